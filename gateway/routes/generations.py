"""POST/GET /v1/generations and the signed images."""

from __future__ import annotations

from typing import Annotated, Any, cast

from fastapi import APIRouter, Query, Request, Response

from audit.models import Job
from gateway import services
from gateway.deps import CallerDep, RequestIdDep, SessionDep, StateDep
from gateway.schemas import MAX_OFFSET, ErrorResponse, GenerationCreate, GenerationPublic, ImagePublic, Page, Status
from gateway.services import GatewayState
from generator.registry import RegistryError

router = APIRouter(prefix="/v1/generations", tags=["generations"])
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 422, 429, 503)}
BODY_ERRORS: dict[int | str, dict[str, Any]] = {**ERRORS, 413: {"model": ErrorResponse}}  # raw bodies with a limit


def note_model(request: Request, state: GatewayState, name: str | None) -> None:
    """Name the requested model on the request for the metrics as the registry knows it, "" when it has no card
    (a name taken from the body would let any caller create label values)."""
    try:
        request.state.model = state.ctx.registry.get(name or state.settings.default_model).name
    except RegistryError:
        request.state.model = ""


def image_public(image: dict[str, Any], url: str) -> ImagePublic:
    """An image of a job's row as the API shows it, fetched from `url`."""
    return ImagePublic(index=image["index"], sha256=image["sha256"], manifest_id=image["manifest_id"],
                       audit_event_id=image["event_id"], width=image["width"], height=image["height"], url=url)


def to_public(job: Job, request: Request) -> GenerationPublic:
    base = str(request.base_url).rstrip("/")
    images = [image_public(i, f"{base}/v1/generations/{job.id}/images/{i['index']}")
              for i in services.released_images(job)]
    return GenerationPublic(id=job.id, status=cast(Status, job.status), model=job.model,
                            model_card_hash=job.model_card_hash,
                            team=job.team, task=job.task, prompt=job.prompt, class_id=job.class_id,
                            params=job.params, policy_revision=job.policy_revision, decisions=job.decisions,
                            images=images, error=job.error, timings=job.timings or {}, cost=job.cost or {},
                            review=job.review, created_at=job.created_at, updated_at=job.updated_at)


@router.post("", status_code=202, response_model=GenerationPublic, responses=ERRORS,
             summary="Submit a governed generation")
def create_generation(body: GenerationCreate, request: Request, state: StateDep, caller: CallerDep,
                      request_id: RequestIdDep) -> GenerationPublic:
    note_model(request, state, body.model)
    job = services.submit_generation(state=state, principal=caller, request=body, request_id=request_id)
    return to_public(job, request)


@router.get("", response_model=Page[GenerationPublic], responses=ERRORS, summary="List generations")
def list_generations(request: Request, session: SessionDep, caller: CallerDep,
                     status: Status | None = None,
                     limit: Annotated[int, Query(ge=1, le=200)] = 50,
                     offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
                     before: Annotated[str | None, Query(max_length=64, description=(
                         "a job id: the page starts after it (use `next_before` of the previous page)"))] = None,
                     ) -> Page[GenerationPublic]:
    jobs, total = services.list_generations(session=session, principal=caller, status=status, limit=limit,
                                            offset=offset, before=before)
    return Page[GenerationPublic](data=[to_public(j, request) for j in jobs], count=total,
                                  next_before=jobs[-1].id if len(jobs) == limit else None)


@router.get("/{job_id}", response_model=GenerationPublic, responses=ERRORS, summary="Status, decisions, images")
async def get_generation(
    job_id: str, request: Request, state: StateDep, caller: CallerDep,
    wait: Annotated[float, Query(ge=0, le=60, description="long-poll: answer when the job is no longer queued "
                                 "or running, or after this many seconds (0: at once)", examples=[30])] = 0,
) -> GenerationPublic:
    job = await services.wait_for_generation(state=state, principal=caller, job_id=job_id, wait_s=wait)
    return to_public(job, request)


@router.get("/{job_id}/images/{index}", responses={200: {"content": {"image/png": {}}}, **ERRORS},
            response_class=Response, summary="The signed PNG (C2PA manifest embedded)")
def get_image(job_id: str, index: int, state: StateDep, session: SessionDep, caller: CallerDep) -> Response:
    data = services.image_bytes(state=state, session=session, principal=caller, job_id=job_id, index=index)
    return png_response(data, f"{job_id}-{index}.png")


def png_response(data: bytes, filename: str) -> Response:
    return Response(content=data, media_type="image/png",
                    headers={"Content-Disposition": f'inline; filename="{filename}"'})
