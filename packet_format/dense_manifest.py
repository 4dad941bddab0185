"""The dense-version manifest: `{model}/_dense/{version:012d}/manifest.json`, written LAST
beside the version's `model.mar`, so its presence means the version is complete.

It names the version, when it was exported, the archive (relative path, bytes, xxh3-64
checksum) and, for each sparse stream of the producer that published it, the position
(generation, sequence) of the last packet flushed before the dense snapshot: the serving side
makes the version the default only once every embedding shard holds at least that much.

Format version 1:
`{"kind": "persia-inc-dense-version", "format_version": 1, "model", "version",
"exported_at_ns", "mar": {"path", "bytes", "checksum"},
"sparse_positions": [{"lane", "producer", "generation", "sequence"}]}`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from persia_inc.packet_format.cut import check_lane
from persia_inc.packet_format.errors import ManifestError
from persia_inc.packet_format.header import check_name
from persia_inc.packet_format.manifest import MANIFEST_NAME, Watermark, read_manifest_json

DENSE_LANE = "_dense"
DENSE_MANIFEST_KIND = "persia-inc-dense-version"
DENSE_MANIFEST_VERSION = 1
DENSE_MANIFEST_VERSIONS = (1,)
DENSE_MAR_NAME = "model.mar"
MAX_DENSE_VERSION = 10**12 - 1  # twelve digits in the folder name
MAX_DENSE_MANIFEST_BYTES = 1024 * 1024


def dense_prefix(model: str) -> str:
    """`{model}/_dense/`: the folder holding every dense version of `model`."""
    return f"{check_name('model', model)}/{DENSE_LANE}/"


def check_dense_version(version: object) -> int:
    """Return `version` if it is an integer in [1, 10^12 - 1], else raise ValueError."""
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_DENSE_VERSION:
        raise ValueError(f"dense version must be an integer in [1, {MAX_DENSE_VERSION}], got {version!r}")
    return version


def dense_version_prefix(model: str, version: int) -> str:
    """`{model}/_dense/{version:012d}/` (zero-padded: listings sort in version order)."""
    return f"{dense_prefix(model)}{check_dense_version(version):012d}/"


def dense_manifest_key(model: str, version: int) -> str:
    return dense_version_prefix(model, version) + MANIFEST_NAME


def dense_mar_key(model: str, version: int) -> str:
    return dense_version_prefix(model, version) + DENSE_MAR_NAME


def dense_version_of_key(model: str, key: str) -> int | None:
    """The version of a manifest key `{model}/_dense/{version:012d}/manifest.json`, else None."""
    prefix = dense_prefix(model)
    if not key.startswith(prefix) or not key.endswith("/" + MANIFEST_NAME):
        return None
    folder = key[len(prefix):-len(MANIFEST_NAME) - 1]
    if len(folder) != 12 or not folder.isdigit() or int(folder) < 1:
        return None
    return int(folder)


@dataclass(frozen=True, slots=True)
class DenseArchive:
    """The version's `.mar`: path relative to the version folder, size, xxh3-64 hex digest."""

    path: str
    bytes: int
    checksum: str


