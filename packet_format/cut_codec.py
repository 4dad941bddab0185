"""Packet v2, a flush cut: one Arrow IPC file, one record batch, every table one producer flushed.

Columns, always in this order, so every packet of a stream has one schema:

* `table` dictionary<int16, utf8>: the dictionary is the header's table names in order (empty
  tables included); each table's rows are contiguous, tables in header order. Two bytes a
  row, and pyarrow datasets and polars read it as a string (categorical) column.
* `sign` uint64.
* `embedding` list<float32 | float16 | uint8>: an upsert holds exactly `dim` values of its
  table, a delete an empty list (a delete has no row; this keeps each table's upserts one
  contiguous `[rows, dim]` block of the values buffer, read as a zero-copy float32 view).
* `scale`, `offset` float16, int8 cuts only: row-wise quantization x ~ offset + q * scale,
  q in 0..255 (0 and 0 on deletes).
* `state` list<float32>, always: `state_dim` values per upsert of a table with optimizer
  state, an empty list on every other row. A cut holds only the tables that changed, so a
  column present "when some table has state" would come and go within one stream; always
  writing it costs one 4-byte offset a row.
* `op` uint8, 0 upsert, 1 delete, always written: within a table, upserts then deletes.

Schema metadata: `persia.{model, producer, generation, sequence, created_at_ns, flush_reason,
dtype, checksum, format_version}` (format_version "2"), under a prioritized update policy
`persia.{pending_rows, max_staleness_ms}` (absent: 0; readers before them ignore them), and
`persia.tables`, a compact JSON list
of `{"name", "dim", "rows", "deleted_rows", "state_dim"}`. The checksum is xxh3-64 over, in
column order: the table indices, signs, embedding offsets and values, scale, offset, state
offsets and values, ops.

`decode_cut` reads v1 packets too, as a cut of one table whose lane is that table.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from typing import BinaryIO, TypeAlias

import numpy as np
import pyarrow as pa

from persia_inc.packet_format.cut import (
    CUT_DTYPES,
    CUT_FORMAT_VERSION,
    CUT_LANE,
    Cut,
    CutHeader,
    CutTable,
    TableRows,
)
from persia_inc.packet_format.errors import (
    CorruptPacketError,
    PacketTooLargeError,
    UnsupportedPacketError,
)
from persia_inc.packet_format.header import DEFAULT_LIMITS, FORMAT_VERSION, PacketHeader, PacketLimits
from persia_inc.packet_format.table_codec import (
    _DECODE_FAILURES,
    ARROW_MAGIC,
    META_PREFIX,
    OP_DELETE,
    OP_UPSERT,
    Packet,
    _as_rows,
    _as_signs,
    _checksum,
    _to_buffer,
    check_messages,
    decode_packet,
    first_repeat,
    metadata_values,
    read_packet_header,
    write_single_batch,
)

MAX_CUT_TABLES = 2**15 - 1  # int16 dictionary indices
_MAX_LIST_VALUES = 2**31 - 1  # int32 list offsets
_FLOAT16_MAX = 65504.0
TABLE_TYPE = pa.dictionary(pa.int16(), pa.string())
_VALUE_TYPES = {"float32": pa.float32(), "float16": pa.float16(), "int8": pa.uint8()}
_STORE_DTYPES = {"float32": np.float32, "float16": np.float16, "int8": np.uint8}
_SCALAR_FIELDS = ("model", "producer", "generation", "sequence", "created_at_ns", "flush_reason",
                  "dtype", "checksum", "format_version")
_PENDING_FIELDS = ("pending_rows", "max_staleness_ms")  # only under a prioritized update policy
_INT_FIELDS = frozenset({"generation", "sequence", "created_at_ns", "format_version",
                         *_PENDING_FIELDS})
_TABLE_KEYS = ("name", "dim", "rows", "deleted_rows", "state_dim")
_Source: TypeAlias = bytes | bytearray | memoryview | pa.Buffer | BinaryIO


def cut_columns(dtype: str) -> list[str]:
    """The column names of a cut of `dtype`, in order."""
    quantized = ["scale", "offset"] if dtype == "int8" else []
    return ["table", "sign", "embedding", *quantized, "state", "op"]


# --------------------------------------------------------------------------- quantization


def _round_f16(values: np.ndarray, direction: float) -> np.ndarray:
    """float64[n] rounded to float16 toward `direction` (-inf: down, +inf: up)."""
    near = values.astype(np.float16)
    wrong = near.astype(np.float64) < values if direction > 0 else near.astype(np.float64) > values
    return np.where(wrong, np.nextafter(near, np.float16(direction)), near)


def quantize_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row-wise 8-bit quantization: rows float32[n, dim] -> (q uint8[n, dim], scale float16[n],
    offset float16[n]) with rows ~ offset + q * scale.

    offset is the row minimum rounded down to float16, scale (max - offset) / 255 rounded up,
    so the grid covers the row and the error is at most scale / 2: (max - min) / 510, loosened
    only by float16 rounding (a factor 1 + 2**-10, plus a float16 ulp of the minimum / 510).
    A constant row gets scale 0 when its value is a float16, else a tiny scale that still
    reconstructs it to a fraction of a float16 ulp. Raises ValueError for non-finite values
    or values beyond float16's range (+-65504).
    """
    n = rows.shape[0]
    if n == 0:
        return (np.empty(rows.shape, np.uint8), np.empty(0, np.float16), np.empty(0, np.float16))
    lo = rows.min(axis=1).astype(np.float64)
    hi = rows.max(axis=1).astype(np.float64)
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise ValueError("int8 cuts need finite values")
    if lo.min() < -_FLOAT16_MAX or hi.max() > _FLOAT16_MAX:
        raise ValueError(f"int8 cuts need values within float16 range (+-{_FLOAT16_MAX:g})")
    offset = _round_f16(lo, -np.inf)
    scale = _round_f16((hi - offset.astype(np.float64)) / 255.0, np.inf)
    scale32 = scale.astype(np.float32)
    inverse = np.divide(1.0, scale32, out=np.zeros(n, np.float32), where=scale32 > 0)
    q = rows - offset.astype(np.float32)[:, None]
    q *= inverse[:, None]
    np.rint(q, out=q)
    np.clip(q, 0, 255, out=q)
    return q.astype(np.uint8), scale, offset


