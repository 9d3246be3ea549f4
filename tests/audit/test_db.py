"""audit/db.py: the SQLite settings an embedded audit log relies on."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from audit.db import make_engine


def test_sqlite_audit_commits_reach_the_disk_before_they_return(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'audit.db'}")
    with engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL: fsync per commit
        assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
    engine.dispose()
