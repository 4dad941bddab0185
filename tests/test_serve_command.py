"""`persia-inc serve`: the command as an operator runs it, against real TorchServe and real
embedding servers on loopback; and its one-line answers when TorchServe or Java is missing."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from persia_inc.config import load_config
from persia_inc.foundation.net import free_port, port_open
from persia_inc.foundation.wait import wait_until
from persia_inc.inference.archive import archive_model
from persia_inc.inference.batch import PersiaBatch
from persia_inc.inference.client import InferenceError, get_inference_stub, infer, infer_http
from persia_inc.inference.engine import PersiaInference
from persia_inc.inference.local import LocalTorchServe, TorchServeError
from persia_inc.inference.model import build_model, load_torchscript, save_torchscript
from persia_inc.inference.spec import ModelSpec
from persia_inc.local_services import EmbeddingCluster, stop_pid, write_test_config
from persia_inc.packet_format import PacketHeader, decode_packet, encode_packet
from persia_inc.wiring import MAR_HANDLER

# the demo's layout (one table per feature), a few tables wider or narrower than the rest
SPEC = ModelSpec.per_feature({f"C{i + 1}": {2: 8, 9: 32}.get(i, 16) for i in range(26)})
CLI = [sys.executable, "-m", "persia_inc.cli"]


def request(seed: int, rows: int = 32) -> tuple[bytes, dict[str, np.ndarray]]:
    """A seed-style request and the table signs it uses (table -> uint64[n])."""
    rng = np.random.default_rng(seed)
    sparse = [rng.integers(0, 5000, (rows, 16), dtype=np.uint64) for _ in SPEC.sparse]
    body = (PersiaBatch().add_dense([rng.random((rows, SPEC.dense_dim), dtype=np.float32)])
            .add_sparse(list(zip(SPEC.sparse, sparse, strict=True))).to_bytes())
    return body, SPEC.signs_by_table(dict(zip(SPEC.sparse, sparse, strict=True)))


def give_rows(cluster: EmbeddingCluster, signs: dict[str, np.ndarray], seed: int | None) -> None:
    """Store a row for every sign (random from `seed`; ones for None), one packet per table."""
    rng = np.random.default_rng(seed)
    with cluster.client() as client:
        for seq, (table, table_signs) in enumerate(signs.items()):
            unique = np.unique(table_signs)
            dim = SPEC.table(table).dim
            rows = (rng.standard_normal((unique.size, dim)).astype(np.float32) if seed is not None
                    else np.ones((unique.size, dim), np.float32))
            client.apply(decode_packet(encode_packet(
                PacketHeader(model="ctr", table=table, producer="p", generation=0, sequence=seq),
                unique, rows)))


def run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run to the end; the caller checks the exit status."""
    return subprocess.run(argv, check=False, capture_output=True, text=True, timeout=60, **kwargs)  # type: ignore[call-overload]


def test_a_port_taken_before_torchserve_binds_it_is_picked_again(tmp_path: Path) -> None:
    """CI once saw a free port taken between its pick and Java's bind: TorchServe served its
    other ports and `serve` failed on the missing one. A port LocalTorchServe picked is picked
    again and the start retried; a port the caller gave fails the start, named."""
    picked = LocalTorchServe(tmp_path / "picked")
    taken = picked.ports["grpc_management"]
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", taken))
        blocker.listen()
        picked.start()
        try:
            assert picked.ports["grpc_management"] != taken
            assert all(port_open(port) for port in picked.ports.values())
            assert (tmp_path / "picked" / "frontend.out").read_text().count("Failed to bind") == 1
        finally:
            picked.stop()

        given = LocalTorchServe(tmp_path / "given", ports={"grpc_management": taken})
        try:
            with pytest.raises(TorchServeError, match=f"could not bind 127.0.0.1:{taken} "):
                given.start()
            assert given.pid is None and not port_open(given.ports["inference"])  # stopped
        finally:
            given.stop()  # had it started after all


