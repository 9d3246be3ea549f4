"""Policy lifecycle: the active policy, history, new revisions, activation and dry-run replay."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from gateway import services
from gateway.deps import CallerDep, StateDep
from gateway.errors import InvalidRequest
from gateway.routes.generations import BODY_ERRORS, ERRORS
from gateway.schemas import MAX_OFFSET, Page, PolicyPublic

router = APIRouter(prefix="/v1/policies", tags=["policies"])
EXAMPLE_POLICY = """\
id: example
version: "1.0.0"
description: Blocks two words; everything else is allowed.
prompt:
  lexical:
    - id: forbidden_words
      description: Words this policy blocks.
      action: block
      message: The prompt uses a forbidden word.
      words: [gore, forbidden]
"""
YAML_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "application/yaml": {"schema": {"type": "string"}, "example": EXAMPLE_POLICY}}}}
MAX_POLICY_BYTES = 1_000_000


async def _yaml_body(request: Request) -> str:
    raw = await request.body()  # at most MAX_POLICY_BYTES (gateway.main.BodyLimit)
    if not raw:
        raise InvalidRequest("send the policy YAML as the request body (Content-Type: application/yaml)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest("policy body is not UTF-8 text") from exc


@router.get("/active", response_model=PolicyPublic, responses=ERRORS, summary="The active policy")
def active_policy(state: StateDep, caller: CallerDep) -> PolicyPublic:
    return services.active_policy(state=state)


@router.get("", response_model=Page[PolicyPublic], responses=ERRORS, summary="Policy history")
def policy_history(state: StateDep, caller: CallerDep, limit: Annotated[int, Query(ge=1, le=200)] = 50,
                   offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0) -> Page[PolicyPublic]:
    rows, total = services.policy_history(state=state, principal=caller, limit=limit, offset=offset)
    return Page[PolicyPublic](data=rows, count=total)


@router.post("/dry-run", response_model=dict[str, Any], responses=BODY_ERRORS, openapi_extra=YAML_BODY,
             summary="Replay a candidate policy over stored history")
async def dry_run(request: Request, state: StateDep, caller: CallerDep,
                  limit: Annotated[int, Query(ge=1, le=100_000)] = 10_000) -> dict[str, Any]:
    source = await _yaml_body(request)
    return services.dry_run_policy(state=state, principal=caller, source=source, limit=limit)


@router.get("/{revision}", response_model=PolicyPublic, responses=ERRORS, summary="One revision")
def get_policy(revision: str, state: StateDep, caller: CallerDep) -> PolicyPublic:
    return services.get_policy(state=state, principal=caller, revision=revision)


@router.post("", status_code=201, response_model=PolicyPublic, responses=BODY_ERRORS, openapi_extra=YAML_BODY,
             summary="Validate and store a policy revision (optionally activate it)")
async def create_policy(request: Request, state: StateDep, caller: CallerDep,
                        activate: bool = False,
                        reason: Annotated[str, Query(min_length=3, max_length=2000)] = "no reason given"
                        ) -> PolicyPublic:
    source = await _yaml_body(request)
    return services.create_policy(state=state, principal=caller, source=source, activate=activate,
                                  reason=reason)


@router.post("/{revision}/activate", response_model=PolicyPublic, responses=ERRORS,
             summary="Activate a stored revision")
def activate_policy(revision: str, state: StateDep, caller: CallerDep,
                    reason: Annotated[str, Query(min_length=3, max_length=2000)]) -> PolicyPublic:
    return services.activate_policy(state=state, principal=caller, revision=revision, reason=reason)
