"""Long-polling: `GET /v1/generations/{id}?wait=S` answers when the job finishes, or when the wait ends."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from gateway.main import create_app
from gateway.state import build_state, close_state
from gateway.waiting import JobWaiters
from tests.conftest import LEXICAL_POLICY, make_settings
from tests.factories import RecordingDispatcher

TINY = {"default_model": "tiny-c2i", "policy_file": LEXICAL_POLICY, "rate_limit_per_minute": 0}


def test_a_long_poll_answers_once_the_in_process_worker_finishes_the_job(gateway_factory, tiny_models) -> None:
    gw = gateway_factory(models_dir=tiny_models, **TINY)
    key = gw.key("creator")
    job = gw.client.post("/v1/generations", json={"model": "tiny-c2i", "class_id": 1, "params": {"seed": 1}},
                         headers=gw.auth(key)).json()
    started = time.monotonic()
    body = gw.client.get(f"/v1/generations/{job['id']}", params={"wait": 30}, headers=gw.auth(key)).json()
    assert body["status"] == "completed" and body["images"]
    assert time.monotonic() - started < 25  # woken by the worker, not by the end of the wait
    assert gw.state.waiters.waiting() == 0


def test_a_long_poll_answers_with_the_job_still_queued_when_the_wait_ends(tmp_path, tiny_models) -> None:
    settings = make_settings(tmp_path / "var", models_dir=tiny_models, **TINY)
    state = build_state(settings, dispatcher=RecordingDispatcher())
    try:
        with TestClient(create_app(settings, state=state)) as client:
            from gateway.auth import create_key

            with state.ctx.sessions() as session, session.begin():
                key = create_key(session, role="creator", team="design")
            headers = {"Authorization": f"Bearer {key}"}
            job = client.post("/v1/generations", json={"model": "tiny-c2i", "class_id": 2}, headers=headers).json()
            started = time.monotonic()
            body = client.get(f"/v1/generations/{job['id']}", params={"wait": 0.6}, headers=headers).json()
            assert body["status"] == "queued"
            assert time.monotonic() - started >= 0.6
    finally:
        close_state(state)


@pytest.mark.parametrize("wait", ["-1", "61", "soon"])
def test_a_wait_outside_0_to_60_seconds_is_refused(gateway_factory, tiny_models, wait: str) -> None:
    gw = gateway_factory(models_dir=tiny_models, **TINY)
    response = gw.client.get("/v1/generations/nope", params={"wait": wait}, headers=gw.auth(gw.key("creator")))
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request"


def test_notify_from_another_thread_wakes_the_waiting_request() -> None:
    waiters = JobWaiters(recheck_s=60.0)

    async def wait_for_notice() -> float:
        with waiters.watch("job-1") as changed:
            started = time.monotonic()
            threading.Timer(0.05, waiters.notify, args=(["job-0", "job-1"],)).start()
            await asyncio.wait_for(changed.wait(), timeout=10)
            return time.monotonic() - started

    # A thread of its own runs the event loop: an earlier test (Playwright's sync API) may leave one running here.
    with ThreadPoolExecutor(max_workers=1) as pool:
        assert pool.submit(asyncio.run, wait_for_notice()).result(timeout=30) < 5
    assert waiters.waiting() == 0
