"""A private TorchServe on 127.0.0.1 for tests, benchmarks and the demo, stopped by its PID.

`torchserve --start` keeps one PID file for the whole machine (in the temp dir) and, in the
foreground, waits on a Java child it does not forward signals to. This starts TorchServe's
Java frontend directly (the same command line `torchserve` builds), so the process we signal
is the server itself; its shutdown hook stops the Python workers. Every address is on
127.0.0.1 with free ports, token authorization is off and the model API on (the local
settings of `infra/torchserve/config.properties`), and logs go to `workdir/logs`.

`persia-inc serve` runs one for a deployment (fixed ports, the user's model store); tests and
benchmarks take free ports and `workdir/model-store`.

Its logs are TorchServe's files without the frontend's lines per request (`LOG4J2_XML`: the
access log, the model log, both metrics logs and ts_log's lifecycle and warnings stay). Its
workers start at the lowest CPU priority and serve at their normal one
(`inference.worker_start`, through the `--python` script `workdir/worker-python`): a dense
version's new worker no longer slows the one serving while it imports torch. Its JVM runs
`JVM_OPTIONS` (C1 only, serial GC): about half the frontend's CPU per request of the JVM's
defaults on a small machine, where that CPU competes with the request's own work.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path

import requests

from persia_inc.foundation.net import free_port
from persia_inc.foundation.wait import WaitStoppedError, WaitTimeoutError, wait_until

log = logging.getLogger(__name__)

# The frontend's JVM: C1 only (no C2 compiler threads), the serial collector (no concurrent GC
# threads) on a fixed heap, no perf-data file. On this project's 2-core machine the C2 and G1
# threads were the frontend's largest CPU users, and they ran while a request's lookup kept both
# cores busy. Measured with /tmp A/B runs, each a fresh TorchServe per setting in the same run,
# 128-row requests interleaved with in-process and constant-handler calls (300 requests after 30
# warm-up ones, 2 runs). Frontend CPU per request fell from 7.4 / 6.8 ms to 3.3 / 3.4 ms (the
# old options were -Xmx512m -XX:+UseG1GC, of which C2 3.7 and G1 1.3 ms per two requests).
# gRPC p50 fell from 14.3 / 13.9 ms to 13.4 / 13.2 ms. The TorchServe gap went from 0.91 / 0.60
# ms to 0.55 / 0.40 ms (gRPC p50 minus in-process p50 minus constant-handler p50). After 1,500
# warm-up requests the frontend's CPU per request was 1.6 ms against 2.75 ms; C2 was still
# compiling at 1.1 ms per two requests. The gaps were then equal (0.37 ms), and p99 was 17.1
# against 21.7 ms. bench/inference.py --throughput '' (300 requests, both layouts), runs
# alternating old and new options: the gap was 0.25 / 0.70 ms (shared table) and 0.87 / 0.57 ms
# (table per feature) with the old ones, 0.33 / 0.19 and 0.18 / -0.08 ms with these, and TorchServe
# gRPC p99 27.6-38.5 ms against 14.8-17.6 ms.
JVM_OPTIONS = ("-Xms512m -Xmx512m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -XX:CICompilerCount=1 "
               "-XX:-UsePerfData")


def local_properties(model_store: Path, ports: Mapping[str, int], **extra: str) -> dict[str, str]:
    """config.properties for a local TorchServe: loopback only, no token, model API on."""
    props = {
        "inference_address": f"http://127.0.0.1:{ports['inference']}",
        "management_address": f"http://127.0.0.1:{ports['management']}",
        "metrics_address": f"http://127.0.0.1:{ports['metrics']}",
        "grpc_inference_address": "127.0.0.1",
        "grpc_inference_port": str(ports["grpc_inference"]),
        "grpc_management_address": "127.0.0.1",
        "grpc_management_port": str(ports["grpc_management"]),
        "disable_token_authorization": "true",
        "enable_model_api": "true",
        "model_store": str(model_store),
        "default_workers_per_model": "1",
        "install_py_dep_per_model": "false",
        "disable_system_metrics": "true",
        "vmargs": JVM_OPTIONS,
    }
    props.update(extra)
    return props


# one of TorchServe's rolling log files, `name`.log under the folder env variable `where` names
_ROLLING_FILE = """    <RollingFile name="{name}" fileName="${{env:{where}:-logs}}/{name}.log"
                 filePattern="${{env:{where}:-logs}}/{name}.%d{{dd-MMM}}.log.gz">
      <PatternLayout pattern="{pattern}"/>
      <Policies><SizeBasedTriggeringPolicy size="100 MB"/><TimeBasedTriggeringPolicy/></Policies>
      <DefaultRolloverStrategy max="5"/>
    </RollingFile>
