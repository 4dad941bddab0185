"""Packet v1: one Arrow IPC file holding one table's changed rows from one producer.

Columns (in this order): `sign` uint64, `embedding` fixed_size_list<float32|float16>[dim],
optional `state` fixed_size_list<float32>[k], optional `op` uint8 (0 upsert, 1 delete).
Writers put upserts first, then deletes, each in the caller's order (no reordering: that costs
more than the rest of encoding); a sign occurs at most once in a packet, which both sides check
with one SIMD sort. The schema metadata carries the header and an xxh3-64 checksum over the
column value buffers, in column order. Readers ignore record batch custom metadata.

Nothing here can run code from a packet: Arrow IPC is plain data, and we never unpickle.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import xxhash

from persia_inc.packet_format._flatbuf import (
    HEADER_DICTIONARY_BATCH,
    HEADER_RECORD_BATCH,
    FlatbufferError,
    dictionary_batch_is_delta,
    record_batch_facts,
)
from persia_inc.packet_format.errors import (
    CorruptPacketError,
    PacketTooLargeError,
    UnsupportedPacketError,
)
from persia_inc.packet_format.header import DEFAULT_LIMITS, FORMAT_VERSION, PacketHeader, PacketLimits

ARROW_MAGIC = b"ARROW1"
META_PREFIX = "persia."
OP_UPSERT = 0
OP_DELETE = 1

_INT_FIELDS = frozenset(
    {"generation", "sequence", "created_at_ns", "rows", "deleted_rows", "dim", "state_dim",
     "format_version"}
)
_HEADER_FIELDS = tuple(f.name for f in fields(PacketHeader))
# Arrow and its Python bindings raise these for malformed input; we translate them once.
_DECODE_FAILURES = (pa.ArrowException, OSError, ValueError, TypeError, OverflowError, IndexError, KeyError)


@dataclass(frozen=True, slots=True, eq=False)
class Packet:
    """A decoded packet.

    signs: uint64[n] upserted signs; embeddings: float32[n, dim] their rows (a view on the
    packet's bytes when stored as float32); deleted: uint64[d] signs to delete;
    state: float32[n, k] optimizer state of the upserted rows, or None.
    """

    header: PacketHeader
    signs: np.ndarray
    embeddings: np.ndarray
    deleted: np.ndarray
    state: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of row data held (signs, rows, deletes, state)."""
        state_bytes = 0 if self.state is None else self.state.nbytes
        return self.signs.nbytes + self.embeddings.nbytes + self.deleted.nbytes + state_bytes


# --------------------------------------------------------------------------------- encoding


def _as_signs(name: str, values: object) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D uint64 array, got shape {array.shape}")
    if array.dtype == np.uint64:
        return array
    if array.size == 0:
        return array.astype(np.uint64)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must be a uint64 array, got dtype {array.dtype}")
    if np.issubdtype(array.dtype, np.signedinteger) and array.min() < 0:
        raise ValueError(f"{name} must be non-negative to fit uint64, got a negative value")
    return array.astype(np.uint64)


def _as_rows(name: str, values: object, n: int) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 2 or array.shape[0] != n:
        raise ValueError(f"{name} must be a float32 array of shape ({n}, dim), got {array.shape}")
    if array.dtype != np.float32:
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"{name} must be float32, got dtype {array.dtype}")
        array = array.astype(np.float32)
    return np.ascontiguousarray(array)


def first_repeat(*arrays: np.ndarray) -> int | None:
    """A sign that occurs more than once across `arrays` (each uint64[k]), or None.

    Ascending input (a sorted producer) is proven unique in one pass; otherwise one sort.
    """
    present = [a for a in arrays if a.size]
    if not present:
        return None
    if len(present) == 1 and _ascending(present[0]):
        return None
    ordered = np.sort(np.concatenate(present) if len(present) > 1 else present[0])
    repeats = ordered[1:] == ordered[:-1]
    return int(ordered[1:][repeats][0]) if repeats.any() else None


