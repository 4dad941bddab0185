"""Shard replicas: configuration, identity, client failover and never-stale reads, against real
`persia-inc embedding-server` processes on 127.0.0.1 (one process per replica).

One shard of two replicas keeps the tests lean: failover and freshness are per shard.
"""

from __future__ import annotations

import signal
from collections.abc import Callable

import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from persia_inc.config import ConfigError, config_from_mapping
from persia_inc.embedding_server.client import EmbeddingClient
from persia_inc.embedding_server.errors import ShardError, ShardIdentityError
from persia_inc.embedding_server.routing import targets_of_servers
from persia_inc.embedding_server.sharding import replica_sets
from persia_inc.foundation.wait import wait_until
from persia_inc.local_services import EMBEDDING_TOKEN
from persia_inc.packet_format.cut import Cut, CutHeader, CutTable, TableRows

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
    with (pytest.raises(ShardIdentityError, match="replica 0 of 2, it reports replica 1"),
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
        assert client.counters()["failovers"] >= 1

        cluster.start(0)  # back, empty: catching up, not serving, not read
        wait_for(lambda: ready(client, 0), "the restarted replica to load")
        assert not client.status(0).current
        assert health(client, 0) == health_pb2.HealthCheckResponse.NOT_SERVING
        for _ in range(6):
            np.testing.assert_array_equal(client.lookup("t", SIGNS), expected(0.5))
        assert client.counters()["behind_answers"] == 0

        # the loader's job, done by hand: the missing cut, to the restarted replica only
        assert client.apply_cut_shards(make_cut(1, 0.5), [0]) == {0: True}
        wait_for(lambda: current(client, 0), "the restarted replica to catch up")
        assert health(client, 0) == health_pb2.HealthCheckResponse.SERVING


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
