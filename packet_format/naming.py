"""Where a packet lives: `{root}/{model}/{table}/{producer}/{generation:010d}-{sequence:012d}.arrow`.

A v2 cut lives in its producer's cut lane: `{root}/{model}/~cuts/{producer}/{gen}-{seq}.arrow`
(`CUT_LANE` in place of the table; no table name can start with '~', so the two never clash).
Cuts stored under the lane's earlier folder `_cuts` (`LEGACY_CUT_LANE`) parse as the same lane
and keep their key; `stream_listings` lists both folders.

Zero-padded numbers make a plain sorted listing the apply order, and let a lister resume with
"list after this key" (S3 StartAfter).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from persia_inc.packet_format.cut import CUT_LANE, CutHeader, check_lane, lane_folders
from persia_inc.packet_format.errors import PacketError
from persia_inc.packet_format.header import PacketHeader, Position, check_name, check_position

PACKET_SUFFIX = ".arrow"
_FILE_RE = re.compile(r"^(\d{10})-(\d{12})\.arrow$")


@dataclass(frozen=True, slots=True, order=True)
class PacketId:
    """A packet's identity; ordering is (model, lane, producer, generation, sequence).

    `lane` is the stream lane: a table name for a v1 packet, `CUT_LANE` for a v2 cut.
    `folder` is the lane's folder in the key when it is not the lane's own name (a cut stored
    under `LEGACY_CUT_LANE`); it is not part of the identity.
    """

    model: str
    lane: str
    producer: str
    generation: int
    sequence: int
    folder: str = field(default="", compare=False, repr=False)

    def __post_init__(self) -> None:
        check_name("model", self.model)
        lane = check_lane(self.lane)
        if lane != self.lane:
            object.__setattr__(self, "folder", self.folder or self.lane)
            object.__setattr__(self, "lane", lane)
        if self.folder and self.folder not in lane_folders(lane):
            raise ValueError(f"folder {self.folder!r} does not hold lane {lane!r}")
        check_name("producer", self.producer)
        check_position(self.generation, self.sequence)

    @classmethod
    def of(cls, header: PacketHeader | CutHeader) -> PacketId:
        """The identity of a v1 packet (lane: its table) or a cut (lane: `CUT_LANE`)."""
        return cls(header.model, header.table, header.producer, header.generation, header.sequence)

    @property
    def stream(self) -> tuple[str, str, str]:
        """(model, lane, producer): the stream this packet is ordered within."""
        return (self.model, self.lane, self.producer)

    @property
    def position(self) -> Position:
        return (self.generation, self.sequence)

    @property
    def key(self) -> str:
        """The packet's key relative to `incremental_dir` (in its `folder`, if it has one)."""
        return packet_key(self.model, self.folder or self.lane, self.producer, self.generation,
                          self.sequence)


def _join(root: str, key: str) -> str:
    return f"{root.rstrip('/')}/{key}" if root else key


def stream_prefix(model: str, table: str | None = None, producer: str | None = None) -> str:
    """Key prefix (ending in '/') of a model, a table or the cut lane, or one producer's stream.
    `table` is a folder: `LEGACY_CUT_LANE` gives the cut lane's earlier folder."""
    parts = [check_name("model", model)]
    if table is not None:
        check_lane(table)
        parts.append(table)
        if producer is not None:
            parts.append(check_name("producer", producer))
    return "/".join(parts) + "/"


def stream_listings(model: str, lane: str, producer: str,
                    after: str | None = None) -> list[tuple[str, str | None]]:
    """(prefix, start_after) pairs that together list stream (`lane`, `producer`) after the key
    `after` (a key of this stream in any of its folders): one per folder (`lane_folders`)."""
    name = None if after is None else after.rpartition("/")[2]
    prefixes = [stream_prefix(model, folder, producer) for folder in lane_folders(lane)]
    return [(prefix, None if name is None else prefix + name) for prefix in prefixes]


def packet_key(model: str, table: str, producer: str, generation: int, sequence: int) -> str:
    """Key of a packet relative to `incremental_dir`."""
    check_position(generation, sequence)
    return f"{stream_prefix(model, table, producer)}{generation:010d}-{sequence:012d}{PACKET_SUFFIX}"


def cut_key(model: str, producer: str, generation: int, sequence: int) -> str:
    """Key of a v2 cut relative to `incremental_dir`: `{model}/~cuts/{producer}/{gen}-{seq}.arrow`."""
    return packet_key(model, CUT_LANE, producer, generation, sequence)


def packet_path(root: str, header: PacketHeader | CutHeader) -> str:
    """Full path or URI of the packet `header` describes under `root` (`incremental_dir`)."""
    return _join(root, PacketId.of(header).key)


def parse_packet_path(path: str) -> PacketId:
    """Inverse of `packet_path`: the identity from the last four components of a path or URI
    (a cut's `lane` is `CUT_LANE`, also when it is stored under `LEGACY_CUT_LANE`)."""
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