def dequantize_rows(q: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """float32[n, dim] = offset[:, None] + q * scale[:, None] (q uint8[n, dim], float16[n] each)."""
    rows = q.astype(np.float32)
    rows *= scale.astype(np.float32)[:, None]
    rows += offset.astype(np.float32)[:, None]
    return rows


# ------------------------------------------------------------------------------- encoding


def _tables_json(tables: Sequence[CutTable]) -> str:
    return json.dumps([{key: getattr(t, key) for key in _TABLE_KEYS} for t in tables],
                      separators=(",", ":"))


def _metadata(header: CutHeader) -> dict[bytes, bytes]:
    names = _SCALAR_FIELDS + (_PENDING_FIELDS if header.max_staleness_ms else ())
    meta = {(META_PREFIX + name).encode(): str(getattr(header, name)).encode()
            for name in names}
    meta[(META_PREFIX + "tables").encode()] = _tables_json(header.tables).encode()
    return meta


def _segments(counts: list[tuple[int, int]], upsert: object, delete: object, dtype: type
              ) -> np.ndarray:
    """One value per row: `upsert[t]` on table t's upserts, `delete[t]` on its deletes."""
    values: np.ndarray = np.empty(2 * len(counts), dtype)
    values[0::2] = upsert
    values[1::2] = delete
    return np.repeat(values, np.asarray(counts, np.int64).reshape(-1))


def _list_array(widths: np.ndarray, values: np.ndarray, width: int = 0
                ) -> tuple[pa.ListArray, np.ndarray]:
    """The list column of `values` cut by `widths` (int32 per row), and its int32 offsets.
    width > 0: every row is that wide (no cumulative sum to run)."""
    if width > 0 and values.size:
        offsets = np.arange(0, width * (widths.size + 1), width, dtype=np.int32)
    else:
        offsets = np.zeros(widths.size + 1, np.int32)
        if values.size:  # all-empty lists (a cut without state) keep zero offsets
            np.cumsum(widths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)), offsets


