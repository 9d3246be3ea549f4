"""Dashboard pages that change governance state: the review queue and the policy lifecycle."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from gateway import services
from gateway.dashboard.diff import changed_count, side_by_side
from gateway.dashboard.policy_check import Problem, problems_of, validate_source
from gateway.dashboard.web import PREFIX, CsrfDep, DashboardRoute, SignedIn, SignedInDep, render
from gateway.deps import SessionDep, StateDep
from gateway.errors import InvalidPolicy, InvalidRequest
from gateway.schemas import MAX_OFFSET, check_text
from gateway.services import GatewayState

router = APIRouter(prefix=PREFIX, route_class=DashboardRoute, include_in_schema=False)
MAX_POLICY_CHARS = 1_000_000
REASON_MIN = 3
DRY_RUN_LIMIT = 10_000


# --- review queue ---------------------------------------------------------------------------------------


def _review_page(request: Request, session: Any, signed: SignedIn, *, offset: int = 0,
                 errors: dict[str, str] | None = None, values: dict[str, str] | None = None,
                 status_code: int = 200, notice: str | None = None) -> HTMLResponse:
    jobs, total = services.list_review(session=session, principal=signed.principal, limit=50, offset=offset)
    return render(request, "review.html", signed, status_code=status_code, jobs=jobs, total=total,
                  offset=offset, errors=errors or {}, values=values or {}, notice=notice)


@router.get("/review", response_class=HTMLResponse)
def review_queue(request: Request, session: SessionDep, signed: SignedInDep,
                 offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
                 done: Annotated[str, Query(max_length=80)] = "") -> HTMLResponse:
    return _review_page(request, session, signed, offset=offset, notice=done or None)


@router.post("/review/{job_id}", response_class=HTMLResponse)
def review_decide(job_id: str, request: Request, state: StateDep, session: SessionDep, signed: CsrfDep,
                  decision: Annotated[str, Form(max_length=16)] = "",
                  reason: Annotated[str, Form(max_length=2000)] = "") -> Response:
    reason = reason.strip()
    if decision not in ("approve", "reject"):
        raise InvalidRequest(f"decision must be 'approve' or 'reject', not {decision!r}")
    problem = (f"Give a reason of at least {REASON_MIN} characters: it is recorded in the audit log."
               if len(reason) < REASON_MIN else None)
    try:
        check_text(reason, field="The reason")  # as the REST API checks it: no control characters
    except ValueError as exc:
        problem = problem or f"{exc}."
    if problem:
        return _review_page(request, session, signed, status_code=422, values={job_id: reason},
                            errors={job_id: problem})
    job = services.decide_review(state=state, principal=signed.principal, job_id=job_id, decision=decision,
                                 reason=reason)
    verb = "approved" if decision == "approve" else "rejected"
    return RedirectResponse(f"{PREFIX}/review?done={verb}+{job.id[:8]}", status_code=303)


@router.get("/review/{job_id}/images/{index}")
def held_image(job_id: str, index: int, state: StateDep, session: SessionDep, signed: SignedInDep) -> Response:
    """An image output screening held for this review (reviewers only, while the job waits)."""
    data = services.held_image_bytes(state=state, session=session, principal=signed.principal, job_id=job_id,
                                     index=index)
    return Response(data, media_type="image/png", headers={"Cache-Control": "private, no-store"})


# --- policies -------------------------------------------------------------------------------------------


@router.get("/policies", response_class=HTMLResponse)
def policies(request: Request, state: StateDep, signed: SignedInDep,
             offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0) -> HTMLResponse:
    active = services.active_policy(state=state)
    history, total = services.policy_history(state=state, principal=signed.principal, limit=50, offset=offset)
    return render(request, "policies.html", signed, active=active, history=history, total=total,
                  offset=offset)


@router.get("/policies/diff", response_class=HTMLResponse)
def policy_diff(request: Request, state: StateDep, signed: SignedInDep,
                a: Annotated[str, Query(max_length=80)],
                b: Annotated[str, Query(max_length=80)]) -> HTMLResponse:
    old = services.get_policy(state=state, principal=signed.principal, revision=a)
    new = services.get_policy(state=state, principal=signed.principal, revision=b)
    rows = side_by_side(old.source or "", new.source or "")
    return render(request, "policy_diff.html", signed, old=old, new=new, rows=rows,
                  changes=changed_count(rows))


def _editor(request: Request, state: GatewayState, signed: SignedIn, *, source: str, reason: str = "",
            activate: bool = False, problems: list[Problem] | None = None, checked: bool = False,
            dry_run: dict[str, Any] | None = None, status_code: int = 200) -> HTMLResponse:
    active = services.active_policy(state=state)
    bad_lines = {p.line for p in problems or [] if p.line is not None}
    return render(request, "policy_edit.html", signed, status_code=status_code, source=source, reason=reason,
                  activate=activate, problems=problems or [], checked=checked, dry_run=dry_run,
                  active=active, numbered=list(enumerate(source.splitlines(), start=1)), bad_lines=bad_lines)


@router.get("/policies/edit", response_class=HTMLResponse)
def policy_editor(request: Request, state: StateDep, signed: SignedInDep,
                  base: Annotated[str, Query(max_length=80)] = "") -> HTMLResponse:
    signed.principal.require("policy_admin")
    start = services.get_policy(state=state, principal=signed.principal, revision=base) if base else \
        services.active_policy(state=state)
    return _editor(request, state, signed, source=start.source or "")


def _source(source: str) -> str:
    if not source.strip():
        raise InvalidRequest("the policy is empty: paste or write the YAML in the editor")
    if len(source) > MAX_POLICY_CHARS:
        raise InvalidRequest(f"the policy is longer than {MAX_POLICY_CHARS} characters")
    return source.replace("\r\n", "\n")


@router.post("/policies/validate", response_class=HTMLResponse)
def policy_validate(request: Request, state: StateDep, signed: CsrfDep,
                    source: Annotated[str, Form()] = "", reason: Annotated[str, Form(max_length=2000)] = "",
                    activate: Annotated[bool, Form()] = False) -> HTMLResponse:
    signed.principal.require("policy_admin")
    source = _source(source)
    problems = validate_source(source)
    return _editor(request, state, signed, source=source, reason=reason, activate=activate, problems=problems,
                   checked=True, status_code=422 if problems else 200)


@router.post("/policies/dry-run", response_class=HTMLResponse)
def policy_dry_run(request: Request, state: StateDep, signed: CsrfDep,
                   source: Annotated[str, Form()] = "", reason: Annotated[str, Form(max_length=2000)] = "",
                   activate: Annotated[bool, Form()] = False) -> HTMLResponse:
    source = _source(source)
    try:
        result = services.dry_run_policy(state=state, principal=signed.principal, source=source,
                                         limit=DRY_RUN_LIMIT)
    except InvalidPolicy as exc:
        return _editor(request, state, signed, source=source, reason=reason, activate=activate,
                       problems=problems_of(exc), checked=True, status_code=422)
    return _editor(request, state, signed, source=source, reason=reason, activate=activate, checked=True,
                   dry_run=result)


@router.post("/policies", response_class=HTMLResponse)
def policy_save(request: Request, state: StateDep, signed: CsrfDep,
                source: Annotated[str, Form()] = "", reason: Annotated[str, Form(max_length=2000)] = "",
                activate: Annotated[bool, Form()] = False) -> Response:
    signed.principal.require("policy_admin")
    source = _source(source)
    reason = reason.strip()
    if len(reason) < REASON_MIN:
        problems = [Problem("reason", None, f"give a reason of at least {REASON_MIN} characters: it is "
                                            "recorded with the revision and in the audit log")]
        return _editor(request, state, signed, source=source, reason=reason, activate=activate,
                       problems=problems, checked=True, status_code=422)
    try:
        stored = services.create_policy(state=state, principal=signed.principal, source=source,
                                        activate=activate, reason=reason)
    except InvalidPolicy as exc:
        return _editor(request, state, signed, source=source, reason=reason, activate=activate,
                       problems=problems_of(exc), checked=True, status_code=422)
    return RedirectResponse(f"{PREFIX}/policies/{stored.revision}", status_code=303)


@router.get("/policies/{revision}", response_class=HTMLResponse)
def policy_revision(revision: str, request: Request, state: StateDep, signed: SignedInDep) -> HTMLResponse:
    policy = services.get_policy(state=state, principal=signed.principal, revision=revision)
    active = services.active_policy(state=state)
    return render(request, "policy.html", signed, policy=policy, active=active, error=None)


@router.post("/policies/{revision}/activate", response_class=HTMLResponse)
def policy_activate(revision: str, request: Request, state: StateDep, signed: CsrfDep,
                    reason: Annotated[str, Form(max_length=2000)] = "") -> Response:
    signed.principal.require("policy_admin")
    reason = reason.strip()
    if len(reason) < REASON_MIN:
        policy = services.get_policy(state=state, principal=signed.principal, revision=revision)
        return render(request, "policy.html", signed, status_code=422, policy=policy,
                      active=services.active_policy(state=state),
                      error=f"Give a reason of at least {REASON_MIN} characters to activate this revision.")
    stored = services.activate_policy(state=state, principal=signed.principal, revision=revision,
                                      reason=reason)
    return RedirectResponse(f"{PREFIX}/policies/{stored.revision}", status_code=303)
