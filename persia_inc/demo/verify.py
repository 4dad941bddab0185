"""The demo's check: every row on the servers equals training's, bit for bit."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from persia_inc.demo.report import DemoReport

if TYPE_CHECKING:
    from persia_inc.demo.ctr import CTRModel
    from persia_inc.embedding_server.client import EmbeddingClient


def verify_rows(client: EmbeddingClient, model: CTRModel, evicted: dict[str, np.ndarray],
                report: DemoReport) -> None:
    """Every live row on the servers equals training's, bit for bit; evicted rows are gone."""
    for name, table in model.named_tables().items():
        weights = table.weight.detach().numpy()
        signs = np.arange(weights.shape[0], dtype=np.uint64)
        served = client.lookup(name, signs)
        live = ~evicted[name]
        differs = np.any(served.view(np.uint32) != weights.view(np.uint32), axis=1)
        report.mismatched_rows += int((differs & live).sum())
        report.checked_rows += int(live.sum())
        gone = signs[evicted[name]]
        report.evicted_rows += int(gone.size)
        if gone.size:
            misses_before = served_misses(client, name)
            client.lookup(name, gone)
            report.evicted_still_served += int(gone.size - (served_misses(client, name) - misses_before))


def served_misses(client: EmbeddingClient, table: str) -> int:
    """Lookups of `table` that found no row, summed over the shards (every replica)."""
    return sum(t.misses for shard in range(len(client.targets))
               for t in client.status(shard).tables if t.name == table)
