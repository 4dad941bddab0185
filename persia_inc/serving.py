"""TorchServe serving one .mar on 127.0.0.1: what `persia-inc serve` and the demo both run.

`ServedModel` starts TorchServe (`inference.local.LocalTorchServe`), registers the .mar and
waits until a worker is READY; its handler reaches the embedding servers of the configuration
it is given (PERSIA_INC_CONFIG).
"""

from __future__ import annotations

import json
import threading
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from persia_inc.inference.local import LocalTorchServe


class ServeError(RuntimeError):
    """The model could not be registered or did not come up."""


@dataclass(frozen=True)
class ServeSettings:
    """How `ServedModel` runs TorchServe. workers / batch_size / max_batch_delay_ms: the
    model's registration (batch_size 1: answers bit for bit as `PersiaInference`);
    start_timeout_s: how long TorchServe and a worker get to come up; token_auth: TorchServe's
    token authorization; ports: `inference.local.PORT_NAMES` -> port (missing or 0: a free
    port); env: extra environment for TorchServe and its workers (e.g. OMP_NUM_THREADS)."""

    workers: int = 1
    batch_size: int = 1
    max_batch_delay_ms: int = 5
    start_timeout_s: float = 120.0
    token_auth: bool = False
    ports: Mapping[str, int] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("workers", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_batch_delay_ms < 0 or self.start_timeout_s <= 0:
            raise ValueError("--max-batch-delay-ms must be >= 0 and --start-timeout-s > 0")


class ServedModel:
    """TorchServe (`LocalTorchServe`, every address on 127.0.0.1) serving one .mar whose
    handler reaches the embedding servers of `config_path` (given as PERSIA_INC_CONFIG);
    start / close / with. What `persia-inc serve` and `persia-inc demo` run.

    `mar` sits in the model store (its folder); TorchServe's config and logs go to `workdir`.
    Raises ValueError if `mar` is not a model archive."""

    def __init__(self, config_path: Path, mar: Path, workdir: Path,
                 settings: ServeSettings | None = None) -> None:
        from persia_inc.inference.local import LocalTorchServe
        from persia_inc.inference.spec import CONFIG_ENV

        self.settings = settings or ServeSettings()
        self.mar = mar
        self.model_name = model_name_of(mar)
        self.server = LocalTorchServe(
            workdir, env={CONFIG_ENV: str(config_path), **self.settings.env},
            model_store=mar.parent, ports=self.settings.ports,
            disable_token_authorization="false" if self.settings.token_auth else "true")
        self._closed = False

    @property
    def grpc_target(self) -> str:
        """host:port of TorchServe's gRPC inference API."""
        return self.server.grpc_inference_target

    def start(self, cancel: threading.Event | None = None) -> ServedModel:
        """Start TorchServe, register the .mar and wait until a worker is READY. On any
        failure (TorchServeError, ServeError, StartCancelledError when `cancel` is set, or
        an interrupt) TorchServe is stopped before the error goes on."""
        if self._closed:
            raise RuntimeError("this TorchServe was stopped; start a new one")
        try:
            self.server.workdir.mkdir(parents=True, exist_ok=True)
            self.server.start(self.settings.start_timeout_s, cancel=cancel)
            register_model(self.server, self.mar.name, self.model_name, self.settings)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop TorchServe and its workers, by PID (bounded; safe to call twice)."""
        self._closed = True
        self.server.stop()

    def __enter__(self) -> ServedModel:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def model_name_of(mar: Path) -> str:
    """The model name in the .mar's manifest; ValueError if it is not a readable .mar."""
    try:
        with zipfile.ZipFile(mar) as archive:
            manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
        return str(manifest["model"]["modelName"])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{mar} is not a model archive (.mar): {exc}") from exc


def management_key(server: LocalTorchServe) -> str:
    """The management key TorchServe wrote at start ('' with token authorization off)."""
    key = server.key("management")
    if server.token_authorization and not key:
        raise ServeError(f"token authorization is on but {server.key_file} has no management key")
    return key


def register_model(server: LocalTorchServe, mar_name: str, model_name: str, settings: ServeSettings) -> None:
    """Register the .mar and wait until a worker is READY; ServeError if it does not come up."""
    from persia_inc.foundation.wait import WaitTimeoutError, wait_until
    from persia_inc.inference.management import HttpManagement, ManagementError, RegisterOptions

    options = RegisterOptions(initial_workers=settings.workers, batch_size=settings.batch_size,
                              max_batch_delay_ms=settings.max_batch_delay_ms,
                              startup_timeout_s=max(1, int(settings.start_timeout_s)))
    with HttpManagement(server.management_url, timeout_s=settings.start_timeout_s + 10,
                        token=management_key(server)) as management:
        workers: list[dict] = []

        def ready() -> bool:
            workers[:] = [w for version in management.describe(model_name)
                          for w in version.get("workers", [])]
            return any(w.get("status") == "READY" for w in workers)

        try:
            management.register(mar_name, options=options)
            wait_until(ready, f"a worker of {model_name!r} to be READY",
                       timeout_s=settings.start_timeout_s, interval_s=0.2)
        except WaitTimeoutError as exc:
            raise ServeError(f"{exc}: {workers}") from None
        except ManagementError as exc:
            raise ServeError(str(exc)) from exc


__all__ = ["ServeError", "ServeSettings", "ServedModel", "management_key", "model_name_of",
           "register_model"]
