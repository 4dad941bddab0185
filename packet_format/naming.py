"""Where a packet lives: `{root}/{model}/{table}/{producer}/{generation:010d}-{sequence:012d}.arrow`.

A v2 cut lives in its producer's cut lane: `{root}/{model}/_cuts/{producer}/{gen}-{seq}.arrow`
(`CUT_LANE` in place of the table; no table name can start with '_', so the two never clash).

Zero-padded numbers make a plain sorted listing the apply order, and let a lister resume with
"list after this key" (S3 StartAfter).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from persia_inc.packet_format.cut import CUT_LANE, CutHeader, check_lane
from persia_inc.packet_format.errors import PacketError
from persia_inc.packet_format.header import PacketHeader, Position, check_name, check_position

PACKET_SUFFIX = ".arrow"
_FILE_RE = re.compile(r"^(\d{10})-(\d{12})\.arrow$")


@dataclass(frozen=True, slots=True, order=True)
class PacketId:
    """A packet's identity; ordering is (model, table, producer, generation, sequence).

    `table` is the stream lane: a table name for a v1 packet, `CUT_LANE` for a v2 cut.
    """

    model: str
    table: str
    producer: str
    generation: int
    sequence: int

    def __post_init__(self) -> None:
        check_name("model", self.model)
        check_lane(self.table)
        check_name("producer", self.producer)
        check_position(self.generation, self.sequence)

    @classmethod
    def of(cls, header: PacketHeader | CutHeader) -> PacketId:
        """The identity of a v1 packet or a cut (whose `table` is its lane)."""
        return cls(header.model, header.table, header.producer, header.generation, header.sequence)

    @property
    def stream(self) -> tuple[str, str, str]:
        """(model, table, producer): the stream this packet is ordered within."""
        return (self.model, self.table, self.producer)

    @property
    def position(self) -> Position:
        return (self.generation, self.sequence)

    @property
    def key(self) -> str:
        """The packet's key relative to `incremental_dir`."""
        return packet_key(self.model, self.table, self.producer, self.generation, self.sequence)


def _join(root: str, key: str) -> str:
    return f"{root.rstrip('/')}/{key}" if root else key


def stream_prefix(model: str, table: str | None = None, producer: str | None = None) -> str:
    """Key prefix (ending in '/') of a model, a table or the cut lane, or one producer's stream."""
    parts = [check_name("model", model)]
    if table is not None:
        parts.append(check_lane(table))
        if producer is not None:
            parts.append(check_name("producer", producer))
    return "/".join(parts) + "/"


def packet_key(model: str, table: str, producer: str, generation: int, sequence: int) -> str:
    """Key of a packet relative to `incremental_dir`."""
    check_position(generation, sequence)
    return f"{stream_prefix(model, table, producer)}{generation:010d}-{sequence:012d}{PACKET_SUFFIX}"


def cut_key(model: str, producer: str, generation: int, sequence: int) -> str:
    """Key of a v2 cut relative to `incremental_dir`: `{model}/_cuts/{producer}/{gen}-{seq}.arrow`."""
    return packet_key(model, CUT_LANE, producer, generation, sequence)


def packet_path(root: str, header: PacketHeader | CutHeader) -> str:
    """Full path or URI of the packet `header` describes under `root` (`incremental_dir`)."""
    return _join(root, PacketId.of(header).key)


def parse_packet_path(path: str) -> PacketId:
    """Inverse of `packet_path`: the identity from the last four components of a path or URI
    (a cut's `table` is `CUT_LANE`)."""
    parts = path.rstrip("/").split("/")
    if len(parts) < 4:
        raise PacketError(path, "not a packet path: want .../model/table/producer/GEN-SEQ.arrow")
    model, table, producer, name = parts[-4:]
    match = _FILE_RE.match(name)
    if not match:
        raise PacketError(path, f"file name {name!r} is not GGGGGGGGGG-SSSSSSSSSSSS.arrow")
    try:
        return PacketId(model, table, producer, int(match[1]), int(match[2]))
    except ValueError as exc:
        raise PacketError(path, str(exc)) from exc
