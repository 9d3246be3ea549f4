"""Liveness, readiness (database, broker, signer, policy) and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from gateway import metrics as gateway_metrics
from gateway import services
from gateway.deps import StateDep

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


READINESS: dict[int | str, dict[str, Any]] = {
    200: {"description": "ready: every check passed", "content": {"application/json": {"example": {
        "status": "ready", "checks": {"database": {"ok": True}, "signer": {"ok": True, "detail": "..."}}}}}},
    503: {"description": "not ready: the checks that failed carry an error", "content": {"application/json": {
        "example": {"status": "not_ready", "checks": {"database": {"ok": True},
                                                      "broker": {"ok": False, "error": "..."}}}}}},
}


@router.get("/readyz", summary="Readiness: database, broker, signer, policy", responses=READINESS)
def readyz(state: StateDep) -> JSONResponse:
    checks: dict[str, Any] = services.readiness(state=state)
    ready = all(c["ok"] for c in checks.values())
    return JSONResponse({"status": "ready" if ready else "not_ready", "checks": checks},
                        status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics")
def metrics(state: StateDep) -> Response:
    services.refresh_queue_metrics(state=state)
    return Response(gateway_metrics.exposition(embedded=state.settings.embedded), media_type=CONTENT_TYPE_LATEST)
