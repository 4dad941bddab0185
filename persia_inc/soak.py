"""The fault soak: a producer trains with known values while faults are injected at random
moments; at the end every row on the servers must equal training's, byte for byte.

Everything runs as real processes bound to 127.0.0.1: the embedding servers, the loader
(`persia-inc loader`), the trainer (`python -m persia_inc.soak trainer`, a producer with a
deterministic model), and, when asked, a throwaway Ceph with its S3 gateway and a Tansu
Kafka-protocol broker. Faults: kill -9 of the trainer, the loader and one server (each then
restarted), a stop and start of the Ceph gateway and of the broker, and one oversized burst.

Training is deterministic: at step t each table's rows of the signs `touched(seed, table, t)`
become `row_value(signs, t)`. The trainer writes its progress (the last step whose rows a
`flush()` confirmed stored) atomically; a trainer killed with -9 restarts from there, rebuilds
its model by replaying the steps before it (without recording), and trains on. So the truth
after step T is a pure function of (seed, T, the burst steps), computed here without the
trainer. `bench/soak.py` runs it for minutes; the test suite runs a short version.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from persia_inc.foundation.threads import ServiceThread
from persia_inc.foundation.wait import WaitTimeoutError, wait_until

log = logging.getLogger(__name__)

MODEL = "soak"
PRODUCER = "trainer-0"
FAULT_KINDS = ("kill_trainer", "kill_loader", "kill_server", "restart_gateway", "restart_broker",
               "burst")


# ------------------------------------------------------------------------ the known model


def touched(seed: int, table: int, step: int, universe: int, per_step: int) -> np.ndarray:
    """The signs (uint64, unique, sorted) step `step` updates in table `table`."""
    rng = np.random.default_rng((seed, table, step))
    return np.unique(rng.integers(0, universe, per_step, dtype=np.uint64))


def row_value(signs: np.ndarray, step: int, dim: int) -> np.ndarray:
    """float32[n, dim]: the rows of `signs` after step `step`; every value is exact in float32."""
    rows = np.empty((signs.size, dim), np.float32)
    rows[:, 0] = step
    rows[:, 1] = (signs & np.uint64(0xFFFFF)).astype(np.float32)
    rows[:, 2:] = step + np.arange(1, dim - 1, dtype=np.float32)
    return rows


@dataclass(frozen=True, slots=True)
class ModelShape:
    seed: int = 7
    tables: int = 2
    universe: int = 40_000
    per_step: int = 800
    dim: int = 8

    def table_name(self, table: int) -> str:
        return f"t{table}"

    def signs_of(self, table: int, step: int, bursts: set[int]) -> np.ndarray:
        if step in bursts:  # an oversized burst touches the whole table at once
            return np.arange(self.universe, dtype=np.uint64)
        return touched(self.seed, table, step, self.universe, self.per_step)


def truth(shape: ModelShape, last_step: int, bursts: set[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per table: (touched signs uint64[n], their rows float32[n, dim]) after `last_step`."""
    out = []
    for table in range(shape.tables):
        last = np.full(shape.universe, -1, np.int64)
        for step in range(last_step + 1):
            last[shape.signs_of(table, step, bursts).astype(np.int64)] = step
        signs = np.flatnonzero(last >= 0).astype(np.uint64)
        rows = np.empty((signs.size, shape.dim), np.float32)
        steps = last[signs.astype(np.int64)]
        for step in np.unique(steps):
            pick = steps == step
            rows[pick] = row_value(signs[pick], int(step), shape.dim)
        out.append((signs, rows))
    return out


# ----------------------------------------------------------------------------- the trainer


def _read_progress(state: Path) -> int:
    """The last step whose rows a flush confirmed stored (-1: none yet)."""
    try:
        return int(json.loads((state / "progress.json").read_text())["step"])
    except FileNotFoundError:
        return -1


def _read_bursts(state: Path) -> set[int]:
    """The steps that are oversized bursts (the whole table)."""
    try:
        return {int(b) for b in json.loads((state / "bursts.json").read_text())}
    except FileNotFoundError:
        return set()


def _write_json(path: Path, value: object) -> None:
    temp = path.with_suffix(".tmp")
    with temp.open("w") as handle:
        json.dump(value, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)


