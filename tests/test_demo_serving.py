"""The demo's serving half: a drifting click stream, the AUC it is judged by, the two arms
(live and frozen), and one real run in which freshness pays."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from process_checks import alive, processes_under

from persia_inc.demo.clicks import ClickStream, ClickStreamConfig
from persia_inc.demo.ctr import CTRModel, dense_part, serving_spec
from persia_inc.demo.pipeline import _check_frozen
from persia_inc.demo.report import DemoReport
from persia_inc.demo.serving import (
    ServingOptions,
    auc,
    compare_frontends,
    in_process_scorer,
    live_scorer,
    log_loss,
    lookup_embeddings,
)
from persia_inc.embedding_server.checkpoint import write_checkpoint
from persia_inc.foundation.wait import wait_until
from persia_inc.inference.engine import PersiaInference
from persia_inc.inference.model import load_torchscript, save_torchscript
from persia_inc.packet_format import PacketHeader, decode_packet, encode_packet
from persia_inc.storage import open_store

SMALL = ClickStreamConfig(vocab=2_000, popular=100, seed=3)


def _draws(config: ClickStreamConfig, times: list[float]) -> list[np.ndarray]:
    stream = ClickStream(config)
    rng = np.random.default_rng(7)
    out = []
    for t in times:
        stream.advance_to(t)
        clicks = stream.sample(rng, 256)
        out += [clicks.dense, clicks.ids, clicks.label, clicks.prob]
    return out


def test_the_stream_is_deterministic_and_a_function_of_stream_time() -> None:
    times = [0.0, 0.5, 3.2, 3.9, 10.0]
    first, again = _draws(SMALL, times), _draws(SMALL, times)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    other = _draws(ClickStreamConfig(vocab=2_000, popular=100, seed=4), times)
    assert not np.array_equal(first[-1], other[-1])

    stepped, jumped = ClickStream(SMALL), ClickStream(SMALL)
    for t in np.arange(0, 12.5, 0.25):
        stepped.advance_to(float(t))
    assert jumped.advance_to(12.4) == stepped.epoch == 12
    assert jumped.advance_to(3.0) == 12  # never backwards
    dense = np.zeros((5, 13), np.float32)
    ids = np.arange(5 * 26).reshape(5, 26) % SMALL.vocab
    assert np.array_equal(stepped.logit(dense, ids), jumped.logit(dense, ids))


def test_the_stream_drifts_a_model_of_early_data_does_worse_later() -> None:
    """The best model of epoch 0 (its true logits) ranks late clicks much worse than early
    ones, while the current truth ranks them as well as ever; new ids keep arriving."""
    stream, early = ClickStream(SMALL), ClickStream(SMALL)  # `early` stays at epoch 0
    rng = np.random.default_rng(0)
    before = stream.sample(rng, 20_000)
    stream.advance_to(30.0)
    after = stream.sample(rng, 20_000)
    fit_early = auc(early.logit(before.dense, before.ids), before.label)
    fit_early_later = auc(early.logit(after.dense, after.ids), after.label)
    current_later = auc(after.prob, after.label)
    assert fit_early > 0.85 and current_later > 0.85
    assert fit_early_later < fit_early - 0.1
    again = ClickStream(SMALL).sample(np.random.default_rng(1), 20_000)  # epoch 0, other draws
    new_late = np.mean([~np.isin(after.ids[:, f], before.ids[:, f]) for f in range(26)])
    new_early = np.mean([~np.isin(again.ids[:, f], before.ids[:, f]) for f in range(26)])
    assert new_late > new_early + 0.01


def _pairwise_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels > 0.5], scores[labels <= 0.5]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (pos.size * neg.size))


@pytest.mark.parametrize("seed", range(6))
def test_auc_equals_the_pairwise_count_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 400))
    labels = (rng.random(n) < rng.uniform(0.1, 0.9)).astype(np.float32)
    labels[:2] = [0, 1]
    scores = rng.normal(size=n) + labels * rng.uniform(0, 2)
    if seed % 2:  # many ties, also across the classes
        scores = np.round(scores, 0)
    assert auc(scores, labels) == pytest.approx(_pairwise_auc(scores, labels), abs=1e-12)


def test_auc_and_log_loss_edges() -> None:
    assert np.isnan(auc(np.array([0.1, 0.2]), np.array([1.0, 1.0])))
    assert auc(np.array([0.5, 0.5, 0.5]), np.array([0, 1, 0])) == 0.5
    assert auc(np.array([0.1, 0.9]), np.array([0, 1])) == 1.0
    y, p = np.array([1.0, 0.0, 1.0]), np.array([0.9, 0.2, 0.6])
    assert log_loss(p, y) == pytest.approx(-np.mean(np.log([0.9, 0.8, 0.6])))
    assert np.isfinite(log_loss(np.array([0.0, 1.0]), np.array([1.0, 0.0])))  # clipped


def test_the_frontend_seam() -> None:
    assert ServingOptions().frontend == "torchserve"
    with pytest.raises(ValueError, match="frontend"):
        ServingOptions(frontend="carrier-pigeon")
    with pytest.raises(ValueError, match="stub"):
        live_scorer("torchserve", None)  # type: ignore[arg-type]


def test_the_frontend_check_counts_requests_that_differ_in_one_bit() -> None:
    stream = ClickStream(SMALL)

    def reference(dense: np.ndarray, ids: np.ndarray) -> np.ndarray:
        return (dense[:, 0] + ids[:, 0]).astype(np.float32)

    calls = 0

    def flaky(dense: np.ndarray, ids: np.ndarray) -> np.ndarray:
        nonlocal calls
        calls += 1
        out = reference(dense, ids)
        if calls == 3:
            out.view(np.uint32)[5] ^= 1  # one bit of one score
        if calls == 7:
            raise ConnectionError("TorchServe went away")
        return out

    assert compare_frontends(stream, reference, reference, 10, rows=16).mismatched == 0
    check = compare_frontends(stream, flaky, reference, 10, rows=16)
    assert (check.checked, check.mismatched) == (10, 2)


def _apply_tables(client, tables: dict[str, np.ndarray], producer: str = "p") -> None:
    for sequence, (name, weights) in enumerate(tables.items()):
        header = PacketHeader(model="m", table=name, producer=producer, generation=1,
                              sequence=sequence)
        signs = np.arange(weights.shape[0], dtype=np.uint64)
        client.apply(decode_packet(encode_packet(header, signs, weights)))


def test_in_process_scoring_equals_the_training_model(embedding_cluster_factory,
                                                     tmp_path: Path) -> None:
    """Embeddings from the servers (one LookupBlocks call per shard) + the TorchScript-able dense
    part give the training model's own probabilities."""
    model = CTRModel(vocab=300, dim=4, seed=2)
    cluster = embedding_cluster_factory(2)
    weights = {name: t.weight.detach().numpy() for name, t in model.named_tables().items()}
    clicks = ClickStream(ClickStreamConfig(vocab=300, popular=50)).sample(np.random.default_rng(0), 128)
    with cluster.client() as client:
        _apply_tables(client, weights)
        rows = lookup_embeddings(client, clicks.ids)
        assert rows.shape == (128, 26, 4) and rows.dtype == np.float32
        scripted = load_torchscript(save_torchscript(dense_part(model), tmp_path / "dense.pt"))
        engine = PersiaInference.from_client(scripted, serving_spec(model), client)
        got = in_process_scorer(engine)(clicks.dense, clicks.ids)
    with torch.no_grad():
        want = torch.sigmoid(model(torch.from_numpy(clicks.dense), torch.from_numpy(clicks.ids)))
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)