"""
_BARE, _LEVELLED = "%d{ISO8601} - %m%n", "%d{ISO8601} [%-5p] %t %c - %m%n"

# TorchServe's own log4j2.xml (in its jar) with each line written once and without the
# frontend's lines per request: the jar's writes every org.pytorch.serve line to ts_log twice and
# to stdout, about 40 writes per request in all. Measured (400 requests of 128 rows, 2 rounds
# alternating): the frontend's CPU per request 6.1 / 6.8 ms with this, 8.0 / 8.8 ms with the jar's
LOG4J2_XML = """<?xml version="1.0" encoding="UTF-8"?>
<!-- persia-inc's TorchServe logging (inference/local.py): TorchServe's files, each line once -->
<Configuration>
  <Appenders>
    <Console name="STDOUT" target="SYSTEM_OUT">
      <PatternLayout pattern="%d{ISO8601} [%-5p] %t %c - %m%n"/>
    </Console>
""" + "".join(
    _ROLLING_FILE.format(name=name, where=where, pattern=pattern) for name, where, pattern in (
        ("access_log", "LOG_LOCATION", _BARE), ("model_log", "LOG_LOCATION", _LEVELLED),
        ("model_metrics", "METRICS_LOCATION", _BARE), ("ts_log", "LOG_LOCATION", _LEVELLED),
        ("ts_metrics", "METRICS_LOCATION", _BARE))) + """  </Appenders>
  <Loggers>
    <Logger name="ACCESS_LOG" level="info" additivity="false"><AppenderRef ref="access_log"/></Logger>
    <Logger name="MODEL_LOG" level="all" additivity="false"><AppenderRef ref="model_log"/></Logger>
    <Logger name="MODEL_METRICS" level="all" additivity="false"><AppenderRef ref="model_metrics"/></Logger>
    <Logger name="TS_METRICS" level="all" additivity="false"><AppenderRef ref="ts_metrics"/></Logger>
    <Logger name="io.netty" level="error"/>
    <Logger name="org.apache" level="off"/>
    <Logger name="org.pytorch.serve" level="debug" additivity="false">
      <AppenderRef ref="ts_log"/>
      <AppenderRef ref="STDOUT" level="warn"/>
    </Logger>
    <!-- a few lines per request each: their warnings and errors stay -->
    <Logger name="org.pytorch.serve.wlm.BatchAggregator" level="warn"/>
    <Logger name="org.pytorch.serve.wlm.WorkerThread" level="warn"/>
    <Logger name="org.pytorch.serve.wlm.WorkerLifeCycle" level="warn"/>
    <Logger name="org.pytorch.serve.job" level="warn"/>
    <Root level="info">
      <AppenderRef ref="STDOUT"/>
      <AppenderRef ref="ts_log"/>
    </Root>
  </Loggers>
</Configuration>
"""

PORT_NAMES = ("inference", "management", "metrics", "grpc_inference", "grpc_management")
BIND_ATTEMPTS = 3  # starts on fresh ports when a port picked free was taken before Java bound it
_BIND_FAILED = re.compile(rb"Failed to bind to address /?(\S+)")  # Java's line (frontend.out)
_STARTED = b"Model server started."  # ModelServer's line once every port is bound
# TorchServe's own defaults, which clients assume (gRPC inference 7070, REST 8080 ...)
DEFAULT_PORTS = {"inference": 8080, "management": 8081, "metrics": 8082,
                 "grpc_inference": 7070, "grpc_management": 7071}
SERVE_INSTALL_HINT = "pip install 'persia-inc[serve]'"
JAVA_INSTALL_HINT = ("install a Java 17 runtime (Debian: apt-get install openjdk-17-jre-headless) "
                     "or set JAVA_HOME")


class TorchServeError(RuntimeError):
    """TorchServe did not start or stop; carries the tail of its log."""


class StartCancelledError(TorchServeError):
    """`start()` was cancelled; the server is stopped."""


class TorchServeMissingError(TorchServeError):
    """TorchServe or Java is not installed; the message is one line saying what to install."""


def torchserve_home() -> Path:
    """The directory holding TorchServe's `ts` package; TorchServeMissingError if not installed."""
    try:
        spec = importlib.util.find_spec("ts")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise TorchServeMissingError(f"TorchServe is not installed: {SERVE_INSTALL_HINT}")
    home = Path(next(iter(spec.submodule_search_locations))).parent
    if not (home / "ts" / "frontend" / "model-server.jar").is_file():
        raise TorchServeMissingError(f"TorchServe's frontend jar is missing under {home}: "
                                f"reinstall it with {SERVE_INSTALL_HINT}")
    return home


