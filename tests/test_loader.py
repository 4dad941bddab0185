"""Loader logic without servers: ordering and gaps, candidate keys, announcement validation,
fetch verification and quarantine, storage polling, replay planning."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from persia_inc.foundation.kafka import KafkaSettings
from persia_inc.foundation.wait import wait_until
from persia_inc.loader.fetch import Quarantine, VerificationError, fetch_packet
from persia_inc.loader.ordering import Action, Offer, Ordering
from persia_inc.loader.replay import plan_replay, trim_plan_until_time
from persia_inc.loader.sources import Candidate, KafkaSource, StoragePoller, packet_id_of_key
from persia_inc.packet_format import (
    CUT_LANE,
    LEGACY_CUT_LANE,
    Announcement,
    CorruptPacketError,
    CutHeader,
    PacketHeader,
    PacketId,
    TableRows,
    Watermark,
    encode_cut,
    encode_packet,
    packet_key,
)
from persia_inc.storage import open_store

S = ("t", "p")


def pid(generation: int, sequence: int, table: str = "t", producer: str = "p") -> PacketId:
    return PacketId("m", table, producer, generation, sequence)


def put_packet(store, generation: int, sequence: int, *, n: int = 8, dim: int = 4, table: str = "t",
               producer: str = "p", model: str = "m", seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    signs = rng.choice(1 << 40, size=n, replace=False).astype(np.uint64)
    rows = rng.standard_normal((n, dim)).astype(np.float32)
    header = PacketHeader(model=model, table=table, producer=producer, generation=generation,
                          sequence=sequence)
    store.put(packet_key(model, table, producer, generation, sequence), encode_packet(header, signs, rows))
    return signs, rows


# ------------------------------------------------------------------------------- ordering


def test_in_order_packets_apply_one_after_another() -> None:
    order = Ordering(gap_timeout_s=1.0)
    order.set_watermark(S, (1, 4), now=0)
    order.listed(S, [], at=0, now=0)
    assert order.offer(pid(1, 5), now=0) is Offer.ACCEPTED
    assert order.offer(pid(1, 5), now=0) is Offer.DUPLICATE
    assert order.offer(pid(1, 4), now=0) is Offer.STALE
    decision = order.decide(S, now=0)
    assert decision.action is Action.APPLY and decision.head == pid(1, 5)
    order.applied(pid(1, 5), now=0)
    assert order.decide(S, now=0).action is Action.IDLE
    assert order.offer(pid(1, 5), now=0) is Offer.STALE


def test_out_of_order_arrival_is_reordered() -> None:
    order = Ordering(gap_timeout_s=10.0)
    order.set_watermark(S, (1, 0), now=0)
    order.listed(S, [], at=0, now=0)
    for seq in (3, 2, 1):
        order.offer(pid(1, seq), now=0)
    applied = []
    for _ in range(3):
        decision = order.decide(S, now=0)
        assert decision.action is Action.APPLY
        applied.append(decision.head.sequence)
        order.applied(decision.head, now=0)
    assert applied == [1, 2, 3]


def test_gap_waits_lists_then_passes_after_timeout() -> None:
    order = Ordering(gap_timeout_s=1.0, list_interval_s=0.2)
    order.set_watermark(S, (1, 0), now=0)
    order.listed(S, [], at=0, now=0)
    order.offer(pid(1, 2), now=0.05)
    assert order.decide(S, now=0.05).action is Action.LIST  # look for (1, 1) in storage
    order.listed(S, [], at=0.06, now=0.06)
    assert order.decide(S, now=0.1).action is Action.WAIT
    assert order.decide(S, now=0.5).action is Action.LIST
    order.listed(S, [], at=0.5, now=0.5)
    decision = order.decide(S, now=1.2)
    assert decision.action is Action.PASS_GAP and decision.missing_after == (1, 0)
    order.applied(decision.head, now=1.2)
    # late: never applied after (1, 2), and the ordering says so (the loader logs it loudly)
    assert order.offer(pid(1, 1), now=1.3) is Offer.SKIPPED
    assert order.offer(pid(1, 2), now=1.3) is Offer.STALE  # applied: a plain duplicate
    assert order.offer(pid(1, 0), now=1.3) is Offer.STALE


def test_stray_generation_is_held_so_the_old_generation_applies_first() -> None:
    """(1,0), (1,1), a stray (9999999999,0), then (1,2): (1,2) applies before the stray is
    considered; the stray is a generation jump, held like a gap and passed only after the gap
    timeout; (1,3) arriving after that is SKIPPED (below the watermark, never applied)."""
    order = Ordering(gap_timeout_s=10.0, list_interval_s=0.5)
    order.set_watermark(S, (1, 0), now=0)
    order.listed(S, [pid(1, 1)], at=0, now=0)
    decision = order.decide(S, now=0)
    assert decision.action is Action.APPLY
    order.applied(decision.head, now=0)
    stray = pid(9999999999, 0)
    assert order.offer(stray, now=1) is Offer.ACCEPTED
    decision = order.decide(S, now=1)
    assert decision.action is Action.LIST and decision.jump_from == 1  # look for generations 2..
    order.listed(S, [stray], at=1, now=1)  # a listing that finds nothing older does not free it
    decision = order.decide(S, now=1.1)
    assert decision.action is Action.WAIT and decision.jump_from == 1
    assert order.held_jump(S) == stray
    assert order.offer(pid(1, 2), now=2) is Offer.ACCEPTED
    decision = order.decide(S, now=2)
    assert decision.action is Action.APPLY and decision.head == pid(1, 2)
    order.applied(decision.head, now=2)
    assert order.decide(S, now=5).action in (Action.LIST, Action.WAIT)  # still held
    decision = order.decide(S, now=12.1)  # the timeout runs from when the stray became head again
    assert decision.action is Action.PASS_GAP and decision.head == stray
    assert decision.jump_from == 1 and decision.missing_after == (1, 2)
    order.applied(stray, now=12.1)
    assert order.held_jump(S) is None
    assert order.offer(pid(1, 3), now=13) is Offer.SKIPPED


def test_next_generation_is_no_jump_and_other_tables_of_the_producer_count() -> None:
    order = Ordering(gap_timeout_s=10.0)
    other = ("u", "p")
    order.set_watermark(S, (1, 4), now=0)
    order.set_watermark(other, (2, 0), now=0)  # the producer's generation 2 wrote only table u
    order.listed(S, [pid(3, 0)], at=0, now=0)
    order.listed(S, [], at=1, now=1)
    decision = order.decide(S, now=1)
    assert decision.action is Action.APPLY and decision.jump_from is None
    order.applied(decision.head, now=1)
    assert order.offer(pid(1, 5), now=2) is Offer.SKIPPED  # generation 1 ended at (1, 4) here


def test_a_rewind_forgets_leaps_above_it() -> None:
    order = Ordering(gap_timeout_s=0.0)
    order.set_watermark(S, (1, 0), now=0)
    order.listed(S, [pid(1, 2)], at=0, now=0)
    decision = order.decide(S, now=1)
    assert decision.action is Action.PASS_GAP
    order.applied(decision.head, now=1)
    order.set_watermark(S, (1, 0), now=2)  # a shard came back holding only (1, 0)
    order.listed(S, [pid(1, 1), pid(1, 2)], at=2, now=2)
    for seq in (1, 2):
        decision = order.decide(S, now=2)
        assert decision.action is Action.APPLY and decision.head == pid(1, seq)
        order.applied(decision.head, now=2)
    assert order.offer(pid(1, 1), now=3) is Offer.STALE  # applied this time


def test_gap_filled_by_listing_applies_in_order() -> None:
    order = Ordering(gap_timeout_s=5.0)
    order.set_watermark(S, (1, 0), now=0)
    order.listed(S, [], at=0, now=0)
    order.offer(pid(1, 2), now=0.05)
    assert order.decide(S, now=0.05).action is Action.LIST
    order.listed(S, [pid(1, 1), pid(1, 2)], at=0.1, now=0.1)
    decision = order.decide(S, now=0.1)
    assert decision.action is Action.APPLY and decision.head == pid(1, 1)


def test_new_generation_needs_a_listing_that_finds_nothing_older() -> None:
    order = Ordering(gap_timeout_s=5.0)
    order.set_watermark(S, (1, 7), now=0)
    order.listed(S, [], at=0, now=0)
    order.offer(pid(2, 0), now=1)
    assert order.decide(S, now=1).action is Action.LIST
    order.listed(S, [pid(1, 8), pid(2, 0)], at=1, now=1)  # the old generation had one more
    assert order.decide(S, now=1).head == pid(1, 8)
    order.applied(pid(1, 8), now=1)
    decision = order.decide(S, now=1)  # the same listing saw nothing between them
    assert decision.action is Action.APPLY and decision.head == pid(2, 0)


def test_first_packet_of_an_empty_server_is_a_generation_start() -> None:
    order = Ordering(gap_timeout_s=5.0)
    order.set_watermark(S, None, now=0)
    assert order.decide(S, now=0).action is Action.LIST
    order.listed(S, [pid(1, 0), pid(1, 1)], at=0, now=0)
    assert order.decide(S, now=0).head == pid(1, 0)


def test_rewind_after_server_restart_owes_a_listing_and_keeps_newer_pending() -> None:
    order = Ordering(gap_timeout_s=5.0)
    order.set_watermark(S, (1, 5), now=0)
    order.listed(S, [], at=0, now=0)
    order.offer(pid(1, 6), now=0)
    order.set_watermark(S, (1, 2), now=1)  # the servers hold less than we applied
    assert order.decide(S, now=1).action is Action.LIST
    order.listed(S, [pid(1, n) for n in range(3, 7)], at=1, now=1)
    assert [p.sequence for p in order.pending(S)] == [3, 4, 5, 6]


def test_rejected_packet_is_never_offered_again_and_leaves_a_gap() -> None:
    order = Ordering(gap_timeout_s=0.5)
    order.set_watermark(S, (1, 0), now=0)
    order.listed(S, [pid(1, 1), pid(1, 2)], at=0, now=0)
    order.reject(pid(1, 1), now=0)
    assert order.offer(pid(1, 1), now=0) is Offer.STALE
    order.listed(S, [], at=0.6, now=0.6)
    assert order.decide(S, now=0.7).action is Action.PASS_GAP


# --------------------------------------------------------------------------- keys, sources


@pytest.mark.parametrize("key, ok", [
    ("m/t/p/0000000001-000000000002.arrow", True),
    ("other/t/p/0000000001-000000000002.arrow", False),
    ("q/m/t/p/0000000001-000000000002.arrow", False),
    ("m/t/p/1-2.arrow", False),
    ("m/t/p/.0000000001-000000000002.arrow.tmp", False),
    ("m/t/0000000001-000000000002.arrow", False),
])
def test_only_exact_packet_keys_of_the_model_are_candidates(key: str, ok: bool) -> None:
    assert (packet_id_of_key(key, "m") is not None) is ok


def _kafka_source(out: queue.Queue, root: str) -> tuple[KafkaSource, list[str]]:
    store = open_store(root)
    rejected: list[str] = []
    return KafkaSource(KafkaSettings(), "topic", "m", out, store.key_of, on_reject=rejected.append), rejected


def test_announcements_outside_incremental_dir_or_malformed_are_rejected(tmp_path: Path) -> None:
    root = str(tmp_path / "inc")
    source, rejected = _kafka_source(queue.Queue(), root)
    header = PacketHeader(model="m", table="t", producer="p", generation=1, sequence=0, checksum="x")
    good = Announcement.for_packet(root, header, 10)
    candidate = source.validate(good.to_json(), "w")
    assert candidate is not None and candidate.key == "m/t/p/0000000001-000000000000.arrow"
    hostile = [
        b"not json", b"{}", b"[1,2]", None, b"x" * 70_000,
        Announcement.for_packet("/etc", header, 10).to_json(),  # outside
        Announcement.for_packet(root + "/../inc2", header, 10).to_json(),
        good.to_json().replace(b'"sequence":0', b'"sequence":5'),  # uri and identity disagree
        good.to_json().replace(b"/m/t/p/", b"/m/t/p/../../../../x/"),
        good.to_json().replace(b"/m/t/p/", b"/other/t/p/"),  # another model's packet
    ]
    for value in hostile:
        assert source.validate(value, "w") is None
    assert len(rejected) == len(hostile)


def test_kafka_commit_waits_for_the_first_unsettled_offset(tmp_path: Path) -> None:
    source, _ = _kafka_source(queue.Queue(), str(tmp_path))
    settles = {}
    for offset in range(3):
        with source._lock:
            source._outstanding.setdefault(0, set()).add(offset)
            source._next[0] = offset + 1
        settles[offset] = source._settler(0, offset)
    assert source.committable() == {0: 0}
    settles[1]()
    assert source.committable() == {0: 0}
    settles[0]()
    assert source.committable() == {0: 2}
    settles[2]()
    assert source.committable() == {0: 3}


def test_storage_poller_lists_after_positions_and_discovers_new_streams(tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    for seq in range(3):
        put_packet(store, 1, seq)
    put_packet(store, 1, 0, producer="q")
    out: queue.Queue[Candidate] = queue.Queue()
    positions = {("t", "p"): packet_key("m", "t", "p", 1, 1)}
    poller = StoragePoller(store.list, "m", out, lambda: positions, interval_s=1, discover_every=2)
    poller.poll_once()  # discovery: everything after the positions, plus the new stream
    keys = sorted(out.get_nowait().key for _ in range(out.qsize()))
    assert keys == ["m/t/p/0000000001-000000000002.arrow", "m/t/q/0000000001-000000000000.arrow"]
    poller.poll_once()  # a known-streams round
    assert [out.get_nowait().packet_id.sequence for _ in range(out.qsize())] == [2]


def test_cuts_in_the_legacy_folder_read_as_the_cut_lane_before_the_new_folder(tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    for generation, folder, count in ((1, LEGACY_CUT_LANE, 3), (2, CUT_LANE, 2)):
        for seq in range(count):
            header = CutHeader(model="m", producer="p", generation=generation, sequence=seq)
            rows = TableRows("t", np.array([seq], np.uint64), np.ones((1, 4), np.float32),
                             np.empty(0, np.uint64))
            store.put(packet_key("m", folder, "p", generation, seq), encode_cut(header, [rows]))
    legacy = packet_key("m", LEGACY_CUT_LANE, "p", 1, 2)
    found = packet_id_of_key(legacy, "m")
    assert found == PacketId("m", CUT_LANE, "p", 1, 2) and found.key == legacy
    assert fetch_packet(store, found.key, found).packet.header.lane == CUT_LANE
    plan = plan_replay(store, "m", {})
    assert list(plan.packets) == [(CUT_LANE, "p")] and not plan.gaps
    assert [(p.packet_id.position, p.key.split("/")[1]) for p in plan.ordered()] == [
        ((1, 0), "_cuts"), ((1, 1), "_cuts"), ((1, 2), "_cuts"), ((2, 0), "~cuts"), ((2, 1), "~cuts")]
    # a known stream is listed in both folders after its position (a key in the new folder)
    out: queue.Queue[Candidate] = queue.Queue()
    positions = {(CUT_LANE, "p"): packet_key("m", CUT_LANE, "p", 1, 0)}
    poller = StoragePoller(store.list, "m", out, lambda: positions, interval_s=1, discover_every=2)
    poller.rounds = 1  # not a discovery round
    poller.poll_once()
    assert [out.get_nowait().packet_id.position for _ in range(out.qsize())] == [
        (1, 1), (1, 2), (2, 0), (2, 1)]
    assert Watermark(LEGACY_CUT_LANE, "p", 1, 2) == Watermark(CUT_LANE, "p", 1, 2)


# ----------------------------------------------------------------------- fetch, quarantine


def test_fetch_verifies_identity_and_dim(tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    signs, rows = put_packet(store, 1, 0, dim=4)
    fetched = fetch_packet(store, pid(1, 0).key, pid(1, 0))
    (table,) = fetched.packet.tables  # a v1 packet reads as a cut of its one table
    np.testing.assert_array_equal(table.signs, signs)
    np.testing.assert_array_equal(table.embeddings, rows)
    with pytest.raises(VerificationError, match="dim"):
        fetch_packet(store, pid(1, 0).key, pid(1, 0), dims={"t": 8})
    # a packet stored under another packet's name
    store.put(pid(1, 1).key, store.get(pid(1, 0).key))
    with pytest.raises(VerificationError, match="name says"):
        fetch_packet(store, pid(1, 1).key, pid(1, 1))
    data = bytearray(store.get(pid(1, 0).key))
    data[len(data) // 2] ^= 0xFF
    store.put(pid(1, 2).key, bytes(data))
    with pytest.raises(CorruptPacketError):
        fetch_packet(store, pid(1, 2).key, pid(1, 2))


def test_quarantine_moves_the_bytes_and_records_why(tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    store.put(pid(1, 0).key, b"garbage")
    record = Quarantine(store, "_quarantine").put(pid(1, 0).key, "bad checksum")
    assert not store.exists(pid(1, 0).key)
    assert store.get("_quarantine/" + pid(1, 0).key) == b"garbage"
    assert b"bad checksum" in store.get("_quarantine/" + pid(1, 0).key + ".reason.json")
    assert record["moved_to"]
    store.put(pid(1, 1).key, b"garbage")
    Quarantine(store).put(pid(1, 1).key, "bad")  # no prefix: recorded, left in place
    assert store.exists(pid(1, 1).key)


def test_replay_plan_orders_streams_and_stops_at_until(tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    for seq in range(4):
        put_packet(store, 1, seq)
    put_packet(store, 2, 0)
    put_packet(store, 2, 2)  # (2, 1) missing
    plan = plan_replay(store, "m", {S: (1, 1)})
    assert [p.packet_id.position for p in plan.packets[S]] == [(1, 2), (1, 3), (2, 0), (2, 2)]
    assert plan.gaps == [(S, (2, 0), (2, 2))]
    plan = plan_replay(store, "m", {}, until=(1, 2))
    assert [p.packet_id.position for p in plan.packets[S]] == [(1, 0), (1, 1), (1, 2)]


def test_replay_plan_trimmed_at_a_time_stops_each_stream_at_its_first_later_packet(
        tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    for seq in (0, 1, 3):  # (1, 2) missing: a gap before (1, 3)
        put_packet(store, 1, seq)
    put_packet(store, 1, 0, producer="q")
    cut = time.time_ns()
    wait_until(lambda: time.time_ns() > cut, "the clock to pass the cut", timeout_s=1)
    put_packet(store, 1, 4)
    put_packet(store, 1, 1, producer="q")
    plan = trim_plan_until_time(store, plan_replay(store, "m", {}), cut)
    assert [p.packet_id.position for p in plan.packets[S]] == [(1, 0), (1, 1), (1, 3)]
    assert [p.packet_id.position for p in plan.packets["t", "q"]] == [(1, 0)]
    assert plan.gaps == [(S, (1, 1), (1, 3))]
    assert trim_plan_until_time(store, plan, 0).total == 0


def test_no_threads_left_by_a_poller(tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    poller = StoragePoller(store.list, "m", queue.Queue(), dict, interval_s=0.05).start()
    poller.close()
    assert not any(t.name == "persia-inc-loader-list" for t in threading.enumerate())
