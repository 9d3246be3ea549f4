"""audit/db.py: the SQLite settings an embedded audit log relies on."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError

from audit.db import DatabaseFault, describe_fault, make_engine


def test_sqlite_audit_commits_reach_the_disk_before_they_return(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'audit.db'}")
    with engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL: fsync per commit
        assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
    engine.dispose()


def _error_of(engine, statement: str):
    with pytest.raises(DBAPIError) as info, engine.connect() as connection:
        connection.execute(text(statement))
    return info.value


def test_a_locked_sqlite_database_is_busy_and_worth_a_retry(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    holder = sqlite3.connect(path)
    holder.execute("CREATE TABLE t (x INTEGER)")
    holder.commit()
    holder.execute("BEGIN IMMEDIATE")  # another writer holds the write lock
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 0})
    try:
        fault = describe_fault(_error_of(engine, "INSERT INTO t VALUES (1)"))
    finally:
        holder.rollback()
        holder.close()
        engine.dispose()
    assert (fault.kind, fault.message, fault.retry_after_s) == ("busy", "the database is busy; retry shortly", 1)


def test_a_read_only_sqlite_database_says_so(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    with sqlite3.connect(path) as setup:
        setup.execute("CREATE TABLE t (x INTEGER)")
    engine = create_engine(f"sqlite:///file:{path}?mode=ro&uri=true")
    fault = describe_fault(_error_of(engine, "INSERT INTO t VALUES (1)"))
    engine.dispose()
    assert fault.kind == "read-only" and fault.retry_after_s is None


def test_postgresql_faults_are_told_apart_by_sqlstate(pg_url: str) -> None:
    engine = create_engine(pg_url)
    try:
        with pytest.raises(DBAPIError) as timeout, engine.connect() as connection:
            connection.execute(text("SET statement_timeout = 10"))
            connection.execute(text("SELECT pg_sleep(1)"))  # 57014: canceled by the statement timeout
        with pytest.raises(DBAPIError) as read_only, engine.connect() as connection:
            connection.execute(text("SET TRANSACTION READ ONLY"))
            connection.execute(text("CREATE TEMP TABLE t (x int)"))  # 25006, as on a standby
    finally:
        engine.dispose()
    assert describe_fault(timeout.value).kind == "busy"
    assert describe_fault(read_only.value).kind == "read-only"
    refused = create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
    assert describe_fault(_error_of(refused, "SELECT 1")) == DatabaseFault(
        "unavailable", "the database is unavailable; see the gateway log")
