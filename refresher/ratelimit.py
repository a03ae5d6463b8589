"""A token bucket per IdP token URL, so that a start-up wave of thousands of jobs (or many
jobs retrying at once) cannot trip the provider's own rate limits.

`acquire()` blocks the calling refresh thread until a request may go out; the waits are
spaced by the rate, so a burst of N requests takes about (N - burst) / rate seconds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class TokenBucket:
    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self._monotonic = monotonic
        self._sleep = sleep
        self._tokens = float(burst)
        self._updated = monotonic()
        self._lock = threading.Lock()

    def _refill(self) -> None:
        now = self._monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now

    def reserve(self) -> float:
        """Take one request's place; return how long the caller must wait before sending."""
        with self._lock:
            self._refill()
            self._tokens -= 1  # may go negative: later callers queue behind this one
            return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def try_take(self) -> float:
        """Take a place if one is free now and return 0.0; else take nothing and return the
        seconds until one is (for a `Retry-After`), so refused callers do not queue."""
        with self._lock:
            self._refill()
            if self._tokens >= 1:
                self._tokens -= 1
                return 0.0
            return (1 - self._tokens) / self.rate

    def acquire(self) -> float:
        """Wait for a place; return the seconds waited."""
        wait = self.reserve()
        if wait > 0:
            self._sleep(wait)
        return wait


class RateLimits:
    """One bucket per token URL, created on first use."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()

    def for_url(self, url: str) -> TokenBucket:
        with self._lock:
            bucket = self._buckets.get(url)
            if bucket is None:
                bucket = self._buckets[url] = TokenBucket(self.rate, self.burst)
            return bucket
