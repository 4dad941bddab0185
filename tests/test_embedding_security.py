"""Embedding servers with TLS and the write token, and their Prometheus endpoint."""

from __future__ import annotations

import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from persia_inc.embedding_server.errors import ShardError
from persia_inc.local_services import free_port
from persia_inc.packet_format import PacketHeader, decode_packet, encode_packet


def self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made with the openssl command."""
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60)
    return cert, key


def packet(signs: np.ndarray, rows: np.ndarray):
    header = PacketHeader(model="m", table="t", producer="p", generation=1, sequence=0)
    return decode_packet(encode_packet(header, signs, rows))


def test_tls_token_and_metrics(tmp_path: Path, embedding_cluster_factory) -> None:
    cert, key = self_signed(tmp_path, "server")
    other_cert, _ = self_signed(tmp_path, "other")
    metrics_base = free_port()
    cluster = embedding_cluster_factory(2, tls_cert_file=str(cert), tls_key_file=str(key),
                                        metrics_port_base=metrics_base)
    signs = np.arange(1, 101, dtype=np.uint64)
    rows = np.random.default_rng(0).standard_normal((100, 8), dtype=np.float32)

    with cluster.client() as client:  # trusts the servers' certificate, sends the token
        client.apply(packet(signs, rows))
        assert np.array_equal(client.lookup("t", signs), rows)

    with cluster.client(token="wrong-token") as client, pytest.raises(ShardError) as info:
        client.apply(packet(signs, rows))
    assert info.value.code in ("UNAUTHENTICATED", "PERMISSION_DENIED")

    with cluster.client(tls_ca=other_cert.read_bytes(), timeout_s=3) as client, \
            pytest.raises(ShardError) as info:
        client.lookup("t", signs)
    assert info.value.code == "UNAVAILABLE"  # a server whose certificate we do not trust

    for shard in range(2):
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_base + shard}/metrics",
                                    timeout=10) as reply:
            text = reply.read().decode()
        assert 'persia_inc_embedding_lookup_rows_total{table="t"}' in text
        assert "persia_inc_embedding_watermark_sequence" in text
