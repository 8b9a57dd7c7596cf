"""Per-key token buckets: requests per second and texts per second. Pure: the caller passes the time."""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass


@dataclass
class TokenBucket:
    rate: float          # tokens per second
    capacity: float      # the most tokens it holds (burst)
    tokens: float
    updated: float       # time of the last refill

    def _refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = max(self.updated, now)

    def wait_for(self, cost: float, now: float) -> float:
        """Seconds until `cost` tokens are there (0 when they are now); takes nothing."""
        self._refill(now)
        if cost > self.capacity:
            return math.inf
        return max(0.0, (cost - self.tokens) / self.rate)

    def take(self, cost: float, now: float) -> None:
        self._refill(now)
        self.tokens -= cost


class RateLimiter:
    """Each key has a request bucket and a text bucket; a request is admitted only if both have room, and then
    takes from both (all or nothing)."""

    def __init__(self, requests_per_s: float, texts_per_s: float, burst_s: float):
        self.requests_per_s, self.texts_per_s, self.burst_s = requests_per_s, texts_per_s, burst_s
        self._buckets: dict[str, tuple[TokenBucket, TokenBucket]] = {}
        self._lock = threading.Lock()

    def _for(self, key: str, now: float) -> tuple[TokenBucket, TokenBucket]:
        buckets = self._buckets.get(key)
        if buckets is None:
            requests = max(1.0, self.requests_per_s * self.burst_s)
            texts = max(1.0, self.texts_per_s * self.burst_s)
            buckets = self._buckets[key] = (TokenBucket(self.requests_per_s, requests, requests, now),
                                            TokenBucket(self.texts_per_s, texts, texts, now))
        return buckets

    def admit(self, key: str, texts: int, now: float) -> float:
        """0.0 when admitted (and charged); otherwise the seconds to wait before the same request can pass
        (math.inf when it never can: more texts than the bucket holds)."""
        with self._lock:
            requests, text_bucket = self._for(key, now)
            wait = max(requests.wait_for(1, now), text_bucket.wait_for(texts, now))
            if wait > 0:
                return wait
            requests.take(1, now)
            text_bucket.take(texts, now)
            return 0.0
