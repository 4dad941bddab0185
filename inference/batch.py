"""The request format: one Arrow IPC stream holding one record batch.

Columns: `dense` fixed_size_list<float32>[dense_dim] (one entry per sample) and one
list<uint64> column per sparse feature, named as the model's spec names them (a sample's
list may be empty). Build it like the seed document's `PyPersiaBatchData`:

    batch = PersiaBatch()
    batch.add_dense([np.random.rand(128, 13).astype(np.float32)])
    batch.add_sparse([(f"feature{i + 1}", [np.array([...], np.uint64), ...]) for i in range(26)])
    payload = batch.to_bytes()

`decode_batch` is the server side: it reads untrusted bytes (Arrow IPC, never pickle), checks
sizes against the spec's limits before it allocates, validates Arrow's offsets, and raises
`BatchError` naming the column for anything wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from persia_inc.inference.spec import DENSE_COLUMN, ModelSpec

FORMAT = b"persia-inc-batch/1"
_SPARSE_TYPE = pa.list_(pa.uint64())


class BatchError(ValueError):
    """A request that cannot be used; `column` names the offending column ('' for the whole
    request)."""

    def __init__(self, column: str, reason: str) -> None:
        self.column, self.reason = column, reason
        super().__init__(f"column {column!r}: {reason}" if column else reason)


SparseInput = Sequence[np.ndarray] | np.ndarray


class PersiaBatch:
    """Builds one request. `add_dense` and `add_sparse` may each be called more than once
    (dense arrays are concatenated along features; sparse features are appended)."""

    def __init__(self) -> None:
        self._dense: list[np.ndarray] = []
        self._sparse: dict[str, pa.Array] = {}
        self._rows: int | None = None

    def _check_rows(self, rows: int, what: str) -> None:
        if self._rows is None:
            self._rows = rows
        elif rows != self._rows:
            raise BatchError(what, f"has {rows} samples, the batch has {self._rows}")

    def add_dense(self, denses: np.ndarray | Sequence[np.ndarray]) -> PersiaBatch:
        """Dense features: one float32[batch, k] array or a list of them."""
        arrays = [denses] if isinstance(denses, np.ndarray) else list(denses)
        for given in arrays:
            array = np.asarray(given)
            if array.ndim != 2:
                raise BatchError(DENSE_COLUMN, f"expected a [batch, k] array, got shape {array.shape}")
            self._check_rows(array.shape[0], DENSE_COLUMN)
            self._dense.append(np.ascontiguousarray(array, dtype=np.float32))
        return self

    def add_sparse(self, sparse: Sequence[tuple[str, SparseInput]]) -> PersiaBatch:
        """Sparse features: (name, signs) pairs, where signs is a list with one uint64[k_i]
        array per sample, or a uint64[batch, k] array (k signs for every sample)."""
        for name, signs in sparse:
            if name == DENSE_COLUMN or name in self._sparse:
                raise BatchError(name, "given twice (or named like the dense column)")
            if isinstance(signs, np.ndarray) and signs.ndim == 2:
                rows, k = signs.shape
                values = np.ascontiguousarray(signs, dtype=np.uint64).reshape(-1)
                offsets = np.arange(0, rows * k + 1, max(k, 1), dtype=np.int32)[: rows + 1]
                if k == 0:
                    offsets = np.zeros(rows + 1, np.int32)
            else:
                parts = [np.asarray(s).reshape(-1) for s in signs]
                rows = len(parts)
                lengths = np.fromiter((p.size for p in parts), np.int64, rows)
                offsets64 = np.zeros(rows + 1, np.int64)
                np.cumsum(lengths, out=offsets64[1:])
                if offsets64[-1] >= 2**31:
                    raise BatchError(name, "more than 2**31 signs")
                offsets = offsets64.astype(np.int32)
                values = (np.concatenate(parts).astype(np.uint64, copy=False) if parts
                          else np.zeros(0, np.uint64))
            self._check_rows(rows, name)
            self._sparse[name] = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()),
                                                          pa.array(values, pa.uint64()))
        return self

    def to_record_batch(self) -> pa.RecordBatch:
        if self._rows is None:
            raise BatchError("", "empty batch: add dense and sparse features first")
        columns, names = [], []
        if self._dense:
            dense = np.concatenate(self._dense, axis=1) if len(self._dense) > 1 else self._dense[0]
            width = dense.shape[1]
            columns.append(pa.FixedSizeListArray.from_arrays(pa.array(dense.reshape(-1)), width))
            names.append(DENSE_COLUMN)
        for name, array in self._sparse.items():
            columns.append(array)
            names.append(name)
        schema = pa.schema([pa.field(n, c.type, nullable=False) for n, c in zip(names, columns, strict=True)],
                           metadata={b"format": FORMAT})
        return pa.RecordBatch.from_arrays(columns, schema=schema)

    def to_bytes(self) -> bytes:
        """The request body: an Arrow IPC stream with one record batch."""
        sink = pa.BufferOutputStream()
        batch = self.to_record_batch()
        with pa.ipc.new_stream(sink, batch.schema) as writer:
            writer.write_batch(batch)
        return sink.getvalue().to_pybytes()


# PERSIA's name for the request builder (`persia.prelude.PyPersiaBatchData`), so code written
# against the seed document runs with only its import line changed
PyPersiaBatchData = PersiaBatch


@dataclass(frozen=True, slots=True)
class DecodedBatch:
    """A validated request, ready for lookup.

    rows: samples B; dense: float32[B, dense_dim]; signs: uint64[n] the table signs
    (`ModelSpec.table_signs`) of every feature, feature-major (feature 0's samples in order,
    then feature 1's ...), each in its feature's table; bag_offsets: int64[F * B + 1], bag
    j = f * B + i holds signs[bag_offsets[j]:bag_offsets[j + 1]] for sample i of feature f.
    """

    rows: int
    dense: np.ndarray
    signs: np.ndarray
    bag_offsets: np.ndarray


def _read_single_batch(data: bytes | bytearray | memoryview) -> pa.RecordBatch:
    try:
        reader = pa.ipc.open_stream(pa.py_buffer(data))
        batch = reader.read_next_batch()
    except StopIteration:
        raise BatchError("", "the Arrow stream holds no record batch") from None
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, OSError) as exc:
        raise BatchError("", f"not an Arrow IPC stream: {exc}") from exc
    try:
        reader.read_next_batch()
    except StopIteration:
        return batch
    except (pa.ArrowInvalid, OSError) as exc:
        raise BatchError("", f"trailing bytes after the record batch: {exc}") from exc
    raise BatchError("", "expected exactly one record batch, got more")


def decode_batch(data: bytes | bytearray | memoryview, spec: ModelSpec) -> DecodedBatch:
    """Decode and validate one request body against `spec`; raises `BatchError` only."""
    try:
        return _decode(data, spec)
    except BatchError:
        raise
    except (pa.ArrowException, UnicodeDecodeError, OSError, ValueError, TypeError, IndexError) as exc:
        # what a hostile body can still provoke inside pyarrow (e.g. a field name that is
        # not utf-8): one error type for the caller, the cause chained
        raise BatchError("", f"malformed Arrow data: {type(exc).__name__}: {exc}") from exc


def _decode(data: bytes | bytearray | memoryview, spec: ModelSpec) -> DecodedBatch:
    limits = spec.limits
    size = memoryview(data).nbytes
    if size > limits.max_bytes:
        raise BatchError("", f"request of {size} bytes is over the limit of {limits.max_bytes}")
    if size == 0:
        raise BatchError("", "empty request body")
    batch = _read_single_batch(data)
    if batch.num_rows > limits.max_rows:
        raise BatchError("", f"{batch.num_rows} samples is over the limit of {limits.max_rows}")
    if batch.num_rows == 0:
        raise BatchError("", "the batch has no samples")
    try:
        batch.validate(full=True)  # offsets within their values, buffers long enough
    except pa.ArrowInvalid as exc:
        raise BatchError("", f"inconsistent Arrow data: {exc}") from exc
    columns = _layout(spec).columns(data, batch)
    rows = batch.num_rows

    # every column's buffers in one call (an array read from an IPC stream has offset 0):
    # pyarrow's per-column accessors cost several microseconds a column, 27 columns a request
    buffers = batch.to_struct_array().buffers()
    if any(buffers[i] is not None for i in columns.validity):
        _check_nulls(batch, columns, spec)  # a validity bitmap: count its nulls
    if spec.dense_dim:
        dense = _view(buffers[columns.dense], np.float32)[:rows * spec.dense_dim]
        dense = dense.reshape(rows, spec.dense_dim).copy()
    else:
        dense = np.zeros((rows, 0), np.float32)
    features = len(spec.sparse)
    offsets = np.empty((features, rows + 1), np.int64)
    for f, at in enumerate(columns.offsets):
        offsets[f] = _view(buffers[at], np.int32)[:rows + 1]
    firsts, lasts = offsets[:, 0], offsets[:, -1]
    sizes = lasts - firsts
    total = int(sizes.sum())
    if total > limits.max_signs:
        raise BatchError("", f"{total} signs is over the limit of {limits.max_signs}")

    starts = np.zeros(features + 1, np.int64)
    np.cumsum(sizes, out=starts[1:])
    bag_offsets = np.empty(features * rows + 1, np.int64)
    bag_offsets[0] = 0
    np.add(offsets[:, 1:], (starts[:-1] - firsts)[:, None], out=bag_offsets[1:].reshape(features, rows))
    pieces = [_view(buffers[at], np.uint64)[lo:hi]
              for at, lo, hi in zip(columns.values, firsts.tolist(), lasts.tolist(), strict=True)]
    signs = np.concatenate(pieces) if pieces else np.empty(0, np.uint64)
    if signs.size != total:
        raise BatchError("", "a sparse column's values are shorter than its offsets say")
    # ids are a per-feature table's signs as they are; a shared table's get the prefix
    # (`ModelSpec.table_signs`): the top bits become the feature's number in its table
    for f, mask, prefix in _layout(spec).prefixes:
        piece = signs[starts[f]:starts[f + 1]]
        np.bitwise_and(piece, mask, out=piece)
        np.bitwise_or(piece, prefix, out=piece)
    return DecodedBatch(rows=rows, dense=dense, signs=signs, bag_offsets=bag_offsets)


def _check_nulls(batch: pa.RecordBatch, columns: _Columns, spec: ModelSpec) -> None:
    """Raise `BatchError` naming the first column with a null (list, sign or dense value)."""
    if spec.dense_dim:
        column = batch.column(columns.positions[0])
        if column.null_count or column.flatten().null_count:
            raise BatchError(DENSE_COLUMN, "has nulls")
    for name, position in zip(spec.sparse, columns.positions[1:], strict=True):
        column = batch.column(position)
        if column.null_count:
            raise BatchError(name, "has null lists (use an empty list for no signs)")
        lo, hi = column.offsets[0].as_py(), column.offsets[-1].as_py()
        if column.values.slice(lo, hi - lo).null_count:
            raise BatchError(name, "has null signs")


def _view(buffer: pa.Buffer | None, dtype: type[np.generic]) -> np.ndarray:
    """A read-only numpy view of an Arrow buffer (an absent one: empty)."""
    if buffer is None:
        return np.empty(0, dtype)
    return np.frombuffer(buffer, dtype, buffer.size // np.dtype(dtype).itemsize)


@dataclass(frozen=True, slots=True)
class _Columns:
    """Where a request schema's columns are: `positions` the dense column's (-1 without),
    then the sparse features' in the spec's order; and, in the record batch's flattened
    buffers (`StructArray.buffers`), the dense values', each feature's offsets' and values',
    and every validity bitmap's."""

    positions: list[int]
    dense: int
    offsets: list[int]
    values: list[int]
    validity: list[int]


class _Layout:
    """What decoding a request of `spec` needs, worked out once per spec: the columns it
    takes, each prefixed feature's (feature, mask, prefix) for `ModelSpec.table_signs`, and
    the schemas already checked, by their stream message's bytes (a fresh pa.Schema's first
    comparison costs about 28 us, its bytes' lookup about 1 us)."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.expected = [DENSE_COLUMN, *spec.sparse] if spec.dense_dim else list(spec.sparse)
        self.dense_type = pa.list_(pa.float32(), spec.dense_dim) if spec.dense_dim else None
        self.accepted: dict[bytes, _Columns] = {}
        self.prefixes = []
        for f in range(len(spec.sparse)):
            bits = spec.feature_table(f).prefix_bits
            if bits:
                number = spec.table_signs(f, np.zeros(1, np.uint64))[0]
                self.prefixes.append((f, np.uint64((1 << (64 - bits)) - 1), number))

    def columns(self, data: bytes | bytearray | memoryview, batch: pa.RecordBatch) -> _Columns:
        """The columns of `batch`, read from `data`; raises `BatchError` naming the column that
        is missing, unexpected, or of the wrong type."""
        view = memoryview(data).cast("B")
        head = 8 if view[:4] == b"\xff\xff\xff\xff" else 4  # continuation marker, length
        key = bytes(view[:head + int.from_bytes(view[head - 4:head], "little")])
        found = self.accepted.get(key)
        if found is None:
            found = self._check(batch.schema)
            if len(self.accepted) < _ACCEPTED_SCHEMAS:
                self.accepted[key] = found
        return found

    def _check(self, schema: pa.Schema) -> _Columns:
        names, expected, spec = schema.names, self.expected, self.spec
        if len(set(names)) != len(names):
            raise BatchError("", f"duplicate column names in {names}")
        for name in names:
            if name not in expected:
                raise BatchError(name, f"unexpected column; the model takes {len(expected)} columns: "
                                       f"{', '.join(expected)}")
        for name in expected:
            if name not in names:
                raise BatchError(name, f"missing; the model takes {len(spec.sparse)} sparse features "
                                       f"and the request has {len(names) - (DENSE_COLUMN in names)}")
        if self.dense_type is not None:
            got = schema.field(DENSE_COLUMN).type
            if got != self.dense_type:
                raise BatchError(DENSE_COLUMN, f"expected {self.dense_type} ({spec.dense_dim} dense "
                                               f"features), got {got}")
        for name in spec.sparse:
            got = schema.field(name).type
            if got != _SPARSE_TYPE:
                raise BatchError(name, f"expected list<uint64>, got {got}")
        # flattened buffers: the struct's validity, then per column its validity and, for
        # fixed_size_list<float32>, values' validity and values; for list<uint64>, offsets,
        # values' validity and values
        first, at = {}, 1
        for name in names:
            first[name] = at
            at += 3 if name == DENSE_COLUMN else 4
        dense = first.get(DENSE_COLUMN, 0)
        return _Columns(
            positions=[names.index(DENSE_COLUMN) if spec.dense_dim else -1,
                       *(names.index(n) for n in spec.sparse)],
            dense=dense + 2,
            offsets=[first[n] + 1 for n in spec.sparse],
            values=[first[n] + 3 for n in spec.sparse],
            validity=[*((dense, dense + 1) if spec.dense_dim else ()),
                      *(i for n in spec.sparse for i in (first[n], first[n] + 2))])


_ACCEPTED_SCHEMAS = 8
_LAYOUTS: dict[int, _Layout] = {}


def _layout(spec: ModelSpec) -> _Layout:
    """The spec's `_Layout` (cached by identity: hashing a spec costs microseconds)."""
    layout = _LAYOUTS.get(id(spec))
    if layout is None or layout.spec is not spec:
        if len(_LAYOUTS) >= 64:
            _LAYOUTS.clear()
        layout = _LAYOUTS[id(spec)] = _Layout(spec)
    return layout


__all__ = ["FORMAT", "BatchError", "DecodedBatch", "PersiaBatch", "PyPersiaBatchData", "decode_batch"]
