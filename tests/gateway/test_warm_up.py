"""A served gateway is not ready until it has loaded its classifiers and default model: a load balancer
sends it no request that would wait seconds for them, and a warm-up that fails still ends in ready."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from audit.db import upgrade_database
from gateway import main
from tests.conftest import LEXICAL_POLICY, make_settings


def readiness(client: TestClient) -> tuple[int, dict]:
    response = client.get("/readyz")
    return response.status_code, response.json()["checks"]


def ready_within(client: TestClient, seconds: float) -> tuple[int, dict]:
    deadline = time.monotonic() + seconds
    while (result := readiness(client))[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.02)
    return result


@pytest.mark.parametrize("fails", [False, True], ids=["warm-up done", "warm-up failed"])
def test_a_served_gateway_is_ready_only_once_warmed_up(tmp_path: Path, tiny_models: Path, monkeypatch,
                                                       fails: bool) -> None:
    settings = make_settings(tmp_path, models_dir=tiny_models, default_model="tiny-c2i", policy_file=LEXICAL_POLICY)
    upgrade_database(settings.database_url)
    may_finish, warmed = threading.Event(), []

    def held_warm_up(state) -> None:
        assert may_finish.wait(timeout=30)
        if fails:
            raise RuntimeError("the default model's checkpoint is unreadable")
        warmed.append(state)

    monkeypatch.setattr(main, "warm_up", held_warm_up)
    with TestClient(main.create_app(settings), raise_server_exceptions=False) as client:  # builds its own state
        status, checks = readiness(client)
        assert status == 503
        assert checks["warm_up"] == {"ok": False, "error": "still loading the default model and the classifiers"}
        assert all(checks[name]["ok"] for name in ("database", "broker", "workers", "signer", "policy"))
        may_finish.set()
        status, checks = ready_within(client, 30)
        assert status == 200 and checks["warm_up"] == {"ok": True}
    assert len(warmed) == (0 if fails else 1)
