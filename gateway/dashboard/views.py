"""Dashboard pages: sign-in, overview, audit explorer, models, provenance; data from services and stats."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from gateway import services, stats
from gateway.auth import authenticate
from gateway.dashboard.sessions import LOGIN_COOKIE, LOGIN_TTL_S, SESSION_COOKIE, sign_out
from gateway.dashboard.web import (
    PREFIX,
    CsrfDep,
    DashboardRoute,
    SignedIn,
    SignedInDep,
    SignInRequired,
    codec,
    get_signed_in,
    overview_cache,
    parse_utc,
    render,
)
from gateway.deps import SessionDep, StateDep
from gateway.errors import InvalidRequest, NotFound, Unauthorized
from generator.artifacts import ArtifactError

router = APIRouter(prefix=PREFIX, route_class=DashboardRoute, include_in_schema=False)
WINDOWS = {"24h": timedelta(hours=24), "7d": timedelta(days=7), "30d": timedelta(days=30),
           "90d": timedelta(days=90)}
MAX_UPLOAD_BYTES = 20 * 1024 * 1024


def _cookie_args(request: Request) -> dict[str, Any]:
    return {"httponly": True, "samesite": "strict", "secure": request.url.scheme == "https", "path": PREFIX}


def _safe_next(target: str | None) -> str | None:
    """Only same-site dashboard paths: never an open redirect."""
    if target and target.startswith(PREFIX + "/") and not target.startswith("//") and "\\" not in target:
        return target
    return None


# --- sign-in --------------------------------------------------------------------------------------------


@router.get("", response_class=HTMLResponse)
def home(signed: SignedInDep) -> RedirectResponse:
    return RedirectResponse(signed.home(), status_code=303)


def _login_page(request: Request, state: StateDep, *, error: str | None, status: int,
                next_path: str | None) -> HTMLResponse:
    token = codec(state).login_token()
    response = render(request, "login.html", None, status_code=status, login_token=token, error=error,
                      next_path=_safe_next(next_path) or "")
    response.set_cookie(LOGIN_COOKIE, token, max_age=LOGIN_TTL_S, **_cookie_args(request))
    return response


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, state: StateDep, next: str | None = None) -> Response:
    try:
        signed = get_signed_in(request, state)
        return RedirectResponse(_safe_next(next) or signed.home(), status_code=303)
    except SignInRequired:  # no session, or a stale one: show the form
        return _login_page(request, state, error=None, status=200, next_path=next)


@router.post("/login", response_class=HTMLResponse)
def login(request: Request, state: StateDep, api_key: Annotated[str, Form(max_length=256)] = "",
          login_token: Annotated[str, Form(max_length=256)] = "",
          next: Annotated[str, Form(max_length=2048)] = "") -> Response:
    sessions = codec(state)
    if not sessions.check_login_token(request.cookies.get(LOGIN_COOKIE), login_token):
        return _login_page(request, state, status=400, next_path=next,
                           error="The sign-in form expired or was not sent from this site. Try again.")
    try:
        with state.ctx.sessions() as db:
            principal = authenticate(db, api_key.strip())
    except Unauthorized as exc:
        return _login_page(request, state, error=f"Sign-in failed: {exc.message}.", status=401,
                           next_path=next)
    cookie, session = sessions.issue(principal.key_id)
    signed = SignedIn(principal, session, sessions.csrf_token(session))
    response = RedirectResponse(_safe_next(next) or signed.home(), status_code=303)
    response.set_cookie(SESSION_COOKIE, cookie, max_age=sessions.ttl_s, **_cookie_args(request))
    response.delete_cookie(LOGIN_COOKIE, **_cookie_args(request))
    return response


@router.post("/logout")
def logout(request: Request, state: StateDep, signed: CsrfDep) -> RedirectResponse:
    with state.ctx.sessions() as db, db.begin():
        sign_out(db, signed.session)
    response = RedirectResponse(f"{PREFIX}/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, **_cookie_args(request))
    return response


# --- overview -------------------------------------------------------------------------------------------


@router.get("/overview", response_class=HTMLResponse)
def overview(request: Request, session: SessionDep, signed: SignedInDep,
             window: Annotated[str, Query(max_length=8)] = "7d") -> HTMLResponse:
    if window not in WINDOWS:
        raise InvalidRequest(f"unknown window {window!r}; choose one of {', '.join(WINDOWS)}")
    until = datetime.now(UTC)
    span = WINDOWS[window]
    data = stats.overview(session=session, principal=signed.principal, since=until - span, until=until,
                          bucket="hour" if span <= timedelta(days=2) else "day",
                          cache=overview_cache(request))
    return render(request, "overview.html", signed, data=data, window=window, windows=list(WINDOWS),
                  chart_data=data.chart_data(), outcomes=stats.OUTCOMES)


def warm_overview_cache(app: Any) -> None:
    """Fill the closed-bucket cache for every overview window, so the first page view is as fast as the rest."""
    from gateway.auth import SYSTEM

    state = app.state.gateway
    cache = app.state.overview_cache = getattr(app.state, "overview_cache", None) or stats.OverviewCache()
    until = datetime.now(UTC)
    with state.ctx.sessions() as session:
        for span in WINDOWS.values():
            stats.overview(session=session, principal=SYSTEM, since=until - span, until=until,
                           bucket="hour" if span <= timedelta(days=2) else "day", cache=cache)


# --- audit explorer -------------------------------------------------------------------------------------


@router.get("/audit", response_class=HTMLResponse)
def audit_explorer(request: Request, state: StateDep, session: SessionDep, signed: SignedInDep,
                   since: Annotated[str, Query(max_length=40)] = "",
                   until: Annotated[str, Query(max_length=40)] = "",
                   team: Annotated[str, Query(max_length=128)] = "",
                   model: Annotated[str, Query(max_length=128)] = "",
                   action: Annotated[str, Query(max_length=64)] = "",
                   rule: Annotated[str, Query(max_length=128)] = "",
                   q: Annotated[str, Query(max_length=200)] = "",
                   before: Annotated[int | None, Query(ge=1, le=2**62)] = None,
                   limit: Annotated[int, Query(ge=1, le=200)] = 50) -> HTMLResponse:
    form = {"since": since, "until": until, "team": team, "model": model, "action": action, "rule": rule,
            "q": q}
    errors: dict[str, str] = {}
    bounds: dict[str, datetime | None] = {}
    for name in ("since", "until"):
        try:
            bounds[name] = parse_utc(form[name], name)
        except InvalidRequest as exc:
            errors[name] = exc.message
            bounds[name] = None
    filters = stats.EventFilters(since=bounds["since"], until=bounds["until"], team=team or None,
                                 model=model or None, action=action or None, rule=rule or None,
                                 text=q or None)
    page = stats.search_events(session=session, principal=signed.principal, filters=filters, limit=limit,
                               before=before)
    query: dict[str, Any] = {k: v for k, v in form.items() if v}
    if limit != 50:  # paging keeps the page size asked for
        query["limit"] = limit
    context: dict[str, Any] = {"page": page, "form": form, "errors": errors, "query": query, "limit": limit,
               "before": before}
    if request.headers.get("hx-request") == "true" and request.headers.get("hx-target") == "results":
        return render(request, "audit_results.html", signed, **context)
    actions = stats.event_actions(session=session, principal=signed.principal)
    teams = stats.event_teams(session=session, principal=signed.principal)
    return render(request, "audit.html", signed, actions=actions, teams=teams,
                  models=[c["name"] for c in services.list_models(state=state)], **context)


@router.get("/audit/verify", response_class=HTMLResponse)
def audit_verify(request: Request, state: StateDep, session: SessionDep, signed: SignedInDep) -> HTMLResponse:
    report = services.verify_audit(state=state, session=session, principal=signed.principal)
    return render(request, "verify.html", signed, report=report)


@router.get("/audit/events/{event_id}", response_class=HTMLResponse)
def audit_event(event_id: str, request: Request, state: StateDep, session: SessionDep,
                signed: SignedInDep) -> HTMLResponse:
    detail = stats.event_detail(session=session, principal=signed.principal, event_id=event_id)
    payload = detail.event["payload"] or {}
    provenance = None
    image_url = None
    artifact_error = None
    if detail.event["action"] == "image.released" and detail.event["job_id"]:
        index = int(payload.get("index", 0))
        try:  # the stored bytes as they are: the provenance report says whether they match the record
            data = services.stored_image(state=state, session=session, principal=signed.principal,
                                         job_id=detail.event["job_id"], index=index)
        except (ArtifactError, NotFound) as exc:
            artifact_error = str(exc)
        else:
            provenance = services.verify_provenance(state=state, principal=signed.principal, data=data)
            image_url = f"{PREFIX}/generations/{detail.event['job_id']}/images/{index}"
    model_name = (detail.job.model if detail.job is not None else None) or payload.get("model")
    card = None
    if model_name:
        try:
            card = services.get_model(state=state, name=str(model_name))
        except NotFound:
            card = None
    return render(request, "event.html", signed, detail=detail, payload=payload, provenance=provenance,
                  image_url=image_url, artifact_error=artifact_error, card=card, rules=stats.fired_rules(payload))


@router.get("/generations/{job_id}/images/{index}")
def generation_image(job_id: str, index: int, state: StateDep, session: SessionDep,
                     signed: SignedInDep) -> Response:
    data = services.image_bytes(state=state, session=session, principal=signed.principal, job_id=job_id,
                                index=index)
    return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})


# --- models and provenance ------------------------------------------------------------------------------


@router.get("/models", response_class=HTMLResponse)
def models(request: Request, state: StateDep, signed: SignedInDep) -> HTMLResponse:
    return render(request, "models.html", signed, cards=services.list_models(state=state))


@router.get("/models/{name}", response_class=HTMLResponse)
def model_card(name: str, request: Request, state: StateDep, signed: SignedInDep) -> HTMLResponse:
    return render(request, "model.html", signed, card=services.get_model(state=state, name=name))


@router.get("/provenance", response_class=HTMLResponse)
def provenance_form(request: Request, signed: SignedInDep) -> HTMLResponse:
    return render(request, "provenance.html", signed, report=None, filename=None, error=None)


@router.post("/provenance", response_class=HTMLResponse)
async def provenance_check(request: Request, state: StateDep, signed: CsrfDep,
                           image: Annotated[UploadFile, File()]) -> HTMLResponse:
    data = await image.read(MAX_UPLOAD_BYTES + 1)
    if len(data) > MAX_UPLOAD_BYTES:
        raise InvalidRequest(f"the upload is larger than {MAX_UPLOAD_BYTES // (1024 * 1024)} MB")
    try:
        report = services.verify_provenance(state=state, principal=signed.principal, data=data)
    except InvalidRequest as exc:
        return render(request, "provenance.html", signed, status_code=422, report=None,
                      filename=image.filename, error=exc.message)
    return render(request, "provenance.html", signed, report=report, filename=image.filename, error=None)
