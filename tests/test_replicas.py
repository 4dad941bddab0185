"""Shard replicas: configuration, identity, client failover and never-stale reads, against real
`persia-inc embedding-server` processes on 127.0.0.1 (one process per replica).

One shard of two replicas keeps the tests lean: failover and freshness are per shard.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable

import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_loader_services import FAST as LOADER_FAST
from test_loader_services import Training

from persia_inc.config import ConfigError, config_from_mapping, load_config
from persia_inc.embedding_server.client import EmbeddingClient
from persia_inc.embedding_server.errors import ShardError, ShardIdentityError
from persia_inc.embedding_server.routing import targets_of_servers
from persia_inc.embedding_server.sharding import replica_sets
from persia_inc.foundation.wait import wait_until
from persia_inc.local_services import EMBEDDING_TOKEN, EMBEDDING_TOKEN_ENV
from persia_inc.packet_format.cut import Cut, CutHeader, CutTable, TableRows
from persia_inc.wiring import loader_from_config

DIM = 8
SIGNS = np.arange(1, 2001, dtype=np.uint64)
FAST = {"replica_max_lag_s": 0.2, "replica_poll_s": 0.05, "replica_retry_s": 0.2}


def make_cut(sequence: int, version: float, signs: np.ndarray = SIGNS) -> Cut:
    rows = np.repeat((signs.astype(np.float32) + version)[:, None], DIM, axis=1)
    header = CutHeader(model="m", producer="p0", generation=0, sequence=sequence,
                       tables=(CutTable("t", DIM, int(signs.size), 0),))
    return Cut(header, (TableRows("t", signs, rows, np.empty(0, np.uint64)),))


def expected(version: float) -> np.ndarray:
    return np.repeat((SIGNS.astype(np.float32) + version)[:, None], DIM, axis=1)


def wait_for(predicate: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    wait_until(predicate, what, timeout_s=timeout_s)


def health(client: EmbeddingClient, target: int) -> int:
    stub = health_pb2_grpc.HealthStub(client._channels[target])
    return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status


def current(client: EmbeddingClient, target: int) -> bool:
    """Whether `target` answers and says it is current (False while it is down)."""
    try:
        return client.status(target).current
    except ShardError:
        return False


def ready(client: EmbeddingClient, target: int) -> bool:
    """Whether `target` answers and has loaded its checkpoint."""
    try:
        return client.status(target).ready
    except ShardError:
        return False


# ----------------------------------------------------------------------- configuration


def test_servers_entries_are_an_address_or_a_list_of_replicas() -> None:
    plain = config_from_mapping({"PersiaInferConfig": {"servers": ["h:1", "h:2"]}})
    assert plain.infer.servers == ("h:1", "h:2")  # a plain list stays exactly as it was
    assert replica_sets(plain.infer.servers) == (("h:1",), ("h:2",))
    targets, by_shard = targets_of_servers(plain.infer.servers)
    assert [(t.index, t.shard, t.replica) for t in targets] == [(0, 0, 0), (1, 1, 0)]
    mixed = config_from_mapping({"PersiaInferConfig": {"servers": [["h:1", "h:3"], "h:2"]}})
    assert mixed.infer.servers == (("h:1", "h:3"), "h:2")
    targets, by_shard = targets_of_servers(mixed.infer.servers)
    assert by_shard == ((0, 1), (2,))
    assert [(t.shard, t.replica, t.address) for t in targets] == [
        (0, 0, "h:1"), (0, 1, "h:3"), (1, 0, "h:2")]
    with pytest.raises(ConfigError, match=r"servers\[0\]\[1\].*host:port"):
        config_from_mapping({"PersiaInferConfig": {"servers": [["h:1", "nope"]]}})
    with pytest.raises(ConfigError, match="one address twice"):
        config_from_mapping({"PersiaInferConfig": {"servers": [["h:1", "h:2"], "h:2"]}})
    with pytest.raises(ConfigError, match="non-empty list"):
        config_from_mapping({"PersiaInferConfig": {"servers": [[]]}})


# ----------------------------------------------------------------------- real processes


def test_replica_identity_failover_and_catch_up(embedding_cluster_factory) -> None:
    cluster = embedding_cluster_factory(1, replicas=2, **FAST)
    (first, second), = cluster.servers
    with (pytest.raises(ShardIdentityError, match=r"replica (0|1) of 2, it reports replica (1|0)"),
          EmbeddingClient([[second, first]], token=EMBEDDING_TOKEN) as wrong):
        wrong.lookup("t", SIGNS[:4])
    with cluster.client(timeout_s=10.0) as client:
        result = client.apply_cut(make_cut(1, 0.5))
        assert result.applied == (True, True)  # every replica got the cut
        for _ in range(4):  # reads spread over both replicas
            np.testing.assert_array_equal(client.lookup("t", SIGNS), expected(0.5))
        served = [sum(x.lookup_rows for x in client.status(t).tables) for t in (0, 1)]
        assert all(n > 0 for n in served), served

        cluster.stop(0, signal.SIGKILL)  # replica 0 dies: every read still answers
        for _ in range(6):
            np.testing.assert_array_equal(client.lookup("t", SIGNS), expected(0.5))
            np.testing.assert_array_equal(client.lookup_tables({"t": SIGNS})["t"], expected(0.5))
        # its health stream ended: reads skip it without paying a failed call to learn it
        wait_for(lambda: client.router.not_serving == (0,), "the client to see replica 0 gone")

        cluster.start(0)  # back, empty: catching up, not serving, not read
        wait_for(lambda: ready(client, 0), "the restarted replica to load")
        assert not client.status(0).current
        assert health(client, 0) == health_pb2.HealthCheckResponse.NOT_SERVING
        for _ in range(6):
            np.testing.assert_array_equal(client.lookup("t", SIGNS), expected(0.5))
        assert client.counters()["behind_answers"] == 0
        assert client.router.not_serving == (0,)  # connected again, and told NOT_SERVING

        # the loader's job, done by hand: the missing cut, to the restarted replica only
        assert client.apply_cut_shards(make_cut(1, 0.5), [0]) == {0: True}
        wait_for(lambda: current(client, 0), "the restarted replica to catch up")
        assert health(client, 0) == health_pb2.HealthCheckResponse.SERVING
        wait_for(lambda: client.router.not_serving == (), "the client to read replica 0 again")


def test_a_replica_missing_the_latest_cut_is_not_read(embedding_cluster_factory) -> None:
    cluster = embedding_cluster_factory(1, replicas=2, **FAST)
    with cluster.client(timeout_s=10.0) as client:
        client.apply_cut(make_cut(1, 0.5))
        wait_for(lambda: current(client, 0) and current(client, 1), "both replicas current")
        # the newest cut reaches replica 1 only (replica 0's apply was lost)
        assert client.apply_cut_shards(make_cut(2, 0.75), [1]) == {1: True}
        wait_for(lambda: not current(client, 0), "the lagging replica to stop serving")
        assert health(client, 0) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert client.status(0).behind_s > 0
        for _ in range(8):  # round-robin would send half of these to replica 0
            np.testing.assert_array_equal(client.lookup("t", SIGNS), expected(0.75))
            np.testing.assert_array_equal(client.lookup_tables({"t": SIGNS})["t"], expected(0.75))
        assert client.counters()["behind_answers"] == 0

        # the fresh replica dies: the lagging one still answers, flagged and counted
        cluster.stop(0, signal.SIGKILL, replica=1)
        np.testing.assert_array_equal(client.lookup("t", SIGNS), expected(0.5))
        assert client.counters()["behind_answers"] >= 1
        assert not client.status(0).current  # it remembers what its sibling held


def test_the_loader_keeps_every_replica_current(embedding_cluster_factory, tmp_path) -> None:
    cluster = embedding_cluster_factory(1, replicas=2, incremental_dir=str(tmp_path / "inc"),
                                        persia_inc={"loader": LOADER_FAST}, **FAST)
    config = load_config(cluster.config_path)

    def positions(target: int) -> list[tuple[int, int]]:
        return [(w.generation, w.sequence) for w in client.shard_watermarks(target)]

    with cluster.client(timeout_s=10.0) as client, config.open_store() as store:
        training = Training(store)
        with loader_from_config(config, client) as loader:
            for seq in range(3):
                training.write(1, seq)
            training.check(client)
            wait_for(lambda: positions(0) == positions(1) == [(1, 2)], "both replicas fed")

            cluster.stop(0, signal.SIGKILL, replica=1)  # down: the other is not held back
            training.write(1, 3)
            training.write(1, 4)
            training.check(client)
            assert positions(0) == [(1, 4)]
            wait_for(lambda: any("replica 1" in f and "unreachable" in f
                                 for f in loader.health().flags), "the down replica flagged")
            assert loader.health().healthy  # its shard still answers
            down = [s for s in loader.streams().shards if s.replica == 1]
            assert down and not down[0].up and not down[0].current

            cluster.start(0, 1)  # back empty: caught up from storage, then serving
            wait_for(lambda: current(client, 1) and positions(1) == [(1, 4)],
                     "the restarted replica caught up from storage")
            training.write(1, 5)
            training.check(client)
            wait_for(lambda: positions(0) == positions(1) == [(1, 5)], "both replicas fed")
            wait_for(lambda: all(s.up and s.current for s in loader.streams().shards),
                     "the loader's report to show both replicas serving")

        done = status_cli(cluster.config_path)
        assert done.returncode == 0, done.stderr
        replicas = json.loads(done.stdout)["replicas"]
        assert [(r["replica"], r["current"], r["lagging"]) for r in replicas] == [
            (0, True, []), (1, True, [])]
        assert replicas[1]["positions"] == {"t/p": [1, 5]}
        # no loader now: a replica restarted empty stays catching up; with its fresh sibling
        # gone too, the shard has no current replica, and status says so
        cluster.stop(0, signal.SIGKILL, replica=1)
        cluster.start(0, 1)
        wait_for(lambda: ready(client, 1), "the restarted replica to load")
        cluster.stop(0, signal.SIGKILL)
        done = status_cli(cluster.config_path)
        assert done.returncode == 3, (done.stdout, done.stderr)
        assert "shard(s) 0 have no current replica" in done.stderr
        assert not json.loads(done.stdout)["replicas"][1]["current"]


def status_cli(config_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "persia_inc.cli", "status", "--json", "--loader",
                           "none", "--config", str(config_path)], capture_output=True, text=True,
                          env={**os.environ, EMBEDDING_TOKEN_ENV: EMBEDDING_TOKEN}, timeout=120,
                          check=False)


def metric(loader, name: str, **labels: str) -> float | None:
    """A sample of the loader's metrics (its own registry), labelled by its model and `labels`."""
    return loader.metrics.registry.get_sample_value(name, {"model": loader.model, **labels})


