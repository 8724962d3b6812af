"""The compose stack's Prometheus: its configuration is valid for the real Prometheus (promtool
of Debian's package), every service of docker-compose.yml is scraped on the metrics port it
serves, and the image is built from the same base as the services."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from common.metrics import DEFAULT_PORTS

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"


def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def scrape_jobs() -> dict[str, list[dict]]:
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    return {job["job_name"]: job.get("dns_sd_configs", []) for job in config["scrape_configs"]}


def test_promtool_accepts_the_configuration():
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    if not Path(promtool).is_file():
        pytest.fail("promtool is missing: apt-get install prometheus (bash .ci/run installs it)")
    result = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_DIR / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_service_replica_is_discovered_on_its_metrics_port():
    jobs = scrape_jobs()
    services = compose()["services"]
    scraped = 0
    for name, service in services.items():
        dockerfile = service.get("build", {}).get("dockerfile", "")
        kind = dockerfile.split("/")[1] if dockerfile.startswith("services/") else ""
        if kind not in DEFAULT_PORTS:  # prometheus, postgres, the proxy, the web edge
            continue
        environment = service.get("environment", {})
        port = int(environment[f"{kind.upper()}_METRICS_PORT"])
        assert port == DEFAULT_PORTS[kind]
        found = [sd for sd in jobs[kind] if name in sd["names"]]
        assert found, f"no DNS discovery of compose service {name}"
        assert all(sd["type"] == "A" and sd["port"] == port for sd in found)
        scraped += 1
    assert scraped == 4


def test_prometheus_image_uses_the_services_base_and_debian_package():
    service = compose()["services"]["prometheus"]
    assert service["build"]["dockerfile"] == "deploy/prometheus/Dockerfile"
    assert (
        service["build"]["args"]["BASE_IMAGE"]
        == compose()["services"]["gateway"]["build"]["args"]["BASE_IMAGE"]
    )
    dockerfile = (PROMETHEUS_DIR / "Dockerfile").read_text()
    assert (
        "FROM ${BASE_IMAGE}" in dockerfile and "install -y --no-install-recommends prometheus" in dockerfile
    )
    assert "USER prometheus" in dockerfile
    assert "!deploy/prometheus/" in (REPO / ".dockerignore").read_text().splitlines()
