"""The storage cases, written once, run on local disk, real Ceph (S3) and the WebHDFS emulator."""

from __future__ import annotations

import errno
import os
import threading

import numpy as np
import pytest

from persia_inc.foundation.net import free_port
from persia_inc.packet_format import PacketHeader, decode_packet, encode_packet, packet_key, write_packet
from persia_inc.storage import (
    NO_RETRY,
    ObjectInfo,
    ObjectStore,
    RetryPolicy,
    StorageError,
    TransientStorageError,
    open_store,
    storage_kind,
)

from conftest import FAST_RETRY


def test_put_get_roundtrip_and_overwrite(object_store: ObjectStore) -> None:
    object_store.put("a/b/one.bin", b"first")
    assert object_store.get("a/b/one.bin") == b"first"
    object_store.put("a/b/one.bin", b"second, longer")
    assert object_store.get("a/b/one.bin") == b"second, longer"
    assert object_store.exists("a/b/one.bin")
    assert not object_store.exists("a/b/two.bin")


def test_streamed_read_of_a_large_object(object_store: ObjectStore) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    object_store.put("big/blob", data)
    with object_store.open("big/blob") as stream:
        chunks = []
        while chunk := stream.read(256 * 1024):
            chunks.append(chunk)
    assert b"".join(chunks) == data


def test_missing_object_is_file_not_found(object_store: ObjectStore) -> None:
    for call in (object_store.get, object_store.open, object_store.delete):
        with pytest.raises(FileNotFoundError) as info:
            call("no/such/key")
        assert "no/such/key" in str(info.value)


def test_list_folders_is_one_level_on_every_backend(object_store: ObjectStore) -> None:
    """The other-models check looks one level down; S3 and HDFS answer it with one request."""
    for key in ("a/x/1", "b/y/z/2", "c", ".hidden/3"):
        object_store.put(key, b"1")
    assert object_store.list_folders() == ["a", "b"]
    assert object_store.list_folders("b/") == ["y"]
    assert object_store.list_folders("b/y/") == ["z"]
    assert object_store.list_folders("nothing/") == []


def test_list_is_in_key_order_and_resumes_after_a_key(object_store: ObjectStore) -> None:
    keys = [packet_key("m", "t", "p0", g, s) for g in (1, 2) for s in (0, 1, 2, 10)]
    keys += ["m/t/p1/0000000001-000000000000.arrow", "m/u/p0/0000000001-000000000000.arrow"]
    for key in reversed(keys):
        object_store.put(key, key.encode())
    listed = object_store.list("m/t/p0/")
    assert [i.key for i in listed] == sorted(k for k in keys if k.startswith("m/t/p0/"))
    assert all(i.size == len(i.key) for i in listed)
    after = object_store.list("m/t/p0/", start_after=packet_key("m", "t", "p0", 1, 10))
    assert [i.key for i in after] == [packet_key("m", "t", "p0", 2, s) for s in (0, 1, 2, 10)]
    assert [i.key for i in object_store.list()] == sorted(keys)
    assert object_store.list("m/t/") == sorted(object_store.list("m/t/"))
    assert object_store.list("nothing/here/") == []
    # a start key from another stream: everything after it in key order
    assert [i.key for i in object_store.list("m/", start_after="m/t/p1/")] == [
        "m/t/p1/0000000001-000000000000.arrow", "m/u/p0/0000000001-000000000000.arrow"]


def test_delete_removes_only_that_object(object_store: ObjectStore) -> None:
    object_store.put("d/x", b"1")
    object_store.put("d/y", b"2")
    object_store.delete("d/x")
    assert object_store.list("d/") == [ObjectInfo("d/y", 1)]


def test_packets_survive_the_roundtrip_bit_for_bit(object_store: ObjectStore) -> None:
    rng = np.random.default_rng(1)
    signs = rng.choice(10**12, 5000, replace=False).astype(np.uint64)
    rows = rng.standard_normal((5000, 8), dtype=np.float32)
    header = PacketHeader(model="m", table="t", producer="p", generation=3, sequence=4)
    key = packet_key("m", "t", "p", 3, 4)
    object_store.put(key, encode_packet(header, signs, rows))
    packet = decode_packet(object_store.get(key), where=object_store.uri(key))
    assert np.array_equal(packet.signs, signs)
    assert np.array_equal(packet.embeddings, rows)


