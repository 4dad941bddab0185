"""Shared fixtures: real services started by the test session itself, stopped by PID.

* `ceph`: one throwaway Ceph cluster with its S3 gateway for the whole session (about 6 s).
* `kafka`: a Tansu Kafka-protocol broker (memory storage) for the whole session;
  `kafka_factory` starts extra brokers a test may stop and restart.
* `torchserve`: a real TorchServe per test module.
* `webhdfs`: the WebHDFS protocol emulator (tests/webhdfs_emulator.py) per test.
* `object_store`: the same storage cases against local disk, Ceph and the emulator.
* `embedding_cluster_factory`: N real embedding-server processes on loopback, one config file.
"""

from __future__ import annotations

import gc
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from persia_inc.foundation.net import free_port
from persia_inc.foundation.threads import leaked_threads
from persia_inc.inference.local import LocalTorchServe
from persia_inc.local_services import CephCluster, EmbeddingCluster, TansuBroker, write_test_config
from persia_inc.storage import ObjectStore, RetryPolicy, open_store

from webhdfs_emulator import WebHdfsEmulator

FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.05, deadline_s=10)


@pytest.fixture(scope="session")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    cluster = CephCluster(tmp_path_factory.mktemp("ceph"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TansuBroker]:
    broker = TansuBroker(tmp_path_factory.mktemp("tansu")).start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def torchserve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalTorchServe]:
    """A real TorchServe (127.0.0.1, free ports) shared by one test module."""
    server = LocalTorchServe(tmp_path_factory.mktemp("torchserve")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def kafka_factory(tmp_path: Path) -> Iterator[Callable[..., TansuBroker]]:
    """Start brokers of a test's own (for outage tests); all are stopped afterwards."""
    started: list[TansuBroker] = []

    def start(**kwargs: object) -> TansuBroker:
        broker = TansuBroker(tmp_path / f"tansu-{len(started)}", **kwargs).start()  # type: ignore[arg-type]
        started.append(broker)
        return broker

    yield start
    for broker in started:
        broker.stop()


@pytest.fixture
def webhdfs(tmp_path: Path) -> Iterator[WebHdfsEmulator]:
    emulator = WebHdfsEmulator(tmp_path / "webhdfs").start()
    try:
        yield emulator
    finally:
        emulator.stop()


@pytest.fixture
def embedding_cluster_factory(tmp_path: Path) -> Iterator[Callable[..., EmbeddingCluster]]:
    """make(num, name="c", incremental_dir=None, replicas=1, storage="local", checkpoint="",
    model="m", persia_inc={...section overrides}, **embedding_server_settings) -> a ready
    cluster (`replicas` > 1: every shard listed as that many replicas, each a process).

    The cluster's `config_path` is a complete config (servers, incremental_dir, our section)
    for the loader, producer and handler of the same test. All processes stop at teardown.
    """
    made: list[EmbeddingCluster] = []

    def make(num: int, name: str = "c", incremental_dir: str | None = None, replicas: int = 1,
             **options: object) -> EmbeddingCluster:
        folder = tmp_path / name
        folder.mkdir()
        servers: list = [f"127.0.0.1:{free_port()}" for _ in range(num)]
        if replicas > 1:  # each shard listed as its replicas
            servers = [[s] + [f"127.0.0.1:{free_port()}" for _ in range(replicas - 1)]
                       for s in servers]
        path = write_test_config(folder / "config.yaml", servers,
                                 incremental_dir or str(tmp_path / "incremental"), **options)  # type: ignore[arg-type]
        cluster = EmbeddingCluster(path, servers, folder)
        if options.get("tls_cert_file"):
            cluster.client_defaults["tls_ca"] = Path(str(options["tls_cert_file"])).read_bytes()
        made.append(cluster)
        for shard in range(num):
            for replica in range(replicas):
                cluster.start(shard, replica)
        cluster.wait_ready()
        return cluster

    yield make
    for cluster in made:
        cluster.stop_all()


BACKENDS = ["local", "ceph", "hdfs"]


@pytest.fixture(params=BACKENDS)
def object_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    """An empty store on each backend, with fast retries."""
    if request.param == "local":
        store = open_store(str(tmp_path / "store"), retry=FAST_RETRY)
    elif request.param == "ceph":
        cluster: CephCluster = request.getfixturevalue("ceph")
        store = open_store(cluster.new_bucket(), retry=FAST_RETRY, s3=cluster.s3_settings())
    else:
        emulator: WebHdfsEmulator = request.getfixturevalue("webhdfs")
        store = open_store(f"{emulator.uri}/persia/inc", retry=FAST_RETRY)
    try:
        yield store
    finally:
        store.close()


@pytest.fixture(autouse=True)
def collect_kafka_sockets(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a test that talked to a broker, collect what kafka-python left: its 3.0 network
    selector can drop a socket it was still connecting when a client closes (traced with
    PYTHONTRACEMALLOC to kafka/net/inet.py), whose ResourceWarning would otherwise fail
    whichever later test the garbage collector happens to run in."""
    yield
    if {"kafka", "kafka_factory"} & set(request.fixturenames):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()


@pytest.fixture(autouse=True)
def no_thread_leaks() -> Iterator[None]:
    """Fail a test that leaves a thread running: any non-daemon thread, and our daemon threads
    (named `persia-inc-...`, pools included), which only a missing close() leaves behind.
    Threads get 5 s to finish stopping (every stop must be prompt)."""
    before = set(threading.enumerate())
    yield
    still = leaked_threads(before, grace_s=5.0)
    assert not still, f"threads leaked by the test: {still}"
