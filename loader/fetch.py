"""Fetch, verify and quarantine: turning a stored key into a packet we trust, or a record of
why not."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

from persia_inc.packet_format import (
    DEFAULT_LIMITS,
    Packet,
    PacketError,
    PacketId,
    PacketLimits,
    decode_packet,
)
from persia_inc.storage import ObjectStore

log = logging.getLogger(__name__)


class VerificationError(PacketError):
    """A packet that decodes but does not belong here (model, identity, table dim)."""


@dataclass(frozen=True, slots=True)
class Fetched:
    """A verified packet and where it came from. `nbytes`: its size in storage."""

    packet_id: PacketId
    key: str
    packet: Packet
    nbytes: int


def fetch_packet(store: ObjectStore, key: str, expected: PacketId, *,
                 limits: PacketLimits = DEFAULT_LIMITS, dims: dict[str, int] | None = None) -> Fetched:
    """Read `key` and check it: checksum and schema (decode_packet), then that it is the packet
    its name says (model, table, producer, generation, sequence) and that its dim matches the
    table's dim on the servers (`dims`: table -> dim; tables absent there are not checked).

    Raises PacketError (quarantine), FileNotFoundError (gone), StorageError (retried by the
    store first; a retriable one is worth trying later).
    """
    where = store.uri(key)
    source = store.open(key)
    try:
        packet = decode_packet(source, where=where, limits=limits)
        nbytes = _size(source)
    finally:
        if store.kind != "local":  # a local open is a memory map the packet's arrays view
            source.close()
    header = packet.header
    found = PacketId.of(header)
    if found != expected:
        raise VerificationError(where, f"holds packet {found} but its name says {expected}")
    if dims is not None and header.table in dims and dims[header.table] != header.dim:
        raise VerificationError(where, f"dim {header.dim} but table {header.table!r} has dim "
                                f"{dims[header.table]} on the embedding servers")
    return Fetched(expected, key, packet, nbytes)


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
    record beside it, and only then removed from the stream (bytes are never destroyed)."""

    def __init__(self, store: ObjectStore, prefix: str = "") -> None:
        self.store = store
        self.prefix = prefix.strip("/")
        self.records: list[dict[str, object]] = []

    def put(self, key: str, reason: str) -> dict[str, object]:
        """Quarantine the object at `key` for `reason`; never raises (logs instead)."""
        record: dict[str, object] = {"key": key, "uri": self.store.location(key), "reason": reason,
                                     "at_ns": time.time_ns(), "moved_to": ""}
        log.error("QUARANTINED %s: %s", record["uri"], reason)
        if self.prefix:
            target = f"{self.prefix}/{key}"
            try:
                data = self.store.get(key)
                self.store.put(target, data)
                self.store.put(target + ".reason.json", json.dumps(record, sort_keys=True).encode())
                self.store.delete(key)
                record["moved_to"] = self.store.location(target)
            except FileNotFoundError:
                log.warning("quarantine: %s vanished before it could be moved", record["uri"])
            except Exception as exc:  # one bad object never stops the loader
                log.error("quarantine: could not move %s to %s: %s", record["uri"], target, exc)
        self.records.append(record)
        return record
