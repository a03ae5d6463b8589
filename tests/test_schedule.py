"""The schedule policy as plain numbers: no clock, no sleeps (design rules 2 and 4)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from refresher.schedule import SchedulePolicy, lead_time, refresh_at, retry_delay, wait_until

HOUR = 3600.0
DEFAULT = SchedulePolicy()


def test_default_refreshes_when_a_third_of_the_lifetime_is_left() -> None:
    # cert-manager's default: 20 minutes before expiry for a one-hour token.
    assert refresh_at(DEFAULT, 1000.0, 1000.0 + HOUR, u=0.0) == 1000.0 + 2400.0


def test_absolute_margin_is_obeyed_when_shorter_than_the_lifetime() -> None:
    policy = SchedulePolicy(margin=300)
    assert refresh_at(policy, 0.0, HOUR, u=0.0) == HOUR - 300


@pytest.mark.parametrize("margin", [HOUR, 2 * HOUR, 10 * HOUR])
def test_margin_at_least_the_lifetime_is_ignored_not_looped_on(margin: float) -> None:
    policy = SchedulePolicy(margin=margin)
    assert lead_time(policy, HOUR) == HOUR / 3
    assert refresh_at(policy, 0.0, HOUR, u=0.0) == 2400.0


def test_jitter_only_moves_earlier_and_is_capped() -> None:
    latest = refresh_at(DEFAULT, 0.0, HOUR, u=0.0)
    earliest = refresh_at(DEFAULT, 0.0, HOUR, u=0.999999)
    assert earliest < latest
    # 10 % of an hour is 6 minutes, capped at 5.
    assert latest - earliest == pytest.approx(300, abs=0.01)
    short = SchedulePolicy(min_interval=0)
    assert refresh_at(short, 0.0, 60.0, u=0.0) - refresh_at(short, 0.0, 60.0, u=0.999999) == (
        pytest.approx(6.0, abs=0.01)
    )


def test_floor_stops_tight_loops_on_tokens_shorter_than_it() -> None:
    assert refresh_at(DEFAULT, 100.0, 110.0, u=0.5) == 130.0


@pytest.mark.parametrize("lifetime", [0.0, -5.0, -HOUR])
def test_zero_or_negative_lifetime_waits_for_the_floor(lifetime: float) -> None:
    assert lead_time(DEFAULT, lifetime) == 0.0
    assert refresh_at(DEFAULT, 500.0, 500.0 + lifetime, u=0.3) == 530.0


def test_wait_until_never_negative_and_robust_to_clock_going_backwards() -> None:
    assert wait_until(now=200.0, at=150.0, started=100.0) == 0.0  # already past: now
    assert wait_until(now=120.0, at=150.0, started=100.0) == 30.0
    # The clock jumped back an hour after planning: we still wait only the planned 50 s.
    assert wait_until(now=100.0 - HOUR, at=150.0, started=100.0) == 50.0


def test_backoff_doubles_from_one_second_to_five_minutes() -> None:
    no_expiry = [retry_delay(DEFAULT, n, 0.0, None, None, u=0.999999) for n in range(1, 12)]
    assert no_expiry[:4] == pytest.approx([1, 2, 4, 8], abs=0.01)
    assert no_expiry[-1] == pytest.approx(300, abs=0.01)
    # Equal jitter: never less than half the step.
    assert retry_delay(DEFAULT, 4, 0.0, None, None, u=0.0) == 4.0


def test_retry_never_waits_past_half_the_time_left() -> None:
    # Token expires in 60 s; the 10th failure would wait 300 s; it waits 30.
    assert retry_delay(DEFAULT, 10, 1000.0, 1060.0, None, u=0.5) == 30.0
    # Retries grow denser as expiry nears.
    delays = [retry_delay(DEFAULT, 10, now, 1060.0, None, 0.5) for now in (1000, 1040, 1055, 1059)]
    assert delays == sorted(delays, reverse=True)
    assert delays[-1] == 0.5


def test_retry_after_is_honoured_within_the_bound() -> None:
    assert retry_delay(DEFAULT, 1, 0.0, 1000.0, 42.0, u=0.0) == 42.0
    assert retry_delay(DEFAULT, 1, 0.0, 40.0, 42.0, u=0.0) == 20.0  # half of 40 s left
    # An absurd Retry-After is capped at the backoff cap, even after expiry.
    assert retry_delay(DEFAULT, 1, 0.0, None, 86400.0, u=0.0) == 300.0


def test_retries_go_on_after_expiry_with_backoff() -> None:
    after = [retry_delay(DEFAULT, n, 2000.0, 1000.0, None, u=0.0) for n in (1, 2, 3, 20)]
    assert after == [0.5, 1.0, 2.0, 150.0]


def test_retry_floor_near_expiry() -> None:
    assert retry_delay(DEFAULT, 3, 999.99, 1000.0, None, u=0.0) == DEFAULT.retry_floor


@given(
    issued=st.floats(-1e9, 1e10),
    lifetime=st.floats(-1e6, 1e7),
    margin=st.none() | st.floats(0, 1e7),
    u=st.floats(0, 1, exclude_max=True),
)
def test_refresh_is_never_after_expiry_unless_the_floor_demands_it(
    issued: float, lifetime: float, margin: float | None, u: float
) -> None:
    policy = SchedulePolicy(margin=margin)
    at = refresh_at(policy, issued, issued + lifetime, u)
    assert at >= issued + policy.min_interval - 1e-6  # the floor always holds
    if lifetime > policy.min_interval * 3:
        assert at <= issued + lifetime  # and otherwise the token is refreshed before it dies


@given(
    failures=st.integers(-5, 10_000),
    now=st.floats(0, 1e9),
    left=st.none() | st.floats(-1e6, 1e6),
    retry_after=st.none() | st.floats(-10, 1e9),
    u=st.floats(0, 1, exclude_max=True),
)
def test_retry_delay_is_always_bounded(
    failures: int, now: float, left: float | None, retry_after: float | None, u: float
) -> None:
    expires_at = None if left is None else now + left
    delay = retry_delay(DEFAULT, failures, now, expires_at, retry_after, u)
    assert DEFAULT.retry_floor <= delay <= DEFAULT.backoff_cap
    if left is not None and left > 2 * DEFAULT.retry_floor:
        # expires_at - now loses precision at large `now` (an ulp at 1e9 is ~1e-7).
        assert delay <= left / 2 + 1e-6
