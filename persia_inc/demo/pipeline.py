"""The demo pipeline: checkpoint, servers, loader, training with the hook, then verification.

The parts it runs live beside it: `processes` (the child processes), `freshness` (how fresh
each packet became visible), `verify` (rows bit for bit) and `report` (progress, report,
picture).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import yaml

from persia_inc.config import Config, load_config
from persia_inc.demo.freshness import FreshnessWatcher
from persia_inc.demo.processes import ChildProcess
from persia_inc.demo.report import DemoReport, Progress, plot_freshness
from persia_inc.demo.verify import verify_rows
from persia_inc.foundation.net import free_port
from persia_inc.storage import S3Settings, resolve_s3_endpoint
from persia_inc.wiring import embedding_client, producer_from_config

if TYPE_CHECKING:
    from prometheus_client import Counter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoOptions:
    """seconds: training time; vocab: rows per table; shards: embedding-server processes;
    incremental_dir: override for ceph/hdfs (default: a folder in the workdir, or a fresh
    bucket for ceph); s3: the S3 endpoint and keys for ceph (None: the endpoint from the
    environment, see `resolve_s3_endpoint`, and boto3's credential chain); kafka_bootstrap:
    host:port for announce=kafka."""

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
    s3: S3Settings | None = None
    seed: int = 0


# ------------------------------------------------------------------------------ the run


def _storage_root(options: DemoOptions) -> str:
    if options.incremental_dir:
        return options.incremental_dir
    if options.storage == "local":
        return str(options.workdir / "incremental")
    if options.storage == "ceph":
        if not _s3_settings(options).endpoint_url:
            raise RuntimeError("--storage ceph needs an S3 endpoint (S3_ENDPOINT_URL or "
                               "AWS_ENDPOINT_URL) or --incremental-dir s3://bucket/prefix")
        return f"s3://persia-demo-{os.getpid()}-{int(time.time())}/inc"
    raise RuntimeError(f"--storage {options.storage} needs --incremental-dir (e.g. "
                       "hdfs://namenode:9870/persia/inc)")


def _s3_settings(options: DemoOptions) -> S3Settings:
    """The given settings, or the endpoint from the environment (flag > S3_ENDPOINT_URL >
    AWS_ENDPOINT_URL_S3 > AWS_ENDPOINT_URL)."""
    s3 = options.s3 or S3Settings()
    return dataclasses.replace(s3, endpoint_url=resolve_s3_endpoint(s3.endpoint_url))


def write_config(options: DemoOptions, servers: list[str], checkpoint: str) -> Path:
    ours: dict = {
        "model": "demo",
        "producer": {"flush_interval_s": options.flush_interval_s, "announce": options.announce,
                     "producer_id": "trainer-0", "close_on_sigterm": False},
        "loader": {"rescan_interval_s": 1.0, "gap_timeout_s": 10.0, "watermark_poll_s": 1.0},
        "embedding_server": {"grace_s": 1.0, "workers": 4},
    }
    if options.storage == "ceph":
        s3 = _s3_settings(options)  # the children get the same endpoint and keys
        ours["s3"] = {key: value for key in ("endpoint_url", "region", "access_key_id",
                                             "secret_access_key") if (value := getattr(s3, key))}
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
        report.objects_stored = _counter_total(producer.metrics.packets)
        report.flushes = _counter_total(producer.metrics.flushes)
        if not watcher.wait_all_visible(timeout_s=90):
            report.problems.append(
                f"only {len(watcher.visible)} of {len(watcher.created)} packets became visible")
        watcher.stop()

        progress.phase = "verifying"
        notify(progress)
        verify_rows(client, model, evicted, report)
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


def _counter_total(counter: Counter) -> int:
    """A Prometheus counter summed over all its labels (table, reason)."""
    return int(sum(sample.value for metric in counter.collect() for sample in metric.samples
                   if sample.name.endswith("_total")))


def default_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="persia-inc-demo-"))
