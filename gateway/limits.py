"""Request rates and daily image quotas, per key and per team: in-process when embedded, Redis when distributed."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import defaultdict
from typing import Protocol

from gateway.errors import RateLimited, ServiceUnavailable

log = logging.getLogger(__name__)
MINUTE = 60
DAY = 86_400


class Counter(Protocol):
    def hit(self, key: str, amount: int, window_s: int) -> tuple[int, float]:
        """Add `amount` to `key` in the current fixed window -> (total in window, seconds until reset)."""
        ...


class MemoryCounter:
    """Fixed-window counters in this process (the embedded mode has one gateway process)."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, int], int] = defaultdict(int)
        self._lock = threading.Lock()

    def hit(self, key: str, amount: int, window_s: int) -> tuple[int, float]:
        now = time.time()
        window = int(now // window_s)
        with self._lock:
            for stale in [k for k in self._counts if k[0] == key and k[1] != window]:
                del self._counts[stale]
            self._counts[(key, window)] += amount
            return self._counts[(key, window)], (window + 1) * window_s - now


class RedisCounter:
    """Fixed-window counters shared by every gateway process (INCRBY + EXPIRE in one round trip)."""

    def __init__(self, url: str) -> None:
        import redis

        self._redis = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)

    def hit(self, key: str, amount: int, window_s: int) -> tuple[int, float]:
        now = time.time()
        window = int(now // window_s)
        name = f"llamagen-gateway:limit:{key}:{window}"
        try:
            pipe = self._redis.pipeline()
            pipe.incrby(name, amount)
            pipe.expire(name, window_s + 5)
            total, _ = pipe.execute()
        except Exception as exc:  # the limiter is part of admission: if it cannot count, admit nothing
            log.warning("rate-limit store error: %s", exc)  # its text names the store's host and port
            raise ServiceUnavailable("the rate-limit store (Redis) is unavailable") from exc
        return int(total), (window + 1) * window_s - now


class Limits:
    """Requests per minute per key and per team (every attempt counts) and images per day per team and per key
    (only accepted work counts); a limit of 0 is off."""

    def __init__(self, counter: Counter, *, per_key_per_minute: int, team_images_per_day: int,
                 per_team_per_minute: int = 0, key_images_per_day: int = 0) -> None:
        self._counter = counter
        self._key_rate, self._team_rate = per_key_per_minute, per_team_per_minute
        self._team_images, self._key_images = team_images_per_day, key_images_per_day

    def check(self, *, key_id: str, team: str) -> None:
        """Count one request against the rate limits, before anything else is done for it."""
        for name, limit, whose in ((f"key:{key_id}", self._key_rate, "this key"),
                                   (f"team-rate:{team}", self._team_rate, f"team {team}")):
            if limit:
                total, reset = self._counter.hit(name, 1, MINUTE)
                if total > limit:
                    raise RateLimited(f"rate limit of {limit} requests per minute for {whose} reached",
                                      headers=retry_after(reset))

    def _image_quotas(self, key_id: str, team: str) -> list[tuple[str, int, str]]:
        return [(name, limit, whose) for name, limit, whose in ((f"team:{team}", self._team_images, f"team {team}"),
                                                                (f"key-images:{key_id}", self._key_images, "this key"))
                if limit]

    def charge_images(self, *, key_id: str, team: str, images: int) -> None:
        """Count the images of a validated request against the daily quotas; a refused charge is taken back."""
        charged: list[str] = []
        try:
            for name, limit, whose in self._image_quotas(key_id, team) if images else ():
                total, reset = self._counter.hit(name, images, DAY)
                charged.append(name)
                if total > limit:
                    raise RateLimited(f"daily quota of {limit} images for {whose} reached",
                                      headers=retry_after(reset))
        except Exception:  # over a quota, or the store failed half-way
            self._take_back(charged, images)
            raise

    def refund_images(self, *, key_id: str, team: str, images: int) -> None:
        """Give back what `charge_images` counted, for a request refused afterwards (blocked, or a 503)."""
        if images:
            self._take_back([name for name, _, _ in self._image_quotas(key_id, team)], images)

    def _take_back(self, names: list[str], images: int) -> None:
        for name in names:
            try:  # best effort: the request's own error is what the caller must see
                self._counter.hit(name, -images, DAY)
            except Exception:
                log.exception("could not give back %d images to quota %s", images, name)


def retry_after(reset_s: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(reset_s)))}
