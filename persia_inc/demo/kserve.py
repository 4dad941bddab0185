"""The demo's live arm through the Open Inference Protocol: `persia-inc serve --frontend kserve`
in a child process (as TorchServe is one), its model store the loader's dense sync fills.

`KServeServed` has what the pipeline reads of a served frontend (`ServedModel` for TorchServe):
`model_name`, `grpc_target`, `start`, `close`, `exit_code`, the dense sync's target, and a
description for the report.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from persia_inc.demo.processes import ChildProcess
from persia_inc.foundation.net import free_port
from persia_inc.foundation.wait import wait_until

log = logging.getLogger(__name__)


class KServeServed:
    """`mar` (in its folder, the model store) served by `persia-inc serve --frontend kserve` on
    127.0.0.1 at free ports, reaching the servers of `config_path`; logs in `workdir`."""

    def __init__(self, config_path: Path, mar: Path, workdir: Path, model_name: str) -> None:
        self.config_path, self.mar, self.workdir = config_path, mar, workdir
        self.model_name = model_name
        self.model_store = mar.parent
        self.http_port, self.grpc_port = free_port(), free_port()
        self.child: ChildProcess | None = None

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def pid(self) -> int | None:
        return self.child.proc.pid if self.child is not None else None

    def start(self, timeout_s: float = 60.0) -> KServeServed:
        """Start the child and wait until it says it is ready (gRPC ServerReady)."""
        from persia_inc.inference.oip_client import OipClient

        self.workdir.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # the child's torch: one thread, as TorchServe's
        self.child = ChildProcess("kserve frontend", [
            "serve", "--frontend", "kserve", "--config", str(self.config_path), "--model-store",
            str(self.model_store), "--model", self.mar.name, "--inference-port", str(self.http_port),
            "--grpc-inference-port", str(self.grpc_port)], self.workdir / "serve.log")
        child = self.child
        with OipClient(self.grpc_target, timeout_s=2.0) as client:
            def ready() -> bool:
                child.check_alive()
                return client.server_ready()

            try:
                wait_until(ready, "the kserve frontend to be ready", timeout_s=timeout_s, interval_s=0.1)
            except BaseException:
                self.close()
                raise
        return self

    def exit_code(self) -> int | None:
        return self.child.proc.poll() if self.child is not None else None

    def close(self) -> None:
        """SIGTERM the child (it stops gracefully), by PID; safe to call twice."""
        if self.child is not None:
            code = self.child.stop()
            if code not in (0, None):
                log.warning("the kserve frontend exited with %s on SIGTERM", code)

    def dense_sync_target(self) -> dict[str, Any]:
        """The loader's dense_sync entries that point it at this frontend."""
        return {"frontend": "kserve", "management_address": f"127.0.0.1:{self.http_port}",
                "model_name": self.model_name, "model_store": str(self.model_store)}

    def describe(self) -> dict[str, Any]:
        return {"pid": self.pid, "grpc": self.grpc_target, "http": self.http_url, "model": self.model_name,
                "workdir": str(self.workdir)}


def kserve_scorer(target: str, model_name: str, timeout_s: float = 10.0) -> Any:
    """Score over the frontend's gRPC API (the request bytes as the BYTES input); the returned
    function has `.close()` for its channel."""
    from persia_inc.demo.serving import request_bytes
    from persia_inc.inference.oip_client import OipClient

    client = OipClient(target, timeout_s=timeout_s)

    def score(dense_features: Any, ids: Any) -> Any:
        return client.infer(model_name, request_bytes(dense_features, ids))

    score.close = client.close  # type: ignore[attr-defined]
    return score


__all__ = ["KServeServed", "kserve_scorer"]