def test_serve_starts_serves_and_stops_on_sigterm(
        tmp_path: Path, embedding_cluster_factory: Callable[..., EmbeddingCluster]) -> None:
    cluster = embedding_cluster_factory(2, name="serve", model="ctr")
    body, signs = request(5)
    give_rows(cluster, signs, 6)
    dense_pt = save_torchscript(build_model(SPEC, seed=3), tmp_path / "ctr.pt")
    store = tmp_path / "store"
    # no config inside: --config names the servers
    archive_model("ctr", dense_pt, SPEC, store, handler=MAR_HANDLER)
    ports = {name: free_port() for name in
             ("grpc-inference", "grpc-management", "inference", "management", "metrics")}
    workdir = tmp_path / "work"
    out_path, err_path = tmp_path / "serve.out", tmp_path / "serve.err"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = subprocess.Popen(
            [*CLI, "serve", "--config", str(cluster.config_path), "--model-store", str(store),
             "--model", "ctr.mar", "--workdir", str(workdir),
             *[arg for name, port in ports.items() for arg in (f"--{name}-port", str(port))]],
            stdout=out, stderr=err)
    client = cluster.client()
    engine = PersiaInference.from_client(load_torchscript(dense_pt), SPEC, client)
    try:
        def started() -> bool:
            assert proc.poll() is None, f"serve exited {proc.returncode}:\n{err_path.read_text()[-3000:]}"
            return "stop with SIGTERM" in out_path.read_text()

        wait_until(started, "serve to say it is up", timeout_s=120, interval_s=0.1)
        printed = out_path.read_text()
        grpc_target = f"127.0.0.1:{ports['grpc-inference']}"
        assert re.search(rf"inference +gRPC {grpc_target} +HTTP http://127.0.0.1:{ports['inference']}\b",
                         printed), printed
        assert re.search(rf"management +gRPC 127.0.0.1:{ports['grpc-management']} +HTTP "
                         rf"http://127.0.0.1:{ports['management']}\b", printed), printed
        assert f"PERSIA_INC_INFERENCE_ADDRESS={grpc_target}" in printed
        assert "token authorization: off" in printed
        torchserve_pid = int(re.search(r"TorchServe pid (\d+)", printed).group(1))  # type: ignore[union-attr]

        want = engine.predict(body)
        stub = get_inference_stub(grpc_target)
        try:
            assert np.array_equal(infer(stub, "ctr", body), want)
            with pytest.raises(InferenceError) as bad:
                infer(stub, "ctr", body[: len(body) // 2])
            assert bad.value.status == "INVALID_ARGUMENT" and "bad request" in bad.value.message
        finally:
            stub.channel.close()
        assert np.array_equal(infer_http(f"http://127.0.0.1:{ports['inference']}", "ctr", body), want)
        # only loopback: the config TorchServe was given binds every address to 127.0.0.1
        properties = (workdir / "config.properties").read_text()
        assert "0.0.0.0" not in properties and "disable_token_authorization=true" in properties

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, err_path.read_text()[-3000:]
        with pytest.raises(ProcessLookupError):
            os.kill(torchserve_pid, 0)  # TorchServe was stopped and reaped, not orphaned
        assert not any(port_open(port) for port in ports.values())
    finally:
        if proc.poll() is None:
            stop_pid(proc)
        client.close()


def test_serve_with_token_authorization(
        tmp_path: Path, embedding_cluster_factory: Callable[..., EmbeddingCluster]) -> None:
    """--token-auth: TorchServe writes its keys, the command registers with the management key,
    a request without the inference key is refused and one with it is answered."""
    cluster = embedding_cluster_factory(2, name="tok", model="ctr")
    body, signs = request(8)
    give_rows(cluster, signs, None)  # creates the tables
    archive_model("ctr", save_torchscript(build_model(SPEC, seed=3), tmp_path / "ctr.pt"), SPEC,
                  tmp_path / "store", handler=MAR_HANDLER)
    http_port = free_port()
    out_path = tmp_path / "serve.out"
    with out_path.open("wb") as out:
        proc = subprocess.Popen(
            [*CLI, "serve", "--config", str(cluster.config_path), "--model-store",
             str(tmp_path / "store"), "--model", "ctr.mar", "--workdir", str(tmp_path / "work"),
             "--token-auth", "--inference-port", str(http_port),
             *[arg for name in ("grpc-inference", "grpc-management", "management", "metrics")
               for arg in (f"--{name}-port", "0")]],
            stdout=out, stderr=subprocess.STDOUT)
    try:
        def started() -> bool:
            assert proc.poll() is None, out_path.read_text()[-3000:]
            return "stop with SIGTERM" in out_path.read_text()

        wait_until(started, "serve to say it is up", timeout_s=120, interval_s=0.1)
        key_file = tmp_path / "work" / "key_file.json"
        assert f"token authorization: on, keys in {key_file}" in out_path.read_text()
        key = json.loads(key_file.read_text())["inference"]["key"]
        url = f"http://127.0.0.1:{http_port}"
        with pytest.raises(InferenceError) as refused:
            infer_http(url, "ctr", body)
        assert refused.value.status in (400, 401)  # TorchServe 0.12 answers 400 without a key
        assert infer_http(url, "ctr", body, token=key).shape == (32,)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, out_path.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            stop_pid(proc)


def test_serve_help_and_missing_pieces(tmp_path: Path) -> None:
    """--help explains it; without Java or without TorchServe: one line naming what to
    install, exit 1, no traceback."""
    shown = run([*CLI, "serve", "--help"])
    assert shown.returncode == 0
    for words in ("127.0.0.1", "SIGTERM", "--token-auth", "key_file.json", "Java 17",
                  "PERSIA_INC_INFERENCE_ADDRESS"):
        assert words in shown.stdout, words

    args = ["serve", "--config", str(tmp_path / "c.yaml"), "--model-store", str(tmp_path),
            "--model", "m.mar"]
    env = {key: value for key, value in os.environ.items() if key != "JAVA_HOME"}
    env["PATH"] = str(tmp_path / "empty-bin")  # no java on it
    no_java = run([*CLI, *args], env=env)
    # TorchServe hidden from the interpreter: import of `ts` finds nothing
    no_ts = run([sys.executable, "-c", "import sys; sys.modules['ts'] = None; "
                 "from persia_inc.cli import main; sys.exit(main(sys.argv[1:]))", *args])
    for result, words in ((no_java, "Java 17"), (no_ts, "pip install 'persia-inc[serve]'")):
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1, result.stderr
        assert lines[0].startswith("persia-inc serve: ") and words in lines[0], lines
        assert "Traceback" not in result.stderr + result.stdout


def test_serve_refuses_a_missing_archive_and_a_bad_config(tmp_path: Path) -> None:
    config = write_test_config(tmp_path / "c.yaml", [f"127.0.0.1:{free_port()}"], str(tmp_path / "inc"))
    load_config(config, need_servers=True)
    missing = run([*CLI, "serve", "--config", str(config), "--model-store", str(tmp_path),
                   "--model", "nothing.mar"])
    assert missing.returncode == 2 and "no nothing.mar in" in missing.stderr, missing.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("PersiaInferConfig:\n  servers: 7\n")
    refused = run([*CLI, "serve", "--config", str(bad), "--model-store", str(tmp_path),
                   "--model", "nothing.mar"])
    assert refused.returncode == 2 and "bad configuration" in refused.stderr, refused.stderr
    assert "Traceback" not in missing.stderr + refused.stderr


def test_served_model_settings_are_checked_before_anything_starts(tmp_path: Path) -> None:
    """`ServedModel` (what the command and the demo run) refuses bad settings and a file that
    is not a .mar before it starts TorchServe."""
    from persia_inc.serving import ServedModel, ServeSettings

    for bad in ({"workers": 0}, {"batch_size": 0}, {"start_timeout_s": 0}):
        with pytest.raises(ValueError, match="must be"):
            ServeSettings(**bad)  # type: ignore[arg-type]
    fake = tmp_path / "store" / "x.mar"
    fake.parent.mkdir()
    fake.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a model archive"):
        ServedModel(tmp_path / "c.yaml", fake, tmp_path / "work")
    assert not (tmp_path / "work").exists()
