"""When to refresh and when to retry: pure functions of time and state (design rules 2 and 4).

Nothing here reads a clock, sleeps or draws a random number: the caller passes `now` and a
uniform draw `u` in [0, 1), so every rule is testable with plain numbers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SchedulePolicy:
    # Absolute lead before expiry. None: refresh when a third of the lifetime is left
    # (cert-manager's default), which leaves mounted Secrets time to propagate.
    margin: float | None = None
    # No two refreshes of one job closer than this, whatever the token says: stops tight loops
    # on tokens that live for seconds or are issued already nearly expired.
    min_interval: float = 30.0
    # Jitter moves a refresh earlier by up to this fraction of the lifetime, at most `jitter_cap`.
    jitter_fraction: float = 0.10
    jitter_cap: float = 300.0
    backoff_initial: float = 1.0
    backoff_cap: float = 300.0
    # The shortest retry wait, reached only in the last seconds before expiry.
    retry_floor: float = 0.1


def lead_time(policy: SchedulePolicy, lifetime: float) -> float:
    """How long before expiry a token of this lifetime is refreshed (before jitter)."""
    if lifetime <= 0:
        return 0.0
    # A margin at least as long as the lifetime would mean "refresh at once, forever": ignored.
    if policy.margin is not None and 0 <= policy.margin < lifetime:
        return policy.margin
    return lifetime / 3


def refresh_at(policy: SchedulePolicy, issued_at: float, expires_at: float, u: float) -> float:
    """The moment a token should be refreshed. `u` in [0, 1) draws the jitter."""
    lifetime = expires_at - issued_at
    jitter = min(policy.jitter_fraction * max(lifetime, 0.0), policy.jitter_cap) * u
    planned = expires_at - lead_time(policy, lifetime) - jitter
    # The floor wins over the margin: a token that lives shorter than the floor is refreshed
    # late (and reported as expired) rather than hammered.
    return max(planned, issued_at + policy.min_interval)


def wait_until(now: float, at: float, *, started: float) -> float:
    """Seconds to wait from `now` until `at`, robust to a clock that moved backwards.

    `started` is when the wait was planned. If the clock now reads earlier than that, it went
    backwards; we never wait longer than the wait that was planned at `started`.
    """
    planned = max(at - started, 0.0)
    return min(max(at - now, 0.0), planned)


def retry_delay(
    policy: SchedulePolicy,
    failures: int,
    now: float,
    expires_at: float | None,
    retry_after: float | None,
    u: float,
) -> float:
    """Seconds to wait after the `failures`-th consecutive failure before trying again.

    Exponential backoff with "equal jitter" (half fixed, half random), so a fleet does not
    retry in lock-step. `Retry-After` is honoured, but never beyond half the time the held
    token has left, so retries grow denser as expiry nears; after expiry plain backoff goes on.
    """
    exponent = min(max(failures, 1) - 1, 30)  # 2**30 s is far past any cap; avoids overflow
    base = min(policy.backoff_initial * 2.0**exponent, policy.backoff_cap)
    delay = base / 2 + base / 2 * u
    if retry_after is not None and retry_after > 0:
        # Honoured, but a server asking for hours would leave consumers without a token.
        delay = max(delay, min(retry_after, policy.backoff_cap))
    if expires_at is not None and expires_at > now:
        delay = min(delay, (expires_at - now) / 2)
    return max(delay, policy.retry_floor)


def is_due(now: float, refresh_at_: float) -> bool:
    return now >= refresh_at_
