"""Rate limits per key and daily image quotas per team: in-process when embedded, Redis when distributed."""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict
from typing import Protocol

from gateway.errors import RateLimited, ServiceUnavailable

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
            raise ServiceUnavailable(f"rate limiter unavailable: {exc}") from exc
        return int(total), (window + 1) * window_s - now


class Limits:
    """Request rates per key (every attempt counts) and daily image quotas per team (only accepted work counts)."""

    def __init__(self, counter: Counter, *, per_key_per_minute: int, team_images_per_day: int) -> None:
        self._counter = counter
        self._per_minute = per_key_per_minute
        self._per_day = team_images_per_day

    def check(self, *, key_id: str, team: str) -> None:
        """Count one request against the rate limit, before anything else is done for it."""
        if self._per_minute:
            total, reset = self._counter.hit(f"key:{key_id}", 1, MINUTE)
            if total > self._per_minute:
                raise RateLimited(f"rate limit of {self._per_minute} requests per minute for this key reached",
                                  headers=retry_after(reset))

    def charge_images(self, *, key_id: str, team: str, images: int) -> None:
        """Count the images of a validated request against the daily quota; a refused request is taken back."""
        if self._per_day and images:
            total, reset = self._counter.hit(f"team:{team}", images, DAY)
            if total > self._per_day:
                self._counter.hit(f"team:{team}", -images, DAY)
                raise RateLimited(f"daily quota of {self._per_day} images for team {team} reached",
                                  headers=retry_after(reset))


def retry_after(reset_s: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(reset_s)))}
