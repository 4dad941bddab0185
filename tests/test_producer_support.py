"""Shared helpers of the producer tests (no tests here): configs, a numpy model, packets."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from persia_inc.config import Config, config_from_mapping
from persia_inc.packet_format import Cut, CutHeader, TableRows, decode_cut, parse_packet_path
from persia_inc.storage import ObjectStore, TransientStorageError
from persia_inc.storage.local import LocalStore


def producer_config(incremental_dir: str, *, buffer_size: int = 1000, storage: str = "local",
                    enabled: bool = True, **producer: Any) -> Config:
    """A config for tests: no atexit/SIGTERM hooks unless asked, fast retries."""
    settings = {"close_on_exit": False, "close_on_sigterm": False, "close_timeout_s": 20.0,
                "flush_interval_s": 60.0}
    kafka = producer.pop("kafka", None)
    s3 = producer.pop("s3", None)
    settings.update(producer)
    section: dict[str, Any] = {
        "model": "ctr",
        "producer": settings,
        "retry": {"max_attempts": 2, "initial_backoff_s": 0.01, "max_backoff_s": 0.2,
                  "deadline_s": 5},
    }
    if kafka:
        section["kafka"] = kafka
    if s3:
        section["s3"] = s3
    return config_from_mapping({
        "enable_incremental_update": enabled,
        "incremental_buffer_size": buffer_size,
        "incremental_dir": incremental_dir,
        "storage": storage,
        "persia_inc": section,
    }, "<test>")


class OutageStore(LocalStore):
    """Local disk whose packet writes fail with a transient (retriable) error while `down` is
    set, as a network store's do in an outage; `attempts` counts the writes tried."""

    def __init__(self, root_uri: str) -> None:
        super().__init__(root_uri)
        self.down = threading.Event()
        self.down.set()
        self.attempts = 0

    @contextmanager
    def writer(self, key: str, size_hint: int = 0) -> Iterator[BinaryIO]:
        self.attempts += 1
        if self.down.is_set():
            raise TransientStorageError(self.location(key), "storage outage (test)")
        with super().writer(key, size_hint) as sink:
            yield sink


class NumpyModel:
    """Embedding tables as numpy matrices, updated in place like an optimizer would."""

    def __init__(self, rows: int = 10_000, dim: int = 8, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.weight = self.rng.standard_normal((rows, dim)).astype(np.float32)

    def read(self, signs: np.ndarray) -> np.ndarray:
        """reader: signs uint64[n] -> float32[n, dim] (a copy)."""
        return self.weight[signs.astype(np.int64)]

    def read_into(self, signs: np.ndarray, out: np.ndarray) -> None:
        """reader registered with reads_into=True: fills out: float32[n, dim]."""
        np.take(self.weight, signs.astype(np.int64), axis=0, out=out)

    def step(self, batch: int = 256) -> np.ndarray:
        """Update `batch` random rows (with repeats); returns the touched ids: int64[batch]."""
        ids = self.rng.integers(0, self.weight.shape[0], batch)
        np.add.at(self.weight, ids, np.float32(0.01))
        return ids


def read_cuts(store: ObjectStore, prefix: str = "") -> list[Cut]:
    """Every packet under `prefix`, decoded (so verified), in key (= apply) order."""
    cuts = []
    for info in store.list(prefix):
        cut = decode_cut(store.get(info.key), where=info.key)
        assert parse_packet_path(info.key).position == cut.header.position
        cuts.append(cut)
    return cuts


@dataclass(frozen=True)
class TableHeader:
    """One table's view of a cut's header (what a v1 packet's header said)."""

    cut: CutHeader
    table: str
    rows: int
    deleted_rows: int
    dim: int

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cut, name)


@dataclass(frozen=True)
class TablePacket:
    """One table's share of a cut, read like a v1 packet: header, signs, embeddings, deleted."""

    header: TableHeader
    rows: TableRows

    @property
    def signs(self) -> np.ndarray:
        return self.rows.signs

    @property
    def embeddings(self) -> np.ndarray:
        return self.rows.embeddings

    @property
    def deleted(self) -> np.ndarray:
        return self.rows.deleted

    @property
    def state(self) -> np.ndarray | None:
        return self.rows.state


def read_packets(store: ObjectStore, prefix: str = "") -> list[TablePacket]:
    """Every table of every packet under `prefix`, in apply order (cut by cut, tables in
    packet order)."""
    out = []
    for cut in read_cuts(store, prefix):
        entries = {t.name: t for t in cut.header.tables}
        for rows in cut.tables:
            entry = entries[rows.name]
            out.append(TablePacket(TableHeader(cut.header, rows.name, entry.rows,
                                               entry.deleted_rows, entry.dim), rows))
    return out


def replay(packets: list[TablePacket], dim: int) -> dict[int, np.ndarray | None]:
    """Apply packets in order: sign -> latest row (None when deleted)."""
    state: dict[int, np.ndarray | None] = {}
    for packet in packets:
        for sign, row in zip(packet.signs.tolist(), packet.embeddings, strict=True):
            state[sign] = row
        for sign in packet.deleted.tolist():
            state[sign] = None
    return state
