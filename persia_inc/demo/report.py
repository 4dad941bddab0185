"""What the demo shows and leaves behind: the live progress, the report, the picture."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from persia_inc.extras import have


@dataclass
class DemoReport:
    """What report.json holds. packets: packets seen becoming visible; objects_stored:
    packets the producer stored; flushes: flushes the producer started; services: what the
    demo started itself (endpoint, PIDs) and `services_left_running` PIDs still alive after
    stopping them (empty); serving: the arms' predictions (`serving.serving_report`);
    warmup_steps: training steps before the checkpoint; dense_versions: the dense versions
    published while training, each {version, exported_at_ns, sparse_positions,
    activated_at_ns (None: never activated), publish_ms} (`versions.dense_versions_report`);
    dense: their summary (`versions.dense_summary`); update_policy: the producer's
    (`--update-policy`); bytes_shipped, rows_shipped: packet bytes and rows (upserts and
    deletes) the producer stored."""

    verified: bool = False
    packets: int = 0
    objects_stored: int = 0
    flushes: int = 0
    update_policy: str = "all"
    bytes_shipped: int = 0
    rows_shipped: int = 0
    rows_applied: int = 0
    freshness_ms: dict[str, float] = field(default_factory=dict)
    mismatched_rows: int = 0
    checked_rows: int = 0
    evicted_rows: int = 0
    evicted_still_served: int = 0
    steps: int = 0
    warmup_steps: int = 0
    train_seconds: float = 0.0
    storage: str = "local"
    announce: str = "dir"
    shards: int = 2
    services: dict[str, dict[str, object]] = field(default_factory=dict)
    services_left_running: list[int] = field(default_factory=list)
    serving: dict[str, object] = field(default_factory=dict)
    dense_versions: list[dict[str, Any]] = field(default_factory=list)
    dense: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    pictures: list[str] = field(default_factory=list)  # written into the workdir

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


@dataclass
class Progress:
    """What the live display shows; updated by the training loop and the watcher."""

    steps: int = 0
    packets_stored: int = 0
    packets_visible: int = 0
    rows_applied: int = 0
    freshness_ms: list[float] = field(default_factory=list)
    phase: str = "starting"
    requests: int = 0
    serving_errors: int = 0
    serving_ms: list[float] = field(default_factory=list)  # live arm, per request
    serving_started: float = 0.0  # monotonic; 0 before serving starts
    auc_live: float = float("nan")  # cumulative, refreshed about every second
    auc_frozen: float = float("nan")
    auc_checkpoint_dense: float = float("nan")
    dense_published: int = 0  # dense versions the training hook published
    dense_activated: int = 0  # of them, activated by the loader's dense sync
    dense_active: int = 0  # the version TorchServe serves by default (0: the checkpoint's)

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.freshness_ms, q)) if self.freshness_ms else float("nan")

    def serving_percentile(self, q: float) -> float:
        return float(np.percentile(self.serving_ms, q)) if self.serving_ms else float("nan")

    def requests_per_s(self, now: float) -> float:
        """Requests per second since serving started (`now`: monotonic)."""
        elapsed = now - self.serving_started
        return self.requests / elapsed if self.serving_started and elapsed > 0 else 0.0


def plot_freshness(latencies_ms: list[float], path: Path) -> bool:
    """A histogram of freshness at `path`; False (and no file) without matplotlib, an optional
    extra the demo says it lacks at its start."""
    if not have("matplotlib"):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    if latencies_ms:
        axes.hist(latencies_ms, bins=50, color="#3b7dd8")
        for q, style in ((50, "--"), (99, ":")):
            value = float(np.percentile(latencies_ms, q))
            axes.axvline(value, color="black", linestyle=style, label=f"p{q} {value:.0f} ms")
        axes.legend()
    axes.set_xlabel("freshness: packet created → visible on every shard (ms)")
    axes.set_ylabel("packets")
    axes.set_title("persia-inc demo: update freshness")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return True


def plot_serving(timeline: list[dict[str, float]], path: Path,
                 switches_s: Sequence[float] = (), kills_s: Sequence[float] = ()) -> bool:
    """AUC over stream time of each arm in the timeline (live; live rows with the checkpoint's
    dense part; frozen), per window and cumulative, a dotted line where a dense version
    became the default (`switches_s`, stream seconds) and a red mark where `--chaos` killed a
    replica (`kills_s`), at `path`; False (and no file) without matplotlib or without a point
    to draw."""
    if not have("matplotlib") or not timeline:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [point["t_s"] for point in timeline]
    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    for arm, color, name in (("live", "#3b7dd8", "live"),
                             ("checkpoint_dense", "#3bb273", "live rows, checkpoint dense"),
                             ("frozen", "#d8573b", "frozen")):
        if f"auc_{arm}" not in timeline[0]:
            continue
        axes.plot(t, [point[f"auc_{arm}"] for point in timeline], "o-", color=color,
                  label=f"{name} (window)")
        axes.plot(t, [point[f"cum_auc_{arm}"] for point in timeline], "--", color=color,
                  label=f"{name} (cumulative)")
    for i, at in enumerate(switches_s):
        axes.axvline(at, color="grey", linestyle=":", linewidth=1,
                     label="dense version activated" if i == 0 else None)
    for i, at in enumerate(kills_s):
        axes.axvline(at, color="#c0392b", linestyle="--", linewidth=0.8, alpha=0.7,
                     label="replica killed (SIGKILL)" if i == 0 else None)
    axes.set_xlabel("stream seconds since the checkpoint (window end)")
    axes.set_ylabel("AUC")
    axes.set_title("persia-inc demo: live embeddings and dense versions vs frozen")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return True