def _ascending(signs: np.ndarray) -> bool:
    return signs.size < 2 or bool(np.all(signs[1:] > signs[:-1]))


def _fixed_size_list(rows: np.ndarray) -> pa.FixedSizeListArray:
    flat = pa.array(rows.reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, rows.shape[1])


def _checksum(columns: list[np.ndarray]) -> str:
    digest = xxhash.xxh3_64()
    for column in columns:
        if column.size:  # an empty column adds no bytes (and a 0-row view cannot be cast)
            digest.update(np.ascontiguousarray(column).data.cast("B"))
    return digest.hexdigest()


def _metadata(header: PacketHeader) -> dict[bytes, bytes]:
    return {
        (META_PREFIX + name).encode(): str(getattr(header, name)).encode()
        for name in _HEADER_FIELDS
    }


def encode_packet(
    header: PacketHeader,
    signs: np.ndarray,
    embeddings: np.ndarray,
    *,
    deleted: np.ndarray | None = None,
    state: np.ndarray | None = None,
) -> bytes:
    """Encode one packet to Arrow IPC file bytes.

    signs: uint64[n] (unique); embeddings: float32[n, dim]; deleted: uint64[d] signs to
    delete (unique, disjoint from `signs`); state: float32[n, k] optimizer state or None.
    Rows keep the caller's order. Raises ValueError for inconsistent arguments.
    """
    sink = pa.BufferOutputStream()
    write_packet(sink, header, signs, embeddings, deleted=deleted, state=state)
    return sink.getvalue().to_pybytes()


def write_packet(
    sink: BinaryIO,
    header: PacketHeader,
    signs: np.ndarray,
    embeddings: np.ndarray,
    *,
    deleted: np.ndarray | None = None,
    state: np.ndarray | None = None,
) -> PacketHeader:
    """Write one packet to a binary file-like `sink`; returns the header as written."""
    signs = _as_signs("signs", signs)
    n = signs.size
    embeddings = _as_rows("embeddings", embeddings, n)
    dim = embeddings.shape[1] if n else int(header.dim)
    if dim <= 0:
        raise ValueError("an empty packet must name its dim in header.dim")
    deleted_signs = _as_signs("deleted", deleted if deleted is not None else np.empty(0, np.uint64))
    if state is not None:
        state = _as_rows("state", state, n)

    for name, values in (("signs", signs), ("deleted", deleted_signs)):
        repeat = first_repeat(values)
        if repeat is not None:
            raise ValueError(f"{name} holds sign {repeat} more than once")
    if deleted_signs.size and n:
        clash = first_repeat(signs, deleted_signs)
        if clash is not None:
            raise ValueError(f"sign {clash} is both upserted and deleted in one packet")

    d = deleted_signs.size
    all_signs = np.concatenate([signs, deleted_signs]) if d else signs
    store_dtype = np.float16 if header.dtype == "float16" else np.float32
    all_rows = embeddings.astype(store_dtype, copy=False).reshape(n, dim)
    if d:
        all_rows = np.concatenate([all_rows, np.zeros((d, dim), store_dtype)])
    columns: dict[str, pa.Array] = {
        "sign": pa.array(all_signs),
        "embedding": _fixed_size_list(all_rows),
    }
    hashed = [all_signs, all_rows]
    state_dim = 0
    if state is not None:
        state_dim = state.shape[1]
        all_state = np.concatenate([state, np.zeros((d, state_dim), np.float32)]) if d else state
        columns["state"] = _fixed_size_list(all_state)
        hashed.append(all_state)
    if d:
        ops = np.concatenate([np.zeros(n, np.uint8), np.ones(d, np.uint8)])
        columns["op"] = pa.array(ops)
        hashed.append(ops)

    written = replace(
        header, rows=n, deleted_rows=d, dim=dim, state_dim=state_dim,
        checksum=_checksum(hashed), format_version=FORMAT_VERSION,
    )
    write_single_batch(sink, columns, _metadata(written))
    return written