def test_the_frozen_check_passes_on_the_checkpoint_and_catches_one_packet(
        embedding_cluster_factory, tmp_path: Path) -> None:
    model = CTRModel(vocab=200, dim=4)
    at_checkpoint = {name: t.weight.detach().numpy().copy() for name, t in model.named_tables().items()}
    signs = np.arange(200, dtype=np.uint64)
    with open_store(str(tmp_path / "ckpt")) as store:
        manifest = write_checkpoint(store, model="m", tables={
            name: (signs, rows) for name, rows in at_checkpoint.items()})
    assert manifest.watermarks == ()
    cluster = embedding_cluster_factory(1, checkpoint=str(tmp_path / "ckpt"))
    with cluster.client() as client:
        clean = DemoReport(serving={"requests": 3, "errors": 0})
        _check_frozen(client, at_checkpoint, [], clean)
        assert clean.problems == [] and clean.serving["frozen_rows_changed"] == 0
        assert clean.serving["frozen_watermarks"] == []

        moved = {"C5": at_checkpoint["C5"] + np.float32(1.0)}
        _apply_tables(client, moved)  # one packet reached the frozen arm
        dirty = DemoReport(serving={"requests": 3, "errors": 0})
        _check_frozen(client, at_checkpoint, [], dirty)
    assert dirty.serving["frozen_rows_changed"] == 200
    assert dirty.serving["frozen_watermarks"] == [["C5", "p", 1, 0]]
    assert len(dirty.problems) == 1 and "frozen arm changed" in dirty.problems[0]


