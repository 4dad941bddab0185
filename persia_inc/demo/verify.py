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
        gone = evicted[name]
        report.evicted_rows += int(gone.sum())
        report.evicted_still_served += still_served(served[gone])


def still_served(rows: np.ndarray) -> int:
    """How many of `rows` (float32[n, dim], as served for signs training evicted) the servers
    still hold. A sign a server does not hold reads as zeros, and a trained row is never all
    zeros, so a row that is not all zeros is one a delete never reached. The rows come through
    the client, as serving reads them: with replicas, from a replica that answers (the
    per-replica miss counters this used to sum needed every replica up, and failed when
    --chaos had just killed one)."""
    return int(np.any(rows != 0, axis=1).sum())
