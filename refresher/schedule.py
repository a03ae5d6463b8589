"""The plan: when to refresh, when to retry, which stored token to keep, how to answer a
token the API rejected (rules 2, 4, 8 and 11 of docs/design.md). Pure functions of time and
state.

Nothing here reads a clock, sleeps or does I/O: the caller passes `now`, and every random
choice arrives as a draw `u` in [0, 1). The refresh point's draw is itself a pure function of
the job and its token (`jitter_draw`), so the daemon, `refresher once`, `refresher status` and
a restarted process all agree on when a token is due. `JobRunner` (refresh.py) only carries
the plan out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

from refresher.tokens import Token

# Without the job's `lifetime` or a lifetime the IdP issued to this process, a stored expiry
# further ahead than this is not believed (rule 8 of docs/design.md): a day is longer than any
# client-credentials token of the seed providers, and short enough that a bad edit cannot stop
# refreshing for long.
DEFAULT_STORED_LIFETIME_BOUND = 86400.0


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
    # While no valid token is held, consumers are failing now: a recovered IdP must be noticed
    # within seconds, whatever the failure count (the per-URL token bucket bounds the rate).
    no_token_backoff_cap: float = 4.0


# ------------------------------------------------------------------------ refresh points


def jitter_draw(job: str, fingerprint: str) -> float:
    """The refresh point's draw in [0, 1) for this job and token: spread across jobs and
    tokens like a random draw, yet the same in every process that looks at the token."""
    digest = hashlib.sha256(f"{job}\n{fingerprint}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


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


def token_refresh_at(policy: SchedulePolicy, job: str, token: Token) -> float:
    """The refresh point of `token` held by `job`: the one every command agrees on."""
    u = jitter_draw(job, token.fingerprint)
    return refresh_at(policy, token.issued_at, token.expires_at, u)


def is_due(now: float, token: Token | None, refresh_point: float | None) -> bool:
    """Whether a new token must be fetched now (nothing held counts as due)."""
    return token is None or refresh_point is None or now >= refresh_point


# -------------------------------------------------------------------------- next attempt


def after_success(now: float, refresh_point: float, *, sinks_pending: bool) -> float:
    """When to run next once an attempt left nothing failed: at once while a sink still lacks
    the held token (adopted from another sink), else at the refresh point."""
    return now if sinks_pending else max(refresh_point, now)


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
    retry in lock-step. While a valid token is held, never beyond half the time it has left,
    so retries grow denser as expiry nears. Once none is held (expired, or never fetched),
    never beyond `no_token_backoff_cap`: the failure count says how long the IdP was down,
    not how long it will stay down, and every second of waiting is a second consumers fail.
    `Retry-After` is honoured within the backoff cap (and within half the time left).
    """
    exponent = min(max(failures, 1) - 1, 30)  # 2**30 s is far past any cap; avoids overflow
    base = min(policy.backoff_initial * 2.0**exponent, policy.backoff_cap)
    holding = expires_at is not None and expires_at > now
    if not holding:
        base = min(base, policy.no_token_backoff_cap)
    delay = base / 2 + base / 2 * u
    if retry_after is not None and retry_after > 0:
        # Honoured, but a server asking for hours would leave consumers without a token.
        delay = max(delay, min(retry_after, policy.backoff_cap))
    if expires_at is not None and holding:
        delay = min(delay, (expires_at - now) / 2)
    return max(delay, policy.retry_floor)


def after_failure(
    policy: SchedulePolicy,
    *,
    now: float,
    failures: int,
    held: Token | None,
    refresh_point: float | None,
    sink_retry: bool,
    retry_after: float | None,
    u: float,
) -> float:
    """When to try again after the `failures`-th consecutive failed attempt.

    `sink_retry`: the attempt failed writing a token already held to a sink (not asking the
    IdP). Such a sink is retried from the floor up, not after seconds: on an invalidate-on-
    reissue IdP its readers hold a revoked token now. And a sink retry never postpones the
    next fetch past the token's refresh point. A failure of the IdP backs off as usual.
    """
    expires_at = held.expires_at if held is not None else None
    if sink_retry and held is not None and held.is_valid(now):
        policy = replace(policy, backoff_initial=policy.retry_floor)
    at = now + retry_delay(policy, failures, now, expires_at, retry_after, u)
    if sink_retry and refresh_point is not None and now < refresh_point:
        at = min(at, refresh_point)
    return at


# ------------------------------------------------------------------------------ adoption


def stored_lifetime_bound(job_lifetime: float | None, issued_lifetime: float | None) -> float:
    """How far ahead a stored expiry may lie and still be believed: the job's `lifetime` when
    set, else the lifetime the IdP last issued to this job in this process, else a day."""
    if job_lifetime is not None:
        return job_lifetime
    if issued_lifetime is not None and issued_lifetime > 0:
        return issued_lifetime
    return DEFAULT_STORED_LIFETIME_BOUND