def test_a_real_demo_run_served_by_torchserve_shows_freshness_pays(tmp_path: Path) -> None:
    """The live arm over TorchServe's gRPC API, through the dense versions the training
    publishes every 4 s and the loader activates; afterwards TorchServe and the in-process
    engine running the last activated version score 100 requests bit for bit alike; no
    request failed; TorchServe is stopped at the end."""
    result = subprocess.run(
        [sys.executable, "-m", "persia_inc.cli", "demo", "--seconds", "15", "--dense-every-seconds",
         "4", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["verified"] is True and report["warmup_steps"] > 0
    serving = report["serving"]
    assert serving["frontend"] == "torchserve"
    assert serving["requests"] > 100 and serving["errors"] == 0
    assert 0 < serving["p50_ms"] <= serving["p99_ms"]
    assert serving["checked"] >= 100 and serving["mismatched"] == 0
    assert serving["frozen_watermarks"] == [] and serving["frozen_rows_changed"] == 0
    assert serving["auc_live"] > serving["auc_frozen"]
    assert serving["logloss_live"] < serving["logloss_frozen"]
    assert len(serving["timeline"]) >= 3

    # dense versions: published in order, each activated after its export, the last checked
    versions = report["dense_versions"]
    activated = [v for v in versions if v["activated_at_ns"] is not None]
    assert len(activated) >= 2 and activated == versions, versions
    assert [v["version"] for v in versions] == list(range(1, len(versions) + 1))
    assert all(v["activated_at_ns"] >= v["exported_at_ns"] for v in versions)
    times = [v["activated_at_ns"] for v in versions]
    assert times == sorted(times)
    positions = [v["sparse_positions"][0]["sequence"] for v in versions]
    assert positions == sorted(positions) and versions[0]["sparse_positions"][0]["producer"] == "trainer-0"
    assert serving["dense_version_checked"] == versions[-1]["version"]
    dense = report["dense"]
    assert (dense["published"], dense["activated"], dense["failed"]) == (len(versions),) * 2 + (0,)
    assert 0 < dense["publish_ms"]["p50"] <= dense["publish_ms"]["max"]
    assert "loader dense sync" in dense["activation_source"]
    # the live rows with the checkpoint's dense part: its own arm, beside live and frozen
    assert serving["auc_checkpoint_dense"] is not None and serving["logloss_checkpoint_dense"] is not None
    assert all("auc_checkpoint_dense" in point for point in serving["timeline"])
    assert serving["error_arms"] == {}
    assert report["pictures"] == ["freshness.png", "serving.png"]
    assert (tmp_path / "serving.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "dense.pt").exists() and (tmp_path / "model-store" / "demo.mar").exists()
    torchserve = serving["torchserve"]
    assert torchserve["grpc"].startswith("127.0.0.1:") and not alive(torchserve["pid"])
    properties = (tmp_path / "torchserve" / "config.properties").read_text()
    assert "0.0.0.0" not in properties
    assert (tmp_path / "torchserve" / "logs" / "model_log.log").exists()
    assert "live rows + ckpt dense / frozen" in result.stdout and "checked / mismatched" in result.stdout
    assert f"{len(versions)} / {len(versions)}" in result.stdout  # dense versions activated / published
    assert "not through TorchServe" not in result.stdout
    # an on-call engineer reads ERROR as something to act on: a clean run logs none (the
    # loader's dense sync once logged TorchServe gone, when the demo stopped it first)
    errors = [line for line in (tmp_path / "logs" / "loader.log").read_text().splitlines()
              if " ERROR " in line]
    assert errors == []


def test_without_java_the_demo_serves_in_process_and_says_so_in_one_line(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key != "JAVA_HOME"}
    env["PATH"] = str(tmp_path / "empty-bin")  # no java on it
    result = subprocess.run(
        [sys.executable, "-m", "persia_inc.cli", "demo", "--seconds", "4", "--warmup-seconds", "2",
         "--vocab", "2000", "--workdir", str(tmp_path / "work")],
        env=env, capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if "not through TorchServe" in line]
    assert len(lines) == 1, result.stdout
    assert "Java not found" in lines[0] and "openjdk-17" in lines[0], lines
    serving = json.loads((tmp_path / "work" / "report.json").read_text())["serving"]
    assert serving["frontend"] == "in-process" and serving["checked"] == 0
    assert serving["requests"] > 0 and serving["errors"] == 0
    assert not (tmp_path / "work" / "torchserve").exists()


def test_sigterm_stops_torchserve_and_every_child(tmp_path: Path) -> None:
    err_path = tmp_path / "demo.err"
    with err_path.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "persia_inc.cli", "demo", "--seconds", "60", "--warmup-seconds", "1",
             "--vocab", "2000", "--workdir", str(tmp_path / "work")],
            stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 180

        def when(path: Path, ready: Callable[[str], Any], what: str) -> Any:
            """`ready(path's text)` once truthy; fails if the demo exits or time is up."""
            def found() -> Any:
                assert proc.poll() is None, err_path.read_text()[-3000:]
                return path.exists() and ready(path.read_text())

            return wait_until(found, what, timeout_s=max(0.0, deadline - time.monotonic()),
                              interval_s=0.2)

        serving = when(tmp_path / "work" / "logs" / "demo.log",
                       lambda text: re.search(r"TorchServe \(pid (\d+)\) serves", text),
                       "TorchServe did not come up")
        torchserve_pid = int(serving.group(1))
        when(tmp_path / "work" / "torchserve" / "logs" / "access_log.log",
             lambda text: text.count("/Predictions") >= 3, "no requests reached TorchServe")
        assert alive(torchserve_pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 143, err_path.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not alive(torchserve_pid)
    assert processes_under(tmp_path / "work") == []
    assert "stopped by SIGTERM" in err_path.read_text()
