"""Protobuf wire encoding for the messages that carry large arrays.

`ApplyRequest` (client to server, with its multi-table `TableSlice`s), `LookupResponse`,
`LookupTablesResponse` and `LookupBlocksResponse` (server to client) are written and read here
directly from and into numpy arrays (the server reads `ApplyRequest` as views on the received
bytes, so a big Apply costs no copy under the GIL before its rows are used):
protobuf's own path costs two or three full copies of every row buffer at about 1 GB/s,
which is most of a 1M-row Apply and a real share of a 53k-sign lookup. The bytes are
standard protobuf (fields ascending, proto3 defaults omitted, byte-identical to
SerializeToString, which tests check), so any protobuf client or server still interoperates;
every other message uses the generated classes.
"""

from __future__ import annotations

import ctypes
import functools
import sys
import typing
from collections.abc import Iterator, Sequence
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
    """Append (field number, str | int | ndarray | bytes) pairs, given in ascending field
    order; proto3 defaults (empty, zero) are omitted as protobuf does."""
    for number, value in fields:
        if isinstance(value, np.ndarray):
            if value.size:
                view = np.ascontiguousarray(value).data.cast("B")
                parts += [_varint(number << 3 | _LEN), _varint(view.nbytes), view]
        elif isinstance(value, str | bytes):
            if value:
                data = value.encode() if isinstance(value, str) else value
                parts += [_varint(number << 3 | _LEN), _varint(len(data)), data]
        elif value:
            parts += [_varint(number << 3 | _VARINT), _varint(value)]


def _submessage(parts: list, number: int, fields: tuple) -> None:
    """Append field `number` holding an embedded message of `fields` (as `_fields` takes
    them), always present (a repeated entry is written even when empty). The arrays stay
    views: they are copied once, when the caller joins the parts."""
    inner: list[bytes | memoryview] = []
    _fields(inner, fields)
    size = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in inner)
    parts += [_varint(number << 3 | _LEN), _varint(size), *inner]


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


@dataclass(frozen=True, slots=True)
class SliceArrays:
    """One table's share of a multi-table Apply message: signs uint64[n], rows float32[n, dim],
    deleted uint64[d] (little-endian, as on every platform we run on)."""

    table: str
    dim: int
    signs: np.ndarray
    rows: np.ndarray
    deleted: np.ndarray


@dataclass(frozen=True, slots=True)
class Expect:
    """A conditional apply's condition: the shard must hold exactly `position` of the stream
    (None: nothing of it), or it refuses the apply."""

    position: tuple[int, int] | None


def encode_apply_request(table: str, producer: str, generation: int, sequence: int, dim: int,
                         signs: np.ndarray, rows: np.ndarray, deleted: np.ndarray,
                         place: ApplyChunk = ApplyChunk(),
                         tables: Sequence[SliceArrays] = (), expect: Expect | None = None) -> bytes:
    """`ApplyRequest` wire bytes in one copy. signs: uint64[n]; rows: float32[n, dim];
    deleted: uint64[d]; all little-endian (as on every platform we run on). `tables`: the
    slices of a multi-table apply (then `table` is the stream lane, and dim and the three
    arrays are empty). `expect`: apply only on this condition (None: unconditionally)."""
    parts: list[bytes | memoryview] = []
    _fields(parts, ((1, table), (2, producer), (3, generation), (4, sequence), (5, dim),
                    (6, signs), (7, rows), (8, deleted), (9, place.shard),
                    (10, place.num_shards), (11, place.apply_id), (12, place.chunk),
                    (13, place.chunks)))
    for piece in tables:
        _submessage(parts, 14, ((1, piece.table), (2, piece.dim), (3, piece.signs),
                                (4, piece.rows), (5, piece.deleted)))
    if expect is not None:
        held = expect.position
        _fields(parts, ((15, 1), (16, int(held is not None)), (17, held[0] if held else 0),
                        (18, held[1] if held else 0)))
    return b"".join(parts)


@dataclass(frozen=True, slots=True)
class TableSliceView:
    """A received `TableSlice`: the arrays are raw byte views on the message (no copy)."""

    table: str = ""
    dim: int = 0
    signs: bytes | memoryview = b""
    rows: bytes | memoryview = b""
    deleted_signs: bytes | memoryview = b""


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
    tables: tuple[TableSliceView, ...] = ()
    expect: Expect | None = None
    error: str = ""


