"""/metrics: what the gateway exports in each mode, and what it leaves out rather than report wrongly."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.exc import OperationalError

from tests.conftest import LEXICAL_POLICY


def families(gw) -> dict[str, list]:  # type: ignore[no-untyped-def]
    response = gw.client.get("/metrics")
    assert response.status_code == 200
    return {family.name: family.samples for family in text_string_to_metric_families(response.text)}


@pytest.fixture
def embedded(gateway_factory, tiny_models):  # type: ignore[no-untyped-def]
    return gateway_factory(models_dir=tiny_models, default_model="tiny-c2i", policy_file=LEXICAL_POLICY)


def test_a_distributed_gateway_exports_no_worker_series(gateway_factory, tiny_models) -> None:
    gw = gateway_factory(models_dir=tiny_models, default_model="tiny-c2i", policy_file=LEXICAL_POLICY,
                         broker_url="redis://127.0.0.1:1/0")  # never reached by /metrics
    exported = families(gw)
    assert "gateway_http_requests" in exported and "gateway_jobs" in exported
    assert not [name for name in exported if name.startswith("worker_")]


def test_the_embedded_gateway_exports_the_worker_series_of_its_in_process_worker(embedded) -> None:
    exported = families(embedded)
    assert {"worker_batch_size", "worker_busy_seconds", "worker_stage_seconds"} <= set(exported)


def test_queue_depth_is_left_out_while_the_database_is_down(embedded, monkeypatch) -> None:
    assert {s.labels["status"] for s in families(embedded)["gateway_jobs"]} >= {"queued", "running"}

    def database_down():  # type: ignore[no-untyped-def]
        raise OperationalError("SELECT", {}, Exception("connection refused"))

    monkeypatch.setattr(embedded.state.ctx, "sessions", database_down)
    exported = families(embedded)
    assert exported["gateway_jobs"] == []
    assert [s.value for s in exported["gateway_jobs_up"]] == [0.0]

    monkeypatch.undo()
    exported = families(embedded)
    assert [s.value for s in exported["gateway_jobs_up"]] == [1.0] and exported["gateway_jobs"]


def requests_counted(gw, **labels: str) -> float:  # type: ignore[no-untyped-def]
    """The /metrics value of gateway_http_requests_total with exactly these labels (0 when absent)."""
    return sum(s.value for s in families(gw)["gateway_http_requests"]
               if s.name == "gateway_http_requests_total" and s.labels == labels)


def test_a_generation_is_counted_under_the_callers_team_and_the_resolved_model(embedded) -> None:
    labels = {"method": "POST", "route": "/v1/generations", "status": "202", "team": "design", "model": "tiny-c2i"}
    before = requests_counted(embedded, **labels)
    key = embedded.key("creator", team="design")

    response = embedded.client.post("/v1/generations", headers=embedded.auth(key), json={"class_id": 1})

    assert response.status_code == 202
    assert requests_counted(embedded, **labels) == before + 1


def test_an_unknown_model_name_never_becomes_a_label(embedded) -> None:
    labels = {"method": "POST", "route": "/v1/generations", "status": "422", "team": "design", "model": ""}
    before = requests_counted(embedded, **labels)
    key = embedded.key("creator", team="design")

    response = embedded.client.post("/v1/generations", headers=embedded.auth(key),
                                    json={"model": "bogus-model-xyz", "class_id": 1})

    assert response.status_code == 422
    assert requests_counted(embedded, **labels) == before + 1
    assert "bogus-model-xyz" not in {s.labels.get("model") for s in families(embedded)["gateway_http_requests"]}
