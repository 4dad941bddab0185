"""Publish the dense part of a model as one version, cut exactly against the sparse stream.

`publish_version` (what `IncrementalProducer.publish_dense` runs) flushes the producer's
sparse buffer and waits until every packet is stored, records the position of the last stored
cut of each of the producer's streams, has the `exporter` write the dense part (TorchScript +
`.mar`; the app's `persia_inc.dense` builds one from `inference`, which this layer does not
import), then stores `{model}/_dense/{version:012d}/model.mar` and, LAST, its `manifest.json`
(`packet_format.dense_manifest`): a version without a manifest is incomplete and ignored.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import xxhash

from persia_inc.packet_format import CUT_LANE, Watermark
from persia_inc.packet_format.dense_manifest import (
    DENSE_MAR_NAME,
    DenseArchive,
    DenseManifest,
    check_dense_version,
    dense_manifest_key,
    dense_mar_key,
    dense_prefix,
)
from persia_inc.producer.errors import UnstoredDataError
from persia_inc.storage import ObjectStore

if TYPE_CHECKING:
    from persia_inc.producer.core import IncrementalProducer

log = logging.getLogger(__name__)

DenseExporter = Callable[[Any, int, Path], Path]
"""exporter(dense_module, version, export_dir) -> path of the `.mar` it wrote in export_dir
(the dense part saved with TorchScript and archived with its handler and model spec)."""


@dataclass(frozen=True, slots=True)
class DenseVersion:
    """A published dense version: its manifest and the keys of the manifest and the `.mar`."""

    manifest: DenseManifest
    manifest_key: str
    mar_key: str

    @property
    def version(self) -> int:
        return self.manifest.version


def stored_versions(store: ObjectStore, model: str) -> list[int]:
    """Versions of `model` with any object in storage (complete or not), ascending."""
    prefix = dense_prefix(model)
    found = set()
    for info in store.list(prefix):
        folder = info.key[len(prefix):].partition("/")[0]
        if len(folder) == 12 and folder.isdigit():
            found.add(int(folder))
    return sorted(found)


def publish_version(producer: IncrementalProducer, dense_module: Any, exporter: DenseExporter, *,
                  version: int | None = None, timeout_s: float | None = None) -> DenseVersion:
    """Flush, wait for the packets to be stored, export and store one dense version.

    version: default 1 + the highest version in storage; an explicit one must be higher.
    timeout_s: longest wait for the flushed packets (UnstoredDataError past it).
    Call it between optimizer steps, like `flush`.
    """
    if not producer.enabled:
        raise RuntimeError("publishing a dense version needs an enabled producer (enable_incremental_update)")
    if not producer.flush(wait=True, timeout_s=timeout_s):
        raise UnstoredDataError(producer.writer.pending_rows, producer.tables,
                                "dense version: the sparse packets were not stored in time; "
                                "no dense version published")
    stored = producer.writer.stored
    positions: tuple[Watermark, ...] = ()
    if stored:
        header = stored[-1].header
        positions = (Watermark(table=CUT_LANE, producer=producer.producer_id,
                               generation=header.generation, sequence=header.sequence),)
    store, model = producer.store, producer.model
    existing = stored_versions(store, model)
    highest = existing[-1] if existing else 0
    if version is None:
        version = highest + 1
    elif check_dense_version(version) <= highest:
        raise ValueError(f"dense version {version} is not above the highest in storage ({highest})")
    exported_at_ns = time.time_ns()
    with tempfile.TemporaryDirectory(prefix="persia-dense-") as staging:
        mar_path = Path(exporter(dense_module, version, Path(staging)))
        data = mar_path.read_bytes()
    mar_key = dense_mar_key(model, version)
    store.put(mar_key, data)
    manifest = DenseManifest(
        model=model, version=version, exported_at_ns=exported_at_ns, sparse_positions=positions,
        mar=DenseArchive(path=DENSE_MAR_NAME, bytes=len(data), checksum=xxhash.xxh3_64_hexdigest(data)))
    manifest_key = dense_manifest_key(model, version)
    store.put(manifest_key, manifest.to_json())  # last: its presence means complete
    log.info("published dense version %d of %s (%d bytes) at sparse positions %s", version, model,
             len(data), [f"{w.producer}:{w.generation}-{w.sequence}" for w in positions])
    return DenseVersion(manifest=manifest, manifest_key=manifest_key, mar_key=mar_key)


__all__ = ["DenseExporter", "DenseVersion", "publish_version", "stored_versions"]
