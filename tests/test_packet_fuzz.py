"""Property tests: the packet reader, fed random bytes or mutated valid packets, either returns
a packet or raises `PacketError`; nothing else escapes, and it never allocates past its limit.

Arrow allocations are measured on a fresh proxy memory pool set as Arrow's default for each
example; numpy allocations with tracemalloc (numpy reports its buffers to it).
"""

from __future__ import annotations

import contextlib
import tracemalloc

import numpy as np
import pyarrow as pa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from persia_inc.packet_format import PacketError, PacketHeader, PacketLimits, decode_packet, encode_packet

LIMITS = PacketLimits(max_rows=10_000, max_bytes=1_000_000, max_dim=64)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _valid_packet(n: int, dim: int, deletes: int, with_state: bool, dtype: str) -> bytes:
    rng = np.random.default_rng(n * 31 + dim)
    signs = rng.permutation(np.arange(n + deletes, dtype=np.uint64) * np.uint64(2**40 + 7))
    state = rng.standard_normal((n, 2), dtype=np.float32) if with_state else None
    header = PacketHeader(model="m", table="t", producer="p", generation=1, sequence=n,
                          dtype=dtype, dim=dim)  # type: ignore[arg-type]
    return encode_packet(header, signs[:n], rng.standard_normal((n, dim), dtype=np.float32),
                         deleted=signs[n:], state=state)


VALID = [
    _valid_packet(300, 16, 0, False, "float32"),
    _valid_packet(120, 8, 7, True, "float32"),
    _valid_packet(50, 4, 3, False, "float16"),
    _valid_packet(0, 8, 5, False, "float32"),
]



def _warm_up() -> None:
    """First calls import and initialise lazily (numpy, Arrow); keep that out of the peaks."""
    for data in VALID:
        decode_packet(data, limits=LIMITS)
        for bad in (data[:-7], data[:40] + data[41:], bytes([data[0] ^ 1]) + data[1:]):
            with contextlib.suppress(PacketError):
                decode_packet(bad, limits=LIMITS)


_warm_up()


def decode_within_limits(data: bytes) -> None:
    """Decode `data`; assert only PacketError escapes and allocations stay under the limit."""
    pool = pa.proxy_memory_pool(pa.default_memory_pool())
    previous = pa.default_memory_pool()
    pa.set_memory_pool(pool)
    tracemalloc.start()
    try:
        decode_packet(data, limits=LIMITS, memory_pool=pool)
    except PacketError:
        pass
    finally:
        _, numpy_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        pa.set_memory_pool(previous)
    assert pool.max_memory() <= LIMITS.max_bytes, f"Arrow peaked at {pool.max_memory()} bytes"
    assert numpy_peak <= LIMITS.max_bytes + len(data), f"numpy peaked at {numpy_peak} bytes"


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes_never_escape_as_other_errors(data: bytes) -> None:
    decode_within_limits(data)


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_behind_the_arrow_magic(data: bytes) -> None:
    decode_within_limits(b"ARROW1\x00\x00" + data + b"ARROW1")


@st.composite
def mutated_packets(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "overwrite", "truncate", "insert", "delete", "int"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16))
            data[at: at + len(chunk)] = chunk
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at: at + draw(st.integers(1, 64))]
        else:  # plant a huge length or count where a flatbuffer field might be
            value = draw(st.sampled_from([2**31 - 1, 2**32 - 1, 2**63 - 1, 10**12, 65536]))
            width = draw(st.sampled_from([4, 8]))
            data[at: at + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")
    return bytes(data)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_packets())
def test_mutated_packets_are_decoded_or_rejected_cleanly(data: bytes) -> None:
    decode_within_limits(data)


@FUZZ
@given(st.sampled_from(VALID), st.integers(0, 64), st.sampled_from([2**31 - 1, 2**40, 2**63 - 1]))
def test_huge_lengths_in_the_header_region_do_not_allocate(valid: bytes, at: int, value: int) -> None:
    """The schema and batch headers sit in the first few hundred bytes and the footer."""
    data = bytearray(valid)
    for offset in (8 + at * 4, len(data) - 10 - at * 4):
        data[offset: offset + 8] = value.to_bytes(8, "little")
    decode_within_limits(bytes(data))


def test_every_valid_fixture_decodes() -> None:
    for data in VALID:
        packet = decode_packet(data, limits=LIMITS)
        assert packet.header.rows == packet.signs.size