def test_a_packet_streamed_with_a_size_hint_reads_back_whole(object_store: ObjectStore) -> None:
    rng = np.random.default_rng(2)
    signs = np.arange(3001, dtype=np.uint64)  # a size that is no multiple of a page
    rows = rng.standard_normal((3001, 16), dtype=np.float32)
    header = PacketHeader(model="m", table="t", producer="p", generation=1, sequence=0)
    for sequence in range(3):  # the second and third reuse the first one's memory
        key = packet_key("m", "t", "p", 1, sequence)
        with object_store.writer(key, size_hint=signs.nbytes + rows.nbytes + 65536) as sink:
            write_packet(sink, header, signs + np.uint64(sequence), rows + sequence)
        packet = decode_packet(object_store.get(key), where=object_store.uri(key))
        assert np.array_equal(packet.signs, signs + np.uint64(sequence))
        assert np.array_equal(packet.embeddings, rows + sequence)
    assert [o.key for o in object_store.list("m/")] == [packet_key("m", "t", "p", 1, i) for i in range(3)]


def test_readers_never_see_a_partial_object(object_store: ObjectStore) -> None:
    """While large objects are being put, every listed object reads back whole."""
    blobs = {f"w/{i:03d}": bytes([i]) * (2 * 1024 * 1024) for i in range(6)}
    seen: list[str] = []
    errors: list[str] = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            for info in object_store.list("w/"):
                data = object_store.get(info.key)
                if data != blobs[info.key]:
                    errors.append(f"{info.key}: {len(data)} bytes")
                seen.append(info.key)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for key, data in blobs.items():
            object_store.put(key, data)
    finally:
        done.set()
        thread.join(timeout=30)
    assert not errors
    assert {i.key for i in object_store.list("w/")} == set(blobs)


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "a/../b", "..", "a/./b", "a\\b"])
def test_unsafe_keys_are_refused(object_store: ObjectStore, key: str) -> None:
    with pytest.raises(ValueError, match="invalid storage key"):
        object_store.put(key, b"x")


def test_uri_and_key_of_are_inverse(object_store: ObjectStore) -> None:
    uri = object_store.uri("m/t/p/x.arrow")
    assert object_store.key_of(uri) == "m/t/p/x.arrow"
    with pytest.raises(ValueError):
        object_store.key_of("s3://elsewhere/m/t/p/x.arrow")


# --------------------------------------------------------------------- backend specifics


def test_local_put_leaves_no_temp_file_and_lists_none(tmp_path) -> None:
    store = open_store(str(tmp_path))
    store.put("a/b", b"x")
    (tmp_path / "a" / ".b.123.tmp").write_bytes(b"partial")  # a crashed writer's leftover
    assert [p.name for p in (tmp_path / "a").iterdir() if not p.name.startswith(".")] == ["b"]
    assert store.list() == [ObjectInfo("a/b", 1)]


def test_local_hinted_writes_go_through_direct_io(tmp_path) -> None:
    store = open_store(str(tmp_path / "inc"))
    data = np.random.default_rng(3).integers(0, 256, 10_000, dtype=np.uint8).tobytes()
    for key in ("a/one", "a/two"):
        with store.writer(key, size_hint=len(data)) as sink:
            sink.write(data)
        assert (tmp_path / "inc" / key).read_bytes() == data  # trimmed back from whole pages
    assert store._direct_io  # ext4, xfs and (since Linux 6.6) tmpfs take O_DIRECT
    assert sorted(p.name for p in (tmp_path / "inc" / "a").iterdir()) == ["one", "two"]  # no temps


def test_local_hinted_writes_reuse_their_memory_without_leaking_earlier_bytes(tmp_path) -> None:
    """A writing thread keeps its page-aligned block: a shorter object after a longer one holds
    only its own bytes, and a write opened inside another on the same thread gets its own."""
    store = open_store(str(tmp_path))
    long, short = b"L" * 20_000, b"s" * 300
    for key, payload in (("long", long), ("short", short)):
        with store.writer(key, size_hint=len(payload)) as sink:
            sink.write(payload)
    assert store.get("long") == long and store.get("short") == short
    with store.writer("outer", size_hint=9000) as outer:
        outer.write(b"o" * 4000)
        with store.writer("inner", size_hint=9000) as inner:
            inner.write(b"i" * 5000)
        outer.write(b"O" * 10)
    assert store.get("outer") == b"o" * 4000 + b"O" * 10 and store.get("inner") == b"i" * 5000


