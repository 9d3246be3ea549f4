"""GET /v1/review and POST /v1/review/{id}: the human review queue."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from gateway import services
from gateway.deps import CallerDep, SessionDep, StateDep
from gateway.routes.generations import ERRORS, to_public
from gateway.schemas import MAX_OFFSET, ErrorResponse, GenerationPublic, Page, ReviewDecisionIn

router = APIRouter(prefix="/v1/review", tags=["review"])


@router.get("", response_model=Page[GenerationPublic], responses=ERRORS, summary="Pending review items")
def list_review(request: Request, session: SessionDep, caller: CallerDep,
                limit: Annotated[int, Query(ge=1, le=200)] = 50,
                offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0) -> Page[GenerationPublic]:
    jobs, total = services.list_review(session=session, principal=caller, limit=limit, offset=offset)
    return Page[GenerationPublic](data=[to_public(j, request) for j in jobs], count=total)


@router.post("/{job_id}", response_model=GenerationPublic, responses={**ERRORS, 409: {"model": ErrorResponse}},
             summary="Approve or reject with a required reason (409 when the job is not waiting for review)")
def decide(job_id: str, body: ReviewDecisionIn, request: Request, state: StateDep,
           caller: CallerDep) -> GenerationPublic:
    job = services.decide_review(state=state, principal=caller, job_id=job_id, decision=body.decision,
                                 reason=body.reason)
    return to_public(job, request)
