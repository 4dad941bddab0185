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
        batch.validate(full=True)
    except pa.ArrowInvalid as exc:
        raise BatchError("", f"inconsistent Arrow data: {exc}") from exc

    names = batch.schema.names
    if len(set(names)) != len(names):
        raise BatchError("", f"duplicate column names in {names}")
    expected = [DENSE_COLUMN, *spec.sparse] if spec.dense_dim else list(spec.sparse)
    for name in names:
        if name not in expected:
            raise BatchError(name, f"unexpected column; the model takes {len(expected)} columns: "
                                   f"{', '.join(expected)}")
    for name in expected:
        if name not in names:
            raise BatchError(name, f"missing; the model takes {len(spec.sparse)} sparse features "
                                   f"and the request has {len(names) - (DENSE_COLUMN in names)}")

    rows = batch.num_rows
    if spec.dense_dim:
        column = batch.column(DENSE_COLUMN)
        want = pa.list_(pa.float32(), spec.dense_dim)
        if column.type != want:
            raise BatchError(DENSE_COLUMN, f"expected {want} ({spec.dense_dim} dense features), "
                                           f"got {column.type}")
        if column.null_count or column.flatten().null_count:
            raise BatchError(DENSE_COLUMN, "has nulls")
        dense = column.flatten().to_numpy(zero_copy_only=False).reshape(rows, spec.dense_dim).copy()
    else:
        dense = np.zeros((rows, 0), np.float32)

    # each column's signs as views on the request: its offsets and its child array's values
    # (`ListArray.flatten` goes through pyarrow.compute, about 20 us a call)
    want = _SPARSE_TYPE
    pieces = []
    total = 0
    for name in spec.sparse:
        column = batch.column(name)
        if column.type != want:
            raise BatchError(name, f"expected list<uint64>, got {column.type}")
        if column.null_count:
            raise BatchError(name, "has null lists (use an empty list for no signs)")
        offsets = column.offsets.to_numpy()
        lo, hi = int(offsets[0]), int(offsets[-1])
        values = column.values.slice(lo, hi - lo)
        if values.null_count:
            raise BatchError(name, "has null signs")
        pieces.append((offsets, values.to_numpy()))
        total += hi - lo
    if total > limits.max_signs:
        raise BatchError("", f"{total} signs is over the limit of {limits.max_signs}")

    signs = np.empty(total, np.uint64)
    bag_offsets = np.empty(len(spec.sparse) * rows + 1, np.int64)
    bag_offsets[0] = 0
    start = 0
    for f, (offsets, values) in enumerate(pieces):
        # ids are a per-feature table's signs as they are; a shared table's get the prefix
        signs[start:start + values.size] = (spec.table_signs(f, values)
                                            if spec.feature_table(f).prefix_bits else values)
        np.add(offsets[1:], np.int64(start - int(offsets[0])),
               out=bag_offsets[f * rows + 1:(f + 1) * rows + 1])
        start += values.size
    return DecodedBatch(rows=rows, dense=dense, signs=signs, bag_offsets=bag_offsets)


__all__ = ["FORMAT", "BatchError", "DecodedBatch", "PersiaBatch", "PyPersiaBatchData", "decode_batch"]
