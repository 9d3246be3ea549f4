"""POST /v1/moderations: screen a prompt only."""

from __future__ import annotations

from fastapi import APIRouter, Request

from gateway import services
from gateway.deps import CallerDep, RequestIdDep, StateDep
from gateway.routes.generations import ERRORS, note_model
from gateway.schemas import ModerationCreate, ModerationPublic

router = APIRouter(prefix="/v1/moderations", tags=["moderations"])


@router.post("", response_model=ModerationPublic, responses=ERRORS, summary="Screen a prompt (audited)")
def create_moderation(body: ModerationCreate, request: Request, state: StateDep, caller: CallerDep,
                      request_id: RequestIdDep) -> ModerationPublic:
    note_model(request, state, body.model)
    return ModerationPublic(**services.moderate(state=state, principal=caller, request=body,
                                                request_id=request_id))
