"""Rate limits and quotas: the same rules in-process (embedded) and on Redis (shared by every gateway)."""

from __future__ import annotations

import pytest

from gateway.errors import RateLimited, ServiceUnavailable
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


def test_a_quota_store_failing_half_way_takes_back_what_it_counted() -> None:
    class FailsOnKeyQuota(MemoryCounter):
        def hit(self, key: str, amount: int, window_s: int) -> tuple[int, float]:
            if key.startswith("key-images:") and amount > 0:
                raise ServiceUnavailable("the rate-limit store (Redis) is unavailable")
            return super().hit(key, amount, window_s)

    counter = FailsOnKeyQuota()
    limits = Limits(counter, per_key_per_minute=0, team_images_per_day=2, key_images_per_day=5)
    with pytest.raises(ServiceUnavailable):
        limits.charge_images(key_id="a", team="t", images=2)
    assert counter.hit("team:t", 0, 86400)[0] == 0  # the team's charge was given back


def test_refunded_images_can_be_requested_again(counter) -> None:
    limits = Limits(counter, per_key_per_minute=0, team_images_per_day=3, key_images_per_day=3)
    limits.charge_images(key_id="a", team="t", images=3)
    limits.refund_images(key_id="a", team="t", images=3)  # e.g. the prompt was then blocked
    limits.charge_images(key_id="a", team="t", images=3)
    with pytest.raises(RateLimited):
        limits.charge_images(key_id="a", team="t", images=1)


def test_the_team_rate_limit_counts_requests_of_every_key_of_the_team(counter) -> None:
    limits = Limits(counter, per_key_per_minute=0, team_images_per_day=0, per_team_per_minute=2)
    limits.check(key_id="a", team="t")
    limits.check(key_id="b", team="t")
    with pytest.raises(RateLimited, match="per minute for team t") as refused:
        limits.check(key_id="c", team="t")
    assert 1 <= int(refused.value.headers["Retry-After"]) <= 60
    limits.check(key_id="a", team="other")  # another team has its own budget


def test_the_key_quota_counts_images_per_key(counter) -> None:
    limits = Limits(counter, per_key_per_minute=0, team_images_per_day=0, key_images_per_day=3)
    limits.charge_images(key_id="a", team="t", images=3)
    with pytest.raises(RateLimited, match="daily quota of 3 images for this key") as refused:
        limits.charge_images(key_id="a", team="t", images=1)
    assert int(refused.value.headers["Retry-After"]) >= 1
    limits.charge_images(key_id="b", team="t", images=3)  # another key of the same team has its own quota


def test_a_request_refused_by_the_key_quota_uses_none_of_the_team_quota(counter) -> None:
    limits = Limits(counter, per_key_per_minute=0, team_images_per_day=4, key_images_per_day=2)
    for _ in range(2):
        with pytest.raises(RateLimited, match="this key"):
            limits.charge_images(key_id="a", team="t", images=3)
    limits.charge_images(key_id="b", team="t", images=2)
    limits.charge_images(key_id="c", team="t", images=2)  # the team's 4 images were all still there


def test_rates_and_quotas_of_a_key_and_its_team_do_not_mix(counter) -> None:
    limits = Limits(counter, per_key_per_minute=1, team_images_per_day=1, per_team_per_minute=1,
                    key_images_per_day=1)
    limits.check(key_id="t", team="t")  # a key id that equals the team name
    limits.charge_images(key_id="t", team="t", images=1)
    with pytest.raises(RateLimited, match="per minute for team t"):
        limits.check(key_id="other", team="t")


def test_an_unreachable_redis_is_a_503_without_its_address() -> None:
    limits = Limits(RedisCounter("redis://127.0.0.1:1"), per_key_per_minute=1, team_images_per_day=0)
    with pytest.raises(ServiceUnavailable) as refused:
        limits.check(key_id="a", team="t")
    assert refused.value.message == "the rate-limit store (Redis) is unavailable"


def test_two_gateways_share_redis_counters() -> None:
    with redis_database() as url:
        first = Limits(RedisCounter(url), per_key_per_minute=1, team_images_per_day=0)
        second = Limits(RedisCounter(url), per_key_per_minute=1, team_images_per_day=0)
        first.check(key_id="a", team="t")
        with pytest.raises(RateLimited):
            second.check(key_id="a", team="t")
