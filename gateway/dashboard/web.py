"""The dashboard's plumbing: templates, the signed-in caller, CSRF checks and HTML error pages."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.auth import Principal
from gateway.dashboard.sessions import (
    CSRF_FIELD,
    CSRF_HEADER,
    SESSION_COOKIE,
    DashboardSession,
    SessionCodec,
    principal_of,
)
from gateway.deps import StateDep
from gateway.errors import ApiError, Forbidden, InvalidRequest, Unauthorized, validation_message
from gateway.services import GatewayState
from gateway.stats import OverviewCache

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
STATIC_DIR = HERE / "static"
PREFIX = "/dashboard"
SECURITY_HEADERS = {
    # Everything is served by the gateway itself: no CDN, no inline script, no framing.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
                               "script-src 'self'; object-src 'none'; frame-ancestors 'none'; "
                               "form-action 'self'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

# (label, path, roles that see it); admin sees everything.
NAV: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("Overview", "/overview", ("auditor", "policy_admin")),
    ("Audit log", "/audit", ("auditor",)),
    ("Review queue", "/review", ("reviewer",)),
    ("Policies", "/policies", ("auditor", "policy_admin")),
    ("Models", "/models", ("creator", "reviewer", "auditor", "policy_admin")),
    ("Provenance", "/provenance", ("creator", "reviewer", "auditor", "policy_admin")),
)


class SignInRequired(Exception):
    """No valid session: the browser is sent to the sign-in page."""


@dataclass(frozen=True)
class SignedIn:
    """The dashboard caller: the key's principal, its session and the CSRF token for its forms."""

    principal: Principal
    session: DashboardSession
    csrf: str

    def can(self, *roles: str) -> bool:
        return self.principal.role == "admin" or self.principal.role in roles

    def nav(self) -> list[tuple[str, str]]:
        return [(label, PREFIX + path) for label, path, roles in NAV if self.can(*roles)]

    def home(self) -> str:
        links = self.nav()
        return links[0][1] if links else PREFIX + "/models"


def codec(state: GatewayState) -> SessionCodec:
    return SessionCodec(state.settings.session_secret.get_secret_value())


def _fmt_ts(value: Any) -> str:
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return str(value or "")


def _short(value: Any, n: int = 12) -> str:
    text = str(value or "")
    return text if len(text) <= n else text[:n] + "…"


def _pct(value: float) -> str:
    return f"{value * 100:.1f}%"


templates = Jinja2Templates(directory=str(HERE / "templates"))
templates.env.filters.update(ts=_fmt_ts, short=_short, pct=_pct)
templates.env.globals.update(prefix=PREFIX, csrf_field=CSRF_FIELD)


def render(request: Request, name: str, signed: SignedIn | None, status_code: int = 200,
           **context: Any) -> HTMLResponse:
    """The template `name` with the signed-in caller as `me` (None on the sign-in and error pages)."""
    return templates.TemplateResponse(request, name, {"me": signed, **context}, status_code=status_code)


def overview_cache(request: Request) -> OverviewCache:
    """The app's cache of closed overview buckets (created on first use)."""
    cache: OverviewCache | None = getattr(request.app.state, "overview_cache", None)
    if cache is None:
        cache = OverviewCache()
        request.app.state.overview_cache = cache
    return cache


def get_signed_in(request: Request, state: StateDep) -> SignedIn:
    """The caller behind the session cookie; a missing, forged, expired or revoked session signs in again."""
    sessions = codec(state)
    session = sessions.read(request.cookies.get(SESSION_COOKIE))
    if session is None:
        raise SignInRequired()
    with state.ctx.sessions() as db:
        principal = principal_of(db, session)
    if principal is None:
        raise SignInRequired()
    request.state.principal = principal
    return SignedIn(principal=principal, session=session, csrf=sessions.csrf_token(session))


SignedInDep = Annotated[SignedIn, Depends(get_signed_in)]


async def require_csrf(request: Request, state: StateDep, signed: SignedInDep) -> SignedIn:
    """Every state-changing dashboard request carries the session's CSRF token (form field or header)."""
    token = request.headers.get(CSRF_HEADER)
    if token is None:
        form = await request.form()
        value = form.get(CSRF_FIELD)
        token = value if isinstance(value, str) else None
    if not codec(state).check_csrf(signed.session, token):
        raise Forbidden("the form's CSRF token is missing or does not match your session: reload the page "
                        "and submit again")
    return signed


CsrfDep = Annotated[SignedIn, Depends(require_csrf)]


def sign_in_redirect(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    if request.method != "GET":
        target = PREFIX
    return RedirectResponse(f"{PREFIX}/login?next={quote(target)}", status_code=303)


class DashboardRoute(APIRoute):
    """Routes that answer in HTML: sign-in redirects, error pages and security headers."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def html_handler(request: Request) -> Response:
            try:
                response = await handler(request)
            except (SignInRequired, Unauthorized):
                response = sign_in_redirect(request)
            except ApiError as exc:
                response = error_page(request, exc.status, exc.message)
            except RequestValidationError as exc:  # a query or form field out of range: a page, not JSON
                response = error_page(request, 422, validation_message(exc))
            except StarletteHTTPException as exc:  # e.g. a form field past the multipart parser's size limit
                response = error_page(request, exc.status_code, str(exc.detail))
            for name, value in SECURITY_HEADERS.items():
                response.headers.setdefault(name, value)
            return response

        return html_handler


def error_page(request: Request, status: int, message: str) -> HTMLResponse:
    titles = {400: "Bad request", 403: "Not allowed", 404: "Not found", 409: "Conflict",
              422: "Cannot accept this", 503: "Service unavailable"}
    signed = None
    try:
        state: GatewayState = request.app.state.gateway
        session = codec(state).read(request.cookies.get(SESSION_COOKIE))
        if session is not None:
            with state.ctx.sessions() as db:
                principal = principal_of(db, session)
            if principal is not None:
                signed = SignedIn(principal, session, codec(state).csrf_token(session))
    except Exception:  # the error page must render even when the database is the problem
        log.warning("error page rendered without the caller's session", exc_info=True)
    return render(request, "error.html", signed, status_code=status, status=status,
                  title=titles.get(status, "Error"), message=message)


def parse_utc(value: str | None, field: str) -> datetime | None:
    """A `datetime-local` form value (read as UTC) or an ISO-8601 timestamp; '' means no bound."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise InvalidRequest(f"{field}: {value!r} is not a date and time (YYYY-MM-DDTHH:MM, UTC)") from exc
    try:
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    except OverflowError as exc:  # e.g. 0001-01-01T00:00+01:00 is before the first representable UTC time
        raise InvalidRequest(f"{field}: {value!r} is out of range once converted to UTC") from exc