def write_single_batch(sink: BinaryIO | pa.NativeFile, columns: dict[str, pa.Array],
                       metadata: dict[bytes, bytes]) -> None:
    """Write `columns` (non-nullable, in order) as an Arrow IPC file of one record batch whose
    schema carries `metadata`: the shape of every packet."""
    schema = pa.schema(
        [pa.field(name, column.type, nullable=False) for name, column in columns.items()],
        metadata=metadata,
    )
    batch = pa.record_batch(list(columns.values()), schema=schema)
    with pa.ipc.new_file(sink, schema) as writer:
        writer.write_batch(batch)


# --------------------------------------------------------------------------------- decoding


def _to_buffer(source: object, where: str, limits: PacketLimits) -> pa.Buffer:
    if isinstance(source, pa.Buffer):
        buf = source
    elif isinstance(source, pa.NativeFile):  # a memory map reads without a copy
        buf = source.read_buffer(limits.max_bytes + 1)
    elif isinstance(source, bytes | bytearray | memoryview):
        buf = pa.py_buffer(source)
    elif hasattr(source, "read"):
        data = source.read(limits.max_bytes + 1)
        if not isinstance(data, bytes | bytearray):
            raise TypeError(f"{where}: read() returned {type(data).__name__}, expected bytes")
        buf = pa.py_buffer(data)
    else:
        raise TypeError(f"cannot decode a packet from {type(source).__name__}")
    if buf.size > limits.max_bytes:
        raise PacketTooLargeError(where, f"packet over the {limits.max_bytes}-byte limit")
    return buf


def check_messages(buf: pa.Buffer, where: str, limits: PacketLimits, *, max_dictionaries: int = 0
                   ) -> None:
    """Refuse compressed, delta-dictionary or multi-batch bodies (and more than
    `max_dictionaries` dictionary batches) before Arrow allocates anything for them."""
    reader = pa.ipc.MessageReader.open_stream(pa.BufferReader(buf.slice(8)))
    batches = dictionaries = 0
    while True:
        try:
            message = reader.read_next_message()
        except StopIteration:
            break
        if message.type == "schema":
            continue
        try:
            metadata = message.metadata.to_pybytes()
            header_type, compressed = record_batch_facts(metadata)
            delta = header_type == HEADER_DICTIONARY_BATCH and dictionary_batch_is_delta(metadata)
        except FlatbufferError as exc:
            raise CorruptPacketError(where, f"malformed message header: {exc}") from exc
        allowed = (HEADER_RECORD_BATCH, HEADER_DICTIONARY_BATCH) if max_dictionaries else (
            HEADER_RECORD_BATCH,)
        if header_type not in allowed:
            raise CorruptPacketError(where, f"unexpected IPC message type {message.type!r}")
        if compressed:
            raise UnsupportedPacketError(where, "compressed record batches are not part of the format")
        if delta:
            raise CorruptPacketError(where, "delta dictionaries are not part of the format")
        if message.body.size > limits.max_bytes:
            raise PacketTooLargeError(where, "record batch body over the byte limit")
        if header_type == HEADER_RECORD_BATCH:
            batches += 1
        else:
            dictionaries += 1
    if batches != 1:
        raise CorruptPacketError(where, f"expected exactly one record batch, found {batches}")
    if dictionaries > max_dictionaries:
        raise CorruptPacketError(where, f"expected at most {max_dictionaries} dictionary batch, "
                                 f"found {dictionaries}")


