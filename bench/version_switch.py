"""Version-switch benchmark: serving latency while TorchServe starts a new dense version's
worker, with the worker's start at the lowest CPU priority (`inference.worker_start`, the
default) and without (TorchServe's plain start), alternating in the same run.

Two embedding-server shards, the demo's table-per-feature model, a request of 128 rows every
50 ms through TorchServe gRPC, and a busy process on one core standing for the trainer (the
demo trains while versions switch). Each round registers `--versions` new versions one after
the other as the loader's dense sync does: register (TorchServe starts the version's worker),
one validation request to that version, make it the default, unregister the one before that
(retired a switch after it stopped serving: an unregistered version's queued request is lost).
Printed and written to bench/results/version_switch.json per mode: p50/p99/max of every
request, of the requests sent during a switch (register to default, +0.2 s), how many took
over 50 and 100 ms, and the seconds each registration took.

Run: flock /tmp/persia-heavy.lock .venv/bin/python bench/version_switch.py [--rounds N]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from persia_inc.embedding_server.client import EmbeddingClient
from persia_inc.foundation.net import free_port
from persia_inc.inference.archive import archive_model
from persia_inc.inference.client import get_inference_stub, infer
from persia_inc.inference.local import LocalTorchServe
from persia_inc.inference.management import HttpManagement
from persia_inc.inference.model import build_model, save_torchscript
from persia_inc.inference.validate import VersionProbe
from persia_inc.wiring import MAR_HANDLER

ROOT = Path(__file__).resolve().parents[1]


def bench_inference() -> Any:
    """bench/inference.py, loaded by path as `bench_inference` (its requests, rows, shards)."""
    spec = importlib.util.spec_from_file_location("bench_inference", ROOT / "bench" / "inference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_inference"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


B = bench_inference()
LAYOUTS, load_rows, make_requests, start_shards = B.LAYOUTS, B.load_rows, B.make_requests, B.start_shards
MODEL = "m"


def one_mode(low: bool, args: argparse.Namespace, work: Path, servers: list[str], config: Path,
             bodies: list[bytes]) -> dict[str, object]:
    """One TorchServe, `args.versions` switches under steady requests and a busy core."""
    spec = LAYOUTS["table_per_feature"]
    torchserve = LocalTorchServe(work / f"ts-{'low' if low else 'plain'}", low_priority_start=low).start()
    pt = save_torchscript(build_model(spec), work / "m.pt")

    def archive(version: int) -> str:
        mar = archive_model(MODEL, pt, spec, work / f"mar-{version}", handler=MAR_HANDLER,
                            config_file=config, version=str(version))
        os.replace(mar, torchserve.model_store / f"{MODEL}.{version}.mar")
        return f"{MODEL}.{version}.mar"

    mgmt = HttpManagement(torchserve.management_url)
    stub = get_inference_stub(torchserve.grpc_inference_target)
    probe = VersionProbe(torchserve.grpc_inference_target)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    stop = threading.Event()
    sent: list[tuple[float, float]] = []  # (time.time() at send, latency ms)

    def steady() -> None:
        i = 0
        while not stop.is_set():
            began_wall, began = time.time(), time.perf_counter()
            infer(stub, MODEL, bodies[i % len(bodies)])
            sent.append((began_wall, (time.perf_counter() - began) * 1e3))
            i += 1
            stop.wait(max(0.0, 0.05 - (time.perf_counter() - began)))

    windows: list[tuple[float, float]] = []
    register_s: list[float] = []
    thread = threading.Thread(target=steady, name="bench-steady")
    try:
        mgmt.register(archive(1), MODEL)
        for body in bodies[:10]:
            infer(stub, MODEL, body)
        thread.start()
        stop.wait(args.gap_s)
        for version in range(2, args.versions + 2):
            name = archive(version)
            began = time.time()
            mgmt.register(name, MODEL)
            register_s.append(round(time.time() - began, 2))
            probe.validate(MODEL, str(version), torchserve.model_store / name)
            mgmt.set_default(MODEL, str(version))
            windows.append((began, time.time() + 0.2))
            if version > 2:  # the dense sync's way: a version is retired a while after its last use
                mgmt.unregister(MODEL, str(version - 2))
            stop.wait(args.gap_s)
    finally:
        stop.set()
        if thread.is_alive():
            thread.join()
        busy.kill()
        busy.wait()
        probe.close()
        stub.channel.close()
        mgmt.close()
        torchserve.stop()
    at = np.array([t for t, _ in sent])
    ms = np.array([m for _, m in sent])
    during = np.zeros(at.size, bool)
    for lo, hi in windows:
        during |= (at >= lo) & (at <= hi)

    def figures(values: np.ndarray) -> dict[str, float]:
        return {"requests": int(values.size), "p50_ms": round(float(np.percentile(values, 50)), 2),
                "p99_ms": round(float(np.percentile(values, 99)), 2), "max_ms": round(float(values.max()), 2),
                "over_50_ms": int((values > 50).sum()), "over_100_ms": int((values > 100).sum())}

    return {"all": figures(ms), "during_switch": figures(ms[during]), "outside": figures(ms[~during]),
            "register_s": register_s}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="rounds of (low, plain)")
    parser.add_argument("--versions", type=int, default=5, help="version switches per mode and round")
    parser.add_argument("--gap-s", type=float, default=3.0, help="seconds between switches")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (TorchServe's logs)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "version_switch.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-version-switch-"))
    servers = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    config, shards = start_shards(work, servers, free_port())
    try:
        spec = LAYOUTS["table_per_feature"]
        reqs, signs = make_requests(spec, 40)
        with EmbeddingClient(servers) as client:
            client.wait_ready(60)
            load_rows(client, "ctr", signs, 16)
        rounds: list[dict[str, object]] = []
        for number in range(args.rounds):
            result = {}
            for low in (True, False) if number % 2 == 0 else (False, True):
                mode = "low_priority_start" if low else "plain_start"
                result[mode] = one_mode(low, args, work, servers, config, [r.body for r in reqs])
                print(f"round {number + 1} {mode:18s} {json.dumps(result[mode])}", flush=True)
            rounds.append(result)
        summary = {}
        for mode in ("low_priority_start", "plain_start"):
            during = [r[mode]["during_switch"] for r in rounds]  # type: ignore[index]
            summary[mode] = {
                "during_switch_p99_ms": [d["p99_ms"] for d in during],
                "during_switch_max_ms": [d["max_ms"] for d in during],
                "over_100_ms": sum(d["over_100_ms"] for d in during)}
        print(json.dumps(summary, indent=2))
        out = {"command": "flock /tmp/persia-heavy.lock .venv/bin/python bench/version_switch.py "
                          + " ".join(sys.argv[1:]),
               "versions_per_round": args.versions, "gap_s": args.gap_s, "busy_processes": 1,
               "summary": summary, "rounds": rounds}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        print(f"written to {args.out}")
    finally:
        for proc in shards:
            proc.terminate()
            proc.wait(15)
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
