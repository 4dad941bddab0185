"""infra/docker-compose.yml: valid for docker-compose, and every command it runs is ours."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from persia_inc.cli import COMMANDS
from persia_inc.config import load_config
from persia_inc.embedding_server.routing import targets_of_servers

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"
COMPOSE = INFRA / "docker-compose.yml"


def docker_compose(*args: str, cwd: Path = INFRA) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("docker-compose")
    assert tool, "docker-compose is missing: run `bash infra/install-test-deps.sh` (make test does)"
    return subprocess.run([tool, *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                          check=False)


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def our_services() -> dict[str, list[str]]:
    """service -> the persia-inc argv it runs."""
    found = {}
    for name, service in compose()["services"].items():
        if service.get("image") == "persia-inc:latest" and "entrypoint" not in service:
            found[name] = service["command"]
    return found


def test_compose_file_validates() -> None:
    result = docker_compose("-f", str(COMPOSE), "config")
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    expected = {"kafka", "namenode", "datanode", "ceph", "embedding-server-0", "embedding-server-1",
                "loader", "torchserve", "prometheus", "grafana"}
    assert expected <= set(resolved["services"])


def test_validation_catches_a_broken_file(tmp_path: Path) -> None:
    broken = compose()
    broken["services"]["loader"]["depends_on"]["kafka"]["condition"] = "service_sleeping"
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    result = docker_compose("-f", str(path), "config", cwd=tmp_path)
    assert result.returncode != 0


def test_every_service_waits_on_health_where_it_matters() -> None:
    services = compose()["services"]
    for name in ("loader", "torchserve"):
        conditions = {dep: spec["condition"] for dep, spec in services[name]["depends_on"].items()}
        assert conditions["embedding-server-0"] == "service_healthy", name
    for name in ("kafka", "namenode", "ceph", "embedding-server-0", "loader", "torchserve"):
        assert "healthcheck" in services[name], name


@pytest.mark.parametrize("service", sorted(our_services()))
def test_every_command_exists_in_our_cli(service: str) -> None:
    argv = our_services()[service]
    assert argv[0] in COMMANDS, f"{service} runs unknown subcommand {argv[0]!r}"
    help_text = subprocess.run([sys.executable, "-m", "persia_inc.cli", argv[0], "--help"],
                               capture_output=True, text=True, timeout=60, check=True).stdout
    for flag in (a for a in argv if a.startswith("--")):
        assert flag in help_text, f"{service}: persia-inc {argv[0]} has no {flag}"


def test_the_cluster_config_loads_and_matches_the_scrape_targets() -> None:
    config = load_config(INFRA / "compose" / "global_config.yaml")
    assert config.storage == "ceph" and config.persia_inc.producer.announce == "kafka"
    targets_of, _ = targets_of_servers(config.infer.servers)
    hosts = [t.address.split(":")[0] for t in targets_of]
    assert set(hosts) <= set(compose()["services"])
    assert all(len(replicas) == 2 for replicas in config.infer.servers)  # two replicas a shard
    scrape = yaml.safe_load((INFRA / "prometheus.yml").read_text())
    targets = {t for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    base = config.persia_inc.embedding_server.metrics_port_base
    for target, host in enumerate(hosts):  # one port per process: base + target index
        assert f"{host}:{base + target}" in targets
    assert f"loader:{config.persia_inc.loader.metrics_port}" in targets



def test_prometheus_reaches_the_compose_loader_and_scrapes_the_producer() -> None:
    """The compose loader binds its metrics on its own container name (where Prometheus and the
    health check connect; 127.0.0.1 would refuse them), and Prometheus has a producer job on the
    producer's metrics port."""
    config = load_config(INFRA / "compose" / "global_config.yaml")
    loader = config.persia_inc.loader
    services = compose()["services"]
    assert loader.metrics_addr == services["loader"]["hostname"] == "loader"
    assert f"http://{loader.metrics_addr}:{loader.metrics_port}/healthz" in \
        " ".join(services["loader"]["healthcheck"]["test"])
    scrape = yaml.safe_load((INFRA / "prometheus.yml").read_text())
    jobs = {job["job_name"]: [t for c in job["static_configs"] for t in c["targets"]]
            for job in scrape["scrape_configs"]}
    port = config.persia_inc.producer.metrics_port
    assert port and jobs["producer"] and all(t.endswith(f":{port}") for t in jobs["producer"])


def test_grafana_dashboard_is_valid_json_with_the_key_panels() -> None:
    dashboard = json.loads((INFRA / "grafana" / "dashboards" / "persia-inc.json").read_text())
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("freshness", "lag", "throughput"):
        assert topic in titles
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs and all("persia_inc_" in e for e in exprs)
