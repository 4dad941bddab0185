"""The loader's dense sync: activate each published dense version in TorchServe only once
every embedding shard holds the sparse positions the version was cut at, and only once it has
answered a real request.

One `ServiceThread` (`persia-inc-dense-sync`) runs a round every `interval_s`:

1. read what TorchServe holds (`describe` of every version and of the default one). That is the
   truth the sync, `/streams`, `status` and the metrics follow, whoever changed it; it is read
   again after every action. A TorchServe that does not answer is flagged (ERROR naming its
   address, `persia_inc_loader_dense_torchserve_up` 0, a health problem) and nothing else is
   done that round;
2. list `{model}/_dense/` and read each new version's `manifest.json` (written last by the
   producer: present = complete), and the operator's pin (`{model}/_dense/pin.json`, written by
   `persia-inc rollback`);
3. a version TorchServe already holds from our archive is adopted as it is (a restarted loader
   never registers again nor deletes anything). Otherwise fetch its `.mar`, check size and
   xxh3-64 against the manifest, copy it into TorchServe's model_store and register it. While
   TorchServe holds no version of the model, registering would serve it at once (TorchServe
   makes a model's first version its default), so the first one is registered only once ready;
4. the newest registered version whose sparse positions every shard holds, and newer than the
   default, is validated (`DenseValidator`: a real request through TorchServe's
   version-specific predictions API) and made the default. Never while pinned;
5. keep the newest `keep_versions` at or below the default registered, unregister older ones
   (`retire_grace_s` after they stopped being the default), and delete a `.mar` copy only once
   TorchServe no longer holds its version.

A version that cannot be used (bad manifest, checksum, TorchServe refuses the archive, the
validation request fails) is quarantined like a bad packet (`Quarantine`: copied aside with a
reason record), counted, logged as an ERROR naming the version and the reason, and skipped:
the default version keeps serving. A call that failed because TorchServe or the embedding
servers were unreachable or busy is retried next round. The management client and the
validator are passed in (the app builds them from `inference`, which this layer does not
import) and closed with the sync.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import xxhash

from persia_inc.embedding_server.client import EmbeddingClient
from persia_inc.foundation.threads import ServiceThread
from persia_inc.loader.dense_state import (
    DenseManagement,
    DenseValidator,
    DenseVersionState,
    TorchServeView,
    digest_of,
    mar_file_name,
    position_json,
    retriable,
    version_key,
)
from persia_inc.loader.fetch import Quarantine
from persia_inc.loader.metrics import LoaderMetrics
from persia_inc.loader.settings import DenseSyncSettings
from persia_inc.packet_format import ManifestError
from persia_inc.packet_format.dense_manifest import (
    DenseManifest,
    DensePin,
    dense_manifest_key,
    dense_pin_key,
    dense_prefix,
    dense_version_of_key,
)
from persia_inc.storage import ObjectStore

log = logging.getLogger(__name__)

Stream = tuple[str, str]  # (lane, producer)
UNREACHABLE_LOG_INTERVAL_S = 30.0
# how log lines and reasons name the frontend a `dense_sync.frontend` setting drives
FRONTEND_NAMES = {"torchserve": "TorchServe", "kserve": "the kserve frontend"}


class DenseSync(ServiceThread):
    """Activates `model`'s dense versions in TorchServe (or the kserve frontend, as
    `settings.frontend` says; log lines and reasons name it) in step with the sparse stream.

    store: incremental_dir; client: the embedding servers (read, not closed here); management:
    TorchServe's management client and validator: its predictions prober (both closed at
    `close()`; no validator: versions are activated unvalidated); quarantine and metrics: the
    loader's.
    """

    def __init__(self, store: ObjectStore, model: str, settings: DenseSyncSettings,
                 management: DenseManagement, client: EmbeddingClient, *,
                 validator: DenseValidator | None = None, quarantine: Quarantine | None = None,
                 metrics: LoaderMetrics | None = None) -> None:
        super().__init__("dense-sync")
        self.store = store
        self.model = model
        self.settings = settings
        self.model_name = settings.model_name or model
        self.model_store = Path(settings.model_store)
        self.address = settings.management_address
        self.frontend = FRONTEND_NAMES.get(settings.frontend, settings.frontend)
        self.frontend_title = self.frontend[:1].upper() + self.frontend[1:]  # at a sentence's start
        self.management = management
        self.validator = validator
        self.client = client
        self.quarantine = quarantine if quarantine is not None else Quarantine(store)
        self.metrics = metrics if metrics is not None else LoaderMetrics(model)
        self.versions: dict[int, DenseVersionState] = {}
        self.active: int | None = None  # TorchServe's default, as last read
        self.view = TorchServeView()
        self.pin: DensePin | None = None
        self.activations: list[dict[str, Any]] = []  # in activation order, for reports
        self.rounds = 0
        self._first_listing = True
        self._set_by_us = ""  # the default this sync set last
        self._unreachable_logged_s = 0.0

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
        """Stop the thread and close the management client and validator; safe to call twice."""
        stopped = super().close(timeout_s)
        for part in (self.management, self.validator):
            try:
                if part is not None:
                    part.close()
            except Exception as exc:  # closing must not raise
                log.warning("dense sync: closing %s: %s", type(part).__name__, exc)
        return stopped

    # ---------------------------------------------------------------------------- round

    def step(self) -> None:
        """One round: read TorchServe, discover, register, validate and activate, retire."""
        try:
            if not self.observe():
                return
            self._discover()
            self._read_pin()
            for state in self._in_order("found"):
                if self.stop.is_set():
                    return
                if self.pin is not None and state.version > self.pin.version:
                    state.waiting_for = [self._pinned_text()]
                    continue
                if not self.view.held and not self._ready(state):  # the first serves once registered
                    break
                if not self._register(state):
                    break  # TorchServe unreachable: later versions wait their turn
            self._activate_newest()
            self._retire()
        finally:
            self._publish_metrics()

    def _in_order(self, state: str) -> list[DenseVersionState]:
        return [v for _, v in sorted(self.versions.items()) if v.state == state]

    def _where(self, version: int | str) -> str:
        return f"version {version} of {self.frontend} model {self.model_name!r} at {self.address}"

    # -------------------------------------------------------------------- TorchServe view

    def observe(self) -> bool:
        """Read what TorchServe holds and serves by default; reconcile the versions' states
        with it. False (and flagged) if TorchServe does not answer."""
        view = self.view
        try:
            try:
                held = {str(d.get("modelVersion")): str(d.get("modelUrl", ""))
                        for d in self.management.describe(self.model_name, "all")}
                described = self.management.describe(self.model_name)
                default = str(described[0].get("modelVersion", "")) if described else ""
            except Exception as exc:
                if not getattr(exc, "not_found", False):
                    raise
                held, default = {}, ""  # the model is not registered at all
        except Exception as exc:
            self._unreachable(exc)
            return False
        if view.down_since_s:
            log.info("dense sync: %s at %s answers again (after %.0f s)", self.frontend, self.address,
                     time.monotonic() - view.down_since_s)
        view.held, view.default, view.answers, view.error = held, default, True, ""
        view.read_at_ns, view.down_since_s = time.time_ns(), 0.0
        self.metrics.dense_torchserve_up.labels(self.model).set(1)
        if default != self._set_by_us and self._set_by_us:
            log.warning("dense sync: %s serves %s by default, set outside the dense sync "
                        "(it had set version %s)", self.frontend, self._where(default or "none"),
                        self._set_by_us)
        self._set_by_us = default
        self._reconcile()
        return True

    def _unreachable(self, exc: BaseException) -> None:
        view, now = self.view, time.monotonic()
        view.answers, view.error = False, f"{type(exc).__name__}: {exc}"
        self.metrics.dense_torchserve_up.labels(self.model).set(0)
        self.metrics.dense_errors.labels(self.model, "torchserve").inc()
        if not view.down_since_s or now - self._unreachable_logged_s >= UNREACHABLE_LOG_INTERVAL_S:
            log.error("dense sync: %s's management API at %s does not answer for model %r: "
                      "%s; the default version cannot be confirmed", self.frontend, self.address,
                      self.model_name, exc)
            self._unreachable_logged_s = now
        view.down_since_s = view.down_since_s or now

    def _reconcile(self) -> None:
        """Versions' states from the view: what TorchServe holds from our archive is registered
        (or active: the default), what it dropped is retired."""
        default = self.view.default
        self.active = int(default) if default.isdigit() and int(default) in self.versions else None
        if self.active is None and default.isdigit():
            state = self._adopt_unknown(int(default))
            self.active = state.version if state is not None else None
        for version, state in self.versions.items():
            url = self.view.held.get(str(version))
            ours = url == self._mar_name(version)
            if state.state == "active" and str(version) != default:
                state.state, state.deactivated_s = ("registered" if ours else "retired"), time.monotonic()
            if ours and state.state in ("registered", "retired", "skipped", "active"):
                if state.manifest is None and not self._load_manifest(state):
                    continue
                state.mar_file = self._mar_name(version)
                state.state = "active" if str(version) == default else "registered"
                if state.state == "active" and not state.activated_at_ns:
                    state.activated_at_ns = time.time_ns()
            elif url is None and state.state == "registered":
                state.state = "retired"
                log.warning("dense sync: %s was unregistered outside the dense sync", self._where(version))

    def _adopt_unknown(self, version: int) -> DenseVersionState | None:
        """TorchServe's default is a version the sync has not listed (yet): read its manifest."""
        if self.view.held.get(str(version)) != self._mar_name(version):
            return None
        state = DenseVersionState(version, state="registered")
        if not self._load_manifest(state):
            return None
        self.versions[version] = state
        return state

    def _mar_name(self, version: int) -> str:
        return mar_file_name(self.model_name, version)

    # ------------------------------------------------------------------------ discovery

    def _load_manifest(self, state: DenseVersionState) -> bool:
        key = dense_manifest_key(self.model, state.version)
        where = self.store.location(key)
        try:
            manifest = DenseManifest.from_json(self.store.get(key), where=where)
            if manifest.version != state.version or manifest.model != self.model:
                raise ManifestError(where, f"version/model: the manifest says {manifest.model} version "
                                    f"{manifest.version}, its key {self.model} version {state.version}")
        except ManifestError as exc:
            self._refuse(state, "manifest", str(exc), [key])
            return False
        except Exception as exc:
            log.warning("dense sync: reading %s failed: %s (retried)", where, exc)
            self.metrics.dense_errors.labels(self.model, "fetch").inc()
            return False
        state.manifest = manifest
        return True

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
                if str(version) not in self.view.held:
                    self.versions[version] = DenseVersionState(
                        version, state="skipped", reason="older than the newest kept at start")
            found = [v for v in found if v not in self.versions]
        self._first_listing = False
        for version in found:
            state = DenseVersionState(version)
            if self._load_manifest(state) or state.state == "refused":
                self.versions[version] = state
        self._reconcile()

    def _read_pin(self) -> None:
        key = dense_pin_key(self.model)
        try:
            pin: DensePin | None = DensePin.from_json(self.store.get(key), where=self.store.location(key))
        except FileNotFoundError:
            pin = None
        except Exception as exc:  # unreadable: keep the last known pin
            log.warning("dense sync: reading the pin %s failed: %s", self.store.location(key), exc)
            return
        if pin != self.pin:
            log.info("dense sync: %s", self._pinned_text(pin) if pin else
                     f"unpinned; the newest ready version of {self.model} becomes the default")
        self.pin = pin

    def _pinned_text(self, pin: DensePin | None = None) -> str:
        pin = pin or self.pin
        assert pin is not None
        return (f"pinned to version {pin.version} by a rollback (`persia-inc rollback --unpin` "
                f"lets newer versions activate)")

    # ------------------------------------------------------------------------- register

    def _register(self, state: DenseVersionState) -> bool:
        """Adopt, or fetch, verify, copy and register one version; False if TorchServe or
        storage should be retried later (the version stays `found`)."""
        manifest = state.manifest
        assert manifest is not None
        version = state.version
        name = self._mar_name(version)
        held = self.view.held.get(str(version))
        if held is not None and held != name:
            state.state, state.reason = "refused", (
                f"{self.frontend_title} already holds {self._where(version)} from {held}, not from our "
                f"{name}: unregister it there or publish a newer version")
            log.error("dense version %d of %s refused (conflict): %s", version, self.model, state.reason)
            self.metrics.dense_refused.labels(self.model, "conflict").inc()
            return True
        mar_key = f"{dense_manifest_key(self.model, version).rsplit('/', 1)[0]}/{manifest.mar.path}"
        path = self.model_store / name
        # a copy TorchServe may load from is never rewritten: only a missing or different one
        if (held is None or not path.is_file()) and digest_of(path) != manifest.mar.checksum \
                and not self._copy_mar(state, mar_key, path):
            return state.state == "refused"
        state.mar_file = name
        if held is None:
            try:
                self.management.register(name, self.model_name)
            except Exception as exc:
                if self.observe() and self.view.held.get(str(version)) == name:
                    log.info("dense sync: %s was already registered from %s: adopted",
                             self._where(version), name)
                elif retriable(exc):
                    log.warning("dense sync: registering %s: %s (retried)", self._where(version), exc)
                    self.metrics.dense_errors.labels(self.model, "register").inc()
                    return False
                else:
                    self._refuse(state, "register",
                                 f"{self.frontend_title} refused it ({self._where(version)}, from {name}): "
                                 f"{exc}{self._log_reason(state)}",
                                 [mar_key, dense_manifest_key(self.model, version)])
                    self._remove_copy(state)
                    return True
        else:
            log.info("dense sync: %s is registered already from %s: adopted", self._where(version), name)
        self._ready(state)  # status names what it waits for from the moment it shows pending
        state.state, state.registered_at_ns = "registered", time.time_ns()
        log.info("dense sync: registered %s (%s)", self._where(version), name)
        self.observe()
        if self.active == version and self._validate(state):  # a model's first version serves at once
            self._record_activation(state, None)
        return True

    def _copy_mar(self, state: DenseVersionState, mar_key: str, path: Path) -> bool:
        manifest = state.manifest
        assert manifest is not None
        try:
            data = self.store.get(mar_key)
        except FileNotFoundError:
            self._refuse(state, "missing", f"{self.store.location(mar_key)} is missing",
                         [dense_manifest_key(self.model, state.version)])
            return False
        except Exception as exc:
            log.warning("dense sync: reading %s failed: %s (retried)", self.store.location(mar_key), exc)
            self.metrics.dense_errors.labels(self.model, "fetch").inc()
            return False
        digest = xxhash.xxh3_64_hexdigest(data)
        if len(data) != manifest.mar.bytes or digest != manifest.mar.checksum:
            self._refuse(state, "checksum", f"{self.store.location(mar_key)}: {len(data)} bytes, xxh3 "
                         f"{digest}; the manifest says {manifest.mar.bytes} bytes, {manifest.mar.checksum}",
                         [mar_key, dense_manifest_key(self.model, state.version)])
            return False
        self.model_store.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        partial.write_bytes(data)
        os.replace(partial, path)
        return True

    def _refuse(self, state: DenseVersionState, why: str, reason: str, keys: list[str]) -> None:
        state.state, state.reason, state.waiting_for = "refused", reason, []
        log.error("dense version %d of %s refused (%s): %s; the default version (%s) keeps serving",
                  state.version, self.model, why, reason, self.view.default or "none")
        self.metrics.dense_refused.labels(self.model, why).inc()
        for key in keys:
            self.quarantine.put(key, f"dense version {state.version}: {reason}")

    def _remove_copy(self, state: DenseVersionState) -> None:
        """Delete the version's .mar copy, only once TorchServe is known not to hold it."""
        if state.mar_file and self.observe() and str(state.version) not in self.view.held:
            (self.model_store / state.mar_file).unlink(missing_ok=True)
            state.mar_file = ""

    def _log_reason(self, state: DenseVersionState) -> str:
        reason = getattr(self.validator, "log_reason", None)
        text = reason(self.model_name, str(state.version)) if callable(reason) else ""
        return f"; {self.frontend}'s model log: {text}" if text else ""

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

    def _activate_newest(self) -> None:
        """Validate and make the default the newest ready registered version above the
        default (an older one if the newest is refused); nothing while pinned."""
        candidates = [s for s in reversed(self._in_order("registered"))
                      if self.active is None or s.version > self.active]
        for state in candidates:
            if self.pin is not None:
                state.waiting_for = [self._pinned_text()]
                continue
            if self.stop.is_set() or not self._ready(state):
                continue
            if self._validate(state) and self._activate(state):
                return

    def _validate(self, state: DenseVersionState) -> bool:
        """One real request to this version alone; a failure refuses it (and unregisters it:
        it never was the default, or was the model's only version)."""
        if self.validator is None or state.validated:
            return True
        try:
            self.validator.validate(self.model_name, str(state.version), self.model_store / state.mar_file)
        except Exception as exc:
            if retriable(exc):
                state.waiting_for = [f"the validation request: {exc} (retried)"]
                self.metrics.dense_errors.labels(self.model, "validate").inc()
                return False
            try:  # before it shows as refused: who sees "refused" sees it gone from TorchServe
                self.management.unregister(self.model_name, str(state.version))
            except Exception as unregister_exc:
                log.warning("dense sync: unregistering the refused %s: %s", self._where(state.version),
                            unregister_exc)
            self._refuse(state, "validation", f"a request to {self._where(state.version)} failed: {exc}",
                         [dense_manifest_key(self.model, state.version)])
            self._remove_copy(state)
            return False
        state.validated = True
        log.info("dense sync: %s answered the validation request", self._where(state.version))
        return True

    def _activate(self, state: DenseVersionState) -> bool:
        try:
            self.management.set_default(self.model_name, str(state.version))
        except Exception as exc:
            log.error("dense sync: making %s the default failed: %s (retried)",
                      self._where(state.version), exc)
            self.metrics.dense_errors.labels(self.model, "set_default").inc()
            return False
        previous = self.view.default or None
        self._set_by_us = str(state.version)
        self.observe()
        self._record_activation(state, previous)
        return True

    def _record_activation(self, state: DenseVersionState, previous: str | None) -> None:
        state.activated_at_ns = time.time_ns()
        manifest = state.manifest
        assert manifest is not None
        self.activations.append({
            "version": state.version, "exported_at_ns": manifest.exported_at_ns,
            "sparse_positions": [position_json(w) for w in manifest.sparse_positions],
            "activated_at_ns": state.activated_at_ns})
        log.info("dense sync: %s is the default now (was %s)", self._where(state.version), previous)

    def _retire(self) -> None:
        """Unregister registered versions below the default beyond the newest kept, once
        `retire_grace_s` passed since they stopped being the default (requests in flight)."""
        if self.active is None:
            return
        now = time.monotonic()
        kept = [v for v, s in sorted(self.versions.items())
                if s.state in ("registered", "active") and v <= self.active]
        for version in kept[:-self.settings.keep_versions]:
            state = self.versions[version]
            if self.pin is not None and version == self.pin.version:
                continue
            if state.deactivated_s and now - state.deactivated_s < self.settings.retire_grace_s:
                continue
            try:
                self.management.unregister(self.model_name, str(version))
            except Exception as exc:
                log.warning("dense sync: unregistering %s: %s (retried)", self._where(version), exc)
                self.metrics.dense_errors.labels(self.model, "unregister").inc()
                continue
            state.state = "retired"
            self._remove_copy(state)
            log.info("dense sync: unregistered %s", self._where(version))

    # --------------------------------------------------------------------------- report

    def _publish_metrics(self) -> None:
        m, model = self.metrics, self.model
        m.dense_pending.labels(model).set(len(self.pending()))
        m.dense_active.labels(model).set(self.active or 0)
        if self.active is None:
            return
        manifest = self.versions[self.active].manifest
        assert manifest is not None
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
        active = self.active
        return [v for v, s in sorted(dict(self.versions).items()) if s.state in ("found", "registered")
                and (active is None or v > active)]

    def flags(self) -> list[str]:
        """What must not go unseen: `torchserve-unreachable`, `pinned=N`."""
        out = ["torchserve-unreachable"] if self.view.error else []
        if self.pin is not None:
            out.append(f"pinned={self.pin.version}")
        return out

    def status(self) -> dict[str, Any]:
        """For health and `/streams`: the TorchServe model name, the version TorchServe serves
        by default as last read (with its export and activation times and sparse positions),
        TorchServe's state, the pin, pending versions (with what they wait for), refused ones
        with the reason, and the activations in order."""
        versions, number = dict(self.versions), self.active  # the sync's thread changes them
        active = None
        if number is not None and versions[number].manifest is not None:
            state = versions[number]
            assert state.manifest is not None
            active = {"version": number, "exported_at_ns": state.manifest.exported_at_ns,
                      "activated_at_ns": state.activated_at_ns,
                      "sparse_positions": [position_json(w) for w in state.manifest.sparse_positions]}
        view = self.view
        return {
            "model_name": self.model_name, "active": active, "flags": self.flags(),
            "torchserve": {"address": self.address, "answers": view.answers, "error": view.error,
                           "default": view.default or None, "held": sorted(view.held, key=version_key),
                           "read_at_ns": view.read_at_ns},
            "pinned": None if self.pin is None else {"version": self.pin.version, "at_ns": self.pin.at_ns,
                                                     "reason": self.pin.reason},
            "pending": [{"version": v, "state": versions[v].state,
                         "waiting_for": list(versions[v].waiting_for)}
                        for v in self.pending() if v in versions],
            "refused": [{"version": v, "reason": s.reason} for v, s in sorted(versions.items())
                        if s.state == "refused"],
            "registered": [v for v, s in sorted(versions.items()) if s.state in ("registered", "active")],
            "activations": list(self.activations),
        }


__all__ = ["DenseManagement", "DenseSync", "DenseValidator", "DenseVersionState", "TorchServeView",
           "mar_file_name"]
