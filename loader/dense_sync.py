"""The loader's dense sync: activate each published dense version in TorchServe only once
every embedding shard holds the sparse positions the version was cut at.

One `ServiceThread` (`persia-inc-dense-sync`) lists `{model}/_dense/` every `interval_s`. For
each new version, in version order:

1. read and validate its `manifest.json` (written last by the producer: present = complete);
2. fetch the `.mar`, check its size and xxh3-64 checksum, copy it into TorchServe's
   model_store and register it (gRPC management API, one initial worker). While no version of
   the model is registered yet, registering would serve it at once (TorchServe makes a
   model's first version its default), so the first one is registered only once it is ready;
3. once every shard's watermark of each stream in `sparse_positions` is at or past the
   position, make it the default version;
4. keep the newest `keep_versions` registered (the active one included), unregister older ones
   (`retire_grace_s` after they stopped being the default, so requests in flight finish).

A version that cannot be used (bad manifest, checksum, TorchServe refuses the archive) is
quarantined like a bad packet (`Quarantine`: copied aside with a reason record, never
destroyed), counted, logged as an ERROR naming the version, and skipped: the previous version
keeps serving. A management call that failed because TorchServe was unreachable or busy is
retried next round. The management client is passed in (the app builds it from
`inference.management`, which this layer does not import) and closed with the sync.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import xxhash

from persia_inc.embedding_server.client import EmbeddingClient
from persia_inc.foundation.threads import ServiceThread
from persia_inc.loader.fetch import Quarantine
from persia_inc.loader.metrics import LoaderMetrics
from persia_inc.loader.settings import DenseSyncSettings
from persia_inc.packet_format import ManifestError, Watermark
from persia_inc.packet_format.dense_manifest import (
    DenseManifest,
    dense_manifest_key,
    dense_prefix,
    dense_version_of_key,
)
from persia_inc.storage import ObjectStore

log = logging.getLogger(__name__)

Stream = tuple[str, str]  # (lane, producer)


class DenseManagement(Protocol):
    """What the dense sync needs of TorchServe's management API (`inference.management`)."""

    def register(self, url: str, model_name: str = "", options: Any = None) -> str: ...

    def set_default(self, model_name: str, version: str) -> str: ...

    def unregister(self, model_name: str, version: str = "") -> str: ...

    def close(self) -> None: ...


@dataclass(slots=True)
class DenseVersionState:
    """One dense version as the sync knows it. state: found, registered, active, retired,
    refused or skipped (older than the newest kept ones when the sync started)."""

    version: int
    manifest: DenseManifest | None = None
    state: str = "found"
    reason: str = ""
    registered_at_ns: int = 0
    activated_at_ns: int = 0
    mar_file: str = ""
    deactivated_s: float = 0.0  # monotonic time it stopped being the default (0: never was)
    waiting_for: list[str] = field(default_factory=list)


def _retriable(exc: BaseException) -> bool:
    """A management error that waiting may fix (TorchServe unreachable or busy)."""
    return bool(getattr(exc, "retriable", False)) or isinstance(exc, ConnectionError | TimeoutError)


def _already_registered(exc: BaseException) -> bool:
    return getattr(exc, "status", None) in ("ALREADY_EXISTS", 409)


