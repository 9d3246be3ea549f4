"""POST /v1/provenance/verify: the C2PA report, valid signature and trusted signer told apart."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from gateway import services
from gateway.deps import CallerDep, StateDep
from gateway.errors import InvalidRequest
from gateway.routes.generations import BODY_ERRORS

router = APIRouter(prefix="/v1/provenance", tags=["provenance"])
MAX_UPLOAD = 50 * 1024 * 1024
IMAGE_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "image/png": {"schema": {"type": "string", "format": "binary"}},
    "image/jpeg": {"schema": {"type": "string", "format": "binary"}}}}}


@router.post("/verify", response_model=dict[str, Any], responses=BODY_ERRORS, openapi_extra=IMAGE_BODY,
             summary="Verify an image's C2PA manifest (send the image bytes as the body)")
async def verify(request: Request, state: StateDep, caller: CallerDep) -> dict[str, Any]:
    data = await request.body()  # at most MAX_UPLOAD bytes (gateway.main.BodyLimit)
    if not data:
        raise InvalidRequest("send the image bytes as the request body")
    return services.verify_provenance(state=state, principal=caller, data=data)