def _header_from_metadata(metadata: dict[bytes, bytes] | None, where: str) -> PacketHeader:
    if not metadata:
        raise CorruptPacketError(where, "schema metadata missing: not a persia-inc packet")
    raw = {
        key.decode("utf-8")[len(META_PREFIX):]: value.decode("utf-8")
        for key, value in metadata.items()
        if key.startswith(META_PREFIX.encode())
    }
    version = raw.get("format_version")
    if version is None:
        raise CorruptPacketError(where, "metadata has no format_version: not a persia-inc packet")
    if version != str(FORMAT_VERSION):
        raise UnsupportedPacketError(
            where, f"format version {version!r}; this reader understands {FORMAT_VERSION}"
        )
    missing = [name for name in _HEADER_FIELDS if name not in raw]
    if missing:
        raise CorruptPacketError(where, f"metadata lacks {', '.join(missing)}")
    values = metadata_values(raw, _HEADER_FIELDS, _INT_FIELDS, where)
    try:
        return PacketHeader(**values)  # type: ignore[arg-type]
    except ValueError as exc:
        raise CorruptPacketError(where, f"bad header: {exc}") from exc


def metadata_values(raw: dict[str, str], names: tuple[str, ...], int_names: frozenset[str],
                    where: str) -> dict[str, object]:
    """The header fields `names` from a packet's metadata text, `int_names` as integers
    (decimal, at most 20 digits); CorruptPacketError naming the field otherwise."""
    values: dict[str, object] = {}
    for name in names:
        text = raw[name]
        if name in int_names:
            if not text.isascii() or not text.isdigit() or len(text) > 20:
                raise CorruptPacketError(where, f"metadata {name}={text!r} is not an integer")
            values[name] = int(text)
        else:
            values[name] = text
    return values


def _list_column(batch: pa.RecordBatch, name: str, item: pa.DataType, where: str) -> pa.Array:
    column = batch.column(name)
    if not pa.types.is_fixed_size_list(column.type) or column.type.value_type != item:
        raise CorruptPacketError(
            where, f"column {name!r} has type {column.type}, expected fixed_size_list<{item}>"
        )
    return column


def _no_nulls(column: pa.Array, name: str, where: str) -> None:
    if column.null_count or (hasattr(column, "values") and column.values.null_count):
        raise CorruptPacketError(where, f"column {name!r} holds nulls")


def decode_packet(
    source: bytes | bytearray | memoryview | pa.Buffer | BinaryIO,
    *,
    where: str | None = None,
    limits: PacketLimits = DEFAULT_LIMITS,
    verify_checksum: bool = True,
    memory_pool: pa.MemoryPool | None = None,
) -> Packet:
    """Decode and verify a packet from bytes, an Arrow buffer or a binary file-like object.

    `where` (a path or URI) is named in every error. Raises only `PacketError` subclasses for
    bad input: CorruptPacketError, UnsupportedPacketError or PacketTooLargeError.
    """
    where = where or "<bytes>"
    buf = _to_buffer(source, where, limits)
    if buf.size < 12 or buf.slice(0, 6).to_pybytes() != ARROW_MAGIC:
        raise CorruptPacketError(where, "bad magic: not an Arrow IPC file")
    if buf.slice(buf.size - 6).to_pybytes() != ARROW_MAGIC:
        raise CorruptPacketError(where, "torn or truncated: Arrow footer magic missing")
    try:
        check_messages(buf, where, limits)
        reader = pa.ipc.open_file(pa.BufferReader(buf), memory_pool=memory_pool)
        header = _header_from_metadata(reader.schema.metadata, where)
        return _decode_batch(reader, header, where, limits, verify_checksum)
    except CorruptPacketError:
        raise
    except (UnsupportedPacketError, PacketTooLargeError):
        raise
    except _DECODE_FAILURES as exc:
        raise CorruptPacketError(where, f"unreadable Arrow IPC: {exc}") from exc


