"""Protobuf wire encoding for the two messages that carry large arrays.

`ApplyRequest` (client to server) and `LookupResponse` (server to client) are written and read
here directly from and into numpy arrays (the server reads `ApplyRequest` as views on the
received bytes, so a big Apply costs no copy under the GIL before its rows are used):
protobuf's own path costs two or three full copies of every row buffer at about 1 GB/s,
which is most of a 1M-row Apply and a real share of a 53k-sign lookup. The bytes are
standard protobuf (fields ascending, proto3 defaults omitted, byte-identical to
SerializeToString, which tests check), so any protobuf client or server still interoperates;
every other message uses the generated classes.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

import numpy as np

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _fields(parts: list, fields: tuple) -> None:
    """Append (field number, str | int | ndarray) pairs, given in ascending field order;
    proto3 defaults (empty, zero) are omitted as protobuf does."""
    for number, value in fields:
        if isinstance(value, np.ndarray):
            if value.size:
                view = np.ascontiguousarray(value).data.cast("B")
                parts += [bytes([number << 3 | _LEN]), _varint(view.nbytes), view]
        elif isinstance(value, str):
            if value:
                data = value.encode()
                parts += [bytes([number << 3 | _LEN]), _varint(len(data)), data]
        elif value:
            parts += [bytes([number << 3 | _VARINT]), _varint(value)]


@dataclass(frozen=True, slots=True)
class ApplyChunk:
    """Where one Apply message stands: shard/num_shards the caller's view of the shard it
    calls (num_shards 0: not given); apply_id, chunk, chunks: the chunk's place in a chunked
    apply (chunks <= 1: the whole slice in one message)."""

    shard: int = 0
    num_shards: int = 0
    apply_id: str = ""
    chunk: int = 0
    chunks: int = 0


def encode_apply_request(table: str, producer: str, generation: int, sequence: int, dim: int,
                         signs: np.ndarray, rows: np.ndarray, deleted: np.ndarray,
                         place: ApplyChunk = ApplyChunk()) -> bytes:
    """`ApplyRequest` wire bytes in one copy. signs: uint64[n]; rows: float32[n, dim];
    deleted: uint64[d]; all little-endian (as on every platform we run on)."""
    parts: list[bytes | memoryview] = []
    _fields(parts, ((1, table), (2, producer), (3, generation), (4, sequence), (5, dim),
                    (6, signs), (7, rows), (8, deleted), (9, place.shard),
                    (10, place.num_shards), (11, place.apply_id), (12, place.chunk),
                    (13, place.chunks)))
    return b"".join(parts)


@dataclass(frozen=True, slots=True)
class ApplyRequestView:
    """A received `ApplyRequest`: signs, rows and deleted are raw byte views on the message
    (no copy; the server checks their sizes); `error` is set when the bytes are malformed."""

    table: str = ""
    producer: str = ""
    generation: int = 0
    sequence: int = 0
    dim: int = 0
    signs: bytes | memoryview = b""
    rows: bytes | memoryview = b""
    deleted_signs: bytes | memoryview = b""
    place: ApplyChunk = ApplyChunk()
    error: str = ""


_APPLY_INTS = {3: "generation", 4: "sequence", 5: "dim", 9: "shard", 10: "num_shards",
               12: "chunk", 13: "chunks"}
_APPLY_BYTES = {1: "table", 2: "producer", 6: "signs", 7: "rows", 8: "deleted_signs",
                11: "apply_id"}
_PLACE = frozenset({"shard", "num_shards", "apply_id", "chunk", "chunks"})


def decode_apply_request(message: bytes) -> ApplyRequestView:
    """Parse `ApplyRequest` wire bytes without copying the arrays. Never raises (a gRPC
    deserializer that raises turns into an opaque INTERNAL): malformed bytes come back as a
    view whose `error` says why, for the handler to refuse with INVALID_ARGUMENT."""
    data = memoryview(message)
    values: dict[str, object] = {}
    pos = 0
    try:
        while pos < len(data):
            key, pos = _read_varint(data, pos)
            number, kind = key >> 3, key & 7
            if kind == _VARINT:
                value, pos = _read_varint(data, pos)
                if number in _APPLY_INTS:
                    values[_APPLY_INTS[number]] = value
            elif kind == _LEN:
                size, pos = _read_varint(data, pos)
                if pos + size > len(data):
                    raise ValueError("truncated length-delimited field")
                if number in _APPLY_BYTES:
                    values[_APPLY_BYTES[number]] = data[pos:pos + size]
                pos += size
            elif kind in (_I64, _I32):
                pos += 8 if kind == _I64 else 4
            else:
                raise ValueError(f"unsupported wire type {kind}")
        for name in ("table", "producer", "apply_id"):
            if name in values:
                values[name] = bytes(typing.cast(memoryview, values[name])).decode()
    except (ValueError, UnicodeDecodeError) as exc:
        return ApplyRequestView(error=f"malformed ApplyRequest: {exc}")
    place = ApplyChunk(**{k: values.pop(k) for k in list(values) if k in _PLACE})  # type: ignore[arg-type]
    return ApplyRequestView(**values, place=place)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class LookupReply:
    """A Lookup answer. rows: float32[n, dim] (on the server: the array to send; on the
    client: a read-only view on the received message, no copy)."""

    dim: int
    rows: np.ndarray
    misses: int

    def encode(self) -> bytes:
        parts: list[bytes | memoryview] = []
        _fields(parts, ((1, self.dim), (2, self.rows)))
        if self.misses:
            parts += [bytes([3 << 3 | _VARINT]), _varint(self.misses)]
        return b"".join(parts)


def _read_varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def decode_lookup_reply(message: bytes) -> LookupReply:
    """Parse `LookupResponse` wire bytes; rows is a view on `message`. Unknown fields are
    skipped, as protobuf does; malformed bytes raise ValueError."""
    data = memoryview(message)
    pos, dim, misses, rows = 0, 0, 0, data[0:0]
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, kind = key >> 3, key & 7
        if kind == _VARINT:
            value, pos = _read_varint(data, pos)
            if number == 1:
                dim = value
            elif number == 3:
                misses = value
        elif kind == _LEN:
            size, pos = _read_varint(data, pos)
            if pos + size > len(data):
                raise ValueError("truncated length-delimited field")
            if number == 2:
                rows = data[pos:pos + size]
            pos += size
        elif kind in (_I64, _I32):
            pos += 8 if kind == _I64 else 4
        else:
            raise ValueError(f"unsupported wire type {kind}")
    if len(rows) and (dim == 0 or len(rows) % (4 * dim)):
        raise ValueError(f"{len(rows)} row bytes do not fit dim {dim}")
    array = np.frombuffer(rows, "<f4")
    return LookupReply(dim, array.reshape(-1, dim) if dim else array.reshape(0, 0), misses)
