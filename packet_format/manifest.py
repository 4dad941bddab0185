"""The checkpoint manifest: `manifest.json` beside a checkpoint's packet-format part files.

It lists each table's dim, rows and parts, and for each stream the watermark
(generation, sequence) the checkpoint already contains, so a replica bootstraps with
"load checkpoint, then apply every packet after its watermark".

Version 1 keys watermarks by (table, producer): `{"table", "producer", "generation", "sequence"}`.
Version 2 adds per-producer watermarks of the cut lane (packet v2): written as
`{"producer", "generation", "sequence"}` without "table", read back as
`Watermark(table=CUT_LANE, ...)`. Manifests are written as `format_version` (default 2; pass 1
for readers that predate cuts, which refuses cut-lane watermarks); this reader reads both.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from persia_inc.packet_format.cut import CUT_LANE, check_lane
from persia_inc.packet_format.errors import ManifestError
from persia_inc.packet_format.header import check_name, check_position

MANIFEST_VERSION = 2
MANIFEST_VERSIONS = (1, 2)  # what this reader reads
MANIFEST_KIND = "persia-inc-checkpoint"
MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ManifestPart:
    """One part file, its path relative to the checkpoint folder."""

    path: str
    rows: int
    bytes: int
    checksum: str


@dataclass(frozen=True, slots=True)
class ManifestTable:
    dim: int
    rows: int
    parts: tuple[ManifestPart, ...]


@dataclass(frozen=True, slots=True)
class Watermark:
    """The newest packet of one (lane, producer) stream already contained; `table` is a table
    name (packet v1) or `CUT_LANE` (the producer's cuts, packet v2)."""

    table: str
    producer: str
    generation: int
    sequence: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "table", check_lane(self.table))
        check_name("producer", self.producer)
        check_position(self.generation, self.sequence)

    @property
    def position(self) -> tuple[int, int]:
        return (self.generation, self.sequence)


@dataclass(frozen=True, slots=True)
class CheckpointManifest:
    model: str
    tables: dict[str, ManifestTable]
    watermarks: tuple[Watermark, ...] = ()
    created_at_ns: int = field(default_factory=time.time_ns)
    format_version: int = MANIFEST_VERSION

    def to_json(self) -> bytes:
        """The manifest as JSON of `format_version`; ValueError if version 1 would have to carry
        a cut-lane watermark, which it cannot express."""
        if self.format_version not in MANIFEST_VERSIONS:
            raise ValueError(f"format_version {self.format_version!r}, expected one of "
                             f"{MANIFEST_VERSIONS}")
        if self.format_version == 1 and any(w.table == CUT_LANE for w in self.watermarks):
            raise ValueError("a version 1 manifest cannot hold cut-lane watermarks: write version 2")
        record = {
            "kind": MANIFEST_KIND,
            "format_version": self.format_version,
            "model": self.model,
            "created_at_ns": self.created_at_ns,
            "tables": {
                name: {
                    "dim": table.dim,
                    "rows": table.rows,
                    "parts": [
                        {"path": p.path, "rows": p.rows, "bytes": p.bytes, "checksum": p.checksum}
                        for p in table.parts
                    ],
                }
                for name, table in sorted(self.tables.items())
            },
            "watermarks": [_watermark_json(w) for w in self.watermarks],
        }
        return json.dumps(record, indent=2).encode()

    @classmethod
    def from_json(cls, data: bytes | str, *, where: str = MANIFEST_NAME) -> CheckpointManifest:
        """Parse and validate; raises ManifestError naming `where` and the offending key."""
        reader, root = read_manifest_json(data, where, MAX_MANIFEST_BYTES)
        if root.get("kind") != MANIFEST_KIND:
            raise ManifestError(where, f"'kind' must be {MANIFEST_KIND!r}")
        version = root.get("format_version")
        if isinstance(version, bool) or version not in MANIFEST_VERSIONS:
            raise ManifestError(where, f"format_version {version!r}, expected one of "
                                f"{MANIFEST_VERSIONS}")
        tables = {}
        for name, raw in reader.obj(root.get("tables"), "tables").items():
            reader.name("table", name, f"tables.{name}")
            table = reader.obj(raw, f"tables.{name}")
            parts = []
            for i, raw_part in enumerate(reader.list(table.get("parts"), f"tables.{name}.parts")):
                at = f"tables.{name}.parts[{i}]"
                part = reader.obj(raw_part, at)
                path = reader.text(part.get("path"), f"{at}.path")
                if path.startswith("/") or ".." in path.split("/") or "://" in path:
                    raise ManifestError(where, f"{at}.path {path!r} must be relative and inside")
                parts.append(ManifestPart(
                    path=path, rows=reader.count(part.get("rows"), f"{at}.rows"),
                    bytes=reader.count(part.get("bytes"), f"{at}.bytes"),
                    checksum=reader.text(part.get("checksum"), f"{at}.checksum"),
                ))
            rows = reader.count(table.get("rows"), f"tables.{name}.rows")
            if sum(p.rows for p in parts) != rows:
                raise ManifestError(where, f"tables.{name}.rows {rows} != the sum of its parts")
            dim = reader.count(table.get("dim"), f"tables.{name}.dim")
            if dim <= 0:
                raise ManifestError(where, f"tables.{name}.dim must be positive")
            tables[name] = ManifestTable(dim=dim, rows=rows, parts=tuple(parts))
        watermarks = []
        for i, raw in enumerate(reader.list(root.get("watermarks", []), "watermarks")):
            at = f"watermarks[{i}]"
            mark = reader.obj(raw, at)
            if "table" in mark or version == 1:
                lane = reader.name("table", mark.get("table"), f"{at}.table")
            else:
                lane = CUT_LANE
            watermarks.append(reader.watermark(lane, mark, at))
        return cls(
            model=reader.name("model", root.get("model"), "model"),
            tables=tables,
            watermarks=tuple(watermarks),
            created_at_ns=reader.count(root.get("created_at_ns"), "created_at_ns"),
            format_version=version,
        )


