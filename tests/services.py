"""Real services for tests: a fresh PostgreSQL database and a fresh Redis database per use.

Tests that need a service skip with the reason when it is unreachable, except with CI=true, where an
unreachable service is a failure (CI must never go green by skipping). Import these helpers in fixtures:

    from tests.services import postgres_database, redis_database
    with postgres_database() as url: ...      # postgresql+psycopg://.../test_<random>, dropped afterwards
    with redis_database() as url: ...         # redis://127.0.0.1:6379/<n>, flushed before and after
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest

POSTGRES_HOST = "127.0.0.1"
POSTGRES_PORT = 5432
POSTGRES_USERS = ("postgres", "root")  # trust auth on the test machines; whichever exists
REDIS_URL = "redis://127.0.0.1:6379"
REDIS_DBS = range(1, 16)  # db 0 is left to people running the gateway by hand
CLAIM_TTL_S = 900  # a crashed test run frees its Redis database after this long


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def unavailable(service: str, reason: str) -> None:
    """Skip the test (fail under CI=true) because `service` cannot be used."""
    message = f"{service} unavailable: {reason}"
    if in_ci():
        pytest.fail(f"{message} (CI=true: required services must be running)")
    pytest.skip(message)


def _admin_connection() -> tuple[psycopg.Connection[tuple[object, ...]], str]:
    errors = []
    for user in POSTGRES_USERS:
        try:
            conn = psycopg.connect(host=POSTGRES_HOST, port=POSTGRES_PORT, user=user, dbname="postgres",
                                   autocommit=True, connect_timeout=3)
            return conn, user
        except psycopg.OperationalError as exc:
            errors.append(f"{user}: {str(exc).strip().splitlines()[0]}")
    unavailable(f"PostgreSQL at {POSTGRES_HOST}:{POSTGRES_PORT}", "; ".join(errors))
    raise AssertionError("unreachable")  # unavailable() always raises


@contextmanager
def postgres_database(prefix: str = "test") -> Iterator[str]:
    """Create a uniquely named database, yield its SQLAlchemy URL, drop it afterwards."""
    conn, user = _admin_connection()
    name = f"{prefix}_{secrets.token_hex(6)}"
    try:
        conn.execute(f'CREATE DATABASE "{name}"')
        yield f"postgresql+psycopg://{user}@{POSTGRES_HOST}:{POSTGRES_PORT}/{name}"
    finally:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


@contextmanager
def redis_database() -> Iterator[str]:
    """Claim a free Redis database number (empty, claimed with a marker key), flush it, yield its URL."""
    import redis

    marker = "tests:claimed-by"
    token = secrets.token_hex(8)
    try:
        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
        client.ping()
    except redis.RedisError as exc:
        unavailable(f"Redis at {REDIS_URL}", str(exc))
    for db in REDIS_DBS:
        candidate = redis.Redis.from_url(f"{REDIS_URL}/{db}", socket_connect_timeout=3)
        # SET NX on a marker claims the database atomically against other test processes.
        if candidate.set(marker, token, nx=True, ex=CLAIM_TTL_S):
            candidate.flushdb()
            candidate.set(marker, token, ex=CLAIM_TTL_S)
            try:
                yield f"{REDIS_URL}/{db}"
            finally:
                candidate.flushdb()
                candidate.close()
            return
        candidate.close()
    unavailable(f"Redis at {REDIS_URL}", f"test databases {REDIS_DBS.start}..{REDIS_DBS.stop - 1} all in use")


def postgres_url() -> Iterator[str]:
    """Generator form of `postgres_database` for `pytest.fixture` (yields the URL, drops at teardown)."""
    with postgres_database() as url:
        yield url


def redis_url() -> Iterator[str]:
    """Generator form of `redis_database` for `pytest.fixture`."""
    with redis_database() as url:
        yield url
