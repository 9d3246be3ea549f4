"""Engine and session factories, the declarative Base, and programmatic Alembic upgrades."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import DateTime, Engine, create_engine, event
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.types import TypeDecorator

from audit.chain import store_json

# Repository root: alembic.ini and migrations/ sit beside the packages in an (editable) checkout.
REPO_ROOT = Path(__file__).resolve().parent.parent
ALEMBIC_INI = REPO_ROOT / "alembic.ini"
MIGRATIONS_DIR = REPO_ROOT / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend (SQLite stores naive values; they are UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware UTC timestamp")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base of every table; `migrations/env.py` takes its metadata."""


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        # FULL: every commit reaches the disk before it returns, so an image released after its audit commit
        # keeps that record through a power loss or OS crash (NORMAL, in WAL mode, can drop the last
        # commits). It costs one fsync of the WAL per commit (0.2 ms here); group commit shares it.
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.close()


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for `url`: SQLite gets WAL, foreign keys and a busy timeout; PostgreSQL uses psycopg 3.

    JSON columns are written as canonical JSON, so an audit payload is stored as exactly the text that was
    hashed and verification can hash the stored text without re-encoding it.
    """
    kwargs.setdefault("json_serializer", store_json)
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() == "sqlite":
        kwargs.setdefault("connect_args", {}).setdefault("timeout", SQLITE_BUSY_TIMEOUT_MS / 1000)
        engine = create_engine(parsed, **kwargs)
        _configure_sqlite(engine)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(parsed, **kwargs)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded attributes after commit (events are returned to callers)."""
    return sessionmaker(bind=engine, expire_on_commit=False)


def alembic_config(url: str) -> Any:
    """The Alembic configuration of this repository, pointed at `url`."""
    from alembic.config import Config

    config = Config(str(ALEMBIC_INI))
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolates '%': escape it so URL-encoded passwords survive.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["configure_logger"] = False  # the caller owns logging; env.py must not reset it
    return config


def upgrade_database(url: str, revision: str = "head") -> None:
    """Run the Alembic migrations up to `revision` against `url` (what `llamagen-gateway migrate` does)."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def downgrade_database(url: str, revision: str = "base") -> None:
    """Run the Alembic downgrades to `revision` (tests prove every upgrade can be undone)."""
    from alembic import command

    command.downgrade(alembic_config(url), revision)


@dataclass(frozen=True)
class DatabaseFault:
    """What a database error means for a caller, in words that name no SQL, host or port."""

    kind: str  # "busy", "full", "read-only" or "unavailable"
    message: str
    retry_after_s: int | None = None  # set where retrying soon is the remedy

    @property
    def headers(self) -> dict[str, str] | None:
        """The HTTP headers of a 503 for this fault: Retry-After where retrying soon is the remedy."""
        return {"Retry-After": str(self.retry_after_s)} if self.retry_after_s else None


# PostgreSQL SQLSTATEs: contention that a retry resolves, and resources an operator must restore.
_BUSY_STATES = {"40001", "40P01", "55P03", "57014", "53300"}  # serialization, deadlock, lock, timeout, slots
_FULL_STATES = {"53100", "53200"}  # disk full, out of memory
_READ_ONLY_STATES = {"25006"}  # read-only transaction: a standby, e.g. right after a failover
_BUSY_TEXT = ("database is locked", "database table is locked", "database is busy")


def describe_fault(exc: BaseException) -> DatabaseFault:
    """Classify a driver or pool error (SQLite by message, PostgreSQL by SQLSTATE); anything else is the
    database being unreachable."""
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    if isinstance(exc, PoolTimeout):
        return DatabaseFault("busy", "the database is busy (no free connection); retry shortly", 1)
    orig = getattr(exc, "orig", None) or exc
    state = str(getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None) or "")
    text = str(orig).lower()
    if state in _BUSY_STATES or any(phrase in text for phrase in _BUSY_TEXT):
        return DatabaseFault("busy", "the database is busy; retry shortly", 1)
    if state in _FULL_STATES or "database or disk is full" in text:
        return DatabaseFault("full", "the database is out of storage or memory; see the gateway log")
    if state in _READ_ONLY_STATES or "readonly database" in text:
        return DatabaseFault("read-only", "the database is read-only; see the gateway log")
    return DatabaseFault("unavailable", "the database is unavailable; see the gateway log")
