"""The production compose file: every service of the distributed mode, validated by Docker Compose itself."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import yaml

from tests.conftest import REPO

COMPOSE = REPO / "docker-compose.yml"
SECRETS_ENV = {"POSTGRES_PASSWORD": "example", "SESSION_SECRET": "example", "MINIO_ROOT_PASSWORD": "example"}


def compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    return None


def test_docker_compose_config_validates() -> None:
    command = compose_command()
    if command is None:
        if os.environ.get("CI") == "true":
            pytest.fail("Docker Compose is not installed (make test installs docker-compose from Debian)")
        pytest.skip("Docker Compose is not installed here (make test installs it)")
    result = subprocess.run([*command, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True,
                            env={**os.environ, **SECRETS_ENV}, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr


def test_compose_runs_the_distributed_mode() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert {"postgres", "redis", "minio", "migrate", "gateway", "worker"} <= set(services)
    assert services["migrate"]["command"] == ["llamagen-gateway", "migrate"]
    assert services["gateway"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    worker = services["worker"]
    assert worker["command"][:4] == ["llamagen-gateway", "worker", "-Q", "gpu"]
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    for name in ("postgres", "redis", "minio", "gateway", "worker"):
        assert "healthcheck" in services[name], name


def test_compose_workers_enforce_the_job_time_limit_with_one_prefork_process() -> None:
    command = yaml.safe_load(COMPOSE.read_text())["services"]["worker"]["command"]
    assert command[command.index("--pool") + 1] == "prefork"
    assert command[command.index("--concurrency") + 1] == "1"


def test_each_worker_replica_health_checks_its_own_node() -> None:
    test = yaml.safe_load(COMPOSE.read_text())["services"]["worker"]["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL" and "inspect ping -d celery@$$HOSTNAME" in test[1]


def test_compose_workers_serve_their_metrics_on_an_exposed_port() -> None:
    worker = yaml.safe_load(COMPOSE.read_text())["services"]["worker"]
    port = worker["environment"]["LLAMAGEN_GATEWAY_WORKER_METRICS_PORT"]
    assert port in worker["expose"]
    assert worker["environment"]["LLAMAGEN_GATEWAY_BROKER_URL"] == "redis://redis:6379/0"  # still the common env


def test_the_image_runs_its_services_as_an_unprivileged_user() -> None:
    lines = [line.split(None, 1) for line in (REPO / "Dockerfile").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    instructions = [(words[0].upper(), words[1] if len(words) > 1 else "") for words in lines]
    users = [i for i, (name, _) in enumerate(instructions) if name == "USER"]
    assert users, "the image must drop root"
    assert instructions[users[-1]][1].split(":")[0] not in ("root", "0")
    assert all(name != "RUN" for name, _ in instructions[users[-1]:]), "nothing runs as root after USER"
    home = yaml.safe_load(COMPOSE.read_text())["x-common-env"]["LLAMAGEN_GATEWAY_DATA_DIR"]
    assert f"--home-dir {home}" in (REPO / "Dockerfile").read_text(), "the data volume is the user's own home"
