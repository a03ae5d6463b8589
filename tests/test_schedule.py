"""The plan as plain numbers: no clock, no sleeps (rules 2, 4, 8 and 11 of docs/design.md)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from refresher.schedule import (
    CONTEST_LIMIT,
    DEFAULT_STORED_LIFETIME_BOUND,
    Rejections,
    SchedulePolicy,
    adopt,
    after_failure,
    after_rejection_refresh,
    after_scheduled_refresh,
    after_success,
    jitter_draw,
    lead_time,
    on_rejection,
    refresh_at,
    retry_delay,
    stored_lifetime_bound,
    token_refresh_at,
)
from refresher.tokens import Token

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


def test_backoff_doubles_from_one_second_to_five_minutes_while_a_token_is_held() -> None:
    far = 1e9  # a token that expires far in the future: only the backoff decides
    held = [retry_delay(DEFAULT, n, 0.0, far, None, u=0.999999) for n in range(1, 12)]
    assert held[:4] == pytest.approx([1, 2, 4, 8], abs=0.01)
    assert held[-1] == pytest.approx(300, abs=0.01)
    # Equal jitter: never less than half the step.
    assert retry_delay(DEFAULT, 4, 0.0, far, None, u=0.0) == 4.0


def test_without_a_valid_token_the_wait_stays_short_whatever_the_failure_count() -> None:
    # Consumers fail while no valid token is held: a recovered IdP must be noticed within
    # seconds. (Before, the 11th failure after expiry waited 150 to 300 s.)
    cap = DEFAULT.no_token_backoff_cap
    for failures in (1, 5, 11, 50, 10_000):
        for u in (0.0, 0.5, 0.999999):
            never_had = retry_delay(DEFAULT, failures, 2000.0, None, None, u)
            expired = retry_delay(DEFAULT, failures, 2000.0, 1000.0, None, u)
            assert DEFAULT.retry_floor <= never_had <= cap
            assert DEFAULT.retry_floor <= expired <= cap
    # Still jittered, so a fleet that lost its tokens together does not retry in step.
    assert retry_delay(DEFAULT, 20, 0.0, None, None, 0.0) < retry_delay(
        DEFAULT, 20, 0.0, None, None, 0.99
    )


def test_a_twenty_second_outage_over_expiry_is_noticed_within_seconds_of_recovery() -> None:
    # The case, simulated with the plan alone: 12 s tokens refreshed 2 s before
    # expiry, an IdP down for 20 s from the refresh point. Every attempt fails until the IdP is
    # back; the first attempt after that must come within 5 s.
    policy = SchedulePolicy(margin=2.0, min_interval=0.1)
    token = Token("t", issued_at=0.0, expires_at=12.0)
    down_from, down_until = 10.0, 30.0
    now, failures, attempts = 10.0, 0, 0
    rng = iter([0.37, 0.91, 0.05, 0.66, 0.99, 0.42] * 50)
    while now < down_until:
        failures += 1
        attempts += 1
        now = after_failure(
            policy,
            now=now,
            failures=failures,
            held=token,
            refresh_point=None,
            sink_retry=False,
            retry_after=1.0,  # the local IdP's 503 says Retry-After: 1
            u=next(rng),
        )
    assert now - down_until <= 5.0
    assert attempts < 40  # dense near expiry, not a tight loop after it
    assert down_from < 12.0 < down_until


def test_retry_after_is_honoured_without_a_token_too() -> None:
    assert retry_delay(DEFAULT, 1, 0.0, None, 42.0, u=0.0) == 42.0


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


def test_retries_go_on_after_expiry_with_backoff_up_to_the_no_token_cap() -> None:
    after = [retry_delay(DEFAULT, n, 2000.0, 1000.0, None, u=0.0) for n in (1, 2, 3, 20)]
    assert after == [0.5, 1.0, 2.0, DEFAULT.no_token_backoff_cap / 2]


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


# ------------------------------------------------------------------ the refresh point's draw


def test_the_jitter_draw_is_a_pure_function_of_job_and_token() -> None:
    assert jitter_draw("a", "0123abcd") == jitter_draw("a", "0123abcd")
    draws = {jitter_draw(job, fp) for job in ("a", "b") for fp in ("0123abcd", "deadbeef")}
    assert len(draws) == 4 and all(0.0 <= u < 1.0 for u in draws)
    # Spread like a uniform draw: a thousand tokens of one job cover the range.
    spread = sorted(jitter_draw("job", f"{n:08x}") for n in range(1000))
    assert spread[0] < 0.01 and spread[-1] > 0.99
    assert 0.45 < spread[500] < 0.55


def test_every_process_agrees_on_a_tokens_refresh_point() -> None:
    token = Token("header.payload.sig", issued_at=1000.0, expires_at=1000.0 + HOUR)
    first = token_refresh_at(DEFAULT, "job", token)
    assert first == token_refresh_at(DEFAULT, "job", Token(token.access_token, 1000.0, 4600.0))
    u = jitter_draw("job", token.fingerprint)
    assert first == refresh_at(DEFAULT, 1000.0, 4600.0, u)


# ----------------------------------------------------------------------- the next attempt


def test_after_success_waits_for_the_refresh_point_unless_a_sink_lacks_the_token() -> None:
    assert after_success(100.0, 500.0, sinks_pending=False) == 500.0
    assert after_success(100.0, 500.0, sinks_pending=True) == 100.0
    assert after_success(600.0, 500.0, sinks_pending=False) == 600.0  # already due: now


def test_a_sink_retry_starts_at_the_floor_and_never_postpones_the_fetch() -> None:
    held = Token("t", issued_at=0.0, expires_at=HOUR)
    first = after_failure(
        DEFAULT,
        now=100.0,
        failures=1,
        held=held,
        refresh_point=2400.0,
        sink_retry=True,
        retry_after=None,
        u=0.0,
    )
    assert first == pytest.approx(100.0 + DEFAULT.retry_floor)
    # Many failed sink writes later the backoff is long, but the fetch still comes on time.
    late = after_failure(
        DEFAULT,
        now=2300.0,
        failures=30,
        held=held,
        refresh_point=2400.0,
        sink_retry=True,
        retry_after=None,
        u=0.5,
    )
    assert late == 2400.0


def test_an_idp_failure_backs_off_from_one_second() -> None:
    held = Token("t", issued_at=0.0, expires_at=HOUR)
    at = after_failure(
        DEFAULT,
        now=2400.0,
        failures=1,
        held=held,
        refresh_point=2400.0,
        sink_retry=False,
        retry_after=None,
        u=0.0,
    )
    assert at == 2400.5


# ------------------------------------------------------------------------------- adoption


def test_adopt_keeps_the_longest_lived_valid_token_and_marks_the_other_sinks_stale() -> None:
    old = Token("old", 0.0, 100.0)
    new = Token("new", 50.0, 150.0)
    expired = Token("expired", 0.0, 10.0)
    adoption = adopt([old, None, new, expired], now=60.0, lifetime_bound=HOUR)
    assert adoption.token is new
    assert adoption.stale == (0, 1, 3)
    assert adoption.unbelievable == ()


def test_adopt_refuses_an_expiry_further_ahead_than_the_bound() -> None:
    edited = Token("edited", 0.0, 300 * 86400.0)  # someone edited expires_at_epoch
    honest = Token("honest", 0.0, 1800.0)
    adoption = adopt([edited, honest], now=60.0, lifetime_bound=HOUR)
    assert adoption.token is honest and adoption.stale == (0,)
    assert adoption.unbelievable == (0,)
    nothing = adopt([edited], now=60.0, lifetime_bound=HOUR)
    assert nothing.token is None and nothing.stale == (0,)


def test_the_stored_lifetime_bound_prefers_the_jobs_word_then_the_idps() -> None:
    assert stored_lifetime_bound(600.0, 3600.0) == 600.0
    assert stored_lifetime_bound(None, 3600.0) == 3600.0
    assert stored_lifetime_bound(None, None) == DEFAULT_STORED_LIFETIME_BOUND == 86400.0


# ---------------------------------------------------------------- rejections (rule 11)


def _held(issued_at: float, lifetime: float = HOUR) -> Token:
    return Token("tok", issued_at=issued_at, expires_at=issued_at + lifetime)


def test_a_confirmed_rejection_refreshes_now_even_inside_the_floor() -> None:
    verdict = on_rejection(DEFAULT, Rejections(), now=1005.0, held=_held(1000.0), confirmed=True)
    assert verdict.refresh_at == 1005.0
    assert verdict.state == Rejections()  # only a refresh that happened counts toward a fight
    assert not verdict.newly_contested


def test_an_unconfirmed_report_waits_for_the_floor() -> None:
    inside = on_rejection(DEFAULT, Rejections(), now=1005.0, held=_held(1000.0), confirmed=False)
    assert inside.refresh_at == 1000.0 + DEFAULT.min_interval
    outside = on_rejection(DEFAULT, Rejections(), now=1100.0, held=_held(1000.0), confirmed=False)
    assert outside.refresh_at == 1100.0


def test_rejections_of_one_token_that_brought_no_refresh_never_make_a_fight() -> None:
    """The IdP is down: the dead token is rejected again and again; no refresh happened."""
    state = Rejections()
    for second in range(20):
        now = 1000.0 + second
        verdict = on_rejection(DEFAULT, state, now=now, held=_held(999.0), confirmed=True)
        assert verdict.refresh_at == now and not verdict.newly_contested
        state = verdict.state
    assert not state.contested


def test_the_rejection_after_three_rejection_refreshes_in_a_lifetime_is_contested() -> None:
    state = Rejections()
    now = 1000.0
    for _ in range(CONTEST_LIMIT):
        verdict = on_rejection(DEFAULT, state, now=now, held=_held(now - 1), confirmed=True)
        assert verdict.refresh_at == now
        state = after_rejection_refresh(verdict.state, now)
        now += 10
    verdict = on_rejection(DEFAULT, state, now=now, held=_held(now - 1), confirmed=True)
    assert verdict.refresh_at is None and verdict.newly_contested
    assert verdict.state.contested
    again = on_rejection(DEFAULT, verdict.state, now=now + 1, held=_held(now), confirmed=True)
    assert again.refresh_at is None and not again.newly_contested
    # A scheduled refresh ends the contest, and rejections count again.
    ended = after_scheduled_refresh(again.state)
    assert not ended.contested
    assert ended.refreshed_at == again.state.refreshed_at


def test_rejection_refreshes_older_than_a_lifetime_do_not_count() -> None:
    state = Rejections(refreshed_at=(1000.0, 1010.0, 1020.0))
    late = 1015.0 + HOUR
    verdict = on_rejection(DEFAULT, state, now=late, held=_held(late - 5), confirmed=True)
    assert verdict.refresh_at == late
    assert verdict.state.refreshed_at == (1020.0,)  # only the ones within a lifetime


@given(
    gaps=st.lists(st.floats(min_value=0.0, max_value=2 * HOUR), min_size=1, max_size=40),
    lifetime=st.floats(min_value=1.0, max_value=2 * HOUR),
)
def test_never_more_than_the_limit_of_rejection_refreshes_in_any_lifetime(
    gaps: list[float], lifetime: float
) -> None:
    """However rejections arrive (each acted on at once), no window of one lifetime holds
    more than CONTEST_LIMIT rejection-driven refreshes; scheduled refreshes (every third
    rejection here) end contests, not the count."""
    policy = SchedulePolicy(min_interval=0.0)
    state = Rejections()
    now = 0.0
    refreshes: list[float] = []
    for index, gap in enumerate(gaps):
        now += gap
        held = Token("tok", issued_at=now, expires_at=now + lifetime)
        verdict = on_rejection(policy, state, now=now, held=held, confirmed=True)
        state = verdict.state
        if verdict.refresh_at is not None:
            refreshes.append(verdict.refresh_at)
            state = after_rejection_refresh(state, verdict.refresh_at)
        if index % 3 == 2:
            state = after_scheduled_refresh(state)
    for start in refreshes:
        assert sum(start <= at < start + lifetime for at in refreshes) <= CONTEST_LIMIT
