"""Dashboard sign-in: HMAC-signed cookies holding a key id and an expiry, and per-session CSRF tokens.

The cookie never contains the API key. It is `base64url(json) "." base64url(hmac_sha256)` over
`{"k": key_id, "e": expiry (unix s), "n": nonce}`; the CSRF token is an HMAC of the nonce, so it needs no
server-side storage and dies with the session. Each request re-reads the key row so a revoked key signs
its sessions out at once, and looks the nonce up among the sign-outs, so a signed-out cookie is dead even
where it was copied.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import delete
from sqlalchemy.orm import Session

from audit.models import ApiKey, DashboardSignout
from gateway.auth import Principal

SESSION_COOKIE = "lgw_session"
LOGIN_COOKIE = "lgw_login"  # double-submit token for the sign-in form, before any session exists
SESSION_TTL_S = 8 * 3600
LOGIN_TTL_S = 15 * 60
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class DashboardSession:
    """What a valid session cookie says."""

    key_id: str
    expires_at: int
    nonce: str


class SessionCodec:
    """Issues and checks session cookies and CSRF tokens with one secret."""

    def __init__(self, secret: str, *, ttl_s: int = SESSION_TTL_S) -> None:
        if not secret:
            raise ValueError("the dashboard session secret is empty")
        self._key = hashlib.sha256(b"llamagen-gateway dashboard session\n" + secret.encode()).digest()
        self.ttl_s = ttl_s

    def _mac(self, purpose: str, message: str) -> bytes:
        return hmac.new(self._key, f"{purpose}\n{message}".encode(), hashlib.sha256).digest()

    def issue(self, key_id: str, *, now: float | None = None) -> tuple[str, DashboardSession]:
        """A new session for `key_id`: (cookie value, session)."""
        session = DashboardSession(key_id=key_id, expires_at=int((now or time.time()) + self.ttl_s),
                                   nonce=secrets.token_urlsafe(16))
        body = _b64(json.dumps({"k": session.key_id, "e": session.expires_at, "n": session.nonce},
                               separators=(",", ":")).encode())
        return f"{body}.{_b64(self._mac('session', body))}", session

    def read(self, cookie: str | None, *, now: float | None = None) -> DashboardSession | None:
        """The session in `cookie`, or None when it is missing, forged, malformed or expired."""
        if not cookie or cookie.count(".") != 1:
            return None
        body, mac = cookie.split(".")
        try:
            if not hmac.compare_digest(_unb64(mac), self._mac("session", body)):
                return None
            data = json.loads(_unb64(body))
            session = DashboardSession(key_id=str(data["k"]), expires_at=int(data["e"]), nonce=str(data["n"]))
        except (binascii.Error, ValueError, KeyError, TypeError):
            return None
        if session.expires_at <= (now or time.time()):
            return None
        return session

    def csrf_token(self, session: DashboardSession) -> str:
        return _b64(self._mac("csrf", session.nonce))

    def check_csrf(self, session: DashboardSession, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(str(token), self.csrf_token(session))

    def login_token(self) -> str:
        """A fresh sign-in form token: the same value goes into a cookie and a hidden field."""
        nonce = secrets.token_urlsafe(16)
        return f"{nonce}.{_b64(self._mac('login', nonce))}"

    def check_login_token(self, cookie: str | None, field: str | None) -> bool:
        if not cookie or not field or not hmac.compare_digest(cookie, field) or cookie.count(".") != 1:
            return False
        nonce, mac = cookie.split(".")
        try:
            return hmac.compare_digest(_unb64(mac), self._mac("login", nonce))
        except (binascii.Error, ValueError):
            return False


def principal_of(db: Session, session: DashboardSession) -> Principal | None:
    """The principal of a session not signed out, whose key exists and is not revoked (a session is only as
    good as its key)."""
    if db.get(DashboardSignout, session.nonce) is not None:
        return None
    row = db.get(ApiKey, session.key_id)
    if row is None or row.revoked_at is not None:
        return None
    return Principal(key_id=row.id, role=row.role, team=row.team)


def sign_out(db: Session, session: DashboardSession, *, now: datetime | None = None) -> None:
    """End `session` for good, wherever its cookie was copied; forget sign-outs whose cookies have expired."""
    now = now or datetime.now(UTC)
    db.execute(delete(DashboardSignout).where(DashboardSignout.expires_at <= now))
    if db.get(DashboardSignout, session.nonce) is None:
        db.add(DashboardSignout(nonce=session.nonce, key_id=session.key_id,
                                expires_at=datetime.fromtimestamp(session.expires_at, UTC)))