def test_local_folder_refusing_direct_io_gets_a_plain_write(tmp_path, monkeypatch) -> None:
    """Filesystems without O_DIRECT (older tmpfs, some FUSE mounts) answer EINVAL at open."""
    real_open = os.open

    def refuse_direct(path: str, flags: int, *args: int, **kwargs: int) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr("persia_inc.storage.local.os.open", refuse_direct)
    store = open_store(str(tmp_path))
    for key, payload in (("k1", b"a" * 6000), ("k2", b"b" * 70)):
        with store.writer(key, size_hint=len(payload)) as sink:
            sink.write(payload)
        assert store.get(key) == payload
    assert not store._direct_io


def test_local_write_past_its_size_hint_fails_once_then_streams(tmp_path) -> None:
    store = open_store(str(tmp_path), retry=NO_RETRY)
    with pytest.raises(OSError, match="out of bounds"), store.writer("k", size_hint=10) as sink:
        sink.write(b"x" * 5000)
    assert store.list() == []  # nothing half-written is visible
    with store.writer("k", size_hint=10) as sink:  # hints are no longer trusted
        sink.write(b"y" * 5000)
    assert store.get("k") == b"y" * 5000


def test_local_file_uri_and_plain_path_agree(tmp_path) -> None:
    open_store(f"file://{tmp_path}").put("k", b"v")
    assert open_store(str(tmp_path)).get("k") == b"v"


def test_local_failure_is_a_storage_error_naming_the_uri(tmp_path) -> None:
    (tmp_path / "file").write_bytes(b"not a folder")
    store = open_store(str(tmp_path / "file"), retry=NO_RETRY)
    with pytest.raises(StorageError) as info:
        store.put("k", b"v")
    assert str(tmp_path / "file") in str(info.value)


def test_ceph_outage_is_retried_then_raised(ceph) -> None:
    store = open_store(ceph.new_bucket(), retry=RetryPolicy(
        max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02), s3=ceph.s3_settings())
    store.put("k", b"v")
    ceph.stop_gateway()
    try:
        with pytest.raises(TransientStorageError, match="unreachable"):
            store.get("k")
        assert store.retries == 2
    finally:
        ceph.start_gateway()
    assert store.get("k") == b"v"


def test_ceph_outage_shorter_than_the_retry_budget_is_invisible(ceph) -> None:
    store = open_store(ceph.new_bucket(), retry=RetryPolicy(
        max_attempts=60, initial_backoff_s=0.2, max_backoff_s=0.5, deadline_s=60),
        s3=ceph.s3_settings())
    ceph.stop_gateway()
    restarter = threading.Timer(1.0, ceph.start_gateway)
    restarter.start()
    try:
        store.put("during/outage", b"kept")
    finally:
        restarter.join()
    assert store.get("during/outage") == b"kept"
    assert store.retries > 0


