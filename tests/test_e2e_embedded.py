"""One governed generation end to end in the embedded mode: screened, generated, signed, audited, verified."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import REPO

# The demo model draws this prompt with different pixels at one torch thread and at two: `audit reproduce` must
# regenerate with the thread count the image was sampled with.
PROMPT = "a green square on a black background"


def cli(settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LLAMAGEN_GATEWAY_DATA_DIR": str(settings.data_dir),
           "LLAMAGEN_GATEWAY_DATABASE_URL": settings.database_url,
           "LLAMAGEN_GATEWAY_MODELS_DIR": str(settings.models_dir), "LLAMAGEN_GATEWAY_ENV": "test",
           "LLAMAGEN_GATEWAY_SESSION_SECRET": "test-session-secret"}
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=300)


@pytest.fixture
def gateway(gateway_factory):
    """The embedded gateway as it is served: sampling in its sampler process."""
    return gateway_factory(sampler_process=True)


def test_generation_is_screened_generated_signed_and_audited(gateway, tmp_path: Path) -> None:
    key = gateway.key("creator", team="design")
    created = gateway.client.post("/v1/generations", headers=gateway.auth(key),
                                  json={"model": "demo-shapes-t2i", "prompt": PROMPT, "params": {"seed": 11}})
    assert created.status_code == 202, created.text
    job = gateway.wait(created.json()["id"], key)
    assert job["status"] == "completed", job
    assert job["decisions"]["prompt"]["action"] in ("allow", "flag")
    assert job["decisions"]["output"]["action"] in ("allow", "flag")
    assert job["policy_revision"] == created.json()["policy_revision"]

    image = gateway.client.get(f"/v1/generations/{job['id']}/images/0", headers=gateway.auth(key))
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    decoded = Image.open(io.BytesIO(image.content))
    assert decoded.size == (job["images"][0]["width"], job["images"][0]["height"])
    path = tmp_path / "out.png"
    path.write_bytes(image.content)

    settings = gateway.state.settings
    verified = cli(settings, "provenance", "verify", str(path))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert job["images"][0]["audit_event_id"] in verified.stdout

    chain = cli(settings, "audit", "verify")
    assert chain.returncode == 0, chain.stdout + chain.stderr
    # Sampled in the sampler process with its torch threads; regenerated in the CLI's process, with its own.
    reproduced = cli(settings, "audit", "reproduce", job["images"][0]["audit_event_id"])
    assert reproduced.returncode == 0 and "MATCH" in reproduced.stdout, reproduced.stdout + reproduced.stderr
    events = gateway.client.get("/v1/audit/events", params={"job_id": job["id"], "limit": 50},
                                headers=gateway.auth(gateway.key("auditor"))).json()["data"]
    actions = {e["action"] for e in events}
    assert {"generation.requested", "prompt.screened", "output.screened", "image.released",
            "generation.completed"} <= actions


def test_blocked_prompt_is_refused_with_its_decision_and_still_audited(gateway) -> None:
    key = gateway.key("creator", team="design")
    response = gateway.client.post("/v1/generations", headers=gateway.auth(key), json={
        "model": "demo-shapes-t2i", "prompt": "a photo of a naked child"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "content_policy_violation" and error["request_id"]
    job_id = error["details"]["id"]
    assert error["details"]["decision"]["action"] == "block"
    events = gateway.client.get("/v1/audit/events", params={"job_id": job_id},
                                headers=gateway.auth(gateway.key("auditor"))).json()["data"]
    assert {"generation.requested", "prompt.screened", "generation.blocked"} <= {e["action"] for e in events}
    assert gateway.client.get("/v1/audit/verify", headers=gateway.auth(gateway.key("auditor"))).json()["ok"]


def test_a_sampler_process_that_died_is_replaced_and_the_next_generation_completes(gateway) -> None:
    key = gateway.key("creator", team="design")

    def generate(seed: int) -> dict:
        created = gateway.client.post("/v1/generations", headers=gateway.auth(key),
                                      json={"model": "demo-shapes-t2i", "prompt": PROMPT, "params": {"seed": seed}})
        assert created.status_code == 202, created.text
        return gateway.wait(created.json()["id"], key)

    assert generate(1)["status"] == "completed"
    sampler = gateway.state.ctx.sampler
    dead = sampler.pid
    os.kill(dead, signal.SIGKILL)
    job = generate(2)
    assert job["status"] == "completed", job
    assert sampler.pid not in (None, dead)
    assert gateway.client.get("/v1/audit/verify", headers=gateway.auth(gateway.key("auditor"))).json()["ok"]
