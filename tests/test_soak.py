"""A short fault soak (bench/soak.py runs the long one): real servers, loader and trainer
processes; kill -9 of each and an oversized burst; not one row may differ at the end."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from persia_inc.soak import ModelShape, SoakOptions, row_value, run_soak, touched, truth


def test_known_model_is_deterministic_and_exact() -> None:
    shape = ModelShape(universe=1000, per_step=50, dim=4)
    first = touched(shape.seed, 0, 3, shape.universe, shape.per_step)
    assert np.array_equal(first, touched(shape.seed, 0, 3, shape.universe, shape.per_step))
    rows = row_value(np.array([5, 2**20 + 5], np.uint64), 12345, 4)
    assert rows.tolist() == [[12345, 5, 12346, 12347], [12345, 5, 12346, 12347]]
    (signs, values), _ = truth(shape, 3, bursts={2})
    assert np.array_equal(signs, np.arange(1000, dtype=np.uint64))  # step 2 touched every sign
    later = touched(shape.seed, 0, 3, shape.universe, shape.per_step)
    assert (values[later.astype(np.int64), 0] == 3).all()


def test_short_soak_loses_nothing(tmp_path: Path) -> None:
    options = SoakOptions(seconds=35, storage="local", announce="dir", fault_every_s=5.0,
                          faults=("kill_trainer", "kill_loader", "kill_server", "burst"),
                          shape=ModelShape(universe=20_000, per_step=400), workdir=tmp_path,
                          max_packet_rows=5_000)
    report = run_soak(options)
    assert report.problems == [], report.to_json()
    assert all(report.faults[kind] >= 1 for kind in options.faults), report.faults
    assert report.rows_checked > 20_000 and report.rows_lost == 0, report.to_json()
    assert report.out_of_order == 0, report.to_json()
