"""The demo's dense versions: published by the training hook, activated in TorchServe by the
loader child's dense sync.

Activation times come from the dense sync itself (`DenseSync.activations`, served by the
loader's metrics port at `/streams` under `dense`): `activated_at_ns` is the loader's wall
clock right after TorchServe accepted the version as its default. TorchServe's describe-model
answer says which version is the default, not since when, and the store holds only what was
published.
"""

from __future__ import annotations

import json
import logging
import urllib.request
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from persia_inc.foundation.threads import ServiceThread
from persia_inc.foundation.wait import WaitTimeoutError, wait_until

if TYPE_CHECKING:
    from persia_inc.demo.report import Progress
    from persia_inc.producer.torch_hook import DensePublish
    from persia_inc.storage import ObjectStore

log = logging.getLogger(__name__)

ACTIVATION_SOURCE = "loader dense sync (/streams: dense.activations)"


def loader_dense_status(url: str, timeout_s: float = 2.0) -> dict[str, Any] | None:
    """The loader's dense-sync status (`DenseSync.status()`) from its `/streams` at `url`
    (http://127.0.0.1:PORT); None when the loader does not answer (yet) or runs no dense sync."""
    try:
        with urllib.request.urlopen(f"{url}/streams", timeout=timeout_s) as response:
            body = json.loads(response.read())
    except (OSError, ValueError) as exc:  # not up yet, busy, or a torn answer: ask again later
        log.debug("loader /streams at %s: %s", url, exc)
        return None
    dense = body.get("dense") if isinstance(body, dict) else None
    return dense if isinstance(dense, dict) else None


class DenseWatcher:
    """Polls the loader's dense-sync status every `poll_s` for the live display (the active
    version) and keeps the last answer. start / stop."""

    def __init__(self, url: str, progress: Progress, poll_s: float = 1.0) -> None:
        self.url = url
        self.progress = progress
        self.poll_s = poll_s
        self.status: dict[str, Any] | None = None
        self._thread = ServiceThread("demo-dense-watch", self._run)

    def start(self) -> DenseWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop polling (bounded; safe to call twice)."""
        self._thread.close(timeout_s=5)

    def _run(self) -> None:
        while not self._thread.stop.is_set():
            self.poll()
            self._thread.stop.wait(self.poll_s)

    def poll(self) -> dict[str, Any] | None:
        """Ask once; update the progress' active version; the status or None."""
        status = loader_dense_status(self.url)
        if status is not None:
            self.status = status
            active = status.get("active") or {}
            self.progress.dense_active = int(active.get("version") or 0)
            self.progress.dense_activated = len(status.get("activations") or [])
        return status

    def wait_activated(self, version: int, timeout_s: float) -> bool:
        """Wait until `version` (or a later one) was activated; False after `timeout_s`."""
        def activated() -> bool:
            status = self.poll()
            return status is not None and any(a.get("version", 0) >= version
                                              for a in status.get("activations") or [])

        try:
            return wait_until(activated, f"dense version {version} to be activated",
                              timeout_s=timeout_s, interval_s=0.2)
        except WaitTimeoutError:
            return False

    def activations(self) -> list[dict[str, Any]]:
        """The dense sync's activations in order, as last seen."""
        return list((self.status or {}).get("activations") or [])

    def active_version(self) -> int | None:
        """The version TorchServe serves by default, as last seen (None: none activated)."""
        active = (self.status or {}).get("active") or {}
        return int(active["version"]) if active.get("version") else None


def dense_versions_report(published: Sequence[DensePublish],
                          activations: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The report's `dense_versions`: one entry per published version, in order: version,
    exported_at_ns, sparse_positions (lane, producer, generation, sequence), activated_at_ns
    (the first activation by the loader's dense sync; None when it never activated) and
    publish_ms (how long the training thread waited for the publish)."""
    activated: dict[int, int] = {}
    for record in activations:
        activated.setdefault(int(record["version"]), int(record["activated_at_ns"]))
    out = []
    for done in published:
        if done.version is None:
            continue
        manifest = done.version.manifest
        out.append({
            "version": manifest.version, "exported_at_ns": manifest.exported_at_ns,
            "sparse_positions": [{"lane": w.table, "producer": w.producer,
                                  "generation": w.generation, "sequence": w.sequence}
                                 for w in manifest.sparse_positions],
            "activated_at_ns": activated.get(manifest.version),
            "publish_ms": round(done.seconds * 1e3, 1),
        })
    return out


def dense_summary(published: Sequence[DensePublish], versions: Sequence[dict[str, Any]],
                  every_s: float) -> dict[str, Any]:
    """The report's `dense` object: every_s, published / activated / failed counts, the
    training thread's wait per publish (p50 / max ms), seconds from export to activation
    (p50 / max), the failures' reasons and where activation times come from."""
    publish_ms = [d.seconds * 1e3 for d in published]
    lag_s = [(v["activated_at_ns"] - v["exported_at_ns"]) / 1e9 for v in versions
             if v["activated_at_ns"] is not None]

    def stats(values: list[float], digits: int) -> dict[str, float]:
        if not values:
            return {}
        return {"p50": round(float(np.percentile(values, 50)), digits),
                "max": round(float(np.max(values)), digits)}

    return {
        "every_s": every_s, "published": len(versions),
        "activated": sum(v["activated_at_ns"] is not None for v in versions),
        "failed": sum(d.version is None for d in published),
        "failures": [d.error for d in published if d.version is None],
        "publish_ms": stats(publish_ms, 1), "export_to_active_s": stats(lag_s, 2),
        "activation_source": ACTIVATION_SOURCE,
    }


def load_dense_version(store: ObjectStore, model: str, version: int, folder: Path) -> Any:
    """The TorchScript dense part inside dense `version`'s `.mar` in `store` (the bytes
    TorchServe loaded), written to `folder` and loaded; FileNotFoundError if there is none."""
    from persia_inc.inference.model import load_torchscript
    from persia_inc.packet_format.dense_manifest import dense_mar_key

    mar = folder / f"dense-v{version}.mar"
    mar.write_bytes(store.get(dense_mar_key(model, version)))
    with zipfile.ZipFile(mar) as archive:
        names = [n for n in archive.namelist() if n.endswith(".pt") and "/" not in n]
        if not names:
            raise FileNotFoundError(f"{mar} holds no TorchScript .pt file")
        pt = folder / f"dense-v{version}.pt"
        pt.write_bytes(archive.read(names[0]))
    return load_torchscript(pt)


__all__ = ["ACTIVATION_SOURCE", "DenseWatcher", "dense_summary", "dense_versions_report",
           "load_dense_version", "loader_dense_status"]
