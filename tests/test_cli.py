"""The `persia-inc` command line, run as a real process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from persia_inc.packet_format import (
    CheckpointManifest,
    CutHeader,
    ManifestPart,
    ManifestTable,
    PacketHeader,
    TableRows,
    Watermark,
    cut_key,
    encode_cut,
    encode_packet,
    packet_path,
)


def persia_inc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "persia_inc.cli", *args],
                          capture_output=True, text=True, timeout=120, check=False)


def write_packet_file(root: Path) -> Path:
    header = PacketHeader(model="ctr", table="emb", producer="p0", generation=2, sequence=5)
    path = Path(packet_path(str(root), header))
    path.parent.mkdir(parents=True)
    rng = np.random.default_rng(0)
    path.write_bytes(encode_packet(header, np.arange(10, dtype=np.uint64),
                                   rng.standard_normal((10, 4), dtype=np.float32)))
    return path


def test_help_lists_every_command() -> None:
    result = persia_inc("--help")
    assert result.returncode == 0
    assert "inspect" in result.stdout and "demo" in result.stdout
    inspect_help = persia_inc("inspect", "--help")
    assert "Exit status" in inspect_help.stdout


def test_inspect_valid_packet_as_json(tmp_path: Path) -> None:
    path = write_packet_file(tmp_path)
    result = persia_inc("inspect", str(path), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["valid"] is True and report["error"] is None and report["kind"] == "packet"
    assert (report["model"], report["lane"], report["producer"]) == ("ctr", "emb", "p0")
    assert (report["generation"], report["sequence"], report["rows"]) == (2, 5, 10)
    assert report["tables"] == {"emb": {"dim": 4, "rows": 10, "deleted_rows": 0, "state_dim": 0}}
    assert report["format_version"] == 1  # a v1 packet reads as a cut of its one table


def test_inspect_a_cut_lists_its_tables(tmp_path: Path) -> None:
    header = CutHeader(model="ctr", producer="p0", generation=1, sequence=0)
    rng = np.random.default_rng(0)
    tables = [TableRows(name, np.arange(n, dtype=np.uint64),
                        rng.standard_normal((n, dim), dtype=np.float32), np.empty(0, np.uint64))
              for name, n, dim in (("a", 3, 4), ("b", 5, 16))]
    path = tmp_path / cut_key("ctr", "p0", 1, 0)
    path.parent.mkdir(parents=True)
    path.write_bytes(encode_cut(header, tables))
    result = persia_inc("inspect", str(path), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["lane"], report["rows"], report["format_version"]) == ("~cuts", 8, 2)
    assert {name: t["dim"] for name, t in report["tables"].items()} == {"a": 4, "b": 16}


def test_inspect_corrupt_packet_exits_1_with_the_reason(tmp_path: Path) -> None:
    path = write_packet_file(tmp_path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    result = persia_inc("inspect", str(path), "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["valid"] is False and "checksum mismatch" in report["error"]
    assert "checksum mismatch" in result.stderr and str(path) in result.stderr


def test_inspect_missing_file_exits_1(tmp_path: Path) -> None:
    result = persia_inc("inspect", str(tmp_path / "x.arrow"), "--json")
    assert result.returncode == 1
    assert json.loads(result.stdout)["error"].startswith("FileNotFoundError")


def test_inspect_manifest_and_checkpoint_folder(tmp_path: Path) -> None:
    manifest = CheckpointManifest(
        model="ctr", tables={"emb": ManifestTable(4, 10, (ManifestPart("emb/part-0.arrow", 10, 1, "x"),))},
        watermarks=(Watermark("emb", "p0", 2, 5),))
    (tmp_path / "manifest.json").write_bytes(manifest.to_json())
    for target in (str(tmp_path / "manifest.json"), str(tmp_path)):
        result = persia_inc("inspect", target, "--json")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["kind"] == "manifest" and report["valid"] is True
        assert report["watermarks"] == [{"table": "emb", "producer": "p0", "generation": 2, "sequence": 5}]
    (tmp_path / "manifest.json").write_text('{"kind": "persia-inc-checkpoint", "format_version": 1}')
    result = persia_inc("inspect", str(tmp_path), "--json")
    assert result.returncode == 1 and json.loads(result.stdout)["kind"] == "manifest"


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert persia_inc("inspect").returncode == 2
    assert persia_inc("no-such-command").returncode == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("surprise: 1\n")
    result = persia_inc("inspect", str(tmp_path / "x.arrow"), "--config", str(bad))
    assert result.returncode == 2 and "surprise" in result.stderr


def test_the_demo_prints_commands_and_paths_exactly() -> None:
    import argparse
    import io

    from rich.console import Console

    from persia_inc.commands.demo import literal, print_intro

    out = io.StringIO()
    console = Console(file=out, width=60, force_terminal=False)
    workdir = Path("/tmp/demo [bold]run[/] with a long name that would wrap at sixty columns")
    args = argparse.Namespace(storage="local", announce="dir", shards=2, frontend="torchserve")
    print_intro(console, workdir, args,
                "TorchServe is not installed: pip install 'persia-inc[serve]'", False)
    literal(console, "stopped the services it started (ceph [rgw] 123)")
    lines = out.getvalue().splitlines()
    assert lines == [
        f"persia-inc demo in {workdir} (local storage, dir announcements, 2 embedding servers)",
        "serving the live arm in process, not through TorchServe: TorchServe is not installed: "
        "pip install 'persia-inc[serve]'",
        "no freshness.png nor serving.png this time: matplotlib is not installed "
        "(pip install 'persia-inc[plot]')",
        "stopped the services it started (ceph [rgw] 123)"]


def test_an_unknown_option_shows_its_subcommands_usage_and_the_nearest_option() -> None:
    """Issue 22: `status --jsn` printed the top-level usage; the subcommand that was given the
    option reports it, with its own usage and a suggestion (nested ones too)."""
    from persia_inc.cli import build_parser, parse_args

    parser = build_parser()
    for argv, usage, hint in (
            (["status", "--config", "c.yaml", "--jsn"], "usage: persia-inc status ", "'--json'"),
            (["checkpoint", "save", "--config", "c.yaml", "--to", "x", "--confg", "y"],
             "usage: persia-inc checkpoint save ", "'--config'")):
        result = persia_inc(*argv)
        assert result.returncode == 2
        assert result.stderr.startswith(usage), result.stderr
        assert "unrecognized arguments" in result.stderr and f"did you mean {hint}?" in result.stderr
    assert parse_args(parser, ["status", "--config", "c.yaml", "--json"]).json is True


def test_checkpoint_save_and_load_help_describe_what_they_do() -> None:
    for action, words in (("save", "manifest.json is written last"), ("load", "re-sharding")):
        result = persia_inc("checkpoint", action, "--help")
        assert result.returncode == 0 and words in " ".join(result.stdout.split())
