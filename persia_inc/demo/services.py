"""The demo's real services: which ones it uses, and a throwaway Ceph (with its S3 gateway) and
Tansu Kafka-protocol broker it starts itself when none is configured.

What it starts it stops, by PID, at the end: after a normal run, an error, Ctrl-C or SIGTERM.
The services are the tests' own (`persia_inc.local_services`), bound to 127.0.0.1.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from persia_inc.local_services import (
    CephCluster,
    TansuBroker,
    ceph_install_command,
    tansu_install_command,
)
from persia_inc.storage import S3Settings, resolve_s3_endpoint, storage_kind

log = logging.getLogger(__name__)

KAFKA_BOOTSTRAP_ENV = "KAFKA_BOOTSTRAP_SERVERS"  # host:port[,host:port...]
CEPH_DATA = ("osd.0", "mon.a", "mgr.x", "rgw.a")  # start-ceph-rgw.sh's data folders


class DemoUsageError(ValueError):
    """The demo cannot run as asked; the message is one line that says what to set."""


@dataclass(frozen=True, slots=True)
class ServicePlan:
    """Where the demo's services are. s3_endpoint: the configured S3 endpoint ("" with an
    explicit s3:// incremental_dir means boto3's default); kafka_bootstrap: host:port list;
    start_ceph / start_kafka: nothing is configured, so start a throwaway one."""

    start_ceph: bool = False
    start_kafka: bool = False
    s3_endpoint: str = ""
    kafka_bootstrap: str = ""


def plan_services(storage: str, announce: str, *, incremental_dir: str = "",
                  s3_endpoint_url: str = "", kafka_bootstrap: str = "",
                  environ: Mapping[str, str] | None = None) -> ServicePlan:
    """Decide from the flags and the environment what the demo uses and what it starts.

    The S3 endpoint is the flag, else S3_ENDPOINT_URL, AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL;
    Kafka is --kafka-bootstrap, else KAFKA_BOOTSTRAP_SERVERS. Raises DemoUsageError.
    """
    env = os.environ if environ is None else environ
    if incremental_dir:
        try:
            implied = storage_kind(incremental_dir)
        except ValueError as exc:
            raise DemoUsageError(f"--incremental-dir: {exc}") from exc
        if implied != storage:
            raise DemoUsageError(f"--incremental-dir {incremental_dir} is on {implied} storage, "
                                 f"but --storage is {storage}")
    if storage == "hdfs" and not incremental_dir:
        raise DemoUsageError(
            "--storage hdfs needs a WebHDFS endpoint, and none can be started here: pass "
            "--incremental-dir hdfs://NAMENODE:9870/persia/inc (config key: incremental_dir)")
    plan = ServicePlan()
    if storage == "ceph":
        endpoint = resolve_s3_endpoint(s3_endpoint_url, env)
        # an explicit s3:// root without an endpoint means AWS itself (boto3's default chain)
        plan = ServicePlan(start_ceph=not endpoint and not incremental_dir, s3_endpoint=endpoint)
    if announce == "kafka":
        bootstrap = kafka_bootstrap or env.get(KAFKA_BOOTSTRAP_ENV, "").strip()
        plan = ServicePlan(start_ceph=plan.start_ceph, s3_endpoint=plan.s3_endpoint,
                           start_kafka=not bootstrap, kafka_bootstrap=bootstrap)
    return plan


def install_command(plan: ServicePlan) -> str | None:
    """The one command (one line) that installs what `plan` must start; None if all is there."""
    commands = [command for needed, find in ((plan.start_ceph, ceph_install_command),
                                             (plan.start_kafka, tansu_install_command))
                if needed and (command := find()) is not None]
    return " && ".join(commands) or None


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return fields[0] not in ("Z", "X")


class StartedServices:
    """The throwaway services of one demo run, under `workdir`; a context manager.

    `start()` starts what the plan asks (nothing, when all is configured); `close()` stops
    them in reverse order, by PID, and is safe to call twice.
    """

    def __init__(self, workdir: Path, plan: ServicePlan) -> None:
        self.workdir = workdir
        self.plan = plan
        self.ceph: CephCluster | None = None
        self.broker: TansuBroker | None = None
        self._started_pids: dict[str, int] = {}
        self._closed = False

    def start(self) -> StartedServices:
        """Start what the plan asks; on a failure stop what did start and raise ServiceError."""
        if self._closed:
            raise RuntimeError("these services were stopped; start new ones")
        try:
            if self.plan.start_ceph:
                log.info("starting a throwaway Ceph with its S3 gateway under %s", self.workdir / "ceph")
                self.ceph = CephCluster(self.workdir / "ceph")
                self.ceph.start()  # a failed start stops its own daemons
                self._started_pids.update({f"ceph {name}": pid for name, pid in self._ceph_pids()})
                log.info("Ceph S3 gateway at %s, daemons %s", self.ceph.endpoint_url, self.ceph.pids())
            if self.plan.start_kafka:
                self.broker = TansuBroker(self.workdir / "kafka")
                self.broker.start()
                if self.broker.pid is not None:
                    self._started_pids["tansu"] = self.broker.pid
                log.info("Tansu Kafka broker at %s (pid %s)", self.broker.bootstrap, self.broker.pid)
        except BaseException:
            self.close()
            raise
        return self

    def _ceph_pids(self) -> list[tuple[str, int]]:
        return list(self.ceph.pids().items()) if self.ceph is not None and (
            self.ceph.workdir / "run").exists() else []

    @property
    def s3(self) -> S3Settings | None:
        """Settings for the started Ceph (endpoint and its keys); None if none was started."""
        return self.ceph.s3_settings() if self.ceph is not None and self.ceph.env else None

    @property
    def kafka_bootstrap(self) -> str:
        return self.broker.bootstrap if self.broker is not None else ""

    @property
    def pids(self) -> dict[str, int]:
        """Every process this object started, by name (ceph mon.a, ceph osd.0, ceph rgw.a, tansu)."""
        return dict(self._started_pids)

    def describe(self) -> str:
        """One line: what was started, where, and its PIDs; "" when nothing was."""
        parts = []
        if self.ceph is not None and self.ceph.env:
            daemons = ", ".join(f"{name} {pid}" for name, pid in self.ceph.pids().items())
            parts.append(f"a throwaway Ceph with its S3 gateway at {self.ceph.endpoint_url} "
                         f"(pids {daemons}; data and logs in {self.ceph.workdir})")
        if self.broker is not None and self.broker.pid is not None:
            parts.append(f"a Tansu Kafka broker at {self.broker.bootstrap} (pid {self.broker.pid})")
        if not parts:
            return ""
        return f"started {' and '.join(parts)}; they stop when the demo ends"

    def as_report(self) -> dict[str, dict[str, object]]:
        """What report.json records about the started services."""
        out: dict[str, dict[str, object]] = {}
        if self.ceph is not None and self.ceph.env:
            out["ceph"] = {"endpoint": self.ceph.endpoint_url, "workdir": str(self.ceph.workdir),
                           "pids": {k.removeprefix("ceph "): v for k, v in self._started_pids.items()
                                    if k.startswith("ceph ")}}
        if self.broker is not None and "tansu" in self._started_pids:
            out["kafka"] = {"bootstrap": self.broker.bootstrap,
                            "pids": {"tansu": self._started_pids["tansu"]}}
        return out

    def close(self) -> list[int]:
        """Stop the broker, then Ceph (rgw, osd, mon), each by its PID; returns the PIDs still
        running afterwards (empty when all stopped). Safe to call twice: a second call (after
        a stop that was interrupted) stops what still runs and is quick otherwise."""
        self._closed = True
        if self.broker is not None and self.broker.running:
            log.info("stopping the Tansu broker (pid %s)", self.broker.pid)
        if self.broker is not None:
            self.broker.stop()
        if self.ceph is not None:
            self._started_pids.update({f"ceph {name}": pid for name, pid in self._ceph_pids()})
            if any(_alive(pid) for name, pid in self._started_pids.items() if name.startswith("ceph ")):
                log.info("stopping Ceph under %s", self.ceph.workdir)
            self.ceph.stop()
            for data in CEPH_DATA:  # about 400 MB of throwaway data; the logs stay
                shutil.rmtree(self.ceph.workdir / data, ignore_errors=True)
        left = [pid for pid in self._started_pids.values() if _alive(pid)]
        if left:
            log.error("services still running after stop: pids %s", left)
        return left

    def __enter__(self) -> StartedServices:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
