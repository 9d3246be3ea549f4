"""tests/services.py: fresh service databases, skipped when unreachable unless CI=true."""

from __future__ import annotations

import pytest
import redis

from tests import services


def test_unreachable_postgres_skips_the_test_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(services, "POSTGRES_PORT", 1)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="PostgreSQL at 127.0.0.1:1 unavailable"):
        with services.postgres_database():
            pass


def test_unreachable_postgres_fails_the_test_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(services, "POSTGRES_PORT", 1)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        with services.postgres_database():
            pass


def test_unreachable_redis_fails_the_test_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(services, "REDIS_URL", "redis://127.0.0.1:1")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="Redis at redis://127.0.0.1:1 unavailable"):
        with services.redis_database():
            pass


def database_exists(name: str) -> bool:
    conn, _ = services._admin_connection()
    with conn:
        return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None


@pytest.mark.services
def test_postgres_database_is_created_fresh_and_dropped_afterwards() -> None:
    with services.postgres_database("test_services") as url:
        name = url.rsplit("/", 1)[1]
        assert url.startswith("postgresql+psycopg://") and database_exists(name)
    assert not database_exists(name)


@pytest.mark.services
def test_redis_database_is_empty_and_flushed_afterwards() -> None:
    with services.redis_database() as url:
        client = redis.Redis.from_url(url)
        assert client.dbsize() == 1  # only the claim marker
        client.set("leftover", "1")
    assert client.exists("leftover") == 0