@dataclass(frozen=True, slots=True)
class DenseManifest:
    """One dense version; `sparse_positions` are Watermarks whose `table` is the lane."""

    model: str
    version: int
    mar: DenseArchive
    sparse_positions: tuple[Watermark, ...] = ()
    exported_at_ns: int = field(default_factory=time.time_ns)
    format_version: int = DENSE_MANIFEST_VERSION

    def __post_init__(self) -> None:
        check_name("model", self.model)
        check_dense_version(self.version)

    def to_json(self) -> bytes:
        record = {
            "kind": DENSE_MANIFEST_KIND,
            "format_version": self.format_version,
            "model": self.model,
            "version": self.version,
            "exported_at_ns": self.exported_at_ns,
            "mar": {"path": self.mar.path, "bytes": self.mar.bytes, "checksum": self.mar.checksum},
            "sparse_positions": [
                {"lane": w.table, "producer": w.producer, "generation": w.generation,
                 "sequence": w.sequence} for w in self.sparse_positions],
        }
        return json.dumps(record, indent=2).encode()

    @classmethod
    def from_json(cls, data: bytes | str, *, where: str = MANIFEST_NAME) -> DenseManifest:
        """Parse and validate; raises ManifestError naming `where` and the offending key."""
        reader, root = read_manifest_json(data, where, MAX_DENSE_MANIFEST_BYTES)
        if root.get("kind") != DENSE_MANIFEST_KIND:
            raise ManifestError(where, f"kind: expected {DENSE_MANIFEST_KIND!r}, "
                                f"got {root.get('kind')!r:.80}")
        fmt = root.get("format_version")
        if isinstance(fmt, bool) or fmt not in DENSE_MANIFEST_VERSIONS:
            raise ManifestError(where, f"format_version: {fmt!r}, expected one of {DENSE_MANIFEST_VERSIONS}")
        version = reader.count(root.get("version"), "version")
        try:
            check_dense_version(version)
        except ValueError as exc:
            raise ManifestError(where, f"version: {exc}") from exc
        mar = reader.obj(root.get("mar"), "mar")
        path = reader.text(mar.get("path"), "mar.path")
        if not path or path.startswith("/") or ".." in path.split("/") or "://" in path:
            raise ManifestError(where, f"mar.path: {path!r} must be relative and inside the version folder")
        checksum = reader.text(mar.get("checksum"), "mar.checksum")
        if len(checksum) != 16 or any(c not in "0123456789abcdef" for c in checksum):
            raise ManifestError(where, "mar.checksum: expected 16 hex digits (xxh3-64), "
                                f"got {checksum!r:.80}")
        positions = []
        for i, raw in enumerate(reader.list(root.get("sparse_positions"), "sparse_positions")):
            at = f"sparse_positions[{i}]"
            mark = reader.obj(raw, at)
            lane = reader.text(mark.get("lane"), f"{at}.lane")
            try:
                check_lane(lane)
            except ValueError as exc:
                raise ManifestError(where, f"{at}.lane: {exc}") from exc
            positions.append(reader.watermark(lane, mark, at))
        streams = [(w.table, w.producer) for w in positions]
        if len(set(streams)) != len(streams):
            raise ManifestError(where, "sparse_positions: a stream is listed twice")
        return cls(
            model=reader.name("model", root.get("model"), "model"),
            version=version,
            mar=DenseArchive(path=path, bytes=reader.count(mar.get("bytes"), "mar.bytes"), checksum=checksum),
            sparse_positions=tuple(positions),
            exported_at_ns=reader.count(root.get("exported_at_ns"), "exported_at_ns"),
            format_version=fmt,
        )


DENSE_PIN_NAME = "pin.json"


def dense_pin_key(model: str) -> str:
    """`{model}/_dense/pin.json`: the operator's pin (`persia-inc rollback`), absent when unpinned."""
    return dense_prefix(model) + DENSE_PIN_NAME


@dataclass(frozen=True, slots=True)
class DensePin:
    """A rollback's pin: `version` stays TorchServe's default and the loader's dense sync
    activates no other version until the pin is removed (`persia-inc rollback --unpin`)."""

    version: int
    at_ns: int = field(default_factory=time.time_ns)
    reason: str = ""

    def __post_init__(self) -> None:
        check_dense_version(self.version)

    def to_json(self) -> bytes:
        return json.dumps({"kind": "persia-inc-dense-pin", "version": self.version,
                           "at_ns": self.at_ns, "reason": self.reason}).encode()

    @classmethod
    def from_json(cls, data: bytes | str, *, where: str = DENSE_PIN_NAME) -> DensePin:
        """Parse; ManifestError naming `where` and the key if it is malformed."""
        try:
            root = json.loads(data)
        except ValueError as exc:
            raise ManifestError(where, f"not JSON: {exc}") from exc
        if not isinstance(root, dict) or root.get("kind") != "persia-inc-dense-pin":
            raise ManifestError(where, "kind: expected 'persia-inc-dense-pin'")
        version, at_ns, reason = root.get("version"), root.get("at_ns", 0), root.get("reason", "")
        if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_DENSE_VERSION:
            raise ManifestError(where, f"version: expected an integer in [1, {MAX_DENSE_VERSION}], "
                                f"got {version!r:.40}")
        if isinstance(at_ns, bool) or not isinstance(at_ns, int) or not isinstance(reason, str):
            raise ManifestError(where, "at_ns must be an integer and reason a string")
        return cls(version, at_ns, reason)


__all__ = [
    "DENSE_LANE",
    "DENSE_MANIFEST_KIND",
    "DENSE_MANIFEST_VERSION",
    "DENSE_MAR_NAME",
    "DENSE_PIN_NAME",
    "DenseArchive",
    "DenseManifest",
    "DensePin",
    "check_dense_version",
    "dense_manifest_key",
    "dense_mar_key",
    "dense_pin_key",
    "dense_prefix",
    "dense_version_of_key",
    "dense_version_prefix",
]
