"""Assembles the app: lifespan, middleware, routers, error handlers."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from audit.db import describe_fault
from gateway import dashboard, metrics
from gateway.errors import ApiError, ServiceUnavailable, validation_message
from gateway.routes import audit, generations, health, models, moderations, policies, provenance, review
from gateway.settings import Settings, get_settings
from gateway.state import build_state, close_state, warm_up
from generator.artifacts import ArtifactError
from generator.pipeline import freeze_heap

log = logging.getLogger("gateway")

# A database that cannot be reached or cannot answer in time: refused or lost connections, an exhausted pool,
# a lock held too long. Other database errors are bugs and stay 500s.
DATABASE_DOWN: tuple[type[Exception], ...] = (OperationalError, InterfaceError, DisconnectionError, PoolTimeout)
HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
              405: "method_not_allowed", 406: "not_acceptable", 409: "conflict", 413: "payload_too_large",
              415: "unsupported_media_type", 422: "invalid_request", 429: "rate_limited",
              503: "service_unavailable"}


def error_response(status: int, code: str, message: str, request_id: str,
                   details: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message, "request_id": request_id}
    if details:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def _rid(request: Request) -> str:
    return str(getattr(request.state, "request_id", "")) or str(uuid.uuid4())


def body_limit(path: str, json_limit: int) -> tuple[int, str] | None:
    """The most bytes a request body to `path` may have, and what to call it: uploads to verify and policy YAML
    have their own room, the dashboard's forms and uploads are checked by its pages, every other route reads
    JSON (`json_limit`). Read at each request, so that a changed limit takes effect."""
    if path.startswith("/v1/provenance/"):
        return provenance.MAX_UPLOAD, "the upload"
    if path.startswith("/v1/policies"):
        return policies.MAX_POLICY_BYTES, "the policy body"
    if path.startswith("/dashboard/"):
        return None
    return json_limit, "the request body"


class BodyLimit:
    """Refuses a request body over its `body_limit` (413) before a route has it, whatever its Content-Type says
    (the JSON routes read any body whole first): unread when its Content-Length says so, and as soon as it passes
    the limit while streaming in (a chunked body declares no length). Pure ASGI, so that bodies are not
    buffered a second time."""

    def __init__(self, app: ASGIApp, json_limit: int) -> None:
        self.app, self.json_limit = app, json_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = body_limit(scope["path"], self.json_limit) if scope["type"] == "http" else None
        if limit is None:
            await self.app(scope, receive, send)
            return
        most, what = limit
        # An HTTPException, because FastAPI's body parsing re-raises those (anything else there becomes a 400).
        too_large = StarletteHTTPException(413, f"{what} is larger than {most} bytes")
        declared = Headers(scope=scope).get("content-length", "")
        received = 0

        async def receive_within_limit() -> Message:
            nonlocal received
            if declared.isdigit() and int(declared) > most:  # refused unread
                raise too_large
            message = await receive()
            received += len(message.get("body", b""))
            if received > most:
                raise too_large
            return message

        await self.app(scope, receive_within_limit, send)


def _warm_up(app: FastAPI) -> None:
    try:
        warm_up(app.state.gateway)
        try:
            dashboard.views.warm_overview_cache(app)
        except Exception:  # only a cache: the page computes what is missing when it is opened
            log.warning("could not warm the dashboard overview cache", exc_info=True)
        log.info("warm-up done", extra={"frozen_objects": freeze_heap()})
    except Exception:  # the first request loads what is missing, and reports any real fault itself
        log.exception("warm-up failed")
    finally:
        app.state.gateway.warmed.set()


def create_app(settings: Settings | None = None, state: Any = None, warm: bool = False) -> FastAPI:
    """The gateway app. `serve` and tests may pass a prebuilt `state` (a `services.GatewayState`), which its
    builder closes; `warm` loads its models in the background (not ready until then), as an owned one does."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = state is None
        app.state.gateway = state if state is not None else build_state(settings or get_settings())
        if owned or warm:  # a served gateway loads its models before the first request needs them
            app.state.gateway.warmed = threading.Event()
            threading.Thread(target=_warm_up, args=(app,), name="warm-up", daemon=True).start()
        try:
            yield
        finally:
            if owned:
                close_state(app.state.gateway)

    app = FastAPI(title="llamagen-gateway", version="0.1.0", lifespan=lifespan,
                  description="Governed LlamaGen image generation: screened, signed with C2PA, audited.")

    # Added before request_context, so inside it: a 413 gets the request id and is logged and counted.
    app.add_middleware(BodyLimit, json_limit=(settings or get_settings()).max_json_body_bytes)

    @app.middleware("http")
    async def request_context(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        incoming = request.headers.get("x-request-id", "")
        request.state.request_id = incoming if 0 < len(incoming) <= 64 and incoming.isprintable() else str(uuid.uuid4())
        started = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:  # last resort: the error body, never a bare traceback
            log.exception("unhandled error", extra={"request_id": request.state.request_id})
            response = error_response(500, "internal_error", "internal error; see the gateway log",
                                      request.state.request_id)
        elapsed = time.perf_counter() - started
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        principal = getattr(request.state, "principal", None)  # set by authentication (deps.get_caller)
        metrics.observe_request(request.method, path, response.status_code, elapsed,
                                team=principal.team if principal else "", model=getattr(request.state, "model", ""))
        response.headers["X-Request-ID"] = request.state.request_id
        log.info("request", extra={"request_id": request.state.request_id, "method": request.method,
                                   "path": path, "status": response.status_code,
                                   "ms": round(elapsed * 1000, 1)})
        return response

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, _rid(request), exc.details, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid_request", validation_message(exc), _rid(request))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), _rid(request),
                              headers=dict(exc.headers or {}))

    @app.exception_handler(ArtifactError)
    async def artifact_store_down(request: Request, exc: ArtifactError) -> JSONResponse:
        # Its text can name the store's endpoint: it goes to the log, not to the caller.
        log.warning("artifact store error: %s", exc, extra={"request_id": _rid(request)})
        return error_response(503, ServiceUnavailable.code, "the artifact store cannot return it; see the gateway log",
                              _rid(request))

    async def database_down(request: Request, exc: Exception) -> JSONResponse:
        # The driver's text can hold SQL and the database's address: it goes to the log, not to the caller.
        fault = describe_fault(exc)
        log.warning("database %s: %s", fault.kind, exc, extra={"request_id": _rid(request)})
        return error_response(503, ServiceUnavailable.code, fault.message, _rid(request), headers=fault.headers)

    for error in DATABASE_DOWN:
        app.add_exception_handler(error, database_down)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", extra={"request_id": _rid(request)})
        return error_response(500, "internal_error", "internal error; see the gateway log", _rid(request))

    @app.get("/", include_in_schema=False)
    async def home() -> RedirectResponse:
        return RedirectResponse("/dashboard", status_code=307)

    for module in (generations, moderations, models, policies, review, audit, provenance, health):
        app.include_router(module.router)
    app.include_router(dashboard.router)
    app.mount(dashboard.STATIC_PATH, StaticFiles(directory=dashboard.STATIC_DIR), name="dashboard-static")
    return app