_APPLY_INTS = {3: "generation", 4: "sequence", 5: "dim", 9: "shard", 10: "num_shards",
               12: "chunk", 13: "chunks", 15: "conditional", 16: "expect_held",
               17: "expect_generation", 18: "expect_sequence"}
_EXPECT = ("conditional", "expect_held", "expect_generation", "expect_sequence")
_APPLY_BYTES = {1: "table", 2: "producer", 6: "signs", 7: "rows", 8: "deleted_signs",
                11: "apply_id"}
_PLACE = frozenset({"shard", "num_shards", "apply_id", "chunk", "chunks"})


def decode_apply_request(message: bytes) -> ApplyRequestView:
    """Parse `ApplyRequest` wire bytes without copying the arrays. Never raises (a gRPC
    deserializer that raises turns into an opaque INTERNAL): malformed bytes come back as a
    view whose `error` says why, for the handler to refuse with INVALID_ARGUMENT."""
    values: dict[str, object] = {}
    tables = []
    try:
        for number, value in _parse(memoryview(message)):
            if number in _APPLY_INTS and isinstance(value, int):
                values[_APPLY_INTS[number]] = value
            elif number in _APPLY_BYTES and isinstance(value, memoryview):
                values[_APPLY_BYTES[number]] = value
            elif number == 14 and isinstance(value, memoryview):
                tables.append(_decode_slice(value))
        for name in ("table", "producer", "apply_id"):
            if name in values:
                values[name] = bytes(typing.cast(memoryview, values[name])).decode()
    except (ValueError, UnicodeDecodeError) as exc:
        return ApplyRequestView(error=f"malformed ApplyRequest: {exc}")
    place = ApplyChunk(**{k: values.pop(k) for k in list(values) if k in _PLACE})  # type: ignore[arg-type]
    conditional, held, generation, sequence = (values.pop(k, 0) for k in _EXPECT)
    expect = (Expect((generation, sequence) if held else None)  # type: ignore[arg-type]
              if conditional else None)
    return ApplyRequestView(**values, place=place, tables=tuple(tables),  # type: ignore[arg-type]
                            expect=expect)


def _decode_slice(data: memoryview) -> TableSliceView:
    table, dim = "", 0
    arrays: dict[int, memoryview] = {}
    for number, value in _parse(data):
        if number == 1 and isinstance(value, memoryview):
            table = bytes(value).decode()
        elif number == 2 and isinstance(value, int):
            dim = value
        elif number in (3, 4, 5) and isinstance(value, memoryview):
            arrays[number] = value
    return TableSliceView(table, dim, arrays.get(3, b""), arrays.get(4, b""), arrays.get(5, b""))


def _parse(data: memoryview) -> Iterator[tuple[int, int | memoryview]]:
    """(field number, value) of every varint and length-delimited field of a message (values
    are ints or views on `data`); fixed-width fields are skipped. ValueError if malformed."""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, kind = key >> 3, key & 7
        if kind == _VARINT:
            value, pos = _read_varint(data, pos)
            yield number, value
        elif kind == _LEN:
            size, pos = _read_varint(data, pos)
            if pos + size > len(data):
                raise ValueError("truncated length-delimited field")
            yield number, data[pos:pos + size]
            pos += size
        elif kind in (_I64, _I32):
            pos += 8 if kind == _I64 else 4
        else:
            raise ValueError(f"unsupported wire type {kind}")


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
    if pos < len(data) and data[pos] < 0x80:  # one byte: tags, names' lengths, dims
        return data[pos], pos + 1
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
    return _decode_rows(memoryview(message), 1, 2, 3)[1]


def _decode_rows(data: memoryview, dim_field: int, rows_field: int, misses_field: int,
                 table_field: int = 0) -> tuple[str, LookupReply]:
    table, dim, misses, rows = "", 0, 0, data[0:0]
    for number, value in _parse(data):
        if isinstance(value, int):
            if number == dim_field:
                dim = value
            elif number == misses_field:
                misses = value
        elif number == rows_field:
            rows = value
        elif number == table_field:
            table = bytes(value).decode()
    if len(rows) and (dim == 0 or len(rows) % (4 * dim)):
        raise ValueError(f"{len(rows)} row bytes do not fit dim {dim}")
    array = np.frombuffer(rows, "<f4")
    return table, LookupReply(dim, array.reshape(-1, dim) if dim else array.reshape(0, 0), misses)


