"""The demo pipeline: checkpoint, servers, loader, training with the hook, then verification.

Freshness is measured end to end without trusting any component's own clock reading: a
watcher lists storage (each packet's created-at is in its header) and polls the servers'
watermarks every few milliseconds; a packet is visible once every shard's watermark for its
(table, producer) reached it. Freshness = first time seen visible - created-at.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml

from persia_inc.config import Config, load_config
from persia_inc.extras import have
from persia_inc.foundation.net import free_port
from persia_inc.foundation.threads import ServiceThread
from persia_inc.packet_format import PacketError, Position, parse_packet_path, read_packet_header
from persia_inc.wiring import embedding_client, producer_from_config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoOptions:
    """seconds: training time; vocab: rows per table; shards: embedding-server processes;
    incremental_dir: override for ceph/hdfs (default: a folder in the workdir, or a fresh
    bucket from S3_ENDPOINT_URL for ceph); kafka_bootstrap: host:port for announce=kafka."""

    workdir: Path
    seconds: float = 60.0
    storage: str = "local"
    announce: str = "dir"
    shards: int = 2
    vocab: int = 20_000
    dim: int = 16
    batch: int = 1024
    buffer_size: int = 20_000
    flush_interval_s: float = 0.5
    evict_every_steps: int = 40
    evict_rows: int = 64
    incremental_dir: str = ""
    kafka_bootstrap: str = ""
    seed: int = 0


@dataclass
class DemoReport:
    verified: bool = False
    packets: int = 0
    rows_applied: int = 0
    freshness_ms: dict[str, float] = field(default_factory=dict)
    mismatched_rows: int = 0
    checked_rows: int = 0
    evicted_rows: int = 0
    evicted_still_served: int = 0
    steps: int = 0
    train_seconds: float = 0.0
    storage: str = "local"
    announce: str = "dir"
    shards: int = 2
    problems: list[str] = field(default_factory=list)
    pictures: list[str] = field(default_factory=list)  # written into the workdir

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


@dataclass
class Progress:
    """What the live display shows; updated by the training loop and the watcher."""

    steps: int = 0
    packets_stored: int = 0
    packets_visible: int = 0
    rows_applied: int = 0
    freshness_ms: list[float] = field(default_factory=list)
    phase: str = "starting"

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.freshness_ms, q)) if self.freshness_ms else float("nan")


# ------------------------------------------------------------------------------ processes


class ChildProcess:
    """A `persia-inc` subcommand in its own process, logging to a file, stopped by its PID."""

    def __init__(self, name: str, args: list[str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        with log_path.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "persia_inc.cli", *args],
                                         stdout=out, stderr=subprocess.STDOUT)
        log.info("started %s (pid %d), log %s", name, self.proc.pid, log_path)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{tail}")

    def stop(self, timeout_s: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0fs; killing it", self.name, timeout_s)
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


# ------------------------------------------------------------------------------ freshness


class FreshnessWatcher:
    """Polls watermarks (every `poll_s`) and lists storage, recording when packets became visible."""

    def __init__(self, client, store, model: str, progress: Progress, poll_s: float = 0.01) -> None:
        self.client, self.store, self.model, self.progress = client, store, model, progress
        self.poll_s = poll_s
        self.created: dict[tuple[str, str, int, int], tuple[int, int]] = {}  # -> (created_ns, rows)
        self.visible: dict[tuple[str, str, int, int], float] = {}
        self.events: dict[tuple[str, str], tuple[list[float], list[Position]]] = {}
        self._thread = ServiceThread("demo-freshness", self._run)
        self._stop = self._thread.stop
        self.errors = 0

    def start(self) -> FreshnessWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching (bounded, safe to call twice)."""
        self._thread.close(timeout_s=10)

    def _run(self) -> None:
        last_list = 0.0
        while not self._stop.is_set():
            now_ns = time.time_ns()
            try:
                self._record_watermarks(now_ns)
                if time.monotonic() - last_list > 0.2:
                    self._list_storage()
                    last_list = time.monotonic()
                self._resolve()
            except Exception as exc:
                self.errors += 1
                log.debug("freshness watcher: %s", exc)
            self._stop.wait(self.poll_s)

    def _record_watermarks(self, now_ns: int) -> None:
        for mark in self.client.watermarks():
            stream = (mark.table, mark.producer)
            times, positions = self.events.setdefault(stream, ([], []))
            if not positions or mark.position > positions[-1]:
                times.append(now_ns / 1e9)
                positions.append(mark.position)

    def _list_storage(self) -> None:
        for info in self.store.list(f"{self.model}/"):
            try:
                ident = parse_packet_path(info.key)
            except PacketError:
                continue
            key = (ident.table, ident.producer, ident.generation, ident.sequence)
            if key in self.created:
                continue
            with self.store.open(info.key) as source:
                header = read_packet_header(source, where=self.store.uri(info.key))
            self.created[key] = (header.created_at_ns, header.rows + header.deleted_rows)
        self.progress.packets_stored = len(self.created)

    def _resolve(self) -> None:
        for key, (created_ns, rows) in self.created.items():
            if key in self.visible:
                continue
            times, positions = self.events.get((key[0], key[1]), ([], []))
            at = bisect.bisect_left(positions, (key[2], key[3]))
            if at < len(positions):
                self.visible[key] = times[at]
                self.progress.packets_visible += 1
                self.progress.rows_applied += rows
                self.progress.freshness_ms.append(max(0.0, times[at] * 1e3 - created_ns / 1e6))

    def wait_all_visible(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._list_storage()
            if self.created and len(self.visible) == len(self.created):
                return True
            time.sleep(0.05)
        return False


# ------------------------------------------------------------------------------ the run


def _storage_root(options: DemoOptions) -> str:
    if options.incremental_dir:
        return options.incremental_dir
    if options.storage == "local":
        return str(options.workdir / "incremental")
    if options.storage == "ceph":
        endpoint = os.environ.get("S3_ENDPOINT_URL")
        if not endpoint:
            raise RuntimeError("--storage ceph needs S3_ENDPOINT_URL (and AWS_ACCESS_KEY_ID / "
                               "AWS_SECRET_ACCESS_KEY) or --incremental-dir s3://bucket/prefix")
        return f"s3://persia-demo-{os.getpid()}-{int(time.time())}/inc"
    raise RuntimeError(f"--storage {options.storage} needs --incremental-dir (e.g. "
                       "hdfs://namenode:9870/persia/inc)")


def write_config(options: DemoOptions, servers: list[str], checkpoint: str) -> Path:
    ours: dict = {
        "model": "demo",
        "producer": {"flush_interval_s": options.flush_interval_s, "announce": options.announce,
                     "producer_id": "trainer-0", "close_on_sigterm": False},
        "loader": {"rescan_interval_s": 1.0, "gap_timeout_s": 10.0, "watermark_poll_s": 1.0},
        "embedding_server": {"grace_s": 1.0, "workers": 4},
    }
    if options.storage == "ceph" and os.environ.get("S3_ENDPOINT_URL"):
        ours["s3"] = {"endpoint_url": os.environ["S3_ENDPOINT_URL"]}
    if options.announce == "kafka":
        if not options.kafka_bootstrap:
            raise RuntimeError("--announce kafka needs --kafka-bootstrap host:port")
        ours["kafka"] = {"bootstrap_servers": [options.kafka_bootstrap],
                         "session_timeout_ms": 6000, "heartbeat_interval_ms": 1000}
    config = {
        "PersiaInferConfig": {"servers": servers, "initial_sparse_checkpoint": checkpoint},
        "enable_incremental_update": True,
        "incremental_buffer_size": options.buffer_size,
        "incremental_dir": _storage_root(options),
        "storage": options.storage,
        "persia_inc": ours,
    }
    path = options.workdir / "global_config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_demo(options: DemoOptions, on_progress: Callable[[Progress], None] | None = None
             ) -> DemoReport:
    """Run the pipeline; writes report.json and freshness.png into the workdir."""
    import torch

    from persia_inc.demo.ctr import CTRModel, synthetic_batch
    from persia_inc.embedding_server.checkpoint import write_checkpoint
    from persia_inc.producer.torch_hook import IncrementalUpdateHook
    from persia_inc.storage import open_store

    torch.set_num_threads(1)  # leave the other core to the servers and the loader
    workdir = options.workdir
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    report = DemoReport(storage=options.storage, announce=options.announce, shards=options.shards)
    progress = Progress()
    notify = on_progress or (lambda _p: None)

    model = CTRModel(options.vocab, options.dim, seed=options.seed)
    checkpoint = str(workdir / "checkpoint")
    with open_store(checkpoint) as ckpt_store:
        signs = np.arange(options.vocab, dtype=np.uint64)
        write_checkpoint(ckpt_store, model="demo", tables={
            name: (signs, table.weight.detach().numpy().copy())
            for name, table in model.named_tables().items()})
    servers = [f"127.0.0.1:{free_port()}" for _ in range(options.shards)]
    config_path = write_config(options, servers, checkpoint)
    config: Config = load_config(config_path)
    store = config.open_store()
    if options.storage == "ceph":
        store.ensure_bucket()  # type: ignore[attr-defined]

    children: list[ChildProcess] = []
    watcher = None
    try:
        progress.phase = "starting embedding servers"
        notify(progress)
        for shard in range(options.shards):
            children.append(ChildProcess(
                f"embedding-server {shard}",
                ["embedding-server", "--config", str(config_path), "--shard", str(shard)],
                workdir / "logs" / f"embedding-server-{shard}.log"))
        client = embedding_client(config)
        try:
            client.wait_ready(90)
        except TimeoutError:
            for child in children:
                child.check_alive()
            raise
        children.append(ChildProcess("loader", ["loader", "--config", str(config_path)],
                                     workdir / "logs" / "loader.log"))
        watcher = FreshnessWatcher(client, store, "demo", progress).start()

        progress.phase = "training"
        producer = producer_from_config(config, producer_id="trainer-0")
        tables = model.named_tables()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        IncrementalUpdateHook(producer, tables, optimizer)
        evicted = {name: np.zeros(options.vocab, bool) for name in tables}
        rng = np.random.default_rng(options.seed)
        loss_fn = torch.nn.BCEWithLogitsLoss()
        started = time.monotonic()
        last_notify = 0.0
        while time.monotonic() - started < options.seconds:
            dense, sparse, label = synthetic_batch(rng, options.batch, options.vocab)
            optimizer.zero_grad()
            loss_fn(model(dense, sparse), label).backward()
            optimizer.step()
            ids = sparse.numpy()
            for i, name in enumerate(tables):
                evicted[name][ids[:, i]] = False  # touched again: the row lives again
            progress.steps += 1
            if progress.steps % options.evict_every_steps == 0:
                name = list(tables)[int(rng.integers(len(tables)))]
                gone = rng.choice(options.vocab, options.evict_rows, replace=False).astype(np.uint64)
                producer.evict(name, gone)
                evicted[name][gone] = True
            if time.monotonic() - last_notify > 0.25:
                for child in children:
                    child.check_alive()
                notify(progress)
                last_notify = time.monotonic()
        report.train_seconds = time.monotonic() - started
        report.steps = progress.steps

        progress.phase = "draining"
        notify(progress)
        producer.close()
        if not watcher.wait_all_visible(timeout_s=90):
            report.problems.append(
                f"only {len(watcher.visible)} of {len(watcher.created)} packets became visible")
        watcher.stop()

        progress.phase = "verifying"
        notify(progress)
        _verify(client, model, evicted, report)
        report.packets = len(watcher.created)
        report.rows_applied = progress.rows_applied
        latencies = progress.freshness_ms
        if latencies:
            report.freshness_ms = {
                "p50": round(float(np.percentile(latencies, 50)), 1),
                "p99": round(float(np.percentile(latencies, 99)), 1),
                "max": round(float(np.max(latencies)), 1),
                "count": len(latencies),
            }
        else:
            report.problems.append("no packet was observed becoming visible")
        for child in children:
            child.check_alive()
        report.verified = (not report.problems and report.mismatched_rows == 0
                           and report.evicted_still_served == 0 and report.packets > 0)
        client.close()
    finally:
        if watcher is not None:
            watcher.stop()
        for child in reversed(children):
            code = child.stop()
            if code not in (0, None):
                report.problems.append(f"{child.name} exited with {code} on SIGTERM")
                report.verified = False
        store.close()
    progress.phase = "done"
    notify(progress)
    if plot_freshness(progress.freshness_ms, workdir / "freshness.png"):
        report.pictures.append("freshness.png")
    (workdir / "report.json").write_text(report.to_json())
    return report


