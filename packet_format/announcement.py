"""The announcement: a small JSON record that says "this packet is stored" (Kafka value).

Storage is the source of truth; an announcement only rings the doorbell. It repeats the
packet's identity so a loader can order and verify before fetching.

A v2 cut is announced with the same record (version 1): `table` is the cut lane `"~cuts"`,
`rows` and `deleted_rows` its totals over all tables, `checksum` the cut's.
"""

from __future__ import annotations

import builtins
import json
from dataclasses import asdict, dataclass

from persia_inc.packet_format.cut import CutHeader, check_lane
from persia_inc.packet_format.errors import AnnouncementError
from persia_inc.packet_format.header import PacketHeader, check_name, check_position
from persia_inc.packet_format.naming import packet_path

ANNOUNCEMENT_VERSION = 1
MAX_ANNOUNCEMENT_BYTES = 64 * 1024
_STR_FIELDS = ("uri", "model", "table", "producer", "checksum")
_INT_FIELDS = ("format_version", "generation", "sequence", "rows", "deleted_rows", "bytes",
               "created_at_ns")


@dataclass(frozen=True, slots=True)
class Announcement:
    """One stored packet or cut, announced. `bytes` is its size in storage; `table` is the
    stream lane (a table name, or `CUT_LANE` for a cut)."""

    uri: str
    model: str
    table: str
    producer: str
    generation: int
    sequence: int
    rows: int
    deleted_rows: int
    bytes: int
    checksum: str
    created_at_ns: int
    format_version: int = ANNOUNCEMENT_VERSION

    @classmethod
    def for_packet(cls, root: str, header: PacketHeader, size: int) -> Announcement:
        """The announcement of a packet written under `root` with `header` (as written)."""
        return cls(
            uri=packet_path(root, header), model=header.model, table=header.table,
            producer=header.producer, generation=header.generation, sequence=header.sequence,
            rows=header.rows, deleted_rows=header.deleted_rows, bytes=size,
            checksum=header.checksum, created_at_ns=header.created_at_ns,
        )

    @classmethod
    def for_cut(cls, root: str, header: CutHeader, size: int) -> Announcement:
        """The announcement of a cut written under `root` with `header` (as written)."""
        return cls(
            uri=packet_path(root, header), model=header.model, table=header.lane,
            producer=header.producer, generation=header.generation, sequence=header.sequence,
            rows=header.rows, deleted_rows=header.deleted_rows, bytes=size,
            checksum=header.checksum, created_at_ns=header.created_at_ns,
        )

    @property
    def key(self) -> builtins.bytes:
        """Kafka message key: the producer id, so one producer's packets share a partition."""
        return self.producer.encode()

    def to_json(self) -> builtins.bytes:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: builtins.bytes | str, *, where: str = "<announcement>") -> Announcement:
        """Parse and validate; raises AnnouncementError naming `where` and the bad field."""
        if len(data) > MAX_ANNOUNCEMENT_BYTES:
            raise AnnouncementError(where, f"over {MAX_ANNOUNCEMENT_BYTES} bytes")
        try:
            record = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise AnnouncementError(where, f"not JSON: {exc}") from exc
        if not isinstance(record, dict):
            raise AnnouncementError(where, "not a JSON object")
        version = record.get("format_version")
        if version != ANNOUNCEMENT_VERSION:
            raise AnnouncementError(where, f"format_version {version!r}, expected 1")
        unknown = set(record) - set(_STR_FIELDS) - set(_INT_FIELDS)
        if unknown:
            raise AnnouncementError(where, f"unknown fields {sorted(unknown)}")
        for name in _STR_FIELDS:
            if not isinstance(record.get(name), str):
                raise AnnouncementError(where, f"field {name!r} must be a string")
        for name in _INT_FIELDS:
            value = record.get(name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise AnnouncementError(where, f"field {name!r} must be a non-negative integer")
        try:
            for name in ("model", "producer"):
                check_name(name, record[name])
            record["table"] = check_lane(record["table"])
            check_position(record["generation"], record["sequence"])
        except ValueError as exc:
            raise AnnouncementError(where, str(exc)) from exc
        return cls(**record)