def read_manifest_json(data: bytes | str, where: str, max_bytes: int) -> tuple[_Fields, dict]:
    """A manifest's JSON object (size-bounded) and a field reader naming `where` in errors."""
    if len(data) > max_bytes:
        raise ManifestError(where, f"over {max_bytes} bytes")
    try:
        record = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(where, f"not JSON: {exc}") from exc
    reader = _Fields(where)
    return reader, reader.obj(record, "manifest")


def _watermark_json(mark: Watermark) -> dict[str, object]:
    """A watermark's JSON record: a cut-lane one has no "table" (see the module docstring)."""
    record: dict[str, object] = {} if mark.table == CUT_LANE else {"table": mark.table}
    record.update(producer=mark.producer, generation=mark.generation, sequence=mark.sequence)
    return record


class _Fields:
    """Typed field access that names the JSON key in every error."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, key: str, expected: str, value: object) -> ManifestError:
        return ManifestError(self.where, f"{key}: expected {expected}, got {value!r:.80}")

    def obj(self, value: object, key: str) -> dict:
        if not isinstance(value, dict):
            raise self.fail(key, "an object", value)
        return value

    def list(self, value: object, key: str) -> list:
        if not isinstance(value, list):
            raise self.fail(key, "a list", value)
        return value

    def text(self, value: object, key: str) -> str:
        if not isinstance(value, str):
            raise self.fail(key, "a string", value)
        return value

    def count(self, value: object, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.fail(key, "a non-negative integer", value)
        return value

    def watermark(self, lane: str, mark: dict, at: str) -> Watermark:
        """The position of stream (`lane`, mark's producer) recorded at key `at`, checked."""
        producer = self.name("producer", mark.get("producer"), f"{at}.producer")
        generation = self.count(mark.get("generation"), f"{at}.generation")
        sequence = self.count(mark.get("sequence"), f"{at}.sequence")
        try:
            check_position(generation, sequence)
        except ValueError as exc:
            raise ManifestError(self.where, f"{at}: {exc}") from exc
        return Watermark(table=lane, producer=producer, generation=generation, sequence=sequence)

    def name(self, kind: str, value: object, key: str) -> str:
        try:
            return check_name(kind, value)
        except ValueError as exc:
            raise ManifestError(self.where, f"{key}: {exc}") from exc
