"""`persia-inc demo` end to end, and its verification catching what it must catch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

from persia_inc.demo.ctr import CTRModel
from persia_inc.demo.report import DemoReport
from persia_inc.demo.verify import verify_rows
from persia_inc.packet_format import PacketHeader, decode_packet, encode_packet


def test_demo_runs_the_whole_pipeline_and_verifies(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "persia_inc.cli", "demo", "--seconds", "6", "--vocab", "2000",
         "--dense-every-seconds", "0", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["verified"] is True
    assert report["packets"] > 10 and report["rows_applied"] > 0
    assert report["mismatched_rows"] == 0 and report["evicted_still_served"] == 0
    assert report["checked_rows"] > 26 * 1000
    assert 0 < report["freshness_ms"]["p50"] <= report["freshness_ms"]["p99"]
    assert (tmp_path / "freshness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["pictures"] == ["freshness.png", "serving.png"]
    assert "verified" in result.stdout
    # --dense-every-seconds 0: no dense version, TorchServe keeps the checkpoint's dense part
    assert report["dense_versions"] == [] and report["dense"] == {}
    assert report["serving"]["auc_checkpoint_dense"] is None
    loader = yaml.safe_load((tmp_path / "global_config.loader.yaml").read_text())
    assert "dense_sync" not in loader["persia_inc"]["loader"]  # the metrics port only


def _load(cluster, model: CTRModel, deleted: dict[str, np.ndarray]) -> None:
    with cluster.client() as client:
        for sequence, (name, table) in enumerate(model.named_tables().items()):
            weights = table.weight.detach().numpy()
            header = PacketHeader(model="m", table=name, producer="p", generation=1,
                                  sequence=sequence)
            keep = np.setdiff1d(np.arange(weights.shape[0], dtype=np.uint64), deleted.get(name, []))
            client.apply(decode_packet(encode_packet(header, keep, weights[keep.astype(np.int64)])))


def test_verification_catches_one_flipped_bit_and_a_served_evicted_row(embedding_cluster_factory) -> None:
    cluster = embedding_cluster_factory(2)
    model = CTRModel(vocab=200, dim=4)
    gone = np.array([5, 6], np.uint64)
    _load(cluster, model, {"C3": gone})
    evicted = {name: np.zeros(200, bool) for name in model.named_tables()}
    evicted["C3"][gone.astype(np.int64)] = True

    with cluster.client() as client:
        clean = DemoReport()
        verify_rows(client, model, evicted, clean)
        assert (clean.mismatched_rows, clean.evicted_rows, clean.evicted_still_served) == (0, 2, 0)

        with torch.no_grad():  # training moves on by one bit the servers never saw
            model.tables[0].weight.view(torch.int32)[7, 1] ^= 1
        evicted["C3"][9] = True  # training evicted a row whose delete never reached the servers
        dirty = DemoReport()
        verify_rows(client, model, evicted, dirty)
    assert dirty.mismatched_rows == 1
    assert dirty.evicted_still_served == 1


_BLOCKER = '''
import sys
BLOCKED = set({blocked!r})
class _Missing:
    """Makes the named packages look uninstalled, as on a plain `pip install persia-inc`."""
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, _Missing())
'''


def _without(tmp_path: Path, *blocked: str) -> dict[str, str]:
    """An environment whose Python cannot import `blocked` (a sitecustomize hides them)."""
    import os

    (tmp_path / "sitecustomize.py").write_text(_BLOCKER.format(blocked=sorted(blocked)))
    return {**os.environ, "PYTHONPATH": str(tmp_path)}


def test_demo_without_torch_says_which_extra_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "persia_inc.cli", "demo", "--seconds", "1",
                             "--workdir", str(tmp_path / "work")], env=_without(tmp_path, "torch"),
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0 and "persia-inc[torch]" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_demo_import_path_and_picture_without_matplotlib(tmp_path: Path) -> None:
    """The demo's modules import without the extras, and the picture is skipped, not a crash."""
    code = ("import sys; from pathlib import Path; import persia_inc.cli, persia_inc.commands.demo; "
            "import persia_inc.demo.pipeline, persia_inc.demo.serving; "
            "from persia_inc.demo.report import plot_freshness; "
            "assert 'matplotlib' not in sys.modules and 'torch' not in sys.modules; "
            f"print(plot_freshness([1.0, 2.0], Path({str(tmp_path / 'f.png')!r})))")
    result = subprocess.run([sys.executable, "-c", code], env=_without(tmp_path, "matplotlib", "torch"),
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False" and not (tmp_path / "f.png").exists()
    help_text = subprocess.run([sys.executable, "-m", "persia_inc.cli", "demo", "--help"],
                               env=_without(tmp_path, "matplotlib", "torch"), capture_output=True,
                               text=True, timeout=60, check=True).stdout
    assert "plot" in help_text


def test_demo_with_the_prioritized_update_policy_verifies_and_reports_bytes(tmp_path: Path) -> None:
    """Rows held back ship by close, so every row still matches training at the end; the
    report says what was shipped."""
    result = subprocess.run(
        [sys.executable, "-m", "persia_inc.cli", "demo", "--seconds", "4", "--vocab", "2000",
         "--dense-every-seconds", "0", "--frontend", "in-process", "--update-policy",
         "prioritized", "--update-budget", "0.1", "--max-staleness-s", "2",
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["verified"] is True and report["mismatched_rows"] == 0
    assert report["update_policy"] == "prioritized"
    assert report["bytes_shipped"] > 0 and report["rows_shipped"] > 0
    producer = yaml.safe_load((tmp_path / "global_config.yaml").read_text())["persia_inc"]["producer"]
    assert (producer["update_policy"], producer["max_staleness_s"]) == ("prioritized", 2.0)
    assert "bytes / rows shipped (prioritized)" in result.stdout
