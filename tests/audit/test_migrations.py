"""migrations/: one schema on SQLite and PostgreSQL, matching the models, with append-only triggers."""

from __future__ import annotations

from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect, text
from sqlalchemy.exc import DatabaseError

from audit.db import Base, downgrade_database, make_engine, upgrade_database
from audit.log import append_event
from audit.models import ChainHead

TABLES = {
    "jobs",
    "job_transitions",
    "api_keys",
    "policy_revisions",
    "model_cards",
    "prompt_texts",
    "chain_head",
    "audit_events",
    "chain_checkpoints",
    "dashboard_signouts",
}


def schema_drift(engine: Engine) -> list[Any]:
    with engine.connect() as connection:
        return list(compare_metadata(MigrationContext.configure(connection), Base.metadata))


def seed_event(sessions: Any) -> None:
    with sessions() as session, session.begin():
        append_event(session, action="test.seed", key_id="k", team="t", payload={"n": 1})


def seed_event_and_checkpoint(sessions: Any) -> None:
    seed_event(sessions)
    with sessions() as session, session.begin():
        session.execute(
            text(
                "INSERT INTO chain_checkpoints (seq, head_hash, ts, alg, signature, cert_pem) "
                "VALUES (1, 'h', '2026-01-01 00:00:00', 'ES256', 's', 'c')"
            )
        )


def test_migrated_sqlite_schema_matches_the_models(sqlite_url: str) -> None:
    assert schema_drift(make_engine(sqlite_url)) == []


def test_migration_creates_the_genesis_chain_head(session_factory: Any) -> None:
    with session_factory() as session:
        head = session.get(ChainHead, 1)
    assert head is not None and (head.seq, head.hash) == (0, "0" * 64)


def test_sqlite_downgrade_removes_every_table_and_upgrade_restores_them(sqlite_url: str) -> None:
    downgrade_database(sqlite_url)
    assert set(inspect(make_engine(sqlite_url)).get_table_names()) == {"alembic_version"}
    upgrade_database(sqlite_url)
    assert TABLES <= set(inspect(make_engine(sqlite_url)).get_table_names())


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_events SET team = 'forged'",
        "DELETE FROM audit_events",
        "UPDATE chain_checkpoints SET head_hash = 'x'",
        "DELETE FROM chain_checkpoints",
    ],
)
def test_sqlite_triggers_reject_changes_to_audit_tables(session_factory: Any, statement: str) -> None:
    seed_event_and_checkpoint(session_factory)
    with session_factory() as session, pytest.raises(DatabaseError, match="append-only"):
        session.execute(text(statement))


def test_chain_head_stays_writable(session_factory: Any) -> None:
    seed_event(session_factory)
    seed_event(session_factory)
    with session_factory() as session:
        assert session.get(ChainHead, 1).seq == 2  # type: ignore[union-attr]


@pytest.mark.services
def test_migrated_postgres_schema_matches_the_models(pg_url: str) -> None:
    assert schema_drift(make_engine(pg_url)) == []


@pytest.mark.services
def test_postgres_downgrade_and_upgrade_round_trip(pg_url: str) -> None:
    downgrade_database(pg_url)
    engine = make_engine(pg_url)
    assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    with engine.connect() as connection:
        functions = text("SELECT count(*) FROM pg_proc WHERE proname = 'audit_reject_change'")
        assert connection.scalar(functions) == 0
    engine.dispose()
    upgrade_database(pg_url)
    assert TABLES <= set(inspect(make_engine(pg_url)).get_table_names())


@pytest.mark.services
@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_events SET team = 'forged'",
        "DELETE FROM audit_events",
        "TRUNCATE audit_events",
        "UPDATE chain_checkpoints SET head_hash = 'x'",
        "TRUNCATE chain_checkpoints",
    ],
)
def test_postgres_triggers_reject_changes_to_audit_tables(pg_session_factory: Any, statement: str) -> None:
    seed_event_and_checkpoint(pg_session_factory)
    with pg_session_factory() as session, pytest.raises(DatabaseError, match="append-only"):
        session.execute(text(statement))
