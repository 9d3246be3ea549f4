"""Rate limits and quotas: the same rules in-process (embedded) and on Redis (shared by every gateway)."""

from __future__ import annotations

import pytest

from gateway.errors import RateLimited
from gateway.limits import Limits, MemoryCounter, RedisCounter
from tests.services import redis_database


@pytest.fixture(params=["memory", "redis"])
def counter(request):
    if request.param == "memory":
        yield MemoryCounter()
    else:
        with redis_database() as url:
            yield RedisCounter(url)


def test_the_key_rate_limit_counts_requests_per_key(counter) -> None:
    limits = Limits(counter, per_key_per_minute=2, team_images_per_day=0)
    limits.check(key_id="a", team="t")
    limits.check(key_id="a", team="t")
    with pytest.raises(RateLimited) as refused:
        limits.check(key_id="a", team="t")
    assert 1 <= int(refused.value.headers["Retry-After"]) <= 60
    limits.check(key_id="b", team="t")  # another key has its own budget


def test_the_team_quota_counts_images(counter) -> None:
    limits = Limits(counter, per_key_per_minute=0, team_images_per_day=5)
    limits.charge_images(key_id="a", team="t", images=4)
    with pytest.raises(RateLimited, match="daily quota") as refused:
        limits.charge_images(key_id="b", team="t", images=2)
    assert int(refused.value.headers["Retry-After"]) >= 1
    limits.charge_images(key_id="a", team="other", images=5)


def test_a_refused_image_request_uses_none_of_the_quota(counter) -> None:
    limits = Limits(counter, per_key_per_minute=0, team_images_per_day=5)
    limits.charge_images(key_id="a", team="t", images=3)
    for _ in range(3):
        with pytest.raises(RateLimited):
            limits.charge_images(key_id="a", team="t", images=3)
    limits.charge_images(key_id="a", team="t", images=2)  # the 2 images left are still there


def test_two_gateways_share_redis_counters() -> None:
    with redis_database() as url:
        first = Limits(RedisCounter(url), per_key_per_minute=1, team_images_per_day=0)
        second = Limits(RedisCounter(url), per_key_per_minute=1, team_images_per_day=0)
        first.check(key_id="a", team="t")
        with pytest.raises(RateLimited):
            second.check(key_id="a", team="t")
