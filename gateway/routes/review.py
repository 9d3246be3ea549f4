"""GET /v1/review and POST /v1/review/{id}: the human review queue."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from audit.models import Job
from gateway import services
from gateway.deps import CallerDep, SessionDep, StateDep
from gateway.routes.generations import ERRORS, image_public, png_response, to_public
from gateway.schemas import MAX_OFFSET, ErrorResponse, GenerationPublic, Page, ReviewDecisionIn, ReviewItem

router = APIRouter(prefix="/v1/review", tags=["review"])


def to_review_item(job: Job, request: Request) -> ReviewItem:
    base = str(request.base_url).rstrip("/")
    held = [image_public(i, f"{base}/v1/review/{job.id}/images/{i['index']}") for i in services.held_images(job)]
    return ReviewItem(**to_public(job, request).model_dump(), held_images=held)


@router.get("", response_model=Page[ReviewItem], responses=ERRORS, summary="Pending review items")
def list_review(request: Request, session: SessionDep, caller: CallerDep,
                limit: Annotated[int, Query(ge=1, le=200)] = 50,
                offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0) -> Page[ReviewItem]:
    jobs, total = services.list_review(session=session, principal=caller, limit=limit, offset=offset)
    return Page[ReviewItem](data=[to_review_item(j, request) for j in jobs], count=total)


@router.get("/{job_id}/images/{index}", responses={200: {"content": {"image/png": {}}}, **ERRORS},
            response_class=Response, summary="An image held for review (signed; its manifest says it is held)")
def get_held_image(job_id: str, index: int, state: StateDep, session: SessionDep, caller: CallerDep) -> Response:
    data = services.held_image_bytes(state=state, session=session, principal=caller, job_id=job_id, index=index)
    return png_response(data, f"{job_id}-{index}-held.png")


@router.post("/{job_id}", response_model=GenerationPublic, responses={**ERRORS, 409: {"model": ErrorResponse}},
             summary="Approve or reject with a required reason (409 when the job is not waiting for review)")
def decide(job_id: str, body: ReviewDecisionIn, request: Request, state: StateDep,
           caller: CallerDep) -> GenerationPublic:
    job = services.decide_review(state=state, principal=caller, job_id=job_id, decision=body.decision,
                                 reason=body.reason)
    return to_public(job, request)
