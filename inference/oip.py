"""The Open Inference Protocol's (KServe v2) tensors for a persia-inc model, both transports.

A model takes one of two input forms (`model_inputs` lists them for the metadata answer):

* `request`: BYTES, shape [1]: the request bytes `inference.batch.PersiaBatch.to_bytes()`
  builds (Arrow IPC), as TorchServe's handler takes them;
* plain tensors, for a client with no project code:
  - `dense`: FP32 [B, dense_dim], the dense features;
  - `sparse_ids`: INT64 or UINT64 [N], every sparse id, feature-major (feature 0's ids of
    sample 0, of sample 1, ..., then feature 1's ...), features in the model's order
    (`ModelSpec.sparse`, the metadata's `parameters`); an INT64 id is its uint64 bit pattern;
  - `sparse_lengths`: INT32 or INT64 [F, B], how many ids sample b has for feature f (they sum
    to N; 0 is an empty list).

Both give the same `DecodedBatch`, so the same engine answers both bit for bit. The output is
`scores`: FP32 [B]. A request that does not fit raises `BatchError` whose `column` names the
input (INVALID_ARGUMENT / HTTP 400 at the server).

BYTES elements travel length-prefixed (a 4-byte little-endian length before each element) in
raw contents and in HTTP's binary extension, as tritonclient and KServe send them.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from persia_inc.inference.batch import BatchError, DecodedBatch, decode_batch
from persia_inc.inference.spec import ModelSpec

REQUEST = "request"
DENSE, SPARSE_IDS, SPARSE_LENGTHS = "dense", "sparse_ids", "sparse_lengths"
SCORES = "scores"
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "INT8": np.dtype(np.int8), "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"), "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8")}


@dataclass(frozen=True, slots=True)
class Tensor:
    """One input as received: name, datatype (protocol name), shape, and its elements, either
    `raw` (little-endian bytes; BYTES length-prefixed) or `values` (a list, from JSON or typed
    protobuf contents)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    raw: bytes | memoryview | None = None
    values: Sequence[Any] | None = None

    def count(self) -> int:
        """Elements the shape says; BatchError for a negative dimension."""
        if any(d < 0 for d in self.shape):
            raise BatchError(self.name, f"shape {list(self.shape)} has a negative dimension")
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    def array(self, accepted: Sequence[str]) -> np.ndarray:
        """The elements as a numpy array of the shape; BatchError if the datatype is not one of
        `accepted` or the data does not fill the shape."""
        if self.datatype not in accepted:
            raise BatchError(self.name, f"datatype {self.datatype} is not accepted; send "
                                        f"{' or '.join(accepted)}")
        dtype, count = DTYPES[self.datatype], self.count()
        if self.raw is not None:
            if len(self.raw) != count * dtype.itemsize:
                raise BatchError(self.name, f"{len(self.raw)} bytes of data for shape {list(self.shape)} "
                                            f"of {self.datatype} (needs {count * dtype.itemsize})")
            return np.frombuffer(self.raw, dtype).reshape(self.shape)
        values = _flatten(self.values if self.values is not None else [])
        if len(values) != count:
            raise BatchError(self.name, f"{len(values)} elements for shape {list(self.shape)}")
        try:
            return np.asarray(values, dtype).reshape(self.shape)
        except (ValueError, TypeError, OverflowError) as exc:
            raise BatchError(self.name, f"elements are not {self.datatype}: {exc}") from exc

    def elements(self) -> list[bytes]:
        """A BYTES tensor's elements; BatchError if it is another datatype or torn."""
        if self.datatype != "BYTES":
            raise BatchError(self.name, f"datatype {self.datatype}: send BYTES")
        if self.raw is not None:
            out = split_bytes(self.raw, self.name)
        else:
            out = [v.encode() if isinstance(v, str) else bytes(v) for v in _flatten(self.values or [])]
        if len(out) != self.count():
            raise BatchError(self.name, f"{len(out)} elements for shape {list(self.shape)}")
        return out


def _flatten(values: Sequence[Any]) -> list[Any]:
    """JSON `data` may be nested as the shape or flat: row-major elements either way."""
    if values and isinstance(values[0], list):
        return [x for row in values for x in _flatten(row)]
    return list(values)


def split_bytes(raw: bytes | memoryview, name: str = "") -> list[bytes]:
    """Length-prefixed BYTES elements (4-byte little-endian length, then the bytes)."""
    view, out, at = memoryview(raw), [], 0
    while at < len(view):
        if at + 4 > len(view):
            raise BatchError(name, f"torn BYTES data: {len(view) - at} bytes left where a length goes")
        (size,) = struct.unpack_from("<I", view, at)
        at += 4
        if at + size > len(view):
            raise BatchError(name, f"torn BYTES data: an element of {size} bytes, {len(view) - at} left")
        out.append(bytes(view[at:at + size]))
        at += size
    return out