@dataclass(frozen=True, slots=True)
class LookupTablesReply:
    """A LookupTables answer: per table, in request order, (name, LookupReply)."""

    tables: tuple[tuple[str, LookupReply], ...]

    def encode(self) -> bytes:
        """`LookupTablesResponse` wire bytes, the rows copied once (from the arrays)."""
        parts: list[bytes | memoryview] = []
        for name, reply in self.tables:
            _submessage(parts, 1, ((1, name), (2, reply.dim), (3, reply.rows), (4, reply.misses)))
        return b"".join(parts)


_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
_new_bytes.restype = ctypes.py_object
_BYTES_DATA = sys.getsizeof(b"") - 1  # where a bytes object's data starts (CPython)


def unfilled_bytes(size: int) -> tuple[bytes, memoryview]:
    """A new bytes object of `size` bytes, not yet filled, and a writable byte view on it, to
    fill before the bytes are used or shared (as C code fills
    `PyBytes_FromStringAndSize(NULL, size)`). gRPC sends only `bytes`: this lets an answer be
    written in place instead of built aside and copied into one."""
    data = _new_bytes(None, size)
    return data, memoryview((ctypes.c_char * size).from_address(id(data) + _BYTES_DATA)).cast("B")


@functools.lru_cache(maxsize=4096)
def _table_head(name: str, dim: int) -> bytes:
    """A `TableLookup`'s table and dim fields."""
    parts: list[bytes | memoryview] = []
    _fields(parts, ((1, name), (2, dim)))
    return b"".join(parts)


_TABLE_TAG, _ROWS_TAG, _MISSES_TAG = (bytes([n << 3 | k]) for n, k in ((1, _LEN), (3, _LEN),
                                                                      (4, _VARINT)))


def lookup_tables_reply(names: Sequence[str], shapes: Sequence[tuple[int, int, int]]
                        ) -> tuple[bytes, list[np.ndarray]]:
    """`LookupTablesResponse` wire bytes for tables `names` with (signs, dim, misses)
    `shapes`, every field written but the rows, and a writable float32[signs, dim] view on
    each table's rows in them: filled, the bytes are `LookupTablesReply.encode`'s, without
    building the rows aside first and copying them in (0.3 ms of a 26-table, 1.7 MB answer)."""
    pieces = []
    total = 0
    for name, (n, dim, misses) in zip(names, shapes, strict=True):
        nbytes = n * dim * 4
        head = _table_head(name, dim) + (_ROWS_TAG + _varint(nbytes) if nbytes else b"")
        tail = _MISSES_TAG + _varint(misses) if misses else b""
        head = _TABLE_TAG + _varint(len(head) + nbytes + len(tail)) + head
        pieces.append((head, nbytes, tail))
        total += len(head) + nbytes + len(tail)
    data, view = unfilled_bytes(total)
    rows, pos = [], 0
    for (head, nbytes, tail), (n, dim, _) in zip(pieces, shapes, strict=True):
        view[pos:pos + len(head)] = head
        pos += len(head)
        rows.append(np.frombuffer(view[pos:pos + nbytes], np.float32).reshape(n, dim))
        pos += nbytes
        view[pos:pos + len(tail)] = tail
        pos += len(tail)
    return data, rows


def decode_lookup_tables_reply(message: bytes) -> LookupTablesReply:
    """Parse `LookupTablesResponse` wire bytes; each table's rows are a view on `message`.
    Malformed bytes raise ValueError."""
    return LookupTablesReply(tuple(_decode_rows(value, 2, 3, 4, 1)
                                   for number, value in _parse(memoryview(message))
                                   if number == 1 and isinstance(value, memoryview)))


_BLOCK_DIMS_TAG, _BLOCK_ROWS_TAG, _BLOCK_MISSES_TAG = (bytes([n << 3 | _LEN]) for n in (1, 2, 3))
_IN_REGION_FIELD = bytes([4 << 3 | _VARINT, 1])  # rows_in_region = true


