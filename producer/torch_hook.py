"""PyTorch wiring: record the rows each optimizer step touched and read them from `weight`.

Forward hooks on the embedding modules keep the ids each forward used (while grad is on);
the optimizer's step pre-hook marks the step (a SIGTERM then waits for its end) and its step
post-hook records the ids. The hook turns on the producer's deferred reads: flushed rows are
read on the writer thread under a lock the optimizer's step holds from its pre-hook to its
post-hook, so they are never torn, and the training thread does not wait for them.
The sign of row i is i (uint64).

With `dense_every_s`, the hook also publishes the dense part as one version
(`IncrementalProducer.publish_dense`) after the first step that ends that long after the last
publish: between optimizer steps, so the sparse cut and the dense snapshot are the same step's.
"""

from __future__ import annotations

import logging
import time
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from persia_inc.producer.core import IncrementalProducer
from persia_inc.producer.dense import DenseExporter, DenseVersion

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DensePublish:
    """One dense publish by the hook: the version (None if it failed), how long the training
    thread waited for it (flush, export, store) and, on failure, why."""

    version: DenseVersion | None
    seconds: float
    error: str = ""


class IncrementalUpdateHook:
    """Ships the rows of `tables` ({name: nn.Embedding | nn.EmbeddingBag}) that `optimizer`
    updates, through `producer`. Works with sparse and dense gradients. `remove()` detaches.

    Per step the forward hooks only keep a reference to each input id tensor (no copy, no
    conversion); the step post-hook records every table in one call, whose buffers are bitsets
    over the rows (`RowIdSignBuffer`): `record_columns` when the ids are columns of one matrix,
    else `record_many` of numpy views.

    dense_every_s: publish a dense version (`producer.publish_dense(dense_module(),
    dense_exporter)`) after the first step ending at least this long (seconds, `clock`) after
    the hook was made or last published; 0 (default): never. dense_module: returns the module
    to export (e.g. a copy of the dense part as it is now). A publish that fails is logged and
    kept in `dense_published` with its error, never raised out of `optimizer.step()`.
    """

    def __init__(self, producer: IncrementalProducer, tables: Mapping[str, nn.Module],
                 optimizer: torch.optim.Optimizer, *, dense_every_s: float = 0.0,
                 dense_module: Callable[[], Any] | None = None,
                 dense_exporter: DenseExporter | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if dense_every_s < 0:
            raise ValueError(f"dense_every_s must be >= 0, got {dense_every_s}")
        if dense_every_s and (dense_module is None or dense_exporter is None):
            raise ValueError("dense_every_s needs dense_module and dense_exporter")
        self.producer = producer
        self.tables = dict(tables)
        self.dense_every_s = dense_every_s
        self._dense_module = dense_module
        self._dense_exporter = dense_exporter
        self._clock = clock
        self._last_dense = clock()
        self.dense_published: list[DensePublish] = []  # in publish order, failures included
        self._seen: dict[str, list[torch.Tensor]] = {name: [] for name in self.tables}
        self._handles: list[Any] = []
        for name, module in self.tables.items():
            if not isinstance(module, nn.Embedding | nn.EmbeddingBag):
                raise TypeError(f"table {name!r}: expected nn.Embedding or nn.EmbeddingBag, "
                                f"got {type(module).__name__}")
            weight = module.weight
            producer.register_table(name, self._reader(module), dim=int(weight.shape[1]),
                                    rows=int(weight.shape[0]), reads_into=True)
            self._handles.append(module.register_forward_hook(self._forward_hook(self._seen[name])))
        self._handles.append(optimizer.register_step_pre_hook(self._pre_step))
        self._handles.append(optimizer.register_step_post_hook(self._post_step))
        producer.defer_reads()

    @staticmethod
    def _reader(module: nn.Module) -> Any:
        def read_into(signs: np.ndarray, out: np.ndarray) -> None:
            """Copy the rows of signs: uint64[n] (row ids) into out: float32[n, dim], as they
            are now. A float32 CPU weight is gathered straight into `out` by numpy, on the
            calling thread only (torch's index_select would wake an OpenMP team of the
            writer thread's own on the cores training uses); any other dtype or device is
            gathered by torch and converted on the copy."""
            ids = signs.view(np.int64) if signs.dtype == np.uint64 else signs.astype(np.int64)
            with torch.no_grad():
                weight = typing.cast(torch.Tensor, module.weight).detach()
                rows = int(weight.shape[0])
                if ids.size and not 0 <= int(ids.min()) <= int(ids.max()) < rows:
                    raise IndexError(f"row ids outside [0, {rows}) for a weight of {rows} rows")
                if (weight.dtype == torch.float32 and weight.device.type == "cpu"
                        and weight.is_contiguous()):
                    np.take(weight.numpy(), ids, axis=0, out=out, mode="clip")  # ids checked
                else:
                    index = torch.from_numpy(ids)  # row ids < 2**63: reinterpreted, not copied
                    torch.from_numpy(out).copy_(weight.index_select(0, index.to(weight.device)))
        return read_into

    @staticmethod
    def _forward_hook(seen: list[torch.Tensor]) -> Any:
        is_grad_enabled = torch.is_grad_enabled

        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if module.training and is_grad_enabled():
                seen.append(inputs[0])  # a reference: ids are read after the step
        return hook

    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.producer._enter_step()

    def _post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.producer._end_update()  # the rows are updated: deferred reads may go on
        try:
            self._record_step()
        finally:
            self.producer._leave()
        if self.dense_every_s and self._clock() - self._last_dense >= self.dense_every_s:
            self.publish_dense_now()

    def _record_step(self) -> None:
        """Record the ids every table saw this step, in one producer call."""
        matrix = _columns_of_one_matrix(self._seen)
        if matrix is not None:
            self.producer.record_columns(*matrix)  # also checks the interval trigger
            for seen in self._seen.values():
                seen.clear()
            return
        batch: dict[str, np.ndarray] = {}
        for name, seen in self._seen.items():
            if not seen:
                continue
            ids = seen[0] if len(seen) == 1 else torch.cat([t.reshape(-1) for t in seen])
            seen.clear()
            batch[name] = ids.cpu().numpy().reshape(-1)  # a view of the ids, any stride
        if batch:
            self.producer.record_many(batch)
        else:
            self.producer.poll()

    def publish_dense_now(self) -> DensePublish:
        """Publish the dense part now (between steps: after one, before the next); the result
        is appended to `dense_published`. A failure is logged and returned, not raised."""
        if self._dense_module is None or self._dense_exporter is None:
            raise ValueError("publish_dense_now needs the hook's dense_module and dense_exporter")
        began = time.perf_counter()
        try:
            version = self.producer.publish_dense(self._dense_module(), self._dense_exporter)
            done = DensePublish(version, time.perf_counter() - began)
        except Exception as exc:  # training goes on; the caller reports dense_published
            log.exception("publishing a dense version failed")
            done = DensePublish(None, time.perf_counter() - began, f"{type(exc).__name__}: {exc}")
        self._last_dense = self._clock()
        self.dense_published.append(done)
        return done

    def remove(self) -> None:
        """Detach every hook (the producer stays open, reading rows at flush time again)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.producer._end_update()
        self.producer.defer_reads(False)


def _columns_of_one_matrix(seen: dict[str, list[torch.Tensor]]
                           ) -> tuple[np.ndarray, dict[str, int]] | None:
    """When every table saw one 1-D CPU int64 id tensor this step and all are columns of one
    row-major matrix (`sparse[:, i]`, the usual CTR input), that matrix as a numpy view (no
    copy) and each table's column in it; else None.

    Runs every step, so it only asks each tensor for plain numbers: tensors whose storage
    starts at one address (data pointer less offset) share it, as live storages never overlap.
    """
    first = None
    offsets: dict[str, int] = {}
    int64 = torch.int64
    for name, tensors in seen.items():
        if len(tensors) != 1:
            return None
        ids = tensors[0]
        if ids.dtype is not int64:
            return None
        offset = int(ids.storage_offset())
        if first is None:
            if ids.dim() != 1 or not ids.is_cpu or len(ids) < 2:
                return None
            first, stride, rows = ids, ids.stride(), len(ids)
            storage = ids.data_ptr() - 8 * offset
        elif (ids.data_ptr() - 8 * offset != storage or ids.stride() != stride
              or len(ids) != rows or ids.dim() != 1):
            return None
        offsets[name] = offset
    if first is None:
        return None
    start = min(offsets.values())
    width = max(offsets.values()) - start + 1
    if width > stride[0]:  # not columns of one row: different rows of something else
        return None
    matrix = first.as_strided((rows, width), (stride[0], 1), start)
    return matrix.numpy(), {name: offset - start for name, offset in offsets.items()}