def _decode_batch(
    reader: pa.ipc.RecordBatchFileReader,
    header: PacketHeader,
    where: str,
    limits: PacketLimits,
    verify_checksum: bool,
) -> Packet:
    total = header.rows + header.deleted_rows
    if total > limits.max_rows:
        raise PacketTooLargeError(where, f"{total} rows over the {limits.max_rows}-row limit")
    if header.dim <= 0 or header.dim > limits.max_dim:
        raise PacketTooLargeError(where, f"dim {header.dim} outside [1, {limits.max_dim}]")
    names = reader.schema.names
    expected = ["sign", "embedding"] + [c for c in ("state", "op") if c in names]
    if names != expected:
        raise CorruptPacketError(where, f"columns {names}, expected {expected}")
    batch = reader.get_batch(0)
    if batch.num_rows != total:
        raise CorruptPacketError(where, f"{batch.num_rows} rows, metadata says {total}")
    batch.validate(full=True)

    sign_column = batch.column("sign")
    if sign_column.type != pa.uint64():
        raise CorruptPacketError(where, f"column 'sign' has type {sign_column.type}, want uint64")
    item = pa.float16() if header.dtype == "float16" else pa.float32()
    embedding_column = _list_column(batch, "embedding", item, where)
    if embedding_column.type.list_size != header.dim:
        raise CorruptPacketError(
            where, f"dim mismatch: rows are {embedding_column.type.list_size} wide, "
            f"metadata says {header.dim}"
        )
    for name in names:
        _no_nulls(batch.column(name), name, where)

    all_signs = sign_column.to_numpy()
    all_rows = embedding_column.flatten().to_numpy().reshape(total, header.dim)
    hashed = [all_signs, all_rows]
    all_state = None
    if "state" in names:
        state_column = _list_column(batch, "state", pa.float32(), where)
        if state_column.type.list_size != header.state_dim:
            raise CorruptPacketError(where, "state width differs from metadata state_dim")
        all_state = state_column.flatten().to_numpy().reshape(total, header.state_dim)
        hashed.append(all_state)
    ops = None
    if "op" in names:
        if batch.column("op").type != pa.uint8():
            raise CorruptPacketError(where, "column 'op' must be uint8")
        ops = batch.column("op").to_numpy()
        hashed.append(ops)
    elif header.deleted_rows:
        raise CorruptPacketError(where, "metadata counts deleted rows but there is no 'op' column")

    if verify_checksum and _checksum(hashed) != header.checksum:
        raise CorruptPacketError(where, "checksum mismatch: the packet's bytes were altered")
    if ops is None:
        upsert, signs, rows, state = None, all_signs, all_rows, all_state
        deleted = np.empty(0, np.uint64)
    else:
        if ops.size and int(ops.max()) > OP_DELETE:
            raise CorruptPacketError(where, f"unknown op code {int(ops.max())}")
        upsert = ops == OP_UPSERT
        if int(upsert.sum()) != header.rows:
            raise CorruptPacketError(where, "op column disagrees with metadata row counts")
        if bool(upsert[: header.rows].all()):  # writer's layout: upserts, then deletes
            cut = slice(0, header.rows)
            signs, rows = all_signs[cut], all_rows[cut]
            state = all_state[cut] if all_state is not None else None
            deleted = all_signs[header.rows:]
        else:
            signs, rows = all_signs[upsert], all_rows[upsert]
            state = all_state[upsert] if all_state is not None else None
            deleted = all_signs[~upsert]
    repeat = first_repeat(signs, deleted)
    if repeat is not None:
        raise CorruptPacketError(where, f"duplicate sign {repeat}")
    if rows.dtype != np.float32:
        rows = rows.astype(np.float32)
    return Packet(header=header, signs=signs, embeddings=rows, deleted=deleted, state=state)


def read_packet_header(
    source: bytes | pa.Buffer | BinaryIO, *, where: str | None = None,
    limits: PacketLimits = DEFAULT_LIMITS,
) -> PacketHeader:
    """Read only the header of a packet (no checksum or row checks): cheap identity."""
    where = where or "<bytes>"
    buf = _to_buffer(source, where, limits)
    try:
        reader = pa.ipc.open_file(pa.BufferReader(buf))
    except _DECODE_FAILURES as exc:
        raise CorruptPacketError(where, f"unreadable Arrow IPC: {exc}") from exc
    return _header_from_metadata(reader.schema.metadata, where)
