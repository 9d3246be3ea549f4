"""API keys: shown once, stored hashed, revocable; roles and team scoping."""

from __future__ import annotations

import hashlib

import pytest
from sqlalchemy import select

from audit.models import ApiKey, AuditEvent
from gateway.auth import Principal, authenticate, create_key, revoke_key
from gateway.errors import Forbidden, Unauthorized


def test_created_key_authenticates_as_its_role_and_team(sessions) -> None:
    with sessions() as session, session.begin():
        token = create_key(session, role="creator", team="ads")
    with sessions() as session:
        principal = authenticate(session, token)
    assert (principal.role, principal.team) == ("creator", "ads")


def test_key_is_stored_only_as_a_hash(sessions) -> None:
    with sessions() as session, session.begin():
        token = create_key(session, role="auditor", team="legal")
    with sessions() as session:
        row = session.scalars(select(ApiKey)).one()
        assert row.secret_sha256 == hashlib.sha256(token.encode()).hexdigest()
        stored = " ".join(str(v) for v in vars(row).values())
        assert token not in stored


def test_key_creation_is_audited_without_the_secret(sessions) -> None:
    with sessions() as session, session.begin():
        token = create_key(session, role="reviewer", team="trust")
    with sessions() as session:
        event = session.scalars(select(AuditEvent).where(AuditEvent.action == "key.created")).one()
    assert event.payload["role"] == "reviewer"
    secret = token.split("_", 2)[2]  # the secret itself may contain "_"
    assert secret and secret not in str(event.payload)


@pytest.mark.parametrize("token", [None, "", "nonsense", "lgw_abc", "lgw_0000_secret", "Bearer x"])
def test_missing_malformed_or_unknown_keys_are_unauthorized(sessions, token) -> None:
    with sessions() as session, pytest.raises(Unauthorized):
        authenticate(session, token)


def test_revoked_key_is_unauthorized(sessions) -> None:
    with sessions() as session, session.begin():
        token = create_key(session, role="creator", team="ads")
        revoke_key(session, token.split("_")[1])
    with sessions() as session, pytest.raises(Unauthorized, match="revoked"):
        authenticate(session, token)


def test_unknown_role_is_refused(sessions) -> None:
    with sessions() as session, pytest.raises(ValueError, match="unknown role"):
        create_key(session, role="superuser", team="ads")


def test_admin_holds_every_role_and_others_only_their_own() -> None:
    Principal("k", "admin", "ops").require("policy_admin")
    Principal("k", "creator", "ads").require("creator")
    with pytest.raises(Forbidden):
        Principal("k", "creator", "ads").require("auditor")


def test_creators_see_only_their_team() -> None:
    creator = Principal("k", "creator", "ads")
    assert creator.can_see_team("ads") and not creator.can_see_team("legal")
    assert Principal("k", "auditor", "legal").can_see_team("ads")