class GatedStore:
    """The test's real store, whose `open` of the keys in `gated` waits for `release`: storage
    slow to give back old packets, so a replica's catch-up from storage takes as long as the
    test wants."""

    def __init__(self, store) -> None:
        self.store = store
        self.gated: set[str] = set()
        self.release = threading.Event()

    def open(self, key: str):
        if key in self.gated:
            self.release.wait(60)
        return self.store.open(key)

    def __getattr__(self, name: str):
        return getattr(self.store, name)


def test_new_cuts_do_not_wait_for_a_replica_catching_up(embedding_cluster_factory,
                                                         tmp_path) -> None:
    cluster = embedding_cluster_factory(1, replicas=2, incremental_dir=str(tmp_path / "inc"),
                                        persia_inc={"loader": LOADER_FAST}, **FAST)
    config = load_config(cluster.config_path)

    def positions(target: int) -> list[tuple[int, int]]:
        return [(w.generation, w.sequence) for w in client.shard_watermarks(target)]

    with cluster.client(timeout_s=10.0) as client, config.open_store() as real:
        store = GatedStore(real)
        training = Training(real)
        with loader_from_config(config, client, store=store) as loader:
            old = [training.write(1, seq) for seq in range(20)]
            wait_for(lambda: positions(0) == positions(1) == [(1, 19)], "both replicas fed")
            store.gated.update(old)  # from now on, catching up from storage hangs
            try:
                cluster.stop(0, signal.SIGKILL, replica=1)
                cluster.start(0, 1)  # back empty: 20 packets to catch up, the first one stuck
                wait_for(lambda: any(s.replica == 1 and s.up and s.lagging_streams
                                     for s in loader.streams().shards),
                         "the loader to see the restarted replica behind")
                training.write(1, 20)
                wait_for(lambda: positions(0) == [(1, 20)],
                         "the new cut on the healthy replica while the other catches up")
                assert positions(1) == []  # still stuck on its first packet to catch up
                assert not current(client, 1)
                training.check(client)  # reads go to the current replica
                # the running catch-up is shown: /streams, the metrics
                wait_for(lambda: [s.catch_up for s in loader.streams().shards] == [False, True],
                         "the report to show replica 1 caught up from storage")
                assert metric(loader, "persia_inc_loader_catch_ups") == 1
                assert metric(loader, "persia_inc_loader_shard_catching_up", shard="0r1") == 1
            finally:
                store.release.set()
            wait_for(lambda: positions(1) == [(1, 20)] and current(client, 1),
                     "the restarted replica caught up, then fed live")
            wait_for(lambda: metric(loader, "persia_inc_loader_catch_ups") == 0,
                     "the catch-up to end")
            assert metric(loader, "persia_inc_loader_shard_catching_up", shard="0r1") == 0
            # the 20 old packets, and the new one it missed while out of live dispatch
            assert metric(loader, "persia_inc_loader_catch_up_packets_total", shard="0r1") == 21
            assert not any(s.catch_up for s in loader.streams().shards)
            training.write(1, 21)
            wait_for(lambda: positions(0) == positions(1) == [(1, 21)], "both replicas fed")
        cluster.stop(0, signal.SIGKILL)  # only the caught-up replica answers now
        training.check(client)