def _reader(model: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """The producer's row reader over one table of the trainer's model."""
    return lambda signs: model[signs.astype(np.int64)]


def run_trainer(config_path: Path, state: Path, shape: ModelShape, steps_per_s: float) -> int:
    """The trainer process: resume after the last confirmed step and train until SIGTERM."""
    from persia_inc.wiring import producer_from_config

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    progress = _read_progress(state)
    bursts = _read_bursts(state)
    models = [np.zeros((shape.universe, shape.dim), np.float32) for _ in range(shape.tables)]
    for step in range(progress + 1):  # rebuild the model as of the last confirmed step
        for table, model in enumerate(models):
            signs = shape.signs_of(table, step, bursts)
            model[signs.astype(np.int64)] = row_value(signs, step, shape.dim)
    # the trainer owns SIGTERM: it ends the loop between steps and closes the producer itself (the
    # producer's own handler would close it between two tables' records of one step)
    producer = producer_from_config(config_path, producer_id=PRODUCER, close_on_sigterm=False)
    for table, model in enumerate(models):
        producer.register_table(shape.table_name(table), _reader(model), dim=shape.dim)
    step = progress
    confirm_every = max(1, int(steps_per_s))
    while not stop.is_set():
        step += 1
        if (state / "burst.request").exists() and step not in bursts:
            bursts.add(step)
            _write_json(state / "bursts.json", sorted(bursts))  # before the step is recorded
            (state / "burst.request").unlink()
        for table, model in enumerate(models):
            signs = shape.signs_of(table, step, bursts)
            model[signs.astype(np.int64)] = row_value(signs, step, shape.dim)
            producer.record(shape.table_name(table), signs)
        if step % confirm_every == 0 and producer.flush(timeout_s=2.0):
            _write_json(state / "progress.json", {"step": step})
        stop.wait(1.0 / steps_per_s)
    producer.close()  # flushes the rest; raises if storage never took it
    _write_json(state / "progress.json", {"step": step})
    return 0


# ------------------------------------------------------------------------------ the soak


@dataclass(slots=True)
class SoakReport:
    """What a soak saw. rows_lost and out_of_order must be 0."""

    seconds: float = 0.0  # the whole run: services, training, catch-up, check
    training_s: float = 0.0
    storage: str = "local"
    announce: str = "dir"
    faults: dict[str, int] = field(default_factory=dict)
    steps: int = 0
    packets: int = 0
    rows_checked: int = 0
    rows_lost: int = 0
    out_of_order: int = 0
    longest_stall_s: float = 0.0
    catch_up_s: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.rows_lost == 0 and self.out_of_order == 0 and not self.problems

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "ok": self.ok}, indent=2)


@dataclass(frozen=True, slots=True)
class SoakOptions:
    seconds: float = 300.0
    storage: str = "ceph"  # ceph | local
    announce: str = "kafka"  # kafka | dir
    faults: tuple[str, ...] = FAULT_KINDS
    fault_every_s: float = 15.0
    seed: int = 7
    steps_per_s: float = 20.0
    shape: ModelShape = field(default_factory=ModelShape)
    workdir: Path | None = None
    max_packet_rows: int = 10_000  # small, so the burst goes out as several packets


