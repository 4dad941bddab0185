"""The one retry rule, the thread base and the leak guard, and the packet writer built on them:
a refusal stops the writer loudly, an outage is retried, close leaves a borrowed store alone."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest
from test_producer_support import NumpyModel, OutageStore, producer_config

from persia_inc.embedding_server.errors import ShardError
from persia_inc.foundation.kafka import import_kafka
from persia_inc.foundation.net import free_port
from persia_inc.foundation.retry import (
    RetryPolicy,
    call_with_retry,
    daemon_delay_s,
    is_retriable,
    retry_delay_s,
    stop_waits_on,
)
from persia_inc.foundation.threads import THREAD_PREFIX, ServiceThread, leaked_threads
from persia_inc.foundation.wait import WaitStoppedError, WaitTimeoutError, wait_until
from persia_inc.producer import UnstoredDataError, WriterFailedError
from persia_inc.producer.announce import DirectoryAnnouncer
from persia_inc.producer.snapshot import Snapshot
from persia_inc.producer.writer import PacketWriter
from persia_inc.storage import StorageError, TransientStorageError
from persia_inc.storage.local import LocalStore
from persia_inc.wiring import producer_from_config

# ------------------------------------------------------------------------ the retry rule


def test_errors_say_whether_they_are_retriable() -> None:
    kafka_errors = import_kafka().errors
    assert is_retriable(TransientStorageError("s3://b/k", "503"))
    assert not is_retriable(StorageError("s3://b/k", "denied"))
    assert is_retriable(StorageError("s3://b/k", "flaky", retriable=True))
    assert is_retriable(kafka_errors.KafkaTimeoutError())
    assert not is_retriable(kafka_errors.MessageSizeTooLargeError())
    assert is_retriable(ShardError(0, "h:1", "UNAVAILABLE", "down"))
    assert not is_retriable(ShardError(0, "h:1", "INVALID_ARGUMENT", "bad"))
    assert is_retriable(ConnectionResetError()) and is_retriable(TimeoutError())
    assert not is_retriable(ValueError("a bug")) and not is_retriable(FileNotFoundError())


def test_retry_delay_is_exponential_capped_and_jittered_within_bounds() -> None:
    policy = RetryPolicy(max_attempts=None, initial_backoff_s=0.1, max_backoff_s=1.0,
                         jitter=0.5, deadline_s=0)
    exc = TransientStorageError("u", "503")
    for attempt in range(1, 40):
        base = min(1.0, 0.1 * 2 ** (attempt - 1))
        waits = [retry_delay_s(exc, attempt, 0.0, policy) for _ in range(50)]
        assert all(w is not None and base * 0.5 <= w <= base for w in waits), (attempt, waits)
    assert len({round(w, 9) for w in waits}) > 1  # jittered
    exact = RetryPolicy(max_attempts=None, initial_backoff_s=0.1, max_backoff_s=1.0, jitter=0)
    assert [retry_delay_s(exc, a, 0.0, exact) for a in (1, 2, 3, 4, 5)] == pytest.approx(
        [0.1, 0.2, 0.4, 0.8, 1.0])
    assert retry_delay_s(exc, 10**6, 0.0, policy) == pytest.approx(0.75, abs=0.25)  # no overflow


def test_retry_delay_gives_up_on_refusals_spent_attempts_and_the_deadline() -> None:
    exc = TransientStorageError("u", "503")
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.1, max_backoff_s=1.0, deadline_s=1.0)
    assert retry_delay_s(StorageError("u", "denied"), 1, 0.0, policy) is None
    assert retry_delay_s(ValueError("bug"), 1, 0.0, policy) is None
    assert retry_delay_s(exc, 2, 0.0, policy) is not None
    assert retry_delay_s(exc, 3, 0.0, policy) is None  # three tries in all
    assert retry_delay_s(exc, 1, 0.95, policy) is None  # the wait would end past the deadline
    assert retry_delay_s(exc, 1, 0.5, policy) is not None
    # a daemon never gives up: a refusal waits the longest wait instead of spinning
    assert daemon_delay_s(StorageError("u", "denied"), 1, policy) == 1.0


def test_call_with_retry_retries_what_is_retriable_and_nothing_else() -> None:
    policy = RetryPolicy(max_attempts=5, initial_backoff_s=0.001, max_backoff_s=0.002)
    calls: list[int] = []
    retried: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise TransientStorageError("u", "503")
        return "ok"

    assert call_with_retry(flaky, policy, "flaky", on_retry=lambda e, a: retried.append(a)) == "ok"
    assert len(calls) == 3 and retried == [1, 2]

    def refused() -> None:
        calls.append(1)
        raise StorageError("u", "denied")

    calls.clear()
    with pytest.raises(StorageError, match="denied"):
        call_with_retry(refused, policy, "refused")
    assert len(calls) == 1


def test_a_scoped_stop_cuts_retry_waits_short() -> None:
    policy = RetryPolicy(max_attempts=None, initial_backoff_s=30, max_backoff_s=30, deadline_s=0)
    stop = threading.Event()

    def down() -> None:
        raise TransientStorageError("u", "503")

    threading.Timer(0.1, stop.set).start()
    started = time.monotonic()
    with stop_waits_on(stop), pytest.raises(TransientStorageError):
        call_with_retry(down, policy, "down", stop=threading.Event())  # two events at once
    assert time.monotonic() - started < 5


# ------------------------------------------------------------------------ thread base


def test_wait_until_returns_the_value_and_names_what_it_waited_for() -> None:
    calls: list[int] = []

    def third() -> int:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionRefusedError("not listening")
        return len(calls) if len(calls) >= 3 else 0

    assert wait_until(third, "the third call", timeout_s=5, interval_s=0.001,
                      ignore=(ConnectionError,)) == 3
    started = time.monotonic()
    with pytest.raises(WaitTimeoutError, match=r"0\.05 s waiting for the port 9 \(last error: nope"):
        wait_until(lambda: (_ for _ in ()).throw(ConnectionRefusedError("nope")), "the port 9",
                   timeout_s=0.05, interval_s=0.01, ignore=(ConnectionError,))
    assert time.monotonic() - started < 2
    with pytest.raises(ValueError, match="exited"):  # not ignored: at once
        wait_until(lambda: (_ for _ in ()).throw(ValueError("exited")), "x", timeout_s=60)


def test_wait_until_ends_promptly_when_stopped() -> None:
    stop = threading.Event()
    timer = threading.Timer(0.05, stop.set)
    timer.start()
    started = time.monotonic()
    with pytest.raises(WaitStoppedError, match="stopped while waiting for nothing"):
        wait_until(lambda: False, "nothing", timeout_s=60, interval_s=30, stop=stop)
    assert time.monotonic() - started < 5
    timer.join()


def test_service_thread_starts_closes_twice_and_refuses_to_restart() -> None:
    ticks: list[int] = []
    thread: ServiceThread

    def loop() -> None:
        while not thread.stop.wait(0.01):
            ticks.append(1)

    thread = ServiceThread("test-loop", loop)
    assert thread.name == THREAD_PREFIX + "test-loop"
    assert thread.start() is thread and thread.start() is thread  # start is once
    wait_until(lambda: len(ticks) > 2, "more than two ticks", timeout_s=15)
    assert thread.close(5) and not thread.is_alive()
    assert thread.close(5)  # twice is fine
    with pytest.raises(RuntimeError, match="closed"):
        thread.start()
    assert ServiceThread("never-started").close(1)


def test_service_thread_close_is_bounded_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    release = threading.Event()
    thread = ServiceThread("stubborn", lambda: release.wait(30)).start()  # ignores its stop
    started = time.monotonic()
    assert not thread.close(0.2)
    assert time.monotonic() - started < 2
    assert "did not stop" in caplog.text
    release.set()
    assert thread.join(5)


def test_service_thread_context_manager_wakes_the_loop_and_keeps_its_error() -> None:
    cond = threading.Condition()
    woken = threading.Event()
    thread: ServiceThread

    def loop() -> None:
        with cond:
            while not thread.stop.is_set():
                cond.wait()  # no timeout: only `wake` ends this wait
        woken.set()

    def wake() -> None:
        with cond:
            cond.notify_all()

    thread = ServiceThread("waits", loop, wake=wake)
    with thread:
        assert thread.is_alive()
    assert woken.is_set() and not thread.is_alive()

    broken = ServiceThread("broken", lambda: 1 / 0).start()  # type: ignore[func-returns-value]
    assert broken.join(5)
    assert isinstance(broken.error, ZeroDivisionError)


# ------------------------------------------------------------------------ leak guard


def test_leak_guard_fires_on_a_leaked_daemon_thread_of_ours() -> None:
    before = set(threading.enumerate())
    release = threading.Event()
    other = threading.Thread(target=release.wait, args=(30,), daemon=True, name="library-thread")
    other.start()
    pool_like = threading.Thread(target=release.wait, args=(30,), daemon=True,
                                 name=THREAD_PREFIX + "loader-fetch_0")  # a pool's thread
    pool_like.start()
    blocked = ServiceThread("blocked", lambda: release.wait(30)).start()  # never closed
    try:
        found = leaked_threads(before, grace_s=0.2)
        assert THREAD_PREFIX + "blocked" in found
        assert THREAD_PREFIX + "loader-fetch_0" in found
        assert "library-thread" not in found  # a library's daemon thread is not ours to judge
        assert leaked_threads(before, grace_s=0.0, extra=lambda t: t.name == "library-thread")[0] \
            == "library-thread"
    finally:
        release.set()
        blocked.close(5)
        other.join(5)
        pool_like.join(5)
    assert leaked_threads(before, grace_s=1.0) == []


# ------------------------------------------------------------------------ the packet writer


class RefusingStore(LocalStore):
    """Local disk that refuses every packet for good (a non-retriable error), counting tries."""

    def __init__(self, root_uri: str) -> None:
        super().__init__(root_uri)
        self.attempts = 0

    @contextmanager
    def writer(self, key: str, size_hint: int = 0) -> Iterator[BinaryIO]:
        self.attempts += 1
        raise StorageError(self.location(key), "access denied by policy (test)")
        yield  # type: ignore[unreachable]


def test_a_refused_packet_stops_the_writer_and_reaches_the_training_thread(tmp_path: Path) -> None:
    store = RefusingStore(str(tmp_path / "inc"))
    model = NumpyModel(rows=1000, dim=4)
    config = producer_config(str(tmp_path / "inc"), buffer_size=100, close_timeout_s=1.0)
    producer = producer_from_config(config, generation=1, store=store)
    producer.register_table("emb", model.read)
    producer.record("emb", np.arange(100))  # full: flushed
    wait_until(lambda: producer.writer.failure is not None,
               "the writer's failure", timeout_s=15)
    assert producer.writer._thread.join(5)  # stopped, not spinning
    assert store.attempts == 1
    uri = store.location("ctr/~cuts/producer-0/0000000001-000000000000.arrow")
    with pytest.raises(WriterFailedError) as info:
        producer.record("emb", np.arange(100, 110))
    assert uri in str(info.value) and "access denied by policy" in str(info.value)
    assert info.value.uri == uri and isinstance(info.value.__cause__, StorageError)
    with pytest.raises(WriterFailedError, match="cannot fix"):
        producer.flush()
    assert producer.buffered("emb") == 10  # kept, not dropped
    with pytest.raises(UnstoredDataError) as closed:
        producer.close()
    assert closed.value.rows == 110 and closed.value.tables == ["emb"]  # in flight + buffered
    assert isinstance(closed.value.__cause__, WriterFailedError)
    assert store.attempts == 1


def _snapshot(rows: int = 10) -> Snapshot:
    signs = np.arange(rows, dtype=np.uint64)
    return Snapshot("emb", signs, np.ones((rows, 4), np.float32), np.empty(0, np.uint64), 4,
                    "explicit")


def test_writer_close_leaves_a_borrowed_store_running_and_cuts_its_retries(
        tmp_path: Path) -> None:
    store = OutageStore(str(tmp_path / "inc"))
    writer = PacketWriter(store, "ctr", "p", DirectoryAnnouncer(), generation=1,
                          max_backoff_s=30.0)
    writer.submit(_snapshot())
    wait_until(lambda: store.attempts >= 3,
               "three attempts", timeout_s=15)  # retrying the outage, waits growing
    started = time.monotonic()
    left, tables = writer.close(0.1)
    assert time.monotonic() - started < 5  # its own stop ended the wait
    assert (left, tables) == (10, ["emb"])
    assert not store.stop.is_set()  # not the writer's to stop
    store.down.clear()
    store.put("still/usable", b"yes")
    assert store.get("still/usable") == b"yes"
    store.close()


def test_writer_close_stops_a_store_it_owns(tmp_path: Path) -> None:
    store = OutageStore(str(tmp_path / "inc"))
    store.down.clear()
    writer = PacketWriter(store, "ctr", "p", DirectoryAnnouncer(), generation=1, owns_store=True)
    writer.submit(_snapshot())
    assert writer.close(10) == (0, [])
    assert store.stop.is_set()
    assert [i.key for i in store.list()] == ["ctr/~cuts/p/0000000001-000000000000.arrow"]


def test_free_port_is_a_free_loopback_port() -> None:
    import socket

    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))



_HEAP = """
import ctypes
import numpy as np
from persia_inc.foundation.memory import keep_freed_memory
kept = keep_freed_memory()
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks",
                "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = Info