def join_bytes(elements: Sequence[bytes]) -> bytes:
    """BYTES elements length-prefixed, as raw contents carry them."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def decode_inputs(inputs: Mapping[str, Tensor], spec: ModelSpec) -> DecodedBatch:
    """The request the inputs hold, validated against `spec`: `request` (BYTES [1]) or the
    plain tensors; BatchError naming the input otherwise."""
    if REQUEST in inputs:
        extra = sorted(set(inputs) - {REQUEST})
        if extra:
            raise BatchError(extra[0], f"unexpected beside {REQUEST!r} (send one input form)")
        elements = inputs[REQUEST].elements()
        if len(elements) != 1:
            raise BatchError(REQUEST, f"shape [1] expected (one request), got {len(elements)} elements")
        try:
            return decode_batch(elements[0], spec)
        except BatchError as exc:  # the column inside the Arrow request, if any, stays named
            raise BatchError(REQUEST, str(exc)) from exc
    unknown = sorted(set(inputs) - {DENSE, SPARSE_IDS, SPARSE_LENGTHS})
    if unknown:
        raise BatchError(unknown[0], f"unknown input; the model takes {REQUEST!r} (BYTES [1]) or "
                                     f"{DENSE!r}, {SPARSE_IDS!r} and {SPARSE_LENGTHS!r}")
    for name in (DENSE, SPARSE_IDS, SPARSE_LENGTHS):
        if name not in inputs and (name != DENSE or spec.dense_dim):
            raise BatchError(name, f"missing; send {REQUEST!r} (BYTES [1]) or {DENSE!r}, "
                                   f"{SPARSE_IDS!r} and {SPARSE_LENGTHS!r}")
    return decode_plain(inputs, spec)


def decode_plain(inputs: Mapping[str, Tensor], spec: ModelSpec) -> DecodedBatch:
    """`dense`, `sparse_ids` and `sparse_lengths` as a `DecodedBatch` (the module docstring
    says their shapes); checks the spec's limits before anything is allocated from them."""
    limits, features = spec.limits, len(spec.sparse)
    lengths_tensor = inputs[SPARSE_LENGTHS]
    if len(lengths_tensor.shape) != 2 or lengths_tensor.shape[0] != features:
        raise BatchError(SPARSE_LENGTHS, f"shape [{features}, B] expected ({features} sparse features), "
                                         f"got {list(lengths_tensor.shape)}")
    rows = lengths_tensor.shape[1]
    if rows < 1 or rows > limits.max_rows:
        raise BatchError(SPARSE_LENGTHS, f"{rows} samples: between 1 and {limits.max_rows} expected")
    lengths = lengths_tensor.array(("INT32", "INT64")).astype(np.int64).reshape(-1)
    if lengths.size and lengths.min() < 0:
        raise BatchError(SPARSE_LENGTHS, "has a negative length")
    total = int(lengths.sum())
    if total > limits.max_signs:
        raise BatchError(SPARSE_IDS, f"{total} ids is over the limit of {limits.max_signs}")
    ids_tensor = inputs[SPARSE_IDS]
    if ids_tensor.shape != (total,):
        raise BatchError(SPARSE_IDS, f"shape [{total}] expected (the sum of {SPARSE_LENGTHS}), "
                                     f"got {list(ids_tensor.shape)}")
    ids = ids_tensor.array(("UINT64", "INT64")).view(np.uint64).reshape(-1)
    if spec.dense_dim:
        dense_tensor = inputs[DENSE]
        if dense_tensor.shape != (rows, spec.dense_dim):
            raise BatchError(DENSE, f"shape [{rows}, {spec.dense_dim}] expected, got "
                                    f"{list(dense_tensor.shape)}")
        dense = np.array(dense_tensor.array(("FP32",)), np.float32, order="C")
    else:
        dense = np.zeros((rows, 0), np.float32)
    bag_offsets = np.zeros(features * rows + 1, np.int64)
    np.cumsum(lengths, out=bag_offsets[1:])
    signs = np.array(ids, np.uint64)
    for f in range(features):  # a shared table's features get their prefix, as decode_batch does
        if spec.feature_table(f).prefix_bits:
            part = slice(bag_offsets[f * rows], bag_offsets[(f + 1) * rows])
            signs[part] = spec.table_signs(f, signs[part])
    return DecodedBatch(rows=rows, dense=dense, signs=signs, bag_offsets=bag_offsets)


def model_inputs(spec: ModelSpec) -> list[tuple[str, str, list[int]]]:
    """(name, datatype, shape) of every input either form takes; -1: variable."""
    out = [(REQUEST, "BYTES", [1])]
    if spec.dense_dim:
        out.append((DENSE, "FP32", [-1, spec.dense_dim]))
    out += [(SPARSE_IDS, "UINT64", [-1]), (SPARSE_LENGTHS, "INT64", [len(spec.sparse), -1])]
    return out


MODEL_OUTPUTS = [(SCORES, "FP32", [-1])]

__all__ = ["DENSE", "DTYPES", "MODEL_OUTPUTS", "REQUEST", "SCORES", "SPARSE_IDS", "SPARSE_LENGTHS", "Tensor",
           "decode_inputs", "decode_plain", "join_bytes", "model_inputs", "split_bytes"]
