"""Hostile storage: what a loader meets in a shared `incremental_dir` besides clean packets.

A FIFO or socket named like a packet, symlinks leading out of the root, a copy written in place
(not by rename), NaN rows, a fetch that hangs, another model's packets. Each case: real files
(real FIFOs, sockets, symlinks), a real loader applying to real embedding-server processes, and
the daemon goes on: it skips or quarantines (never destroying bytes), counts, logs, and applies
the rest.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from test_loader_services import FAST, Training, metric
from test_producer_support import NumpyModel, producer_config

from persia_inc.config import load_config
from persia_inc.foundation.wait import wait_until
from persia_inc.loader.daemon import Loader
from persia_inc.loader.fetch import NotSettledError, Quarantine, fetch_packet
from persia_inc.loader.sources import find_other_models
from persia_inc.local_services import EMBEDDING_TOKEN, EMBEDDING_TOKEN_ENV
from persia_inc.packet_format import PacketError, PacketHeader, PacketId, encode_packet, packet_key
from persia_inc.producer import NonFiniteRowsWarning
from persia_inc.storage import open_store
from persia_inc.storage.base import NotAnObjectError
from persia_inc.storage.local import LocalStore
from persia_inc.wiring import loader_from_config, producer_from_config

DIM = 4


def labelled(loader: Loader, name: str, **labels: str) -> float:
    """The value of one labelled sample (0 if absent)."""
    return sum(s.value for m in loader.metrics.registry.collect() for s in m.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def packet_bytes(generation: int, sequence: int, *, model: str = "m", table: str = "t",
                 producer: str = "p", n: int = 10, seed: int = 7) -> tuple[bytes, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    signs = np.sort(rng.choice(10**6, n, replace=False)).astype(np.uint64) + 1
    rows = rng.standard_normal((n, DIM)).astype(np.float32)
    header = PacketHeader(model=model, table=table, producer=producer, generation=generation,
                          sequence=sequence)
    return encode_packet(header, signs, rows), signs, rows


def in_thread(call, timeout_s: float = 5.0):
    """Run `call` on a thread; fail (not hang) if it blocks longer than `timeout_s`."""
    result: dict[str, object] = {}

    def run() -> None:
        try:
            result["value"] = call()
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), f"{call} blocked for more than {timeout_s} s"
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result.get("value")


# ------------------------------------------------------------------------- store level


def test_fifo_and_socket_named_like_packets_are_refused_without_blocking(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "inc"))
    reported: list[tuple[str, str]] = []
    store.on_not_object = lambda key, kind: reported.append((key, kind))
    fifo_key, sock_key = packet_key("m", "t", "p", 1, 0), packet_key("m", "t", "p", 1, 1)
    store.put(packet_key("m", "t", "p", 1, 2), b"a real object")
    os.mkfifo(tmp_path / "inc" / fifo_key)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(str(tmp_path / "inc" / sock_key))
        for call in (store.open, store.get, store.stat):
            for key, kind in ((fifo_key, "fifo"), (sock_key, "socket")):
                with pytest.raises(NotAnObjectError, match=f"a {kind}, not a regular file") as info:
                    in_thread(lambda call=call, key=key: call(key))
                assert key in str(info.value) and info.value.kind == kind
        expected = PacketId("m", "t", "p", 1, 0)
        with pytest.raises(NotAnObjectError):
            in_thread(lambda: fetch_packet(store, fifo_key, expected))
        assert [i.key for i in store.list("m/")] == [packet_key("m", "t", "p", 1, 2)]
        assert not store.exists(fifo_key) and not store.exists(sock_key)
        assert sorted(reported) == [(fifo_key, "fifo"), (sock_key, "socket")]  # once per key
    finally:
        server.close()
        store.close()


def test_symlinks_are_never_followed_and_the_quarantine_copies_nothing_from_outside(
        tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.arrow"
    secret.write_bytes(b"bytes that live outside incremental_dir")
    (outside / "t2").mkdir()
    good, _, _ = packet_bytes(1, 0)
    (outside / "t2" / "0000000001-000000000000.arrow").write_bytes(good)
    store = open_store(str(tmp_path / "inc"))
    reported: list[tuple[str, str]] = []
    store.on_not_object = lambda key, kind: reported.append((key, kind))
    link_key = packet_key("m", "t", "p", 1, 0)
    store.put(packet_key("m", "t", "p", 1, 1), good)
    (tmp_path / "inc" / link_key).symlink_to(secret)
    (tmp_path / "inc" / "m" / "t" / "q").symlink_to(outside / "t2", target_is_directory=True)
    via_folder = "m/t/q/0000000001-000000000000.arrow"
    try:
        assert [i.key for i in store.list("m/")] == [packet_key("m", "t", "p", 1, 1)]
        assert not store.exists(link_key) and not store.exists(via_folder)
        for key in (link_key, via_folder):
            for call in (store.get, store.open, store.stat):
                with pytest.raises(NotAnObjectError, match="symlink"):
                    call(key)
        record = Quarantine(store, "_quarantine").put(link_key, "judged bad")
        assert record["moved_to"] == ""
        assert store.list("_quarantine/") == []
        assert secret.read_bytes() == b"bytes that live outside incremental_dir"
        assert (tmp_path / "inc" / link_key).is_symlink()
        assert sorted(reported) == [(link_key, "symlink"), ("m/t/q", "symlink")]
    finally:
        store.close()


def test_list_folders_is_one_level(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "inc"))
    for key in ("a/x/1", "b/y/z/2", "c", ".hidden/3"):
        store.put(key, b"1")
    (tmp_path / "inc" / "link").symlink_to(tmp_path / "inc" / "a")
    assert store.list_folders() == ["a", "b"]
    assert store.list_folders("b/") == ["y"]
    assert store.list_folders("nothing/") == []
    store.close()


def test_a_verdict_on_a_file_still_changing_is_deferred(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "inc"))
    key = packet_key("m", "t", "p", 1, 0)
    data, _, _ = packet_bytes(1, 0)
    path = tmp_path / "inc" / key
    path.parent.mkdir(parents=True)
    path.write_bytes(data[: len(data) // 2])  # torn, and written just now
    expected = PacketId("m", "t", "p", 1, 0)
    with pytest.raises(NotSettledError, match="judged once it settles"):
        fetch_packet(store, key, expected, settle_s=60.0)
    with pytest.raises(PacketError, match="torn"):  # settled (settle_s 0): judged
        fetch_packet(store, key, expected, settle_s=0.0)
    store.close()


def test_quarantine_leaves_a_file_whose_bytes_changed_since_they_were_judged(
        tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "inc"))
    key = packet_key("m", "t", "p", 1, 0)
    data, _, _ = packet_bytes(1, 0)
    store.put(key, data[:-30])  # corrupt
    with pytest.raises(PacketError) as info:
        fetch_packet(store, key, PacketId("m", "t", "p", 1, 0))
    judged = info.value.judged  # type: ignore[attr-defined]
    with open(tmp_path / "inc" / key, "r+b") as handle:  # rewritten in place meanwhile
        handle.write(data)
    record = Quarantine(store, "_quarantine").put(key, str(info.value), judged)
    assert record["changed"] and record["moved_to"] == ""
    assert store.get(key) == data  # intact, left to be judged again
    assert store.list("_quarantine/") == []
    # unchanged bytes: moved, with the record beside them
    store.put(key, data[:-30])
    with pytest.raises(PacketError) as info:
        fetch_packet(store, key, PacketId("m", "t", "p", 1, 0))
    record = Quarantine(store, "_quarantine").put(key, "bad", info.value.judged)  # type: ignore[attr-defined]
    assert not record["changed"] and not store.exists(key)
    assert store.get("_quarantine/" + key) == data[:-30]
    store.close()


# ------------------------------------------------------------------------ with a loader


def test_loader_skips_fifos_and_symlinks_whichever_source_sees_them(
        embedding_cluster_factory, tmp_path: Path) -> None:
    inc, outside = tmp_path / "inc", tmp_path / "outside"
    outside.mkdir()
    cluster = embedding_cluster_factory(1, incremental_dir=str(inc), persia_inc={"loader": FAST})
    config = load_config(cluster.config_path)
    with cluster.client() as client, config.open_store() as store:
        training = Training(store)
        training.write(1, 0)
        with loader_from_config(config, client) as loader:
            assert loader.source_kind == "watch"
            training.check(client)
            folder = inc / "m" / "t" / "p"
            # (1, 1): a valid packet outside, linked in by a rename (the watcher sees it move)
            key, data, _, _ = training.packet(1, 1)
            (outside / "p1.arrow").write_bytes(data)
            (folder / ".link.tmp").symlink_to(outside / "p1.arrow")
            os.rename(folder / ".link.tmp", inc / key)
            # (1, 2): a corrupt file outside, linked in directly (the rescan lists it)
            key2, data2, _, _ = training.packet(1, 2)
            (outside / "p2.arrow").write_bytes(data2[:-10])
            (inc / key2).symlink_to(outside / "p2.arrow")
            # (1, 3): a FIFO, which would block any reader opening it
            os.mkfifo(inc / packet_key("m", "t", "p", 1, 3))
            training.write(1, 4)  # after the gap of three: applied once it is passed
            wait_until(lambda: labelled(loader, "persia_inc_loader_rejected_total", reason="symlink") == 2
                       and labelled(loader, "persia_inc_loader_rejected_total", reason="fifo") == 1,
                       "two symlinks and a FIFO counted", timeout_s=15)
            training.check(client)
            assert loader.health().dispatcher
            assert (outside / "p1.arrow").read_bytes() == data
            assert (outside / "p2.arrow").read_bytes() == data2[:-10]
            assert not (inc / "_quarantine").exists()
            assert metric(loader, "persia_inc_loader_quarantined_total") == 0
            training.write(1, 5)  # the loader goes on
            training.check(client)
            # counted once per key, however often the rescan met them
            assert labelled(loader, "persia_inc_loader_rejected_total", reason="symlink") == 2


def test_slow_in_place_copy_is_applied_not_quarantined(embedding_cluster_factory,
                                                         tmp_path: Path) -> None:
    inc = tmp_path / "inc"
    cluster = embedding_cluster_factory(1, incremental_dir=str(inc),
                                        persia_inc={"loader": {**FAST, "settle_s": 5.0}})
    config = load_config(cluster.config_path)
    with cluster.client() as client, config.open_store() as store:
        training = Training(store)
        training.write(1, 0)
        with loader_from_config(config, client) as loader:
            training.check(client)
            key, data, signs, rows = training.packet(1, 1)
            training.remember(signs, rows)
            with open(inc / key, "wb") as handle:  # in place, like cp onto the folder
                handle.write(data[: len(data) // 2])
                handle.flush()
                wait_until(lambda: labelled(loader, "persia_inc_loader_errors_total",
                                          stage="unsettled") >= 1,
                           "the half-written file was seen and not judged", timeout_s=15)
                handle.write(data[len(data) // 2:])
            training.check(client)
            assert (inc / key).read_bytes() == data
            assert metric(loader, "persia_inc_loader_quarantined_total") == 0
            assert not (inc / "_quarantine").exists()


def test_non_finite_rows_are_refused_by_default_and_applied_when_allowed(
        embedding_cluster_factory, tmp_path: Path) -> None:
    inc = tmp_path / "inc"
    cluster = embedding_cluster_factory(1, incremental_dir=str(inc),
                                        persia_inc={"loader": {**FAST, "settle_s": 0.0}})
    config = load_config(cluster.config_path)
    with cluster.client() as client, config.open_store() as store:
        training = Training(store)
        training.write(1, 0)
        key, _, signs, rows = training.packet(1, 1)
        rows[3, 1] = np.nan
        rows[5, 0] = np.inf
        header = PacketHeader(model="m", table="t", producer="p", generation=1, sequence=1)
        store.put(key, encode_packet(header, signs, rows))
        training.write(1, 2)
        with loader_from_config(config, client) as loader:
            wait_until(lambda: labelled(loader, "persia_inc_loader_quarantined_total",
                                      reason="NonFiniteError") == 1, "NaN packet quarantined", timeout_s=15)
            training.check(client)  # (1, 0) and (1, 2): the gap is passed
            record = json.loads(store.get(f"_quarantine/{key}.reason.json"))
            first = int(signs[3])
            assert "table 't'" in record["reason"] and f"sign {first}" in record["reason"]
            assert "2 of 20 rows" in record["reason"]
            assert store.exists(f"_quarantine/{key}") and not store.exists(key)
            assert np.isfinite(client.lookup("t", signs)).all()
        allowed = replace(config.persia_inc.loader, allow_non_finite=True)
        key3, _, signs3, rows3 = training.packet(1, 3)
        rows3[0, 2] = np.nan
        store.put(key3, encode_packet(PacketHeader(model="m", table="t", producer="p",
                                                   generation=1, sequence=3), signs3, rows3))
        with loader_from_config(config, client, settings=allowed) as loader:
            wait_until(lambda: loader.applied >= 1, "the NaN packet applied when allowed", timeout_s=15)
            got = client.lookup("t", signs3)
            assert np.isnan(got[0, 2]) and np.array_equal(got[1:], rows3[1:])
            assert metric(loader, "persia_inc_loader_quarantined_total") == 0


def test_producer_warns_of_the_first_non_finite_sign_once_per_table_and_still_ships(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Logged, and warned (`NonFiniteRowsWarning`, issue 22) on the training thread at the
    caller's line, so a script that configures no logging still sees it."""
    model = NumpyModel(rows=100, dim=DIM)
    model.weight[17, 2] = np.nan
    model.weight[40, 0] = -np.inf
    config = producer_config(str(tmp_path / "inc"), buffer_size=10_000)
    caplog.set_level(logging.WARNING, logger="persia_inc.producer")
    with pytest.warns(NonFiniteRowsWarning) as warned, \
            producer_from_config(config, producer_id="p1") as producer:
        producer.register_table("emb", model.read)
        producer.register_table("ok", model.read)
        for _ in range(3):
            producer.record("emb", np.arange(10, 50))
            producer.record("ok", np.arange(0, 10))
            assert producer.flush()
        assert producer.writer.drain(10)
        stored = [s for s in producer.writer.stored
                  if "emb" in {t.name for t in s.header.tables}]
    lines = [r for r in caplog.records if "NaN or Inf" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert "'emb'" in lines[0].getMessage() and "sign 17" in lines[0].getMessage()
    assert len(warned) == 1 and str(warned[0].message) == lines[0].getMessage()
    assert warned[0].filename == __file__  # points at the training script's call
    assert len(stored) == 3  # shipped all the same: the loader decides


def test_loader_names_other_models_once_and_status_lists_them(
        embedding_cluster_factory, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    inc = tmp_path / "inc"
    cluster = embedding_cluster_factory(
        1, incremental_dir=str(inc),
        persia_inc={"loader": {**FAST, "other_models_interval_s": 0.2}})
    config = load_config(cluster.config_path)
    caplog.set_level(logging.WARNING, logger="persia_inc.loader")
    with cluster.client() as client, config.open_store() as store:
        ctr, _, _ = packet_bytes(1, 0, model="ctr")
        store.put(packet_key("ctr", "emb", "p0", 1, 0), ctr)
        store.put("_quarantine/m/t/p/0000000001-000000000000.arrow", b"old")  # ours, quarantined
        store.put("notes/readme.txt", b"not a model")
        with loader_from_config(config, client) as loader:
            wait_until(lambda: loader.other_models == ["ctr"], "model ctr noticed", timeout_s=15)
            assert loader.health().other_models == ("ctr",)
            assert metric(loader, "persia_inc_loader_other_models") == 1
            ads, _, _ = packet_bytes(1, 0, model="ads")
            store.put(packet_key("ads", "t", "p", 1, 0), ads)
            wait_until(lambda: loader.other_models == ["ads", "ctr"], "model ads noticed", timeout_s=15)
            assert metric(loader, "persia_inc_loader_other_models") == 2
            assert loader.applied == 0
        lines = [r.getMessage() for r in caplog.records if "other model" in r.getMessage()]
        assert len(lines) == 2 and "'ctr'" in lines[0] and "'ads'" in lines[1], lines
        assert str(inc) in lines[0] and "'m'" in lines[0]
        assert find_other_models(store, "m", ("_quarantine",)) == ["ads", "ctr"]

    def status(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "persia_inc.cli", "status", "--config",
                               str(cluster.config_path), "--loader", "none", *extra],
                              capture_output=True, text=True, timeout=120, check=False,
                              env={**os.environ, EMBEDDING_TOKEN_ENV: EMBEDDING_TOKEN})

    done = status("--json")  # exit 3: flagged
    assert done.returncode == 3, done.stderr
    assert json.loads(done.stdout)["other_models"] == ["ads", "ctr"]
    assert json.loads(done.stdout)["flags"] == ["other-models: ads, ctr"]
    done = status()
    assert done.returncode == 3, done.stderr
    assert "flag other-models: packets under" in done.stdout and "ads, ctr" in done.stdout


class StuckStore(LocalStore):
    """Local disk where reading one key hangs until `release` is set: a stuck mount."""

    def __init__(self, root: str, stuck_key: str) -> None:
        super().__init__(root)
        self.stuck_key = stuck_key
        self.entered = threading.Event()
        self.release = threading.Event()

    def _open(self, key: str):  # type: ignore[override]
        if key == self.stuck_key:
            self.entered.set()
            self.release.wait(60)
        return super()._open(key)


def test_a_hung_fetch_is_timed_out_and_other_streams_go_on(embedding_cluster_factory,
                                                             tmp_path: Path) -> None:
    inc = tmp_path / "inc"
    cluster = embedding_cluster_factory(
        1, incremental_dir=str(inc), persia_inc={"loader": {**FAST, "fetch_timeout_s": 0.5}})
    config = load_config(cluster.config_path)
    stuck = StuckStore(str(inc), packet_key("m", "a", "p", 1, 1))
    with cluster.client() as client, stuck:
        one, two = Training(stuck, table="a", seed=1), Training(stuck, table="b", seed=2)
        one.write(1, 0)
        two.write(1, 0)
        with loader_from_config(config, client, store=stuck, source="list") as loader:
            one.check(client)
            one.write(1, 1)  # its fetch hangs
            assert stuck.entered.wait(15)
            two.write(1, 1)
            two.write(1, 2)
            two.check(client)  # the other stream is not held up
            wait_until(lambda: labelled(loader, "persia_inc_loader_errors_total",
                                      stage="fetch_timeout") == 1, "fetch timeout counted", timeout_s=15)
            assert loader.health().dispatcher
            stuck.release.set()  # the mount recovers: the same fetch completes and applies
            one.write(1, 2)
            one.check(client)
            assert labelled(loader, "persia_inc_loader_errors_total", stage="fetch_timeout") == 1