def lookup_blocks_reply(shapes: Sequence[tuple[int, int, int]], space: memoryview | None = None
                        ) -> tuple[bytes, list[np.ndarray], np.ndarray, bool]:
    """`LookupBlocksResponse` wire bytes for tables of (signs, dim, misses) `shapes`, with a
    writable float32[signs, dim] view on each table's rows in its block and a writable
    uint64[T] view on its misses, to fill before the bytes are shared: the rows are gathered
    straight into the answer, not built aside and copied in. (The misses given are not
    written: the caller fills them after the gather.) With `space` (a lookup region's bytes
    for the rows) big enough, the rows go there instead and the answer says rows_in_region
    (the last value returned)."""
    packed = b"".join(_varint(dim) for _, dim, _ in shapes)
    floats = sum(n * dim for n, dim, _ in shapes)
    in_region = space is not None and 4 * floats <= len(space)
    head = _BLOCK_DIMS_TAG + _varint(len(packed)) + packed if packed else b""
    if floats and not in_region:
        head += _BLOCK_ROWS_TAG + _varint(4 * floats)
    tail = _BLOCK_MISSES_TAG + _varint(8 * len(shapes)) if shapes else b""
    rows_end = len(head) + (0 if in_region else 4 * floats)
    flag = _IN_REGION_FIELD if in_region else b""
    data, view = unfilled_bytes(rows_end + len(tail) + 8 * len(shapes) + len(flag))
    view[:len(head)] = head
    view[rows_end:rows_end + len(tail)] = tail
    view[len(view) - len(flag):] = flag
    block = np.frombuffer(space if space is not None and in_region else view[len(head):rows_end],
                          np.float32, floats)
    rows, at = [], 0
    for n, dim, _ in shapes:
        rows.append(block[at:at + n * dim].reshape(n, dim))
        at += n * dim
    misses_at = rows_end + len(tail)
    return data, rows, np.frombuffer(view[misses_at:misses_at + 8 * len(shapes)], "<u8"), in_region


def split_blocks(tables: Sequence[str], counts: Sequence[int], signs: np.ndarray
                 ) -> list[tuple[str, np.ndarray]]:
    """A LookupBlocks request's (table, uint64[counts[t]]) pairs, views on `signs`; ValueError
    when there are no tables or the counts do not add up to the signs."""
    if not tables or len(counts) != len(tables) or sum(counts) != signs.shape[0]:
        raise ValueError(f"LookupBlocks: {len(tables)} tables with {len(counts)} counts adding "
                         f"up to {sum(counts)}, for {signs.shape[0]} signs")
    ends = np.cumsum(counts).tolist()
    return [(name, signs[end - count:end]) for name, count, end in zip(tables, counts, ends,
                                                                        strict=True)]


@dataclass(frozen=True, slots=True)
class BlocksReply:
    """A LookupBlocks answer as received: dims: int64[T] each table's width; rows: float32[k]
    every table's rows, one table after the other (a read-only view on the message, no copy);
    misses: uint64[T] (zeros when the server sent none); in_region: the rows are in the lookup
    region the request lent (`regions.py`), not in the message."""

    dims: np.ndarray
    rows: np.ndarray
    misses: np.ndarray
    in_region: bool = False


def _packed_varints(data: memoryview) -> np.ndarray:
    """int64[k] of a packed repeated varint field's bytes; ValueError if malformed."""
    raw = np.frombuffer(data, np.uint8)
    if not (raw & 0x80).any():  # every value under 128 (widths, mostly): one byte each
        return raw.astype(np.int64)
    out, pos = [], 0
    while pos < len(data):
        value, pos = _read_varint(data, pos)
        out.append(value)
    return np.asarray(out, np.int64)


def decode_lookup_blocks_reply(message: bytes) -> BlocksReply:
    """Parse `LookupBlocksResponse` wire bytes (repeated fields packed, as protobuf writes
    them); rows is a view on `message`. Malformed bytes raise ValueError."""
    data = memoryview(message)
    dims, rows, misses, in_region = np.zeros(0, np.int64), data[0:0], data[0:0], False
    for number, value in _parse(data):
        if number == 4 and isinstance(value, int):
            in_region = bool(value)
        elif isinstance(value, memoryview):
            if number == 1:
                dims = _packed_varints(value)
            elif number == 2:
                rows = value
            elif number == 3:
                misses = value
    if len(rows) % 4 or len(misses) % 8:
        raise ValueError(f"{len(rows)} row bytes, {len(misses)} misses bytes: not whole values")
    counted = np.frombuffer(misses, "<u8")
    return BlocksReply(dims, np.frombuffer(rows, "<f4"),
                       counted if counted.size else np.zeros(dims.size, np.uint64), in_region)