buffer = np.ones(8 << 20)  # 64 MiB
mapped = mallinfo2().hblkhd  # bytes in blocks mapped on their own (returned on free)
del buffer
print(kept, mapped >> 20, mallinfo2().arena >> 20)  # heap kept after the free, in MiB
"""


@pytest.mark.parametrize("opt_out", [False, True])
def test_kept_freed_memory_serves_big_buffers_from_the_heap_and_keeps_them(
        opt_out: bool) -> None:
    """A 64 MiB buffer: from malloc's heap and kept there after its free (reused without
    faulting fresh pages in) with kept memory; a mapping of its own, returned on free, with
    glibc's defaults (PERSIA_INC_KEEP_FREED_MEMORY=0)."""
    import os
    import subprocess
    import sys

    from persia_inc.foundation.memory import OPT_OUT

    env = {**os.environ, OPT_OUT: "0" if opt_out else "1"}
    out = subprocess.run([sys.executable, "-c", _HEAP], capture_output=True, text=True,
                         env=env, timeout=60, check=True).stdout.split()
    kept, mapped_mib, heap_mib = out[0] == "True", int(out[1]), int(out[2])
    assert kept is not opt_out
    if opt_out:
        assert mapped_mib >= 64 and heap_mib < 64, out
    else:
        assert mapped_mib < 64 and heap_mib >= 64, out
