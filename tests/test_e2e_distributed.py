"""Distributed mode, same code path: PostgreSQL + Redis, the gateway enqueues to Celery queue `gpu` and a
`llamagen-gateway worker` in another process, as deployed (the default prefork pool: the job runs in its child
process, under the time limit), runs the job. Same outcome as the embedded test."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import REPO, Gateway, make_settings
from tests.services import postgres_database, redis_database

pytestmark = pytest.mark.services
PROMPT = "a small red star above a large blue circle on a white background"


@pytest.fixture
def distributed(tmp_path: Path):
    from fastapi.testclient import TestClient

    from audit.db import upgrade_database
    from gateway.main import create_app
    from gateway.state import build_state, close_state

    with postgres_database() as db_url, redis_database() as broker_url:
        settings = make_settings(tmp_path / "var", database_url=db_url, broker_url=broker_url)
        settings.data_dir.mkdir(parents=True)
        migrated = subprocess.run([sys.executable, "-m", "gateway.cli", "migrate"], cwd=REPO, text=True,
                                  capture_output=True, timeout=120, env=_env(settings))
        assert migrated.returncode == 0, migrated.stderr
        upgrade_database(db_url)  # idempotent: already at head
        state = build_state(settings)
        worker = subprocess.Popen([sys.executable, "-m", "gateway.cli", "worker"], cwd=REPO,
                                  env=_env(settings), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        client = TestClient(create_app(settings, state=state), raise_server_exceptions=False)
        client.__enter__()
        try:
            yield Gateway(client, state), worker
        finally:
            client.__exit__(None, None, None)
            close_state(state)
            worker.terminate()
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                worker.kill()


def _env(settings) -> dict[str, str]:
    return {**os.environ, "LLAMAGEN_GATEWAY_DATA_DIR": str(settings.data_dir),
            "LLAMAGEN_GATEWAY_DATABASE_URL": settings.database_url,
            "LLAMAGEN_GATEWAY_BROKER_URL": settings.broker_url or "",
            "LLAMAGEN_GATEWAY_MODELS_DIR": str(settings.models_dir), "LLAMAGEN_GATEWAY_ENV": "test",
            "LLAMAGEN_GATEWAY_SESSION_SECRET": "test-session-secret", "LLAMAGEN_GATEWAY_DEVICE": "cpu",
            "LLAMAGEN_GATEWAY_LOG_JSON": "false"}


def test_celery_worker_in_another_process_runs_the_job_with_the_same_outcome(distributed, tmp_path) -> None:
    gateway, worker = distributed
    assert not gateway.state.settings.embedded
    key = gateway.key("creator", team="design")
    created = gateway.client.post("/v1/generations", headers=gateway.auth(key),
                                  json={"model": "demo-shapes-t2i", "prompt": PROMPT, "params": {"seed": 11}})
    assert created.status_code == 202, created.text
    try:
        job = gateway.wait(created.json()["id"], key, timeout=240)
    except AssertionError:
        worker.terminate()
        out = worker.communicate(timeout=20)[0]
        raise AssertionError(f"worker did not finish the job; its output:\n{out[-4000:]}") from None
    assert job["status"] == "completed", job
    assert job["decisions"]["output"]["action"] in ("allow", "flag")
    workers = gateway.client.get("/readyz").json()["checks"]["workers"]["detail"]
    assert any(m["name"] == "demo-shapes-t2i" for w in workers for m in w["models"]), workers

    image = gateway.client.get(f"/v1/generations/{job['id']}/images/0", headers=gateway.auth(key))
    assert image.status_code == 200
    Image.open(io.BytesIO(image.content)).verify()
    auditor = gateway.auth(gateway.key("auditor"))
    report = gateway.client.post("/v1/provenance/verify", content=image.content,
                                 headers={**auditor, "Content-Type": "image/png"}).json()
    assert report["signature_valid"] and report["signer_trusted"] and report["content_intact"]
    assert report["audit_event_id"] == job["images"][0]["audit_event_id"]
    chain = gateway.client.get("/v1/audit/verify", headers=auditor).json()
    assert chain["ok"], chain
    actions = {e["action"] for e in gateway.client.get(
        "/v1/audit/events", params={"job_id": job["id"]}, headers=auditor).json()["data"]}
    assert {"generation.requested", "prompt.screened", "image.released", "generation.completed"} <= actions


def test_migrate_upgrades_postgresql(tmp_path) -> None:
    with postgres_database() as db_url:
        settings = make_settings(tmp_path / "var", database_url=db_url)
        first = subprocess.run([sys.executable, "-m", "gateway.cli", "migrate"], cwd=REPO, text=True,
                               capture_output=True, timeout=120, env=_env(settings))
        again = subprocess.run([sys.executable, "-m", "gateway.cli", "migrate"], cwd=REPO, text=True,
                               capture_output=True, timeout=120, env=_env(settings))
        assert first.returncode == 0 and again.returncode == 0, first.stderr + again.stderr