def find_java() -> str:
    """`$JAVA_HOME/bin/java`, else `java` on PATH; TorchServeMissingError if neither exists."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home:
        java = Path(java_home) / "bin" / "java"
        if java.is_file():
            return str(java)
        raise TorchServeMissingError(f"JAVA_HOME={java_home} has no bin/java: {JAVA_INSTALL_HINT}")
    found = shutil.which("java")
    if not found:
        raise TorchServeMissingError(f"Java not found (TorchServe's frontend needs Java 17): "
                                     f"{JAVA_INSTALL_HINT}")
    return found


def check_installed() -> None:
    """Raise TorchServeMissingError (one line: what to install) unless TorchServe and Java are there."""
    torchserve_home()
    find_java()


class LocalTorchServe:
    """One TorchServe frontend (Java) under `workdir`; `start()`, `stop()`, or `with`.

    env: extra environment for the server and its workers (e.g. PERSIA_INC_CONFIG);
    model_store: default `workdir/model-store`; ports: any of PORT_NAMES -> port (a missing
    one, or 0, takes a free port); low_priority_start: start workers at the lowest CPU
    priority (`inference.worker_start`; False: as TorchServe starts them); properties: extra or
    overriding config.properties entries.
    """

    def __init__(self, workdir: str | Path, *, env: Mapping[str, str] | None = None,
                 model_store: str | Path | None = None, ports: Mapping[str, int] | None = None,
                 low_priority_start: bool = True, **properties: str) -> None:
        self.workdir = Path(workdir)
        self.model_store = Path(model_store) if model_store is not None else self.workdir / "model-store"
        unknown = set(ports or {}) - set(PORT_NAMES)
        if unknown:
            raise ValueError(f"unknown TorchServe ports {sorted(unknown)}; known: {PORT_NAMES}")
        given = dict(ports or {})
        self.ports = {name: given.get(name) or free_port() for name in PORT_NAMES}
        self._picked = [name for name in PORT_NAMES if not given.get(name)]  # ours to pick again
        self.env = dict(env or {})
        self.low_priority_start = low_priority_start
        self._extra = properties
        self.properties = local_properties(self.model_store, self.ports, **properties)
        self._proc: subprocess.Popen | None = None

    # addresses
    @property
    def inference_url(self) -> str:
        return self.properties["inference_address"]

    @property
    def management_url(self) -> str:
        return self.properties["management_address"]

    @property
    def grpc_inference_target(self) -> str:
        return f"127.0.0.1:{self.ports['grpc_inference']}"

    @property
    def grpc_management_target(self) -> str:
        return f"127.0.0.1:{self.ports['grpc_management']}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def exit_code(self) -> int | None:
        """TorchServe's exit status if it exited by itself, None while it runs (or before
        start, or after stop)."""
        return self._proc.poll() if self._proc is not None else None

    def log_tail(self, lines: int = 40) -> str:
        out = []
        for path in (self.workdir / "frontend.out", self.workdir / "logs" / "model_log.log"):
            if path.exists():
                out += [f"--- {path.name}", *path.read_text(errors="replace").splitlines()[-lines:]]
        return "\n".join(out)

    @property
    def metrics_url(self) -> str:
        return self.properties["metrics_address"]

    @property
    def token_authorization(self) -> bool:
        """Whether TorchServe asks for keys (then in `key_file`, written at start)."""
        return self.properties.get("disable_token_authorization", "false").lower() != "true"

    @property
    def key_file(self) -> Path:
        """Where TorchServe 0.12 writes its keys when token authorization is on: key_file.json
        in its working directory (management, inference and API keys)."""
        return self.workdir / "key_file.json"

    def key(self, api: str) -> str:
        """TorchServe's key for `api` ("inference", "management" or "API") from `key_file`;
        '' with token authorization off or before TorchServe wrote the file."""
        if not self.token_authorization:
            return ""
        try:
            return str(json.loads(self.key_file.read_text())[api]["key"])
        except (OSError, ValueError, KeyError, TypeError):
            return ""

    def worker_python(self) -> str:
        """The interpreter TorchServe starts workers with: this one, or (low_priority_start)
        `workdir/worker-python`, a script running it on `inference/worker_start.py`."""
        if not self.low_priority_start:
            return sys.executable
        script = self.workdir / "worker-python"
        start = Path(__file__).with_name("worker_start.py")
        script.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(start))} \"$@\"\n")
        script.chmod(0o755)
        return str(script)

    def _command(self, config: Path) -> list[str]:
        ts_home = torchserve_home()
        java = find_java()
        log_config = self.workdir / "log4j2.xml"
        log_config.write_text(LOG4J2_XML)
        return [java, f"-Dmodel_server_home={ts_home}", f"-Dlog4j.configurationFile={log_config}",
                *self.properties["vmargs"].split(),
                "-cp", f".:{ts_home / 'ts' / 'frontend' / '*'}", "org.pytorch.serve.ModelServer",
                "--python", self.worker_python(), "-f", str(config), "-s", str(self.model_store), "-ncs"]

    def start(self, timeout_s: float = 60.0, *, cancel: threading.Event | None = None
              ) -> LocalTorchServe:
        """Start and wait until every port is bound and /ping answers; TorchServeError
        (with the log tail) if it exits or is not up within `timeout_s`. Setting `cancel` (e.g.
        from a signal handler) stops it and raises StartCancelledError.

        A port taken free a moment before can be taken by another process before Java binds it
        (an outgoing connection's ephemeral port, another test's server): TorchServe then
        serves only some of its ports. Ports this object picked are picked again and the
        start retried, up to `BIND_ATTEMPTS` times; a port the caller gave is its to fix."""
        if self._proc is not None:
            raise TorchServeError("already started")
        for attempt in range(1, BIND_ATTEMPTS + 1):
            out = self.workdir / "frontend.out"
            seen = out.stat().st_size if out.exists() else 0
            try:
                return self._start_once(timeout_s, cancel, seen)
            except TorchServeError:
                failed = _BIND_FAILED.findall(out.read_bytes()[seen:]) if out.exists() else []
                taken = [n for n in self._picked
                         if any(f.endswith(b":%d" % self.ports[n]) for f in failed)]
                if not taken or attempt == BIND_ATTEMPTS:
                    raise
                log.warning("TorchServe could not bind its %s port(s) %s (taken since they were "
                            "picked): starting again on fresh ports", ", ".join(taken),
                            ", ".join(str(self.ports[n]) for n in taken))
                self.ports.update({name: free_port() for name in self._picked})
                self.properties = local_properties(self.model_store, self.ports, **self._extra)
        raise AssertionError("unreachable")

    def _start_once(self, timeout_s: float, cancel: threading.Event | None, seen: int
                    ) -> LocalTorchServe:
        """One start; `seen`: frontend.out's size before it (earlier starts' lines)."""
        self.model_store.mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)
        config = self.workdir / "config.properties"
        config.write_text("".join(f"{k}={v}\n" for k, v in self.properties.items()))
        env = {**os.environ, **self.env, "LOG_LOCATION": str(self.workdir / "logs"),
               "METRICS_LOCATION": str(self.workdir / "logs")}
        # the workers must find this interpreter's packages (inference, persia_inc ...)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        with (self.workdir / "frontend.out").open("ab") as out:
            self._proc = subprocess.Popen(self._command(config), cwd=self.workdir, env=env,
                                          stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        proc = self._proc

        def answers() -> bool:
            exited = proc.poll() is not None  # before the read: then its output is all there
            # Java binds its ports one by one (/ping answers before the gRPC ports are bound)
            # and says so once all are; a failed bind stops the start (Java may exit on it)
            said = (self.workdir / "frontend.out").read_bytes()[seen:]
            failed = _BIND_FAILED.search(said)
            if failed:
                raise TorchServeError(f"TorchServe could not bind {failed[1].decode()} (taken by "
                                      f"another process):\n{self.log_tail()}")
            if exited:
                raise TorchServeError(f"TorchServe exited with {proc.returncode}:\n{self.log_tail()}")
            if _STARTED not in said:
                return False
            key = self.key("inference")  # with token authorization, /ping wants it too
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            return requests.get(f"{self.inference_url}/ping", headers=headers, timeout=1).status_code == 200

        try:
            wait_until(answers, f"TorchServe to answer /ping at {self.inference_url}",
                       timeout_s=timeout_s, interval_s=0.1, stop=cancel,
                       ignore=(requests.RequestException,))
        except WaitStoppedError:
            self.stop()
            raise StartCancelledError("stopped while starting") from None
        except WaitTimeoutError as exc:
            self.stop()
            raise TorchServeError(f"{exc}:\n{self.log_tail()}") from None
        except TorchServeError:
            self.stop()
            raise
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM our Java process (its shutdown hook stops the workers), then wait; SIGKILL
        the process group we started if it lingers, or if Java died by itself (killed -9: no
        shutdown hook ran, its workers may still be there). Safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # what is left of our own session
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # our own session: the server and its workers
            proc.wait(timeout=10)

    def __enter__(self) -> LocalTorchServe:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


__all__ = ["DEFAULT_PORTS", "JVM_OPTIONS", "PORT_NAMES", "LocalTorchServe", "StartCancelledError",
           "TorchServeError", "TorchServeMissingError", "check_installed", "find_java", "free_port",
           "local_properties", "torchserve_home"]
