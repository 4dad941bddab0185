"""Dense versions, wired: the `.mar` exporter the producer's `publish_dense` calls (TorchScript
and `inference.archive`), and the TorchServe management client the loader's dense sync uses.

The producer and the loader do not import `inference` (the layers contract): this module, on
the app layer, hands them what they need.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from persia_inc.inference.spec import ModelSpec
    from persia_inc.producer.core import IncrementalProducer
    from persia_inc.producer.dense import DenseExporter, DenseVersion
    from persia_inc.storage import ObjectStore

MAR_MODEL_NAME = "dense"  # the archive's internal name; TorchServe registers it under its own


def mar_exporter(spec: ModelSpec, *, config_file: str | os.PathLike[str] | None = None) -> DenseExporter:
    """exporter(dense_module, version, export_dir) -> `.mar`: the module saved with TorchScript
    (its training mode restored after), archived with the handler, `spec` and, if given,
    `config_file` (checked with `load_config` first), archive version `str(version)`."""
    from persia_inc.config import load_config
    from persia_inc.inference.archive import archive_model
    from persia_inc.inference.model import save_torchscript
    from persia_inc.wiring import MAR_HANDLER

    def export(dense_module: Any, version: int, export_dir: Path) -> Path:
        training = bool(getattr(dense_module, "training", False))
        try:
            pt = save_torchscript(dense_module, export_dir / f"{MAR_MODEL_NAME}.pt")
        finally:
            dense_module.train(training)
        config = None if config_file is None else Path(config_file)
        return archive_model(MAR_MODEL_NAME, pt, spec, export_dir / "mar", handler=MAR_HANDLER,
                             config_file=config, version=str(version), check_config=load_config)

    return export


def publish_mar(producer: IncrementalProducer, dense_module: Any, spec: ModelSpec, *,
                config_file: str | os.PathLike[str] | None = None, version: int | None = None,
                timeout_s: float | None = None) -> DenseVersion:
    """`producer.publish_dense` with the `.mar` exporter of `spec` (see `mar_exporter`)."""
    return producer.publish_dense(dense_module, mar_exporter(spec, config_file=config_file),
                                  version=version, timeout_s=timeout_s)


def rollback_dense(store: ObjectStore, model: str, version: int, management: Any, *,
                   model_name: str, model_store: str | os.PathLike[str]) -> str:
    """Make dense `version` of `model` TorchServe's default for `model_name` again. If TorchServe
    no longer holds it, its `.mar` is fetched from `store`, checked against its manifest, copied
    into `model_store` and registered first. Returns what was done; raises ManifestError,
    ValueError (checksum), FileNotFoundError, or the management client's error."""
    import xxhash

    from persia_inc.packet_format.dense_manifest import (
        DenseManifest,
        dense_manifest_key,
        dense_version_prefix,
    )

    key = dense_manifest_key(model, version)
    manifest = DenseManifest.from_json(store.get(key), where=store.location(key))
    try:
        held = {str(d.get("modelVersion")) for d in management.describe(f"{model_name}/all")}
    except Exception as exc:  # the model is not registered at all: register below
        if getattr(exc, "retriable", False):
            raise
        held = set()
    done = ""
    if str(version) not in held:
        mar_key = dense_version_prefix(model, version) + manifest.mar.path
        data = store.get(mar_key)
        if len(data) != manifest.mar.bytes or xxhash.xxh3_64_hexdigest(data) != manifest.mar.checksum:
            raise ValueError(f"{store.location(mar_key)} does not match its manifest (size or checksum)")
        name = f"{model_name}.v{version:012d}.mar"
        folder = Path(model_store)
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f".{name}.partial"
        partial.write_bytes(data)
        os.replace(partial, folder / name)
        management.register(name, model_name)
        done = "registered again from storage and "
    management.set_default(model_name, str(version))
    return f"dense version {version} of {model} {done}made the default of TorchServe model {model_name}"


def grpc_management(address: str, *, timeout_s: float = 180.0) -> Any:
    """TorchServe's gRPC management client at `address` (the dense sync's `management`)."""
    from persia_inc.inference.management import GrpcManagement

    return GrpcManagement(address, timeout_s=timeout_s)


__all__ = ["MAR_MODEL_NAME", "grpc_management", "mar_exporter", "publish_mar", "rollback_dense"]
