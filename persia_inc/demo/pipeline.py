"""The demo pipeline: warm-up, checkpoint, servers, loader, training with the hook on a
drifting click stream while two arms serve it, then verification.

The parts it runs live beside it: `clicks` (the drifting stream), `processes` (the child
processes), `freshness` (how fresh each packet became visible), `serving` (live vs frozen
predictions), `verify` (rows bit for bit) and `report` (progress, report, pictures).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from persia_inc.config import Config, load_config
from persia_inc.demo.chaos import ReplicaProcesses
from persia_inc.demo.clicks import ClickStream, ClickStreamConfig
from persia_inc.demo.freshness import FreshnessWatcher
from persia_inc.demo.kserve import KServeServed, kserve_scorer
from persia_inc.demo.processes import ChildProcess
from persia_inc.demo.report import DemoReport, Progress, plot_freshness, plot_serving
from persia_inc.demo.serving import (
    ServingOptions,
    ServingProbe,
    compare_frontends,
    in_process_scorer,
    live_scorer,
)
from persia_inc.demo.verify import verify_rows
from persia_inc.demo.versions import (
    DenseWatcher,
    dense_summary,
    dense_versions_report,
    load_dense_version,
)
from persia_inc.foundation.net import free_port
from persia_inc.foundation.wait import WaitTimeoutError, wait_until
from persia_inc.local_services import ServiceError
from persia_inc.storage import S3Settings, resolve_s3_endpoint
from persia_inc.wiring import embedding_client, producer_from_config

if TYPE_CHECKING:
    from prometheus_client import Counter

    from persia_inc.embedding_server.client import EmbeddingClient
    from persia_inc.inference.spec import ModelSpec
    from persia_inc.producer.torch_hook import DensePublish
    from persia_inc.serving import ServedModel

log = logging.getLogger(__name__)

CHECKPOINT_DENSE_VERSION = "0"  # demo.mar's TorchServe version; dense versions count from 1


@dataclass(frozen=True)
class DemoOptions:
    """seconds: training time after the checkpoint (the stream drifts meanwhile); warmup_s:
    training time before it (the stream stands still); vocab: rows per table; shards:
    embedding-server processes of the live arm; frozen_shards: of the frozen arm;
    embedding_lr / dense_lr: SGD learning rates of the tables / the MLP; drift: the click
    stream (default: `ClickStreamConfig` with this vocab and seed); serving: the requests;
    incremental_dir: override for ceph/hdfs (default: a folder in the workdir, or a fresh
    bucket for ceph); s3: the S3 endpoint and keys for ceph (None: the endpoint from the
    environment, see `resolve_s3_endpoint`, and boto3's credential chain); kafka_bootstrap:
    host:port for announce=kafka; dense_every_s: publish the dense part as a dense version
    this often while training (seconds; the loader's dense sync activates each in TorchServe
    once the servers hold its sparse positions; 0: never; only with the torchserve frontend);
    dense_activate_timeout_s: how long, after training, the last one gets to activate;
    replicas: processes per live shard (each a full copy; clients fail over between them);
    chaos_every_s: kill one live replica with SIGKILL this often and start it again (0: never;
    needs replicas >= 2);
    update_policy, update_budget, max_staleness_s: the producer's update policy
    (`persia_inc.producer.update_policy`, `update_budget_fraction`, `max_staleness_s`)."""

    workdir: Path
    seconds: float = 60.0
    warmup_s: float = 8.0
    storage: str = "local"
    announce: str = "dir"
    shards: int = 2
    frozen_shards: int = 1
    vocab: int = 20_000
    dim: int = 16
    batch: int = 1024
    buffer_size: int = 20_000
    flush_interval_s: float = 0.5
    evict_every_steps: int = 40
    evict_rows: int = 64
    embedding_lr: float = 60.0
    dense_lr: float = 0.1
    drift: ClickStreamConfig | None = None
    serving: ServingOptions = field(default_factory=ServingOptions)
    incremental_dir: str = ""
    kafka_bootstrap: str = ""
    s3: S3Settings | None = None
    seed: int = 0
    dense_every_s: float = 10.0
    dense_activate_timeout_s: float = 60.0
    replicas: int = 1
    chaos_every_s: float = 0.0
    update_policy: str = "all"
    update_budget: float = 0.05
    max_staleness_s: float = 20.0

    def __post_init__(self) -> None:
        if self.dense_every_s < 0 or self.dense_activate_timeout_s <= 0:
            raise ValueError("need dense_every_s >= 0 and dense_activate_timeout_s > 0")
        if self.replicas < 1 or self.chaos_every_s < 0 or (self.chaos_every_s
                                                           and self.replicas < 2):
            raise ValueError("need replicas >= 1, chaos_every_s >= 0, and replicas >= 2 for chaos")


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


def write_config(options: DemoOptions, servers: list[str], checkpoint: str,
                 name: str = "global_config.yaml") -> Path:
    ours: dict = {
        "model": "demo",
        "producer": {"flush_interval_s": options.flush_interval_s, "announce": options.announce,
                     "producer_id": "trainer-0", "close_on_sigterm": False,
                     **({"update_policy": "prioritized",
                         "update_budget_fraction": options.update_budget,
                         "max_staleness_s": options.max_staleness_s}
                        if options.update_policy == "prioritized" else {})},
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
    path = options.workdir / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def loader_config(config_path: Path, metrics_port: int, served: ServedModel | KServeServed | None = None
                  ) -> Path:
    """`config_path` plus the loader's metrics port on 127.0.0.1 (/healthz: the demo trains
    once the loader is ready; /streams: the dense sync's status) and, with `served`, its dense
    sync against that TorchServe (gRPC management API, model name and model store), as
    global_config.loader.yaml beside it: the loader child's config."""
    config = yaml.safe_load(config_path.read_text())
    loader = config["persia_inc"]["loader"]
    loader.update({"metrics_port": metrics_port, "metrics_addr": "127.0.0.1"})
    if isinstance(served, KServeServed):  # loads in tens of ms: list often
        loader["dense_sync"] = {"enabled": True, **served.dense_sync_target(), "keep_versions": 2,
                                "interval_s": 0.1, "retire_grace_s": 5.0}
    elif served is not None:
        loader["dense_sync"] = {
            "enabled": True, "management_address": served.server.grpc_management_target,
            "inference_address": served.server.grpc_inference_target,
            "log_dir": str(served.server.workdir / "logs"),
            "model_name": served.model_name, "model_store": str(served.server.model_store),
            "keep_versions": 2, "interval_s": 0.5, "retire_grace_s": 5.0}
    path = config_path.with_name("global_config.loader.yaml")
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def wait_loader_ready(url: str, loader: ChildProcess, timeout_s: float = 60.0) -> dict | None:
    """Poll the loader's /healthz until it says ready (its sources see packets: a Kafka
    consumer has its partitions), as a loader long up in production is; its last answer, or
    None if it never answered. Raises if the loader process died."""
    import json
    import urllib.error
    import urllib.request

    health: dict | None = None

    def ready() -> bool:
        nonlocal health
        loader.check_alive()
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                health = json.loads(reply.read())
        except urllib.error.HTTPError as exc:  # 503: not healthy yet, with the report
            health = json.loads(exc.read() or b"null")
        return bool(health and health.get("ready"))

    with contextlib.suppress(WaitTimeoutError):  # OSError, ValueError: not listening yet
        wait_until(ready, f"the loader's {url} to say ready", timeout_s=timeout_s, interval_s=0.1,
                   ignore=(OSError, ValueError))
    return health


def run_demo(options: DemoOptions, on_progress: Callable[[Progress], None] | None = None
             ) -> DemoReport:
    """Run the pipeline; writes report.json, freshness.png and serving.png into the workdir."""
    import torch

    from persia_inc.demo.ctr import CTRModel, dense_part, serving_spec
    from persia_inc.dense import mar_exporter
    from persia_inc.embedding_server.checkpoint import write_checkpoint
    from persia_inc.inference.client import get_inference_stub
    from persia_inc.inference.engine import PersiaInference
    from persia_inc.inference.model import load_torchscript, save_torchscript
    from persia_inc.producer.torch_hook import IncrementalUpdateHook
    from persia_inc.storage import open_store

    torch.set_num_threads(1)  # leave the other core to the servers and the loader
    workdir = options.workdir
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    report = DemoReport(storage=options.storage, announce=options.announce, shards=options.shards)
    progress = Progress()
    notify = on_progress or (lambda _p: None)

    model = CTRModel(options.vocab, options.dim, seed=options.seed)
    stream = ClickStream(options.drift or ClickStreamConfig(
        vocab=options.vocab, popular=min(200, options.vocab // 2), seed=options.seed))
    tables = model.named_tables()
    optimizer = torch.optim.SGD([{"params": model.tables.parameters(), "lr": options.embedding_lr},
                                 {"params": model.mlp.parameters(), "lr": options.dense_lr}])
    rng = np.random.default_rng(options.seed)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def train_step() -> np.ndarray:
        """One SGD step on a batch of the stream as it is now; returns its ids int64[b, 26]."""
        clicks = stream.sample(rng, options.batch)
        sparse = torch.from_numpy(clicks.ids)
        optimizer.zero_grad()
        loss_fn(model(torch.from_numpy(clicks.dense), sparse), torch.from_numpy(clicks.label)).backward()
        optimizer.step()
        return clicks.ids

    progress.phase = "warming up (no drift)"
    notify(progress)
    started = time.monotonic()
    while time.monotonic() - started < options.warmup_s:
        train_step()
        report.warmup_steps += 1
    checkpoint = str(workdir / "checkpoint")
    with open_store(checkpoint) as ckpt_store:  # the servers start here; the frozen arm stays
        signs = np.arange(options.vocab, dtype=np.uint64)
        at_checkpoint = {name: table.weight.detach().numpy().copy() for name, table in tables.items()}
        manifest = write_checkpoint(ckpt_store, model="demo", tables={
            name: (signs, rows) for name, rows in at_checkpoint.items()})
    dense_pt = save_torchscript(dense_part(model), workdir / "dense.pt")
    dense = load_torchscript(dense_pt)
    spec = serving_spec(model)
    servers: list = [f"127.0.0.1:{free_port()}" for _ in range(options.shards)]
    if options.replicas > 1:  # each shard listed as its replicas
        servers = [[s] + [f"127.0.0.1:{free_port()}" for _ in range(options.replicas - 1)]
                   for s in servers]
    # one storage root for both configs (a ceph run's is a new bucket name on every call)
    options = dataclasses.replace(options, incremental_dir=_storage_root(options))
    config_path = write_config(options, servers, checkpoint)
    frozen_servers = [f"127.0.0.1:{free_port()}" for _ in range(options.frozen_shards)]
    frozen_path = write_config(options, frozen_servers, checkpoint, "global_config.frozen.yaml")
    config: Config = load_config(config_path)
    store = config.open_store()
    if options.storage == "ceph":
        store.ensure_bucket()  # type: ignore[attr-defined]

    children: list[ChildProcess] = []
    watcher = None
    probe = None
    served: ServedModel | KServeServed | None = None
    kserve_live: Any = None
    dense_watch: DenseWatcher | None = None
    stub = None
    clients: list[EmbeddingClient] = []
    live_servers: ReplicaProcesses | None = None
    try:
        progress.phase = "starting embedding servers"
        notify(progress)
        live_servers = ReplicaProcesses("embedding-server", config_path,
                                        [options.replicas] * options.shards, workdir / "logs")
        for arm, path, count in (("frozen-embedding-server", frozen_path, options.frozen_shards),):
            for shard in range(count):
                children.append(ChildProcess(
                    f"{arm} {shard}", ["embedding-server", "--config", str(path), "--shard", str(shard)],
                    workdir / "logs" / f"{arm}-{shard}.log"))
        if options.serving.frontend == "torchserve":  # while the servers load the checkpoint
            progress.phase = "starting embedding servers and TorchServe"
            notify(progress)
            served = _torchserve(workdir, config_path, dense_pt, spec)
            served.start()
            stub = get_inference_stub(served.grpc_target)
            log.info("TorchServe (pid %s) serves %r at %s; logs in %s", served.server.pid,
                     served.model_name, served.grpc_target, served.server.workdir / "logs")
        elif options.serving.frontend == "kserve":
            progress.phase = "starting embedding servers and the kserve frontend"
            notify(progress)
            served = KServeServed(config_path, _archive(workdir, config_path, dense_pt, spec),
                                  workdir / "kserve", "demo").start()
            kserve_live = kserve_scorer(served.grpc_target, served.model_name)
            log.info("the kserve frontend (pid %s) serves %r at %s", served.pid, served.model_name,
                     served.grpc_target)
        client = embedding_client(config)
        frozen_client = embedding_client(frozen_path)
        clients += [client, frozen_client]
        def servers_ready() -> bool:
            live_servers.check_alive()  # a server that exited (a port taken) ends the wait at once
            for child in children:
                child.check_alive()
            try:
                client.wait_ready(2)
                frozen_client.wait_ready(2)
            except TimeoutError:
                return False
            return True

        try:
            wait_until(servers_ready, "the live and frozen embedding servers to report SERVING",
                       timeout_s=90)
        except TimeoutError as exc:
            raise ServiceError(str(exc)) from None
        dense_every = options.dense_every_s if served is not None else 0.0
        if options.dense_every_s and served is None:
            log.info("no dense versions this time: they are activated in TorchServe, and the "
                     "live arm is served in process")
        metrics_port = free_port()
        loader_path = loader_config(config_path, metrics_port,
                                    served if dense_every and served is not None else None)
        if dense_every and served is not None:
            dense_watch = DenseWatcher(f"http://127.0.0.1:{metrics_port}", progress).start()
        loader = ChildProcess("loader", ["loader", "--config", str(loader_path)],
                              workdir / "logs" / "loader.log")
        children.append(loader)
        progress.phase = "waiting for the loader to be ready"
        notify(progress)
        health = wait_loader_ready(f"http://127.0.0.1:{metrics_port}/healthz", loader)
        if not (health and health.get("ready")):
            report.problems.append(f"the loader was not ready after 60 s: {health}")
        watcher = FreshnessWatcher(client, store, "demo", progress).start()

        progress.phase = "training on a drifting stream, serving live and frozen"
        producer = producer_from_config(config, producer_id="trainer-0")
        hook = IncrementalUpdateHook(
            producer, tables, optimizer, dense_every_s=dense_every,
            dense_module=lambda: dense_part(model),
            dense_exporter=mar_exporter(spec, config_file=config_path) if dense_every else None)
        for name, rows in at_checkpoint.items():  # what serving holds: changes rank against it
            producer.mark_served(name, signs, rows)
        evicted = {name: np.zeros(options.vocab, bool) for name in tables}
        started = time.monotonic()
        started_ns = time.time_ns()

        def stream_clock() -> float:
            return time.monotonic() - started

        engine = PersiaInference.from_client(dense, spec, client)  # the handler's code, here
        live = kserve_live or live_scorer(options.serving.frontend, engine, stub,
                                          served.model_name if served is not None else "")
        frozen = in_process_scorer(PersiaInference.from_client(dense, spec, frozen_client))
        # with dense versions the live arm's dense part moves on: score the live rows with the
        # checkpoint's dense part too, to show what the dense updates add
        probe = ServingProbe(stream, live, frozen, options.serving, progress, stream_clock,
                             until_s=options.seconds,
                             checkpoint_dense=in_process_scorer(engine) if dense_every else None
                             ).start()
        if options.chaos_every_s:
            live_servers.start_chaos(options.chaos_every_s, stream_clock)
        last_notify = 0.0
        while stream_clock() < options.seconds:
            stream.advance_to(stream_clock())
            ids = train_step()
            for i, name in enumerate(tables):
                evicted[name][ids[:, i]] = False  # touched again: the row lives again
            progress.steps += 1
            progress.dense_published = sum(d.version is not None for d in hook.dense_published)
            if progress.steps % options.evict_every_steps == 0:
                name = list(tables)[int(rng.integers(len(tables)))]
                gone = rng.choice(options.vocab, options.evict_rows, replace=False).astype(np.uint64)
                producer.evict(name, gone)
                evicted[name][gone] = True
            if time.monotonic() - last_notify > 0.25:
                live_servers.check_alive()
                for child in children:
                    child.check_alive()
                notify(progress)
                last_notify = time.monotonic()
        report.train_seconds = time.monotonic() - started
        report.steps = progress.steps
        probe.close()
        report.serving = probe.report()
        report.serving["failovers"] = client.counters()["failovers"]
        report.serving["behind_answers"] = client.counters()["behind_answers"]
        report.serving["replicas"] = options.replicas
        report.serving["kills"] = list(live_servers.kills)

        progress.phase = "draining"
        notify(progress)
        producer.close()
        report.objects_stored = _counter_total(producer.metrics.packets)
        report.flushes = _counter_total(producer.metrics.flushes)
        report.update_policy = options.update_policy
        report.bytes_shipped = _counter_total(producer.metrics.bytes)
        report.rows_shipped = _counter_total(producer.metrics.rows)
        if not watcher.wait_all_visible(timeout_s=90):
            report.problems.append(
                f"only {len(watcher.visible)} of {len(watcher.created)} packets became visible")
        watcher.stop()

        reference = engine  # what TorchServe serves by default: the checkpoint's dense part ...
        if dense_watch is not None:  # ... or the last dense version activated
            progress.phase = "waiting for the last dense version to activate"
            notify(progress)
            active = _settle_dense(hook.dense_published, dense_watch, dense_every,
                                   options.dense_activate_timeout_s, report)
            if active is not None:
                folder = workdir / "dense-versions"
                folder.mkdir(exist_ok=True)
                reference = PersiaInference.from_client(
                    load_dense_version(store, "demo", active, folder), spec, client)
            report.serving["dense_version_checked"] = active or 0

        if served is not None:  # the rows stand still now: TorchServe must answer as the engine
            progress.phase = "checking TorchServe against the in-process engine"
            notify(progress)
            check = compare_frontends(stream, live, in_process_scorer(reference),
                                      options.serving.check_requests, options.serving.request_rows)
            report.serving.update(checked=check.checked, mismatched=check.mismatched)
            report.serving[options.serving.frontend] = served.describe() if isinstance(
                served, KServeServed) else {
                "pid": served.server.pid, "grpc": served.grpc_target, "model": served.model_name,
                "workdir": str(served.server.workdir)}
            if check.mismatched:
                report.problems.append(
                    f"serving: {check.mismatched} of {check.checked} requests scored by TorchServe "
                    "differ from the in-process engine (see logs/demo.log)")

        progress.phase = "verifying"
        notify(progress)
        verify_rows(client, model, evicted, report)
        marks = [(w.table, w.producer, w.generation, w.sequence) for w in manifest.watermarks]
        _check_frozen(frozen_client, at_checkpoint, marks, report)
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
        live_servers.check_alive()
        for child in children:
            child.check_alive()
        if served is not None and (code := served.exit_code() if isinstance(served, KServeServed)
                                   else served.server.exit_code()) is not None:
            report.problems.append(f"the {options.serving.frontend} frontend exited with {code} "
                                   "(see its logs in the workdir)")
        report.verified = (not report.problems and report.mismatched_rows == 0
                           and report.evicted_still_served == 0 and report.packets > 0)
    finally:
        if probe is not None:
            probe.close()
        if watcher is not None:
            watcher.stop()
        if dense_watch is not None:
            dense_watch.stop()
        if stub is not None:
            stub.channel.close()
        if kserve_live is not None:
            kserve_live.close()
        for opened in clients:
            opened.close()
        for child in reversed(children):
            code = child.stop()
            if code not in (0, None):
                report.problems.append(f"{child.name} exited with {code} on SIGTERM")
                report.verified = False
        if served is not None:  # after the loader: its dense sync would log the frontend gone
            served.close()
        if live_servers is not None:
            stopped = live_servers.stop()
            report.problems += stopped
            report.verified = report.verified and not stopped
        store.close()
    progress.phase = "done"
    notify(progress)
    if plot_freshness(progress.freshness_ms, workdir / "freshness.png"):
        report.pictures.append("freshness.png")
    timeline = report.serving.get("timeline")
    switches = [(v["activated_at_ns"] - started_ns) / 1e9 for v in report.dense_versions
                if isinstance(v.get("activated_at_ns"), int)] if report.dense_versions else []
    kills = report.serving.get("kills")
    if plot_serving(timeline if isinstance(timeline, list) else [], workdir / "serving.png",
                    switches_s=switches,
                    kills_s=[k["t_s"] for k in kills] if isinstance(kills, list) else []):
        report.pictures.append("serving.png")
    (workdir / "report.json").write_text(report.to_json())
    return report


def _torchserve(workdir: Path, config_path: Path, dense_pt: Path, spec: ModelSpec) -> ServedModel:
    """The dense part and its spec archived as `demo.mar` (the live servers' config inside),
    served as `persia-inc serve` serves it: 127.0.0.1, free ports, one worker, batch size 1
    (bit for bit as the engine), one thread per worker (2 cores: leave training its own)."""
    from persia_inc.serving import ServedModel, ServeSettings

    return ServedModel(config_path, _archive(workdir, config_path, dense_pt, spec), workdir / "torchserve",
                       ServeSettings(workers=1, batch_size=1,
                                     env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}))


def _archive(workdir: Path, config_path: Path, dense_pt: Path, spec: ModelSpec) -> Path:
    """`WORKDIR/model-store/demo.mar`: the checkpoint's dense part, version 0, with its spec and
    the live servers' config (what either frontend serves first)."""
    from persia_inc.inference.archive import archive_model
    from persia_inc.wiring import MAR_HANDLER

    return archive_model("demo", dense_pt, spec, workdir / "model-store", handler=MAR_HANDLER,
                         config_file=config_path,
                         check_config=lambda path: load_config(path, need_servers=True),
                         version=CHECKPOINT_DENSE_VERSION)


def _settle_dense(published: list[DensePublish], watch: DenseWatcher, every_s: float,
                  timeout_s: float, report: DemoReport) -> int | None:
    """After training: wait (at most `timeout_s`) until the last published dense version is
    active, fill the report's `dense_versions` and `dense`, and add a problem for a failed
    publish, a version refused or never activated. Returns the version TorchServe serves by
    default now (None: still the checkpoint's dense part)."""
    stored = [d.version.version for d in published if d.version is not None]
    if stored and not watch.wait_activated(stored[-1], timeout_s):
        report.problems.append(f"dense: version {stored[-1]} was not activated {timeout_s:.0f} s "
                               "after training (see logs/loader.log)")
    report.dense_versions = dense_versions_report(published, watch.activations())
    report.dense = dense_summary(published, report.dense_versions, every_s)
    failures = [d.error for d in published if d.version is None]
    if failures:
        report.problems.append(f"dense: {len(failures)} publish(es) failed, first: {failures[0]}")
    missing = [v["version"] for v in report.dense_versions if v["activated_at_ns"] is None]
    if missing:
        report.problems.append(f"dense: versions {missing} were published but never activated")
    refused = (watch.status or {}).get("refused") or []
    if refused:
        report.problems.append(f"dense: the loader refused {refused}")
    return watch.active_version()


def _check_frozen(client: EmbeddingClient, at_checkpoint: dict[str, np.ndarray],
                  marks: list[tuple[str, str, int, int]], report: DemoReport) -> None:
    """The frozen arm must still hold the checkpoint: its watermarks the checkpoint's, every
    row bit for bit; the serving checks and problems go into `report`."""
    served = [(w.table, w.producer, w.generation, w.sequence) for w in client.watermarks()]
    changed = 0
    for name, rows in at_checkpoint.items():
        now = client.lookup(name, np.arange(rows.shape[0], dtype=np.uint64))
        changed += int(np.any(now.view(np.uint32) != rows.view(np.uint32), axis=1).sum())
    serving = report.serving
    serving["frozen_watermarks"] = [list(mark) for mark in served]
    serving["frozen_rows_changed"] = changed
    if served != marks or changed:
        report.problems.append(f"the frozen arm changed: watermarks {served} (checkpoint: "
                               f"{marks}), {changed} rows differ from the checkpoint")
    if not serving.get("requests"):
        report.problems.append("serving: no request was sent")
    elif serving.get("errors"):
        report.problems.append(f"serving: {serving['errors']} of {serving['requests']} requests "
                               "failed (see logs/demo.log)")


def _counter_total(counter: Counter) -> int:
    """A Prometheus counter summed over all its labels (table, reason)."""
    return int(sum(sample.value for metric in counter.collect() for sample in metric.samples
                   if sample.name.endswith("_total")))


def default_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="persia-inc-demo-"))