def _joined(arrays: list[np.ndarray], dtype: type) -> np.ndarray:
    """`arrays` (1-D, contiguous) end to end: a view when they already lie so in one buffer
    (a producer that read a cut's rows into one block), else a concatenated copy."""
    present = [a for a in arrays if a.size]
    if len(present) < 2:
        return present[0] if present else np.empty(0, dtype)
    first, root = present[0], _root_of(present[0])
    end = first.ctypes.data
    for a in present:
        if (a.dtype != first.dtype or not a.flags.c_contiguous or a.ctypes.data != end
                or _root_of(a) is not root):
            return np.concatenate(present)
        end += a.nbytes
    if not (isinstance(root, np.ndarray) and root.flags.c_contiguous and root.dtype == first.dtype):
        return np.concatenate(present)
    start = (first.ctypes.data - root.ctypes.data) // first.itemsize
    return root.reshape(-1)[start:start + (end - first.ctypes.data) // first.itemsize]


def _root_of(array: np.ndarray) -> object:
    """The array that owns `array`'s memory (its base chain's last ndarray)."""
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array


def _checked_table(entry: CutTable | None, rows: TableRows, dtype: str) -> tuple[CutTable, dict]:
    """Validate one table's arrays; returns its header entry and normalized arrays."""
    name = rows.name
    if entry is not None and entry.name != name:
        raise ValueError(f"table {name!r} is where header.tables lists {entry.name!r}")
    what = f"table {name!r}"
    signs = _as_signs(f"{what} signs", rows.signs)
    deleted = _as_signs(f"{what} deleted", rows.deleted)
    n = signs.size
    raw = np.asarray(rows.embeddings)
    dim = entry.dim if entry is not None else (raw.shape[1] if raw.ndim == 2 else 0)
    if n == 0 and raw.size == 0:
        raw = np.empty((0, dim), np.float32)
    embeddings = _as_rows(f"{what} embeddings", raw, n)
    if embeddings.shape[1] != dim or dim <= 0:
        raise ValueError(f"{what}: embeddings are {embeddings.shape[1]} wide, the header says "
                         f"dim {dim}" if dim > 0 else f"{what}: dim must be positive")
    state = None
    state_dim = 0
    if rows.state is not None:
        state = _as_rows(f"{what} state", rows.state, n)
        state_dim = state.shape[1]
    if entry is not None and entry.state_dim and entry.state_dim != state_dim:
        raise ValueError(f"{what}: state is {state_dim} wide, the header says {entry.state_dim}")
    for label, values in (("signs", signs), ("deleted", deleted)):
        repeat = first_repeat(values)
        if repeat is not None:
            raise ValueError(f"{what}: {label} holds sign {repeat} more than once")
    if n and deleted.size:
        clash = first_repeat(signs, deleted)
        if clash is not None:
            raise ValueError(f"{what}: sign {clash} is both upserted and deleted")
    if dtype == "int8":
        try:
            q, scale, offset = quantize_rows(embeddings)
        except ValueError as exc:
            raise ValueError(f"{what}: {exc}") from exc
        stored = {"values": q.reshape(-1), "scale": scale, "offset": offset}
    else:
        stored = {"values": embeddings.astype(_STORE_DTYPES[dtype], copy=False).reshape(-1)}
    entry = CutTable(name=name, dim=dim, rows=n, deleted_rows=int(deleted.size), state_dim=state_dim)
    return entry, {"signs": signs, "deleted": deleted, "state": state, **stored}


def write_cut(sink: BinaryIO | pa.NativeFile, header: CutHeader, tables: Sequence[TableRows]
              ) -> CutHeader:
    """Write one cut to a binary file-like `sink`; returns the header as written.

    `tables` in packet order; header.tables is either empty (names and dims come from the
    rows) or names the same tables in the same order (then it gives the dim of empty tables).
    Each table: signs uint64[n] unique, embeddings float32[n, dim], deleted uint64[d] unique and
    disjoint from signs, state float32[n, k] or None. Raises ValueError naming the table.
    """
    if header.lane != CUT_LANE:
        raise ValueError(f"a v2 cut lives in the {CUT_LANE!r} lane, header.lane is {header.lane!r}")
    if header.tables and len(header.tables) != len(tables):
        raise ValueError(f"header.tables lists {len(header.tables)} tables, {len(tables)} given")
    if len(tables) > MAX_CUT_TABLES:
        raise ValueError(f"a cut holds at most {MAX_CUT_TABLES} tables, got {len(tables)}")
    dtype = header.dtype
    entries: list[CutTable] = []
    parts: list[dict] = []
    for i, rows in enumerate(tables):
        entry, part = _checked_table(header.tables[i] if header.tables else None, rows, dtype)
        entries.append(entry)
        parts.append(part)
    if len({t.name for t in entries}) != len(entries):
        raise ValueError(f"a cut lists each table once, got {[t.name for t in entries]}")
    if sum(t.rows * t.dim for t in entries) > _MAX_LIST_VALUES:
        raise ValueError("cut over 2**31 - 1 embedding values: split it")

    counts = [(t.rows, t.deleted_rows) for t in entries]
    indices = _segments(counts, np.arange(len(entries)), np.arange(len(entries)), np.int16)
    signs = np.concatenate([a for p in parts for a in (p["signs"], p["deleted"])] or
                           [np.empty(0, np.uint64)])
    widths = _segments(counts, [t.dim for t in entries], 0, np.int32)
    values = _joined([p["values"] for p in parts], _STORE_DTYPES[dtype])
    uniform = (entries[0].dim if entries and all(t.dim == entries[0].dim and not t.deleted_rows
                                                 for t in entries) else 0)
    embedding, offsets = _list_array(widths, values, uniform)
    ops = _segments(counts, OP_UPSERT, OP_DELETE, np.uint8)
    table_names = pa.array([t.name for t in entries], pa.string())
    columns: dict[str, pa.Array] = {
        "table": pa.DictionaryArray.from_arrays(pa.array(indices, pa.int16()), table_names),
        "sign": pa.array(signs),
        "embedding": embedding,
    }
    hashed = [indices, signs, offsets, values]
    if dtype == "int8":
        for key in ("scale", "offset"):
            column = np.concatenate([a for t, p in zip(entries, parts, strict=True)
                                     for a in (p[key], np.zeros(t.deleted_rows, np.float16))]
                                    or [np.empty(0, np.float16)])
            columns[key] = pa.array(column)
            hashed.append(column)
    state_dims = [t.state_dim for t in entries]
    state_widths = (_segments(counts, state_dims, 0, np.int32) if any(state_dims)
                    else np.zeros(len(signs), np.int32))
    state_values = np.concatenate([p["state"].reshape(-1) for p in parts if p["state"] is not None]
                                  or [np.empty(0, np.float32)])
    columns["state"], state_offsets = _list_array(state_widths, state_values)
    hashed += [state_offsets, state_values]
    columns["op"] = pa.array(ops)
    hashed.append(ops)

    written = replace(header, tables=tuple(entries), checksum=_checksum(hashed),
                      format_version=CUT_FORMAT_VERSION)
    write_single_batch(sink, columns, _metadata(written))
    return written


def encode_cut(header: CutHeader, tables: Sequence[TableRows]) -> bytes:
    """Encode one cut to Arrow IPC file bytes (see `write_cut`)."""
    sink = pa.BufferOutputStream()
    write_cut(sink, header, tables)
    return sink.getvalue().to_pybytes()


# ------------------------------------------------------------------------------- decoding


def _raw_metadata(metadata: dict[bytes, bytes] | None, where: str) -> dict[str, str]:
    if not metadata:
        raise CorruptPacketError(where, "schema metadata missing: not a persia-inc packet")
    try:
        raw = {key.decode("utf-8")[len(META_PREFIX):]: value.decode("utf-8")
               for key, value in metadata.items() if key.startswith(META_PREFIX.encode())}
    except UnicodeDecodeError as exc:
        raise CorruptPacketError(where, f"metadata is not UTF-8: {exc}") from exc
    if "format_version" not in raw:
        raise CorruptPacketError(where, "metadata has no format_version: not a persia-inc packet")
    return raw


def _parse_tables(text: str, where: str) -> tuple[CutTable, ...]:
    try:
        records = json.loads(text)
    except ValueError as exc:
        raise CorruptPacketError(where, f"metadata tables is not JSON: {exc}") from exc
    if not isinstance(records, list) or len(records) > MAX_CUT_TABLES:
        raise CorruptPacketError(where, f"metadata tables must be a list of at most {MAX_CUT_TABLES}")
    tables = []
    for i, record in enumerate(records):
        if not isinstance(record, dict) or sorted(record) != sorted(_TABLE_KEYS):
            raise CorruptPacketError(where, f"metadata tables[{i}] must be an object with keys "
                                     f"{list(_TABLE_KEYS)}")
        try:
            tables.append(CutTable(**record))
        except (ValueError, TypeError) as exc:
            raise CorruptPacketError(where, f"metadata tables[{i}]: {exc}") from exc
    return tuple(tables)


def _cut_header_from(raw: dict[str, str], where: str) -> CutHeader:
    version = raw["format_version"]
    if version != str(CUT_FORMAT_VERSION):
        raise UnsupportedPacketError(
            where, f"format version {version!r}; this reader understands 1 and {CUT_FORMAT_VERSION}")
    missing = [name for name in (*_SCALAR_FIELDS, "tables") if name not in raw]
    if missing:
        raise CorruptPacketError(where, f"metadata lacks {', '.join(missing)}")
    if raw["dtype"] not in CUT_DTYPES:
        raise UnsupportedPacketError(where, f"dtype {raw['dtype']!r}; this reader understands "
                                     f"{', '.join(CUT_DTYPES)}")
    values = metadata_values(raw, _SCALAR_FIELDS, _INT_FIELDS, where)
    values.update(metadata_values(raw, tuple(f for f in _PENDING_FIELDS if f in raw),
                                  _INT_FIELDS, where))
    values["tables"] = _parse_tables(raw["tables"], where)
    try:
        return CutHeader(**values)  # type: ignore[arg-type]
    except ValueError as exc:
        raise CorruptPacketError(where, f"bad header: {exc}") from exc


def _cut_header_of(header: PacketHeader) -> CutHeader:
    """A v1 header as the header of a one-table cut in that table's lane."""
    return CutHeader(
        model=header.model, producer=header.producer, generation=header.generation,
        sequence=header.sequence, created_at_ns=header.created_at_ns,
        flush_reason=header.flush_reason, dtype=header.dtype,
        tables=(CutTable(name=header.table, dim=header.dim, rows=header.rows,
                         deleted_rows=header.deleted_rows, state_dim=header.state_dim),),
        checksum=header.checksum, lane=header.table, format_version=header.format_version,
    )


def _cut_of_packet(packet: Packet) -> Cut:
    rows = TableRows(name=packet.header.table, signs=packet.signs, embeddings=packet.embeddings,
                     deleted=packet.deleted, state=packet.state)
    return Cut(header=_cut_header_of(packet.header), tables=(rows,))


def _check_magic(buf: pa.Buffer, where: str) -> None:
    if buf.size < 12 or buf.slice(0, 6).to_pybytes() != ARROW_MAGIC:
        raise CorruptPacketError(where, "bad magic: not an Arrow IPC file")
    if buf.slice(buf.size - 6).to_pybytes() != ARROW_MAGIC:
        raise CorruptPacketError(where, "torn or truncated: Arrow footer magic missing")


def _open(buf: pa.Buffer, where: str, memory_pool: pa.MemoryPool | None
          ) -> tuple[pa.ipc.RecordBatchFileReader, dict[str, str]]:
    reader = pa.ipc.open_file(pa.BufferReader(buf), memory_pool=memory_pool)
    return reader, _raw_metadata(reader.schema.metadata, where)


def decode_cut(
    source: _Source,
    *,
    where: str | None = None,
    limits: PacketLimits = DEFAULT_LIMITS,
    verify_checksum: bool = True,
    memory_pool: pa.MemoryPool | None = None,
) -> Cut:
    """Decode and verify a v2 cut, or a v1 packet as a cut of one table.

    float32 rows are zero-copy views on the packet's bytes; float16 and int8 rows are
    converted to float32. `where` (a path or URI) is named in every error. Raises only
    `PacketError` subclasses for bad input: CorruptPacketError, UnsupportedPacketError or
    PacketTooLargeError.
    """
    where = where or "<bytes>"
    buf = _to_buffer(source, where, limits)
    try:
        _check_magic(buf, where)
        check_messages(buf, where, limits, max_dictionaries=1)
        reader, raw = _open(buf, where, memory_pool)
        if raw["format_version"] == str(FORMAT_VERSION):
            return _cut_of_packet(decode_packet(buf, where=where, limits=limits,
                                                verify_checksum=verify_checksum,
                                                memory_pool=memory_pool))
        header = _cut_header_from(raw, where)
        return _decode_batch(reader, header, where, limits, verify_checksum)
    except (CorruptPacketError, UnsupportedPacketError, PacketTooLargeError):
        raise
    except _DECODE_FAILURES as exc:
        raise CorruptPacketError(where, f"unreadable Arrow IPC: {exc}") from exc


def read_cut_header(source: _Source, *, where: str | None = None,
                    limits: PacketLimits = DEFAULT_LIMITS) -> CutHeader:
    """Read only the header of a v2 cut or v1 packet (no checksum or row checks): cheap identity."""
    where = where or "<bytes>"
    buf = _to_buffer(source, where, limits)
    _check_magic(buf, where)
    try:
        _, raw = _open(buf, where, None)
    except (CorruptPacketError, UnsupportedPacketError, PacketTooLargeError):
        raise
    except _DECODE_FAILURES as exc:
        raise CorruptPacketError(where, f"unreadable Arrow IPC: {exc}") from exc
    if raw["format_version"] == str(FORMAT_VERSION):
        return _cut_header_of(read_packet_header(buf, where=where, limits=limits))
    return _cut_header_from(raw, where)


def _numpy(array: pa.Array, name: str, where: str) -> np.ndarray:
    if array.null_count:
        raise CorruptPacketError(where, f"column {name!r} holds nulls")
    return array.to_numpy(zero_copy_only=True)


def _list_parts(batch: pa.RecordBatch, name: str, item: pa.DataType, where: str
                ) -> tuple[np.ndarray, np.ndarray]:
    """(offsets int32[n + 1], values) of a list<item> column, refusing nulls."""
    column = batch.column(name)
    if column.type != pa.list_(item):
        raise CorruptPacketError(where, f"column {name!r} has type {column.type}, expected list<{item}>")
    if column.null_count:
        raise CorruptPacketError(where, f"column {name!r} holds nulls")
    return (_numpy(column.offsets, name, where), _numpy(column.values, f"{name} values", where))


def _check_widths(offsets: np.ndarray, values: np.ndarray, widths: Sequence[int],
                  tables: Sequence[CutTable], starts: Sequence[int], name: str, where: str) -> None:
    """Each upsert of table t holds exactly widths[t] values, each delete none (vectorized)."""
    if offsets[0] != 0 or offsets[-1] != values.size:
        raise CorruptPacketError(where, f"column {name!r}: offsets span [{offsets[0]}, {offsets[-1]}] "
                                 f"of {values.size} values")
    steps = np.diff(offsets)
    for table, start, width in zip(tables, starts, widths, strict=True):
        split = start + table.rows
        if not ((steps[start:split] == width).all() and (steps[split:split + table.deleted_rows] == 0
                                                         ).all()):
            raise CorruptPacketError(where, f"table {table.name!r}: {name!r} offsets are not "
                                     f"{width} values per upsert and none per delete")


def _decode_batch(reader: pa.ipc.RecordBatchFileReader, header: CutHeader, where: str,
                  limits: PacketLimits, verify_checksum: bool) -> Cut:
    tables = header.tables
    total = header.rows + header.deleted_rows
    if total > limits.max_rows:
        raise PacketTooLargeError(where, f"{total} rows over the {limits.max_rows}-row limit")
    for table in tables:
        if table.dim > limits.max_dim or table.state_dim > limits.max_dim:
            raise PacketTooLargeError(where, f"table {table.name!r}: dim {table.dim} or state_dim "
                                      f"{table.state_dim} over the {limits.max_dim} limit")
    expected = cut_columns(header.dtype)
    if reader.schema.names != expected:
        raise CorruptPacketError(where, f"columns {reader.schema.names}, expected {expected}")
    if reader.num_record_batches != 1:
        raise CorruptPacketError(where, f"expected one record batch, found {reader.num_record_batches}")
    batch = reader.get_batch(0)
    if batch.num_rows != total:
        raise CorruptPacketError(where, f"{batch.num_rows} rows, metadata says {total}")
    batch.validate(full=True)

    table_column = batch.column("table")
    if table_column.type != TABLE_TYPE:
        raise CorruptPacketError(where, f"column 'table' has type {table_column.type}, "
                                 f"expected {TABLE_TYPE}")
    names = [t.name for t in tables]
    if table_column.dictionary.null_count or table_column.dictionary.to_pylist() != names:
        raise CorruptPacketError(where, f"column 'table' names {table_column.dictionary.to_pylist()[:8]}"
                                 f", the header lists {names[:8]}")
    indices = _numpy(table_column.indices, "table", where)
    for name, want in (("sign", pa.uint64()), ("op", pa.uint8())):
        if batch.column(name).type != want:
            raise CorruptPacketError(where, f"column {name!r} has type {batch.column(name).type}, "
                                     f"expected {want}")
    signs = _numpy(batch.column("sign"), "sign", where)
    ops = _numpy(batch.column("op"), "op", where)
    if ops.size and int(ops.max()) > OP_DELETE:
        raise CorruptPacketError(where, f"unknown op code {int(ops.max())}")
    starts = np.cumsum([0] + [t.rows + t.deleted_rows for t in tables])[:-1].tolist()
    for i, (table, start) in enumerate(zip(tables, starts, strict=True)):
        split, end = start + table.rows, start + table.rows + table.deleted_rows
        if not (indices[start:end] == i).all():
            raise CorruptPacketError(where, f"table {table.name!r}: column 'table' disagrees with "
                                     f"the header's {table.rows + table.deleted_rows} rows")
        if not ((ops[start:split] == OP_UPSERT).all() and (ops[split:end] == OP_DELETE).all()):
            raise CorruptPacketError(where, f"table {table.name!r}: column 'op' disagrees with the "
                                     f"header's {table.rows} upserts then {table.deleted_rows} deletes")

    offsets, values = _list_parts(batch, "embedding", _VALUE_TYPES[header.dtype], where)
    _check_widths(offsets, values, [t.dim for t in tables], tables, starts, "embedding", where)
    hashed = [indices, signs, offsets, values]
    scale = offset = None
    if header.dtype == "int8":
        scale, offset = (_numpy(batch.column(n), n, where) for n in ("scale", "offset"))
        for name, column in (("scale", scale), ("offset", offset)):
            if column.dtype != np.float16:
                raise CorruptPacketError(where, f"column {name!r} must be float16")
            if not np.isfinite(column).all():
                raise CorruptPacketError(where, f"column {name!r} holds a non-finite value")
        hashed += [scale, offset]
    state_offsets, state_values = _list_parts(batch, "state", pa.float32(), where)
    _check_widths(state_offsets, state_values, [t.state_dim for t in tables], tables, starts,
                  "state", where)
    hashed += [state_offsets, state_values]
    hashed.append(ops)
    if verify_checksum and _checksum(hashed) != header.checksum:
        raise CorruptPacketError(where, "checksum mismatch: the packet's bytes were altered")

    if header.dtype == "float16":
        values = values.astype(np.float32)
    out = []
    for table, start in zip(tables, starts, strict=True):
        split, end = start + table.rows, start + table.rows + table.deleted_rows
        first = int(offsets[start])
        block = values[first:first + table.rows * table.dim].reshape(table.rows, table.dim)
        if scale is not None and offset is not None:
            block = dequantize_rows(block, scale[start:split], offset[start:split])
        state = None
        if table.state_dim:
            s = int(state_offsets[start])
            state = state_values[s:s + table.rows * table.state_dim].reshape(table.rows, table.state_dim)
        repeat = first_repeat(signs[start:split], signs[split:end])
        if repeat is not None:
            raise CorruptPacketError(where, f"table {table.name!r}: duplicate sign {repeat}")
        out.append(TableRows(name=table.name, signs=signs[start:split], embeddings=block,
                             deleted=signs[split:end], state=state))
    return Cut(header=header, tables=tuple(out))
