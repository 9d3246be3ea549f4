"""Dependency aliases, declared once: state, settings, database session and the authenticated caller."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from audit.db import describe_fault
from gateway.auth import Principal, authenticate
from gateway.errors import ServiceUnavailable, Unauthorized
from gateway.services import GatewayState
from gateway.settings import Settings

log = logging.getLogger(__name__)


def get_state(request: Request) -> GatewayState:
    state: GatewayState | None = getattr(request.app.state, "gateway", None)
    if state is None:
        raise ServiceUnavailable("the gateway is still starting")
    return state


StateDep = Annotated[GatewayState, Depends(get_state)]


def get_settings_dep(state: StateDep) -> Settings:
    return state.settings


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


def get_session(state: StateDep) -> Iterator[Session]:
    with state.ctx.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if header and scheme.lower() != "bearer":
        raise Unauthorized("use 'Authorization: Bearer <key>'")
    return token.strip() or None


# Declares the scheme in OpenAPI (the Authorize button in /docs, security on each operation); `bearer_token`
# reads the header itself, so that a missing or malformed one gets the gateway's own 401 messages.
BEARER = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer <key>`")


def get_caller(request: Request, state: StateDep,
               _declared: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)]) -> Principal:
    token = bearer_token(request)
    try:
        with state.ctx.sessions() as session:
            principal = authenticate(session, token)
    except Unauthorized:
        raise
    except Exception as exc:  # the key store is the database: if it is down, say so (503), never 500
        log.warning("authentication could not read the key store: %s", exc)  # driver text: SQL, host, port
        fault = describe_fault(exc)
        raise ServiceUnavailable(fault.message, headers=fault.headers) from exc
    request.state.principal = principal
    return principal


CallerDep = Annotated[Principal, Depends(get_caller)]


def request_id(request: Request) -> str:
    return str(getattr(request.state, "request_id", ""))


RequestIdDep = Annotated[str, Depends(request_id)]