@dataclass(frozen=True)
class Adoption:
    token: Token | None  # the stored token to keep, or None: fetch a new one
    stale: tuple[int, ...]  # the sinks (by index) that do not hold `token`
    unbelievable: tuple[int, ...]  # sinks holding a valid-looking expiry too far ahead


def as_stored(token: Token, now: float) -> Token:
    """A token read back, with an issue time no later than now: a stored `issued_at` in the
    future (an edit, a clock that ran ahead) would put the floor `issued_at + min_interval`,
    and so the refresh point, past the token's expiry."""
    if token.issued_at <= now:
        return token
    return replace(token, issued_at=min(now, token.expires_at))


def believable(token: Token, now: float, lifetime_bound: float) -> bool:
    """Whether a stored token's expiry may be believed: no further ahead than the bound."""
    return token.expires_at - now <= lifetime_bound


def adopt(
    held: Sequence[Token | None],
    now: float,
    lifetime_bound: float,
    in_memory: Token | None = None,
) -> Adoption:
    """Which token to keep instead of asking the IdP: one read back from a job's sinks, or
    `in_memory`, the one this runner already holds (issued to it, perhaps not yet in every
    sink; on an invalidate-on-reissue IdP it may be the only live one).

    A stored token is kept only when it is still valid and its expiry is believable (no
    further ahead than `lifetime_bound`): a sink is a file anyone with access can edit, and
    obeying an expiry years away would stop refreshing while every metric looked healthy. Of
    those, the one that lives longest wins; every sink that holds another one (or none) is
    stale. Stored issue times are taken no later than `now` (`as_stored`).
    """
    held = [None if token is None else as_stored(token, now) for token in held]
    unbelievable = tuple(
        index
        for index, token in enumerate(held)
        if token is not None and not believable(token, now, lifetime_bound)
    )
    valid = [
        (index, token)
        for index, token in enumerate(held)
        if token is not None and token.is_valid(now) and index not in unbelievable
    ]
    candidates = [token for _, token in valid]
    if in_memory is not None and in_memory.is_valid(now):
        candidates.append(in_memory)
    if not candidates:
        return Adoption(None, tuple(range(len(held))), unbelievable)
    best = max(candidates, key=lambda token: token.expires_at)
    stale = tuple(
        index
        for index, token in enumerate(held)
        if token is None or token.access_token != best.access_token
    )
    return Adoption(best, stale, unbelievable)


# ---------------------------------------------------------------------------- rejections

# Rejection-driven refreshes allowed within one token lifetime before the job stops reacting
# to rejections (rule 11 of docs/design.md).
CONTEST_LIMIT = 3


@dataclass(frozen=True)
class Rejections:
    """What the contest rule remembers of one job: when its rejection-driven refreshes were,
    and whether it has stopped reacting to rejections until the next scheduled refresh."""

    refreshed_at: tuple[float, ...] = ()
    contested: bool = False


@dataclass(frozen=True)
class RejectionVerdict:
    refresh_at: float | None  # when to refresh for this rejection; None: not at all
    state: Rejections
    newly_contested: bool  # this rejection is the one that found the token contested


def on_rejection(
    policy: SchedulePolicy,
    state: Rejections,
    *,
    now: float,
    held: Token,
    confirmed: bool,
) -> RejectionVerdict:
    """What to do about the API rejecting `held`: refresh now, at the floor, or not at all.

    `confirmed`: the job's own probe saw the rejection. Such a refresh may come before the
    floor (`min_interval` after the token was issued): the token is known dead, and the
    contest rule below stops loops better than the floor would. A report nobody confirmed
    (`trust_rejection_reports`) waits for the floor: a consumer's word is not proof.

    Contest rule: when rejection-driven refreshes already happened `CONTEST_LIMIT` times
    within one lifetime of `held`, another client is using the same credentials and scope,
    and every refresh revokes its token, which revokes ours in turn. Refreshing again would
    only feed that ping-pong (and the IdP's rate limit), so the job stops reacting until its
    next scheduled refresh (`after_scheduled_refresh`).
    """
    if state.contested:
        return RejectionVerdict(None, state, False)
    lifetime = max(held.lifetime, policy.min_interval)
    recent = tuple(at for at in state.refreshed_at if now - at < lifetime)
    if len(recent) >= CONTEST_LIMIT:
        return RejectionVerdict(None, Rejections(recent, contested=True), True)
    at = now if confirmed else max(now, held.issued_at + policy.min_interval)
    return RejectionVerdict(at, Rejections(recent), False)


def after_rejection_refresh(state: Rejections, now: float) -> Rejections:
    """A refresh a rejection asked for has brought a new token: it counts toward a fight.
    Only refreshes count, not rejections: while the IdP is down, the same dead token may be
    rejected many times, and that is no sign of another client."""
    return replace(state, refreshed_at=(*state.refreshed_at, now))


def after_scheduled_refresh(state: Rejections) -> Rejections:
    """A refresh the plan scheduled (not a rejection) ends a contest: rejections count again.
    The history stays, so a fight still going on is contested again at its next rejection,
    without three more refreshes."""
    return replace(state, contested=False)