class _Child:
    """One child process with its log, restartable."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.name, self.argv, self.log_path, self.env = name, argv, log_path, env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env})

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout_s: float = 60.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                return None
        return self.proc.returncode


def _outage(stop: Callable[[], object], start: Callable[[], object], seconds: float) -> None:
    """A service down for `seconds` (the fault itself), then up again."""
    stop()
    time.sleep(seconds)
    start()


class _StallWatch:
    """Samples storage and the servers: how long each stored packet waited to be visible on
    every shard (the longest is the longest stall of any stream)."""

    def __init__(self, store: object, client: object, shape: ModelShape) -> None:
        self.store, self.client, self.shape = store, client, shape
        self.seen: dict[tuple[str, tuple[int, int]], float] = {}
        self.longest_s = 0.0
        self.packets = 0
        self._last_key: dict[str, str | None] = {}
        self._thread = ServiceThread("soak-watch", self._run)
        self.stop = self._thread.stop

    def start(self) -> _StallWatch:
        self._thread.start()
        return self

    def close(self) -> None:
        self._thread.close(30)

    def sample(self) -> bool:
        """One round; True when every stored packet is visible."""
        from persia_inc.packet_format import CUT_LANE, parse_packet_path, stream_prefix

        now = time.monotonic()
        for name in (CUT_LANE,):  # the producer's one stream: its cuts of every table
            prefix = f"{stream_prefix(MODEL, name, PRODUCER)}"
            try:
                found = self.store.list(prefix, start_after=self._last_key.get(name))  # type: ignore[attr-defined]
            except Exception as exc:  # storage down: try again next round
                log.debug("soak watch: listing %s failed: %s", prefix, exc)
                continue
            for info in found:
                packet = parse_packet_path(info.key)
                if (name, packet.position) not in self.seen:
                    self.seen[(name, packet.position)] = now
                    self.packets += 1
                self._last_key[name] = info.key
        try:
            marks = {w.table: (w.generation, w.sequence) for w in self.client.watermarks()  # type: ignore[attr-defined]
                     if w.producer == PRODUCER}
        except Exception as exc:  # a server down: its shard holds nothing new now
            log.debug("soak watch: watermarks failed: %s", exc)
            return False
        waiting = False
        for (name, position), since in list(self.seen.items()):
            mark = marks.get(name)
            if mark is not None and position <= mark:
                self.longest_s = max(self.longest_s, now - since)
                del self.seen[(name, position)]
            else:
                waiting = True
                self.longest_s = max(self.longest_s, now - since)
        return not waiting

    def _run(self) -> None:
        while not self.stop.wait(0.25):
            self.sample()


def _out_of_order(log_dir: Path) -> int:
    """Packets a loader passed over or skipped, from every loader life's log: gap passes and
    packets found below a watermark they never reached."""
    count = 0
    for path in log_dir.glob("loader*.log"):
        for line in path.read_text(errors="replace").splitlines():
            lowered = line.lower()
            if " error " in lowered and ("gap" in lowered or "below" in lowered):
                count += 1
    return count


def run_soak(options: SoakOptions, on_fault: Callable[[str, float], None] | None = None) -> SoakReport:
    """Run the soak; returns its report (also written to workdir/soak.json)."""
    from persia_inc.config import load_config
    from persia_inc.foundation.net import free_port
    from persia_inc.local_services import (
        EMBEDDING_TOKEN,
        EMBEDDING_TOKEN_ENV,
        CephCluster,
        EmbeddingCluster,
        TansuBroker,
        write_test_config,
    )

    workdir = options.workdir or Path(tempfile.mkdtemp(prefix="persia-inc-soak-"))
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    state = workdir / "trainer"
    state.mkdir(exist_ok=True)
    report = SoakReport(storage=options.storage, announce=options.announce,
                        faults=dict.fromkeys(options.faults, 0))
    rng = random.Random(options.seed)
    shape = options.shape
    ceph = broker = None
    cluster: EmbeddingCluster | None = None
    children: list[_Child] = []
    live_loaders: list[_Child] = []
    watch: _StallWatch | None = None
    started = time.monotonic()
    try:
        persia: dict[str, object] = {
            "model": MODEL,
            "producer": {"flush_interval_s": 0.2, "close_on_exit": False, "close_timeout_s": 60.0,
                         "max_packet_rows": options.max_packet_rows},
            "loader": {"list_interval_s": 0.2, "rescan_interval_s": 1.0, "watermark_poll_s": 0.5,
                       "gap_timeout_s": 60.0, "retry_backoff_s": 0.1},
            "retry": {"max_attempts": 3, "initial_backoff_s": 0.05, "max_backoff_s": 1.0,
                      "deadline_s": 10},
        }
        incremental_dir = str(workdir / "inc")
        if options.storage == "ceph":
            ceph = CephCluster(workdir / "ceph").start()
            incremental_dir = ceph.new_bucket("soak")
            s3 = ceph.s3_settings()
            persia["s3"] = {"endpoint_url": s3.endpoint_url, "region": s3.region,
                            "access_key_id": s3.access_key_id, "secret_access_key": s3.secret_access_key,
                            "connect_timeout_s": 1.0, "read_timeout_s": 5.0}
        if options.announce == "kafka":
            broker = TansuBroker(workdir / "tansu").start()
            persia["kafka"] = {"bootstrap_servers": [broker.bootstrap], "session_timeout_ms": 2000,
                               "heartbeat_interval_ms": 500, "request_timeout_ms": 5000,
                               "delivery_timeout_ms": 10000}
            persia["producer"]["announce"] = "kafka"  # type: ignore[index]
        servers = [f"127.0.0.1:{free_port()}" for _ in range(2)]
        config_path = write_test_config(workdir / "config.yaml", servers, incremental_dir,
                                        storage="ceph" if options.storage == "ceph" else "local",
                                        model=MODEL, persia_inc=persia)
        config = load_config(config_path)
        cluster = EmbeddingCluster(config_path, servers, logs)
        for shard in range(len(servers)):
            cluster.start(shard)
        cluster.wait_ready(90)
        cli = [sys.executable, "-m", "persia_inc.cli"]
        token = {EMBEDDING_TOKEN_ENV: EMBEDDING_TOKEN}  # the servers' write token, for the loader
        loader_lives = 0

        def new_loader() -> _Child:
            nonlocal loader_lives
            loader_lives += 1
            child = _Child("loader", [*cli, "loader", "--config", str(config_path)],
                           logs / f"loader-{loader_lives}.log", token)
            child.start()
            return child

        trainer = _Child("trainer", [sys.executable, "-m", "persia_inc.soak", "trainer",
                                     "--config", str(config_path), "--state", str(state),
                                     "--steps-per-s", str(options.steps_per_s), "--seed", str(shape.seed),
                                     "--universe", str(shape.universe), "--per-step", str(shape.per_step),
                                     "--dim", str(shape.dim), "--tables", str(shape.tables)],
                         logs / "trainer.log", {})
        loader = new_loader()
        trainer.start()
        children += [trainer]
        live_loaders = [loader]
        store = config.open_store()
        client = cluster.client()
        watch = _StallWatch(store, client, shape).start()

        # one of each kind first (in random order), then random kinds, until the time is up
        schedule = [k for k in options.faults if k != "restart_gateway" or ceph is not None]
        schedule = [k for k in schedule if k != "restart_broker" or broker is not None]
        kinds = tuple(schedule)
        rng.shuffle(schedule)
        training_started = time.monotonic()  # services are up: the soak's time starts here
        deadline = training_started + options.seconds
        next_fault = time.monotonic() + min(options.fault_every_s, options.seconds / (len(schedule) + 2))
        quiet_from = deadline - max(10.0, 0.15 * options.seconds)  # the last fault heals in time
        while time.monotonic() < deadline:
            if trainer.proc is None or trainer.proc.poll() is not None:
                exited = None if trainer.proc is None else trainer.proc.returncode
                report.problems.append(f"trainer exited with {exited}; see {trainer.log_path}")
                break
            if next_fault <= time.monotonic() < quiet_from and options.faults:
                kind = schedule.pop(0) if schedule else rng.choice(kinds)
                report.faults[kind] += 1
                if on_fault is not None:
                    on_fault(kind, time.monotonic() - training_started)
                log.info("soak: injecting %s", kind)
                if kind == "kill_trainer":
                    trainer.kill()
                    trainer.start()
                elif kind == "kill_loader":
                    loader.kill()
                    loader = new_loader()
                    live_loaders.append(loader)
                elif kind == "kill_server":
                    shard = rng.randrange(len(servers))
                    cluster.stop(shard, signal.SIGKILL)
                    cluster.start(shard)
                elif kind == "restart_gateway" and ceph is not None:
                    _outage(ceph.stop_gateway, ceph.start_gateway, rng.uniform(1.0, 4.0))
                elif kind == "restart_broker" and broker is not None:
                    _outage(broker.stop, broker.start, rng.uniform(1.0, 4.0))
                elif kind == "burst":
                    (state / "burst.request").touch()
                gap = options.fault_every_s
                next_fault = time.monotonic() + rng.uniform(0.5 * gap, 1.5 * gap)
            with contextlib.suppress(subprocess.TimeoutExpired):  # a tick; at once if it exits
                trainer.proc.wait(0.1)

        report.training_s = round(time.monotonic() - training_started, 1)
        code = trainer.stop(timeout_s=120)
        if code != 0:
            report.problems.append(f"trainer stopped with {code}; see {trainer.log_path}")
        caught_up = time.monotonic()
        try:
            wait_until(watch.sample, "the servers to catch up with storage", timeout_s=180,
                       interval_s=0.25)
        except WaitTimeoutError as exc:
            report.problems.append(str(exc))
        report.catch_up_s = time.monotonic() - caught_up
        watch.close()
        report.longest_stall_s = round(watch.longest_s, 3)
        report.packets = watch.packets
        last = _read_progress(state)
        bursts = _read_bursts(state)
        report.steps = last + 1
        for table, (signs, rows) in enumerate(truth(shape, last, bursts)):
            served = client.lookup(shape.table_name(table), signs)
            equal = (served.view(np.uint32) == rows.view(np.uint32)).all(axis=1)
            report.rows_checked += int(signs.size)
            report.rows_lost += int((~equal).sum())
        loader.stop()
        report.out_of_order = _out_of_order(logs)
        client.close()
        store.close()
    finally:
        for child in children + live_loaders:
            child.kill()
        if watch is not None:
            watch.stop.set()
        if cluster is not None:
            cluster.stop_all()
        if broker is not None:
            broker.stop()
        if ceph is not None:
            ceph.stop()
        report.seconds = round(time.monotonic() - started, 1)  # set up, training and catch-up
        (workdir / "soak.json").write_text(report.to_json())
    return report


def main(argv: list[str] | None = None) -> int:
    """`python -m persia_inc.soak trainer ...`: the trainer process of a soak."""
    parser = argparse.ArgumentParser(prog="python -m persia_inc.soak")
    parser.add_argument("role", choices=["trainer"])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--steps-per-s", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--universe", type=int, default=40_000)
    parser.add_argument("--per-step", type=int, default=800)
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--tables", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    shape = ModelShape(seed=args.seed, tables=args.tables, universe=args.universe,
                       per_step=args.per_step, dim=args.dim)
    return run_trainer(args.config, args.state, shape, args.steps_per_s)


if __name__ == "__main__":
    sys.exit(main())
