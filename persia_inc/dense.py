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


def check_dense_module(dense_module: Any, spec: ModelSpec, rows: int = 4) -> None:
    """ValueError naming the problem unless `dense_module(dense, sparse)`, given dense
    float32[rows, dense_dim] and sparse float32[spec.sparse_shape(rows)], returns `rows`
    finite scores: what the served handler will call it with. Runs in eval mode without
    autograd, on inputs from its own generator (training's random state is untouched), and
    restores the module's training mode."""
    import torch

    generator = torch.Generator().manual_seed(0)
    dense = torch.rand(rows, spec.dense_dim, generator=generator)
    sparse = torch.rand(*spec.sparse_shape(rows), generator=generator)
    what = (f"dense module {type(dense_module).__name__}: forward(dense float32{list(dense.shape)}, "
            f"sparse float32{list(sparse.shape)})")
    training = bool(getattr(dense_module, "training", False))
    try:
        dense_module.eval()
        with torch.no_grad():
            out = dense_module(dense, sparse)
    except Exception as exc:
        raise ValueError(f"{what} failed: {type(exc).__name__}: {exc}. The served module must take "
                         f"(dense, sparse) and return one score per sample (for a bare MLP over their "
                         f"concatenation: persia_inc.inference.model.DenseHead(mlp))") from exc
    finally:
        dense_module.train(training)
    if not isinstance(out, torch.Tensor) or out.numel() != rows:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{what} returned {shape}; serving needs one score per sample ({rows})")
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{what} returned NaN or infinite scores")


def publish_mar(producer: IncrementalProducer, dense_module: Any, spec: ModelSpec, *,
                  config_file: str | os.PathLike[str] | None = None, version: int | None = None,
                  timeout_s: float | None = None) -> DenseVersion:
    """`producer.publish_dense` with the `.mar` exporter of `spec` (see `mar_exporter`), after
    `check_dense_module`: a module that cannot serve `spec` is refused here, in training."""
    check_dense_module(dense_module, spec)
    return producer.publish_dense(dense_module, mar_exporter(spec, config_file=config_file),
                                  version=version, timeout_s=timeout_s)


def _held(management: Any, model_name: str) -> dict[str, str]:
    """TorchServe's registered versions of the model -> the .mar each came from ({} if none)."""
    try:
        return {str(d.get("modelVersion")): str(d.get("modelUrl", ""))
                for d in management.describe(model_name, "all")}
    except Exception as exc:
        if getattr(exc, "not_found", False):
            return {}
        raise