class Reads:
    """Lookups back to back on a thread of the test's, each checked against `want`; counts
    answers and failures (any exception, with the first kept)."""

    def __init__(self, client: EmbeddingClient, want: np.ndarray) -> None:
        self.client, self.want = client, want
        self.answers, self.failed, self.first_error = 0, 0, ""
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="test-reads")

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                rows = (self.client.lookup("t", SIGNS) if self.answers % 2 else  # one RPC each
                        self.client.lookup_tables({"t": SIGNS})["t"])  # lookup regions, mostly
                if not np.array_equal(rows, self.want):
                    raise AssertionError("a read answered other rows than the newest cut's")
                self.answers += 1
            except Exception as exc:  # counted: the test asserts there were none
                self.failed += 1
                self.first_error = self.first_error or repr(exc)

    def more(self, n: int, what: str) -> None:
        """Wait for `n` more answers than now."""
        target = self.answers + n
        wait_for(lambda: self.answers >= target or self.failed > 0, what)

    def __enter__(self) -> Reads:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        self.thread.join(30)


def test_chaos_under_steady_reads_fails_no_read(embedding_cluster_factory) -> None:
    """The demo's --chaos in seconds: kill -9 a replica under steady lookups, restart it (not
    serving until caught up), then stop the other with SIGTERM, as a rolling restart does."""
    cluster = embedding_cluster_factory(1, replicas=2, drain_s=1.0, **FAST)
    with cluster.client(timeout_s=10.0) as client:
        client.apply_cut(make_cut(1, 0.5))
        wait_for(lambda: current(client, 0) and current(client, 1), "both replicas current")
        with Reads(client, expected(0.5)) as reads:
            reads.more(20, "reads on both replicas")
            cluster.stop(0, signal.SIGKILL)
            reads.more(20, "reads after the kill")
            wait_for(lambda: client.router.not_serving == (0,), "the client to see it gone")

            cluster.start(0)  # back, empty: NOT_SERVING until caught up, reads never go there
            wait_for(lambda: ready(client, 0), "the restarted replica to load")
            reads.more(20, "reads while it catches up")
            assert health(client, 0) == health_pb2.HealthCheckResponse.NOT_SERVING
            assert client.router.not_serving == (0,)
            assert client.apply_cut_shards(make_cut(1, 0.5), [0]) == {0: True}
            wait_for(lambda: client.router.not_serving == (), "the caught-up replica serving")

            failovers = client.counters()["failovers"]
            cluster.stop(0, signal.SIGTERM, replica=1)  # drained first: no read pays for it
            reads.more(20, "reads after the other stopped")
            assert client.counters()["failovers"] == failovers
        assert reads.failed == 0, reads.first_error
        assert client.counters()["behind_answers"] == 0
        assert client.counters()["region_answers"] > 0  # the kills met reads through regions too
