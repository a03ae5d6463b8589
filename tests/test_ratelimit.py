"""The per-token-URL rate limit toward the IdP."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from refresher.localidp import LocalIdP
from refresher.ratelimit import RateLimits, TokenBucket
from tests.conftest import config_of, job_for, running, wait_for


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_burst_then_the_rate() -> None:
    clock = FakeTime()
    bucket = TokenBucket(rate=10, burst=3, monotonic=clock.monotonic, sleep=clock.sleep)
    waits = [bucket.acquire() for _ in range(6)]
    assert waits[:3] == [0, 0, 0]
    assert [round(w, 6) for w in waits[3:]] == [0.1, 0.1, 0.1]
    clock.now += 10  # a long pause refills the bucket, but never beyond the burst
    assert [bucket.acquire() for _ in range(3)] == [0, 0, 0]
    assert bucket.acquire() > 0


def test_concurrent_callers_queue_behind_each_other() -> None:
    clock = FakeTime()
    bucket = TokenBucket(rate=2, burst=1, monotonic=clock.monotonic, sleep=clock.sleep)
    # Reservations made at the same instant are spaced by 1/rate, not all told "0.5 s".
    assert [bucket.reserve() for _ in range(4)] == [0.0, 0.5, 1.0, 1.5]


def test_one_bucket_per_url() -> None:
    limits = RateLimits(rate=1, burst=1)
    assert limits.for_url("https://a/t") is limits.for_url("https://a/t")
    assert limits.for_url("https://a/t") is not limits.for_url("https://b/t")


def test_a_start_up_wave_is_spread_over_time(
    make_idp: Callable[..., LocalIdP], secret_file: Path, tmp_path: Path
) -> None:
    idp = make_idp("generic", lifetime=3600)
    jobs = [
        job_for(idp, secret_file, tmp_path / f"t{i}", name=f"j{i}", scopes=[f"s{i}"])
        for i in range(16)
    ]
    config = config_of(*jobs, idp_rate_limit=10, idp_rate_burst=4, max_concurrent_refreshes=16)
    with running(config) as daemon:
        wait_for(lambda: all(r.snapshot().ready for r in daemon.runners), timeout=10)
    times = sorted(t.issued_at for t in idp.issued)
    assert len(times) == 16
    # 4 at once, then 12 more at 10 per second: at least 1.1 s from first to last.
    assert times[-1] - times[0] >= 1.1
    for i, start in enumerate(times):
        in_one_second = sum(1 for t in times[i:] if t < start + 1.0)
        assert in_one_second <= 4 + 10 + 1


def test_try_take_never_queues_and_says_how_long_until_a_place() -> None:
    clock = FakeTime()
    bucket = TokenBucket(rate=1, burst=2, monotonic=clock.monotonic, sleep=clock.sleep)
    assert [bucket.try_take() for _ in range(2)] == [0.0, 0.0]
    assert bucket.try_take() == 1.0
    assert bucket.try_take() == 1.0  # refused callers take nothing
    clock.now += 0.5
    assert bucket.try_take() == 0.5
    clock.now += 0.5
    assert bucket.try_take() == 0.0
    assert clock.slept == []
