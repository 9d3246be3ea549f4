"""API keys (hashed at rest), roles and team scoping."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from audit.log import append_event
from audit.models import ApiKey
from gateway.errors import Forbidden, NotFound, Unauthorized

ROLES = ("creator", "reviewer", "auditor", "policy_admin", "admin")
KEY_PREFIX = "lgw"


@dataclass(frozen=True)
class Principal:
    """The authenticated caller."""

    key_id: str
    role: str
    team: str

    def require(self, *roles: str) -> None:
        if self.role != "admin" and self.role not in roles:
            raise Forbidden(f"role {self.role!r} may not do this; needs one of: {', '.join(roles)}")

    def can_see_team(self, team: str) -> bool:
        return self.role in ("admin", "auditor", "reviewer") or self.team == team


SYSTEM = Principal(key_id="system", role="admin", team="org")


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(session: Session, *, role: str, team: str, name: str = "", created_by: str = "cli") -> str:
    """Create a key and return it in full; only its SHA-256 is stored, so it is shown once."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
    if not team or not team.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"team {team!r} must be letters, digits, '-' or '_'")
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    token = f"{KEY_PREFIX}_{key_id}_{secret}"
    session.add(ApiKey(id=key_id, secret_sha256=_digest(token), role=role, team=team, name=name,
                       created_at=datetime.now(UTC), revoked_at=None))
    session.flush()
    append_event(session, action="key.created", key_id=created_by, team=team,
                 payload={"created_key_id": key_id, "role": role, "team": team, "name": name})
    return token


def revoke_key(session: Session, key_id: str, *, revoked_by: str = "cli") -> None:
    row = session.get(ApiKey, key_id)
    if row is None:
        raise NotFound(f"no API key {key_id}")
    if row.revoked_at is None:
        row.revoked_at = datetime.now(UTC)
        append_event(session, action="key.revoked", key_id=revoked_by, team=row.team,
                     payload={"revoked_key_id": key_id})


def authenticate(session: Session, token: str | None) -> Principal:
    """Bearer token -> Principal, or Unauthorized (missing, malformed, unknown or revoked)."""
    if not token:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX:
        raise Unauthorized("malformed API key")
    row = session.scalar(select(ApiKey).where(ApiKey.id == parts[1]))
    if row is None or not hmac.compare_digest(row.secret_sha256, _digest(token)):
        raise Unauthorized("unknown API key")
    if row.revoked_at is not None:
        raise Unauthorized("this API key was revoked")
    return Principal(key_id=row.id, role=row.role, team=row.team)