def _verify(client, model, evicted: dict[str, np.ndarray], report: DemoReport) -> None:
    """Every live row on the servers equals training's, bit for bit; evicted rows are gone."""
    for name, table in model.named_tables().items():
        weights = table.weight.detach().numpy()
        signs = np.arange(weights.shape[0], dtype=np.uint64)
        served = client.lookup(name, signs)
        live = ~evicted[name]
        differs = np.any(served.view(np.uint32) != weights.view(np.uint32), axis=1)
        report.mismatched_rows += int((differs & live).sum())
        report.checked_rows += int(live.sum())
        gone = signs[evicted[name]]
        report.evicted_rows += int(gone.size)
        if gone.size:
            misses_before = _misses(client, name)
            client.lookup(name, gone)
            report.evicted_still_served += int(gone.size - (_misses(client, name) - misses_before))


def _misses(client, table: str) -> int:
    return sum(t.misses for shard in range(len(client.servers))
               for t in client.status(shard).tables if t.name == table)


def plot_freshness(latencies_ms: list[float], path: Path) -> bool:
    """A histogram of freshness at `path`; False (and no file) without matplotlib, an optional
    extra the demo says it lacks at its start."""
    if not have("matplotlib"):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    if latencies_ms:
        axes.hist(latencies_ms, bins=50, color="#3b7dd8")
        for q, style in ((50, "--"), (99, ":")):
            value = float(np.percentile(latencies_ms, q))
            axes.axvline(value, color="black", linestyle=style, label=f"p{q} {value:.0f} ms")
        axes.legend()
    axes.set_xlabel("freshness: packet created → visible on every shard (ms)")
    axes.set_ylabel("packets")
    axes.set_title("persia-inc demo: update freshness")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return True


def default_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="persia-inc-demo-"))