class DenseSync(ServiceThread):
    """Activates `model`'s dense versions in TorchServe in step with the sparse stream.

    store: incremental_dir; client: the embedding servers (read, not closed here); management:
    TorchServe's management client (closed at `close()`); quarantine and metrics: the loader's.
    """

    def __init__(self, store: ObjectStore, model: str, settings: DenseSyncSettings,
                 management: DenseManagement, client: EmbeddingClient, *,
                 quarantine: Quarantine | None = None, metrics: LoaderMetrics | None = None) -> None:
        super().__init__("dense-sync")
        self.store = store
        self.model = model
        self.settings = settings
        self.model_name = settings.model_name or model
        self.model_store = Path(settings.model_store)
        self.management = management
        self.client = client
        self.quarantine = quarantine if quarantine is not None else Quarantine(store)
        self.metrics = metrics if metrics is not None else LoaderMetrics(model)
        self.versions: dict[int, DenseVersionState] = {}
        self.active: int | None = None
        self.activations: list[dict[str, Any]] = []  # in activation order, for reports
        self.rounds = 0
        self._first_listing = True

    # ------------------------------------------------------------------------ lifecycle

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.step()
            except Exception as exc:  # one bad round never kills the thread
                log.exception("dense sync of %s: round failed: %s", self.model, exc)
                self.metrics.dense_errors.labels(self.model, "round").inc()
            self.rounds += 1
            self.stop.wait(self.settings.interval_s)

    def close(self, timeout_s: float = 10.0) -> bool:
        """Stop the thread and close the management client; safe to call twice."""
        stopped = super().close(timeout_s)
        try:
            self.management.close()
        except Exception as exc:  # closing must not raise
            log.warning("dense sync: closing the management client: %s", exc)
        return stopped

    # ---------------------------------------------------------------------------- round

    def step(self) -> None:
        """One round: discover, register, activate, retire, publish metrics."""
        self._discover()
        for state in self._in_order("found"):
            if self.stop.is_set():
                return
            first = self.active is None and not self._in_order("registered")
            if first and not self._ready(state):  # the first version serves once registered
                break
            if not self._register(state):
                break  # TorchServe unreachable: later versions wait their turn
        for state in self._in_order("registered"):
            if self.active is not None and state.version < self.active:
                continue
            if self._ready(state):
                self._activate(state)
        self._retire()
        self._publish_metrics()

    def _in_order(self, state: str) -> list[DenseVersionState]:
        return [v for _, v in sorted(self.versions.items()) if v.state == state]

    def _discover(self) -> None:
        try:
            infos = self.store.list(dense_prefix(self.model))
        except Exception as exc:  # storage outage: next round
            log.warning("dense sync: listing %s failed: %s",
                        self.store.location(dense_prefix(self.model)), exc)
            self.metrics.dense_errors.labels(self.model, "list").inc()
            return
        found = sorted(v for v in (dense_version_of_key(self.model, i.key) for i in infos)
                       if v is not None and v not in self.versions)
        if self._first_listing and len(found) > self.settings.keep_versions:
            for version in found[:-self.settings.keep_versions]:
                self.versions[version] = DenseVersionState(version, state="skipped",
                                                           reason="older than the newest kept at start")
            found = found[-self.settings.keep_versions:]
        self._first_listing = False
        for version in found:
            key = dense_manifest_key(self.model, version)
            where = self.store.location(key)
            try:
                data = self.store.get(key)
            except Exception as exc:
                log.warning("dense sync: reading %s failed: %s (retried)", where, exc)
                self.metrics.dense_errors.labels(self.model, "fetch").inc()
                continue
            state = DenseVersionState(version)
            self.versions[version] = state
            try:
                manifest = DenseManifest.from_json(data, where=where)
                if manifest.version != version or manifest.model != self.model:
                    raise ManifestError(where, f"version/model: the manifest says {manifest.model} "
                                        f"version {manifest.version}, its key {self.model} version {version}")
            except ManifestError as exc:
                self._refuse(state, "manifest", str(exc), [key])
                continue
            state.manifest = manifest

    # ------------------------------------------------------------------------- register

    def _register(self, state: DenseVersionState) -> bool:
        """Fetch, verify, copy and register one version; False if TorchServe or storage
        should be retried later (the version stays `found`)."""
        manifest = state.manifest
        assert manifest is not None
        version = state.version
        mar_key = f"{dense_manifest_key(self.model, version).rsplit('/', 1)[0]}/{manifest.mar.path}"
        try:
            data = self.store.get(mar_key)
        except FileNotFoundError:
            self._refuse(state, "missing", f"{self.store.location(mar_key)} is missing",
                         [dense_manifest_key(self.model, version)])
            return True
        except Exception as exc:
            log.warning("dense sync: reading %s failed: %s (retried)", self.store.location(mar_key), exc)
            self.metrics.dense_errors.labels(self.model, "fetch").inc()
            return False
        digest = xxhash.xxh3_64_hexdigest(data)
        if len(data) != manifest.mar.bytes or digest != manifest.mar.checksum:
            self._refuse(state, "checksum", f"{self.store.location(mar_key)}: {len(data)} bytes, xxh3 "
                         f"{digest}; the manifest says {manifest.mar.bytes} bytes, {manifest.mar.checksum}",
                         [mar_key, dense_manifest_key(self.model, version)])
            return True
        name = f"{self.model_name}.v{version:012d}.mar"
        self.model_store.mkdir(parents=True, exist_ok=True)
        partial = self.model_store / f".{name}.partial"
        partial.write_bytes(data)
        os.replace(partial, self.model_store / name)
        state.mar_file = name
        try:
            self.management.register(name, self.model_name)
        except Exception as exc:
            if _already_registered(exc):
                log.info("dense sync: version %d of %s was already registered", version, self.model_name)
            elif _retriable(exc):
                log.warning("dense sync: registering version %d of %s: %s (retried)", version,
                            self.model_name, exc)
                self.metrics.dense_errors.labels(self.model, "register").inc()
                return False
            else:
                self._remove_copy(state)
                self._refuse(state, "register", f"TorchServe refused it: {exc}",
                             [mar_key, dense_manifest_key(self.model, version)])
                return True
        self._ready(state)  # status names what it waits for from the moment it shows pending
        state.state, state.registered_at_ns = "registered", time.time_ns()
        log.info("dense sync: registered version %d of %s in TorchServe (%s)", version, self.model_name, name)
        return True

    def _refuse(self, state: DenseVersionState, why: str, reason: str, keys: list[str]) -> None:
        state.state, state.reason = "refused", reason
        log.error("dense version %d of %s refused (%s): %s; the active version (%s) keeps serving",
                  state.version, self.model, why, reason, self.active)
        self.metrics.dense_refused.labels(self.model, why).inc()
        for key in keys:
            self.quarantine.put(key, f"dense version {state.version}: {reason}")

    def _remove_copy(self, state: DenseVersionState) -> None:
        if state.mar_file:
            (self.model_store / state.mar_file).unlink(missing_ok=True)
            state.mar_file = ""

    # ------------------------------------------------------------------------- activate

    def shard_marks(self) -> list[dict[Stream, tuple[int, int]]] | None:
        """Each shard's watermarks {(lane, producer): (generation, sequence)}, the lowest over
        its replicas that answer; None if no replica of a shard answers (no version activates
        on a guess)."""
        out = []
        for shard in range(self.client.num_shards):
            held: list[dict[Stream, tuple[int, int]]] = []
            for target in self.client.replicas_of(shard):
                try:
                    marks = self.client.shard_watermarks(target)
                except Exception as exc:
                    log.debug("dense sync: shard %d target %d watermarks: %s", shard, target, exc)
                    continue
                held.append({(w.table, w.producer): (w.generation, w.sequence) for w in marks})
            if not held:
                return None
            common = set.intersection(*(set(h) for h in held))
            out.append({s: min(h[s] for h in held) for s in common})
        return out

    def _ready(self, state: DenseVersionState) -> bool:
        """Whether every shard holds each of the version's sparse positions."""
        manifest = state.manifest
        assert manifest is not None
        marks = self.shard_marks()
        if marks is None:
            state.waiting_for = ["a shard does not answer"]
            return False
        state.waiting_for = [
            f"shard {i} {w.table}/{w.producer} at {shard.get((w.table, w.producer))}, needs {w.position}"
            for w in manifest.sparse_positions for i, shard in enumerate(marks)
            if shard.get((w.table, w.producer), (-1, -1)) < w.position]
        return not state.waiting_for

    def _activate(self, state: DenseVersionState) -> None:
        try:
            self.management.set_default(self.model_name, str(state.version))
        except Exception as exc:
            log.error("dense sync: making version %d of %s the default failed: %s (retried)",
                      state.version, self.model_name, exc)
            self.metrics.dense_errors.labels(self.model, "set_default").inc()
            return
        previous = self.active
        if previous is not None and previous in self.versions:
            self.versions[previous].state = "registered"
            self.versions[previous].deactivated_s = time.monotonic()
        state.state, state.activated_at_ns = "active", time.time_ns()
        self.active = state.version
        manifest = state.manifest
        assert manifest is not None
        self.activations.append({
            "version": state.version, "exported_at_ns": manifest.exported_at_ns,
            "sparse_positions": [_position_json(w) for w in manifest.sparse_positions],
            "activated_at_ns": state.activated_at_ns})
        log.info("dense sync: version %d of %s is the default now (was %s)", state.version,
                 self.model_name, previous)

    def _retire(self) -> None:
        """Unregister registered versions below the active one beyond the newest kept, once
        `retire_grace_s` passed since they stopped being the default (requests in flight)."""
        if self.active is None:
            return
        now = time.monotonic()
        kept = [v for v, s in sorted(self.versions.items())
                if s.state in ("registered", "active") and v <= self.active]
        for version in kept[:-self.settings.keep_versions]:
            state = self.versions[version]
            if state.deactivated_s and now - state.deactivated_s < self.settings.retire_grace_s:
                continue
            try:
                self.management.unregister(self.model_name, str(version))
            except Exception as exc:
                log.warning("dense sync: unregistering version %d of %s: %s (retried)", version,
                            self.model_name, exc)
                self.metrics.dense_errors.labels(self.model, "unregister").inc()
                continue
            state.state = "retired"
            self._remove_copy(state)
            log.info("dense sync: unregistered version %d of %s", version, self.model_name)

    # --------------------------------------------------------------------------- report

    def _publish_metrics(self) -> None:
        m, model = self.metrics, self.model
        m.dense_pending.labels(model).set(len(self.pending()))
        if self.active is None:
            return
        manifest = self.versions[self.active].manifest
        assert manifest is not None
        m.dense_active.labels(model).set(self.active)
        m.dense_age.labels(model).set(max(0.0, (time.time_ns() - manifest.exported_at_ns) / 1e9))
        marks = self.shard_marks()
        for w in manifest.sparse_positions:
            held = None if marks is None else [shard.get((w.table, w.producer)) for shard in marks]
            skew = float("nan")
            if held and all(h is not None and h[0] == w.generation for h in held):
                skew = float(min(h[1] for h in held if h is not None) - w.sequence)
            m.dense_skew.labels(model, w.table, w.producer).set(skew)

    def pending(self) -> list[int]:
        """Versions found or registered and newer than the active one, ascending."""
        return [v for v, s in sorted(self.versions.items()) if s.state in ("found", "registered")
                and (self.active is None or v > self.active)]

    def status(self) -> dict[str, Any]:
        """For health and `/streams`: the TorchServe model name, the active version (with its
        export and activation times and sparse positions), pending versions (with what they
        wait for), refused ones with the reason, and the activations in order."""
        active = None
        if self.active is not None:
            state = self.versions[self.active]
            assert state.manifest is not None
            active = {"version": self.active, "exported_at_ns": state.manifest.exported_at_ns,
                      "activated_at_ns": state.activated_at_ns,
                      "sparse_positions": [_position_json(w) for w in state.manifest.sparse_positions]}
        return {
            "model_name": self.model_name, "active": active,
            "pending": [{"version": v, "state": self.versions[v].state,
                         "waiting_for": list(self.versions[v].waiting_for)} for v in self.pending()],
            "refused": [{"version": v, "reason": s.reason} for v, s in sorted(self.versions.items())
                        if s.state == "refused"],
            "registered": [v for v, s in sorted(self.versions.items())
                           if s.state in ("registered", "active")],
            "activations": list(self.activations),
        }


def _position_json(mark: Watermark) -> dict[str, object]:
    return {"lane": mark.table, "producer": mark.producer, "generation": mark.generation,
            "sequence": mark.sequence}


__all__ = ["DenseManagement", "DenseSync", "DenseVersionState"]