def test_warm_up_writes_nothing_and_never_raises_or_retries(object_store: ObjectStore,
                                                            caplog: pytest.LogCaptureFixture,
                                                            ceph) -> None:
    object_store.put("k", b"v")
    object_store.warm_up()
    assert [i.key for i in object_store.list("")] == ["k"] and object_store.retries == 0
    # storage down: logged (at INFO: the next call retries), not raised, not retried
    down = open_store("s3://bucket/x", retry=FAST_RETRY,
                      s3=ceph.s3_settings(endpoint_url=f"http://127.0.0.1:{free_port()}"))
    with caplog.at_level("INFO", logger="persia_inc.storage"):
        down.warm_up()
    assert down.retries == 0
    assert any("warming up s3://bucket/x: TransientStorageError" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_ceph_wrong_credentials_are_permission_errors(ceph) -> None:
    bucket = ceph.new_bucket()
    store = open_store(bucket, retry=FAST_RETRY,
                       s3=ceph.s3_settings(secret_access_key="wrong-secret-000000000000000"))
    with pytest.raises(PermissionError) as info:
        store.put("k", b"v")
    assert "wrong-secret" not in str(info.value)  # credentials are never echoed
    assert store.retries == 0


def test_ceph_missing_bucket_is_file_not_found(ceph) -> None:
    store = open_store("s3://no-such-bucket-here/x", retry=FAST_RETRY, s3=ceph.s3_settings())
    with pytest.raises(FileNotFoundError):
        store.get("k")


def test_ceph_multipart_upload_is_one_atomic_object(ceph) -> None:
    store = open_store(ceph.new_bucket(), retry=FAST_RETRY, s3=ceph.s3_settings(
        multipart_threshold_bytes=5 * 1024 * 1024, multipart_chunk_bytes=5 * 1024 * 1024))
    data = os.urandom(12 * 1024 * 1024)
    store.put("big", data)
    assert store.get("big") == data
    assert store.list() == [ObjectInfo("big", len(data))]


def test_s3_settings_never_show_credentials(ceph) -> None:
    settings = ceph.s3_settings()
    assert settings.secret_access_key not in repr(settings)
    assert settings.access_key_id not in repr(settings)


def test_hdfs_uses_the_two_step_create_and_open(webhdfs) -> None:
    store = open_store(f"{webhdfs.uri}/root")
    store.put("x/y", b"payload")
    assert store.get("x/y") == b"payload"
    ops = [(node, op) for node, _method, op in webhdfs.requests]
    assert ("namenode", "CREATE") in ops and ("datanode", "CREATE") in ops
    assert ("namenode", "OPEN") in ops and ("datanode", "OPEN") in ops
    assert ("namenode", "RENAME") in ops


def test_hdfs_standby_namenode_is_retried(webhdfs) -> None:
    store = open_store(f"{webhdfs.uri}/root", retry=FAST_RETRY)
    store.put("k", b"v")
    webhdfs.fail_next(2, "StandbyException", 403)
    assert store.get("k") == b"v"
    assert store.retries == 2


def test_hdfs_access_control_is_permission_error(webhdfs) -> None:
    webhdfs.deny("/root/secret")
    store = open_store(f"{webhdfs.uri}/root", retry=FAST_RETRY)
    with pytest.raises(PermissionError, match="AccessControlException"):
        store.put("secret/k", b"v")
    assert store.retries == 0


def test_hdfs_namenode_down_is_transient(webhdfs) -> None:
    uri = f"{webhdfs.uri}/root"
    webhdfs.stop()
    store = open_store(uri, retry=RetryPolicy(max_attempts=2, initial_backoff_s=0.01))
    with pytest.raises(TransientStorageError, match="unreachable"):
        store.list()


def test_hdfs_failed_rename_leaves_no_visible_object(webhdfs) -> None:
    store = open_store(f"{webhdfs.uri}/root", retry=NO_RETRY)
    store.put("k", b"old")
    webhdfs.fail_next(1, "IOException", 500, op="RENAME")
    with pytest.raises(StorageError):
        store.put("j", b"new")
    assert [i.key for i in store.list()] == ["k"]


# ------------------------------------------------------------------------ registry


@pytest.mark.parametrize(("uri", "kind"), [
    ("/data/inc", "local"), ("relative/dir", "local"), ("file:///data/inc", "local"),
    ("hdfs://nn:9870/persia/inc", "hdfs"), ("s3://persia/inc", "ceph"),
])
def test_storage_kind_follows_the_scheme(uri: str, kind: str) -> None:
    assert storage_kind(uri) == kind


def test_unknown_scheme_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="hdfs://host:port/path"):
        open_store("gs://bucket/x")


def test_retry_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="initial_backoff_s"):
        RetryPolicy(initial_backoff_s=2, max_backoff_s=1)


def test_backoff_is_capped_and_jittered() -> None:
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=1.0, jitter=0.5)
    waits = [policy.backoff_s(a) for a in range(1, 12)]
    assert all(w <= 1.0 for w in waits)
    assert waits[-1] >= 0.5
    assert len({round(policy.backoff_s(3), 6) for _ in range(20)}) > 1
