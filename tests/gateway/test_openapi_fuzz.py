"""Schemathesis against the running server's /openapi.json: generated and mutated requests never get a 5xx."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

from tests.conftest import REPO, Gateway, make_settings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The gateway under uvicorn on a real port, with a quota so fuzzed generations stay few."""
    import uvicorn
    from fastapi.testclient import TestClient

    from gateway.main import create_app
    from gateway.state import build_state, close_state

    cfg = make_settings(tmp_path_factory.mktemp("fuzz") / "var", team_quota_per_day=3, rate_limit_per_minute=0,
                        policy_file=REPO / "tests" / "data" / "lexical-only.yaml")
    state = build_state(cfg)
    app = create_app(cfg, state=state)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    key = Gateway(TestClient(app), state).key("admin", team="fuzz")
    yield f"http://127.0.0.1:{port}", key
    server.should_exit = True
    thread.join(timeout=10)
    close_state(state)


def test_no_generated_request_gets_a_server_error(server) -> None:
    """Every operation, positive and negative (mutated) data: never a 5xx, always the error body on 4xx."""
    from schemathesis import GenerationMode

    base_url, key = server
    api = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    problems: list[str] = []
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 18
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                      derandomize=True)
            def run(case) -> None:
                response = case.call(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
                if response.status_code >= 500:
                    problems.append(f"{case.method} {case.formatted_path} -> {response.status_code}: "
                                    f"{response.text[:200]}")
                elif response.status_code >= 400 and "json" in response.headers.get("content-type", ""):
                    error = response.json().get("error", {})
                    if not {"code", "message", "request_id"} <= set(error):
                        problems.append(f"{case.method} {case.formatted_path}: error body {response.text[:200]}")

            try:
                run()
            except Unsatisfiable:
                if mode == GenerationMode.POSITIVE:
                    raise  # negative data may not exist (no parameters to break); positive data always does
    assert not problems, "\n".join(problems[:20])