def rollback_dense(store: ObjectStore, model: str, version: int, management: Any, *,
                   model_name: str, model_store: str | os.PathLike[str], pin: bool = True) -> str:
    """Make dense `version` of `model` TorchServe's default for `model_name` again, whether
    TorchServe still holds it or not (then its `.mar` is fetched from `store`, checked against
    its manifest, copied into `model_store` and registered first). With `pin` (the default) the
    version is pinned first (`{model}/_dense/pin.json`): the loader's dense sync then activates
    no other version until `unpin_dense`. Returns what was done; raises ManifestError,
    ValueError (checksum, a version TorchServe holds from another archive), FileNotFoundError,
    or RuntimeError naming the model, the version and TorchServe's address."""
    import xxhash

    from persia_inc.loader.dense_sync import mar_file_name
    from persia_inc.packet_format.dense_manifest import (
        DenseManifest,
        DensePin,
        dense_manifest_key,
        dense_pin_key,
        dense_version_prefix,
    )

    key = dense_manifest_key(model, version)
    manifest = DenseManifest.from_json(store.get(key), where=store.location(key))
    name = mar_file_name(model_name, version)
    where = (f"dense version {version} of {model} (TorchServe model {model_name!r} at "
             f"{getattr(management, 'address', '?')})")
    pin_key = dense_pin_key(model)
    before = store.get(pin_key) if store.exists(pin_key) else None
    try:
        held = _held(management, model_name)
        if str(version) in held and held[str(version)] != name:
            raise ValueError(f"{where}: TorchServe holds it from {held[str(version)]}, not from {name}")
        if pin:
            store.put(pin_key, DensePin(version, reason="persia-inc rollback").to_json())
        done = ""
        if str(version) not in held:
            path = Path(model_store) / name
            if not path.is_file() or xxhash.xxh3_64_hexdigest(path.read_bytes()) != manifest.mar.checksum:
                mar_key = dense_version_prefix(model, version) + manifest.mar.path
                data = store.get(mar_key)
                if len(data) != manifest.mar.bytes or xxhash.xxh3_64_hexdigest(data) != manifest.mar.checksum:
                    raise ValueError(f"{store.location(mar_key)} does not match its manifest "
                                     "(size or checksum)")
                path.parent.mkdir(parents=True, exist_ok=True)
                partial = path.with_name(f".{name}.partial")
                partial.write_bytes(data)
                os.replace(partial, path)  # TorchServe does not hold this version: nobody loads from it
            try:
                management.register(name, model_name)
            except Exception:
                if _held(management, model_name).get(str(version)) != name:  # registered meanwhile?
                    raise
            done = "registered again from storage and "
        management.set_default(model_name, str(version))
    except (ValueError, FileNotFoundError):
        _restore_pin(store, pin_key, before, pin)
        raise
    except Exception as exc:
        _restore_pin(store, pin_key, before, pin)
        raise RuntimeError(f"{where}: {exc}") from exc
    pinned = ("; pinned: the dense sync activates no other version until `persia-inc rollback --unpin`"
              if pin else "")
    return f"{where} {done}made the default{pinned}"


def _restore_pin(store: ObjectStore, key: str, before: bytes | None, pinned: bool) -> None:
    if not pinned:
        return
    if before is None:
        store.delete(key)
    else:
        store.put(key, before)


def unpin_dense(store: ObjectStore, model: str) -> str:
    """Remove the rollback's pin: the dense sync makes the newest ready version the default."""
    from persia_inc.packet_format.dense_manifest import DensePin, dense_pin_key

    key = dense_pin_key(model)
    if not store.exists(key):
        return f"dense versions of {model} were not pinned"
    pin = DensePin.from_json(store.get(key), where=store.location(key))
    store.delete(key)
    return (f"unpinned version {pin.version} of {model}: the dense sync makes the newest ready "
            f"version the default at its next round")


def grpc_management(address: str, *, timeout_s: float = 180.0) -> Any:
    """TorchServe's gRPC management client at `address` (the dense sync's `management`)."""
    from persia_inc.inference.management import GrpcManagement

    return GrpcManagement(address, timeout_s=timeout_s)


def management_client(address: str, frontend: str = "torchserve", *, timeout_s: float = 180.0) -> Any:
    """The dense sync's and rollback's `management` for `frontend`: TorchServe's gRPC
    management API, or the kserve frontend's TorchServe-shaped REST management routes
    (`inference.oip_http`, at http://ADDRESS/persia)."""
    if frontend == "kserve":
        from persia_inc.inference.management import HttpManagement

        client = HttpManagement(f"http://{address}/persia", timeout_s=timeout_s)
        client.address = address  # type: ignore[attr-defined]
        return client
    return grpc_management(address, timeout_s=timeout_s)


def version_probe(address: str, *, log_dir: str = "", frontend: str = "torchserve") -> Any:
    """The dense sync's validator: one request shaped by the version's spec, to that version
    alone: TorchServe's gRPC inference API at `address` (`inference.validate.VersionProbe`),
    or the kserve frontend's REST host:port (`OipVersionProbe`, its v2 versioned infer)."""
    if frontend == "kserve":
        from persia_inc.inference.validate import OipVersionProbe

        return OipVersionProbe(address)
    from persia_inc.inference.validate import VersionProbe

    return VersionProbe(address, log_dir=log_dir)


__all__ = ["MAR_MODEL_NAME", "check_dense_module", "grpc_management", "management_client", "mar_exporter",
           "publish_mar",
           "rollback_dense", "unpin_dense", "version_probe"]
