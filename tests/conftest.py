"""Shared fixtures: settings pointed at a temporary data dir, a migrated database, a running embedded gateway."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
DEMO_MODELS = REPO / "models"
DEFAULT_POLICY = REPO / "policies" / "rules" / "default.yaml"
LEXICAL_POLICY = REPO / "tests" / "data" / "lexical-only.yaml"  # loads instantly: for mechanics tests


def make_settings(data_dir: Path, **overrides: Any) -> Any:
    """Settings for a test, independent of the caller's environment variables."""
    from gateway.settings import Settings

    values: dict[str, Any] = {"env": "test", "data_dir": data_dir, "models_dir": DEMO_MODELS,
                              "policy_file": DEFAULT_POLICY, "session_secret": "test-session-secret",
                              "worker_batch_wait_ms": 5, "log_json": False, "device": "cpu",
                              # In-process, so that tests can patch the pipeline; tests/generator/test_sampler.py
                              # and the served gateways of the end-to-end tests use the sampler process.
                              "sampler_process": False}
    values.update(overrides)
    return Settings(_env_file=None, **values)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models directory with tiny random-weight `tiny-c2i` and `tiny-t2i` models and their cards."""
    from tests.factories import write_tiny_model

    models = tmp_path_factory.mktemp("tiny-models")
    write_tiny_model(models, "tiny-c2i", "c2i")
    write_tiny_model(models, "tiny-t2i", "t2i")
    return models


@pytest.fixture
def settings(tmp_path: Path) -> Any:
    return make_settings(tmp_path / "var")


@pytest.fixture
def sessions(settings: Any) -> Any:
    """A session factory on a freshly migrated SQLite database."""
    from audit.db import make_engine, make_session_factory, upgrade_database

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_database(settings.database_url)
    return make_session_factory(make_engine(settings.database_url))


@pytest.fixture
def c2i_state(tmp_path: Path, tiny_models: Path) -> Iterator[Any]:
    """Gateway state on the tiny c2i model with the lexical policy; jobs are queued to a RecordingDispatcher."""
    from gateway.state import build_state, close_state
    from tests.factories import RecordingDispatcher

    settings = make_settings(tmp_path / "var", models_dir=tiny_models, default_model="tiny-c2i",
                             policy_file=LEXICAL_POLICY, rate_limit_per_minute=0)
    state = build_state(settings, dispatcher=RecordingDispatcher())
    yield state
    close_state(state)


class Gateway:
    """A running gateway app (TestClient) with helpers to make keys and wait for jobs."""

    def __init__(self, client: Any, state: Any) -> None:
        self.client = client
        self.state = state

    def key(self, role: str, team: str = "design") -> str:
        from gateway.auth import create_key

        with self.state.ctx.sessions() as session, session.begin():
            return create_key(session, role=role, team=team, name=f"test {role}")

    @staticmethod
    def auth(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    def wait(self, job_id: str, key: str, timeout: float = 120.0) -> dict[str, Any]:
        """Poll a generation until it leaves queued/running."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            body: dict[str, Any] = self.client.get(f"/v1/generations/{job_id}", headers=self.auth(key)).json()
            if body["status"] not in ("queued", "running"):
                return body
            time.sleep(0.05)
        raise AssertionError(f"generation {job_id} did not finish in {timeout}s")


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    """Start embedded gateways on fresh data dirs; each is shut down at teardown."""
    from fastapi.testclient import TestClient

    from audit.db import upgrade_database
    from gateway.main import create_app
    from gateway.state import build_state

    clients: list[Any] = []

    def start(**overrides: Any) -> Gateway:
        data_dir = tmp_path / f"var{len(clients)}"
        data_dir.mkdir(parents=True)
        settings = make_settings(data_dir, **overrides)
        upgrade_database(settings.database_url)
        state = build_state(settings)
        client = TestClient(create_app(settings, state=state), raise_server_exceptions=False)
        client.__enter__()
        clients.append((client, state))
        return Gateway(client, state)

    yield start
    from gateway.state import close_state

    for client, state in clients:
        client.__exit__(None, None, None)
        close_state(state)


@pytest.fixture
def gateway(gateway_factory: Callable[..., Gateway]) -> Gateway:
    """An embedded gateway with the shipped demo models and default policy."""
    return gateway_factory()
