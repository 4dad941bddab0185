"""Fetch, verify and quarantine: turning a stored key into a packet we trust, or a record of
why not.

A packet is judged only once its file has settled: a failed check on a file that changed while
it was read, or was modified less than `settle_s` ago (a copy written in place, not by rename),
is `NotSettledError` (retried later), never a quarantine. The quarantine copies the judged
bytes and removes the original only if it still holds exactly those bytes; otherwise it leaves
it to be judged again. Non-finite rows (NaN, Inf) are refused unless `allow_non_finite`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import xxhash

from persia_inc.packet_format import (
    DEFAULT_LIMITS,
    Cut,
    PacketError,
    PacketId,
    PacketLimits,
    decode_cut,
)
from persia_inc.storage import ObjectStore, TransientStorageError
from persia_inc.storage.base import NotAnObjectError, ObjectStat

log = logging.getLogger(__name__)

__all__ = ["Fetched", "Judged", "NonFiniteError", "NotAnObjectError", "NotSettledError",
           "Quarantine", "VerificationError", "fetch_packet", "first_non_finite"]


class VerificationError(PacketError):
    """A packet that decodes but does not belong here (model, identity, table dim)."""


class NonFiniteError(VerificationError):
    """A packet with NaN or Inf in its rows (refused unless `allow_non_finite`)."""


class NotSettledError(TransientStorageError):
    """A packet failed its checks while its file was still changing: not judged yet, retried."""


@dataclass(frozen=True, slots=True)
class Judged:
    """The bytes a verdict was reached on: their xxh3-64 digest, and the object's stat then
    (None where the store publishes whole objects). Attached to a PacketError as `judged`."""

    digest: str
    stat: ObjectStat | None


@dataclass(frozen=True, slots=True)
class Fetched:
    """A verified packet (a cut: a v1 packet reads as a cut of one table) and where it came
    from. `nbytes`: its size in storage; `fetched_at_ns`: wall time its checks passed."""

    packet_id: PacketId
    key: str
    packet: Cut
    nbytes: int
    fetched_at_ns: int = 0


def first_non_finite(rows: np.ndarray) -> tuple[int, int] | None:
    """(index of the first row holding a NaN or Inf, count of such rows) of float32[n, dim]
    `rows`, or None when every value is finite. Vectorized: one pass when all is well."""
    if rows.size == 0 or bool(np.isfinite(rows).all()):
        return None
    bad = ~np.isfinite(rows).all(axis=1)
    return int(np.argmax(bad)), int(bad.sum())


def fetch_packet(store: ObjectStore, key: str, expected: PacketId, *,
                 limits: PacketLimits = DEFAULT_LIMITS, dims: dict[str, int] | None = None,
                 allow_non_finite: bool = False, settle_s: float = 0.0,
                 wall_clock: Callable[[], float] = time.time) -> Fetched:
    """Read `key` and check it: checksum and schema (decode_cut: packet v2 or v1), then that it
    is the packet its name says (model, lane, producer, generation, sequence), that each
    table's dim matches the table's dim on the servers (`dims`: table -> dim; tables absent
    there are not checked), and that every row is finite (unless `allow_non_finite`).

    A failed check on a file that changed while it was read or was modified less than
    `settle_s` ago (where the store can tell: local disk) raises NotSettledError instead.

    Raises PacketError (quarantine; its `judged` attribute says which bytes), NotSettledError
    (try later), FileNotFoundError (gone), NotAnObjectError (a symlink, FIFO, ...: never read),
    StorageError (retried by the store first; a retriable one is worth trying later).
    """
    where = store.uri(key)
    before = store.stat(key)
    source = store.open(key)
    try:
        try:
            packet = decode_cut(source, where=where, limits=limits)
            nbytes = _size(source)
            _verify(packet, where, expected, dims, allow_non_finite)
        except PacketError as exc:
            after = store.stat(key)
            if before is not None and after is not None:
                age_s = wall_clock() - after.mtime_ns / 1e9
                if after != before or age_s < settle_s:
                    raise NotSettledError(where, f"failed its checks ({exc.reason}) while still "
                                          f"changing (modified {max(age_s, 0.0):.2f} s ago, "
                                          f"settle time {settle_s:g} s): judged once it "
                                          "settles") from exc
            exc.judged = Judged(_digest(source), after)  # type: ignore[attr-defined]
            raise
    finally:
        source.close()  # a local reader's bytes stay alive while the packet's arrays view them
    return Fetched(expected, key, packet, nbytes, time.time_ns())


def _verify(packet: Cut, where: str, expected: PacketId, dims: dict[str, int] | None,
            allow_non_finite: bool) -> None:
    found = PacketId.of(packet.header)
    if found != expected:
        raise VerificationError(where, f"holds packet {found} but its name says {expected}")
    for table in packet.tables:
        if dims is not None and table.name in dims and dims[table.name] != table.dim:
            raise VerificationError(where, f"dim {table.dim} but table {table.name!r} has dim "
                                    f"{dims[table.name]} on the embedding servers")
        if not allow_non_finite:
            bad = first_non_finite(table.embeddings)
            if bad is not None:
                index, count = bad
                raise NonFiniteError(
                    where, f"table {table.name!r}: {count} of {table.signs.size} rows hold NaN "
                    f"or Inf, the first at sign {int(table.signs[index])} (set "
                    "persia_inc.loader.allow_non_finite to apply them)")


def _digest(source: object) -> str:
    try:
        source.seek(0)  # type: ignore[attr-defined]
        return xxhash.xxh3_64_hexdigest(source.read())  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return ""


def _size(source: object) -> int:
    try:
        return int(source.size())  # type: ignore[attr-defined]  # pyarrow files
    except (AttributeError, TypeError, OSError):
        try:
            return int(source.seek(0, 2))  # type: ignore[attr-defined]
        except (AttributeError, OSError, ValueError):
            return 0


class Quarantine:
    """Where packets that fail verification go: always logged and kept in `records`; with a
    `prefix`, the packet is copied to `{prefix}/{key}` with a `{prefix}/{key}.reason.json`
    record beside it, and only then removed from the stream. Bytes are never destroyed: the
    original is removed only if it still holds the judged bytes (same digest, same stat before
    and after the copy); otherwise it is left in place and the record says `changed` (the
    caller offers it again). Symlinks, FIFOs and the like are never read (the store refuses),
    so nothing from outside `incremental_dir` is ever copied in."""

    def __init__(self, store: ObjectStore, prefix: str = "") -> None:
        self.store = store
        self.prefix = prefix.strip("/")
        self.records: list[dict[str, object]] = []

    def put(self, key: str, reason: str, judged: Judged | None = None) -> dict[str, object]:
        """Quarantine the object at `key` for `reason`; never raises (logs instead).
        judged: the bytes the verdict was reached on (fetch_packet attaches it to its error)."""
        record: dict[str, object] = {"key": key, "uri": self.store.location(key), "reason": reason,
                                     "at_ns": time.time_ns(), "moved_to": "", "changed": False}
        if self.prefix:
            target = f"{self.prefix}/{key}"
            try:
                self._move(key, target, record, judged)
            except FileNotFoundError:
                log.warning("quarantine: %s vanished before it could be moved", record["uri"])
            except Exception as exc:  # one bad object never stops the loader
                log.error("quarantine: could not move %s to %s: %s", record["uri"], target, exc)
        if record["changed"]:
            log.warning("NOT QUARANTINED %s: its bytes changed since they were judged (%s); "
                        "left in place to be judged again", record["uri"], reason)
        else:
            log.error("QUARANTINED %s: %s", record["uri"], reason)
            self.records.append(record)
        return record

    def _move(self, key: str, target: str, record: dict[str, object], judged: Judged | None) -> None:
        first = self.store.stat(key)
        if judged is not None and judged.stat is not None and first != judged.stat:
            record["changed"] = True
            return
        data = self.store.get(key)
        if judged is not None and judged.digest and xxhash.xxh3_64_hexdigest(data) != judged.digest:
            record["changed"] = True
            return
        self.store.put(target, data)
        self.store.put(target + ".reason.json", json.dumps(
            {k: v for k, v in record.items() if k != "changed"}, sort_keys=True).encode())
        if self.store.stat(key) != first:  # rewritten while copied: leave it, drop our copy
            record["changed"] = True
            for made in (target, target + ".reason.json"):
                self.store.delete(made)
            return
        self.store.delete(key)
        record["moved_to"] = self.store.location(target)
