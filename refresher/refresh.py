"""Doing a refresh: one job's state and the attempt that moves it forward.

`JobRunner` is the controller of one token job. The plan (`schedule.py`) decides when to
fetch, when to retry and which stored token to keep; the runner carries it out: read the sinks
on start, fetch a token, write every sink, count and log what happened, and return when it
wants to run next. The daemon (or `refresher once`) only calls `step()` at the time the runner
asked for. Nothing here sleeps, and the clock and the IdP arrive from outside, so every path
runs in a unit test with plain numbers (tests/test_runner.py).

Invariants (rule 4 of docs/design.md): a failed attempt leaves every sink as it was; a token
the IdP has issued is never thrown away because a sink failed, since on an invalidate-on-
reissue IdP the previous token is already dead: the runner keeps it and retries the sinks that
missed it without asking the IdP again. Every error on the way, expected or not, is counted
as a failed attempt.

Self-healing (rule 11): with a probe configured, the runner asks the real API about a token
adopted from a sink before trusting it, about every token it has just fetched, every
`probe.interval`, and when a consumer reports a rejection (`report`). A rejection the plan
(`schedule.on_rejection`) says to act on makes a refresh due at once.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Literal, Protocol

from refresher.clock import Clock, format_utc
from refresher.config import TokenJobConfig
from refresher.errors import Reason, RefreshError
from refresher.metrics import JobSnapshot, JobStats
from refresher.probe import ProbeResult
from refresher.ratelimit import TokenBucket
from refresher.schedule import (
    Rejections,
    adopt,
    after_failure,
    after_rejection_refresh,
    after_scheduled_refresh,
    after_success,
    is_due,
    on_rejection,
    stored_lifetime_bound,
    token_refresh_at,
)
from refresher.sinks import Sink
from refresher.tokens import Token

log = logging.getLogger(__name__)


class TokenSource(Protocol):
    """Where new tokens come from: `idp.IdPClient` in the product, a script in unit tests."""

    def fetch(self, job: TokenJobConfig, *, still_wanted: Callable[[], bool]) -> Token | None:
        """A new token for `job`, or None when `still_wanted()` said no right before the
        request would have gone out. Raises RefreshError for a classified failure."""
        ...


@dataclass(frozen=True)
class RefreshEvent:
    """What one attempt did; logged, and shown live by `refresher demo`."""

    job: str
    scope: str | None
    outcome: str  # "success" | "failure" | "reused"
    reason: str | None
    message: str | None
    fingerprint: str | None
    expires_at: float | None
    next_attempt_at: float
    duration: float  # the IdP round trip, 0 when the IdP was not asked
    write_window: float | None  # from the IdP's answer to the last sink written


Listener = Callable[[RefreshEvent], None]


class TokenProbe(Protocol):
    """Asks the real API whether it accepts a token: `probe.Prober` in the product."""

    def probe(self, job: TokenJobConfig, token: Token) -> ProbeResult: ...


# How a rejection report was answered: the probe's outcome, `ignored` (no probe and reports
# not trusted), `stale` (the reported token is not the current one), `limited` (too many),
# `unavailable` (no token held yet; not counted), `forwarded` (a follower sent it to the
# leader through the Secret).
ReportOutcome = Literal[
    "accepted", "rejected", "error", "ignored", "stale", "limited", "unavailable", "forwarded"
]
# Reports that need a new probe, per job: a flood of reports for one token joins one probe,
# and this bounds how often the API is probed on consumers' say-so.
REPORT_RATE = 1.0
REPORT_BURST = 3


@dataclass(frozen=True)
class ReportAnswer:
    outcome: ReportOutcome
    refreshing: bool  # a refresh follows (the sinks will hold a new token)
    fingerprint: str | None  # of the token judged; of the current one when `stale`
    retry_after: float | None = None  # when `limited`


@dataclass(frozen=True)
class ReportTicket:
    answer: Future[ReportAnswer]
    queued: bool  # a step must run to answer it (the caller wakes the job)


@dataclass
class _Report:
    token: Token
    answer: Future[ReportAnswer]
    # Seen by the refresher's own proxy: the API rejected the token on a consumer's request
    # (trusted without a probe; with one, the probe still judges).
    observed: bool = False


@dataclass(frozen=True)
class SinkWrite:
    sink: Sink
    duration: float
    error: RefreshError | None


class JobRunner:
    def __init__(
        self,
        job: TokenJobConfig,
        sinks: Sequence[Sink],
        idp: TokenSource,
        *,
        clock: Clock = time.time,
        rng: random.Random | None = None,
        listeners: Sequence[Listener] = (),
        may_fetch: Callable[[], bool] = lambda: True,
        prober: TokenProbe | None = None,
        takes_reports: bool = False,
        on_token: Callable[[str, Token | None], None] | None = None,
    ) -> None:
        self.job = job
        # Asked right before every IdP request: False once this replica stopped leading.
        self.may_fetch = may_fetch
        self.sinks = list(sinks)
        self.idp = idp
        self.clock = clock
        self.rng = rng or random.Random()  # draws retry jitter only; refresh points are pure
        self.listeners = list(listeners)
        self.policy = job.schedule_policy()
        self._lock = threading.Lock()  # guards the state below against snapshot() readers
        self._started = False
        self.token: Token | None = None  # the newest token we hold (and want in every sink)
        self.pending: list[Sink] = []  # sinks that do not hold `token` yet
        self.next_attempt_at: float | None = None
        self.failures = 0
        self.last_error: RefreshError | None = None
        self.last_success_at: float | None = None
        self.issued_lifetime: float | None = None  # of the last token the IdP gave this runner
        self._answered_at = 0.0  # perf_counter when the IdP answered with `token`
        self._copied_once = True  # False while an adopted token waits for its first copy
        self.stats = JobStats(
            sinks=tuple(sink.name for sink in self.sinks),
            heals=job.probe is not None or takes_reports,
        )
        # Self-healing (rule 11 of docs/design.md).
        # Told the token this runner holds whenever it changes: the token API's board.
        self.on_token = on_token or (lambda name, token: None)
        self.prober = prober if job.probe is not None else None
        self.rejections = Rejections()
        self._probe_at: float | None = None  # the next `probe.interval` probe
        self._heal_at: float | None = None  # a refresh a rejection made due (or will)
        self._probe_blind: Token | None = None  # rejected by the probe as soon as issued
        self._probe_accepted_once = False  # the probe has accepted a token of this job
        self._last_rejected: str | None = None  # the token the probe last rejected
        self._report: _Report | None = None  # a rejection report waiting for a step
        self._report_bucket = TokenBucket(REPORT_RATE, REPORT_BURST)

    # ------------------------------------------------------------------------ public API

    def step(self) -> float:
        """Do what is due now; return the time (Unix seconds) this runner wants to run next."""
        try:
            if not self._started:
                at = self.start()
                if at > self.clock():
                    return self._unless_reported(at)
            return self._unless_reported(self.attempt())
        except Exception as err:  # a bug must not stop the job: count it, retry on the plan
            log.exception("unexpected error during refresh", extra={"token": self.job.name})
            error = RefreshError(Reason.INTERNAL, type(err).__name__)
            return self._unless_reported(self._failed(error, self.clock(), 0.0, None))

    def _unless_reported(self, at: float) -> float:
        """`at`, or now when a rejection report arrived during the step: it waits for one."""
        return min(at, self.clock()) if self.report_waiting else at

    @property
    def report_waiting(self) -> bool:
        """A rejection report waits for a step to answer it."""
        return self._report is not None

    def restart(self) -> None:
        """Read the sinks again on the next step (another replica may have written them)."""
        self._started = False

    def start(self) -> float:
        """Read every sink and adopt a token that is still good, instead of asking the IdP."""
        self._started = True
        now = self.clock()
        for sink in self.sinks:
            sink.remove_leftovers(now)  # a killed predecessor's temp files; never in `status`
        held = [self._read(sink, now) for sink in self.sinks]
        bound = stored_lifetime_bound(self.job.lifetime, self.issued_lifetime)
        # The token this runner holds is a candidate too: after leadership came back it may
        # be the newest one issued, with a sink write still pending.
        adoption = adopt(held, now, bound, in_memory=self.token)
        for index in adoption.unbelievable:
            stored = held[index]
            assert stored is not None
            log.warning(
                "stored expiry not believed: further ahead than any token of this job lives",
                extra={
                    "token": self.job.name,
                    "sink": self.sinks[index].name,
                    "expires_at": format_utc(stored.expires_at),
                    "fingerprint": stored.fingerprint,
                },
            )
        best = adoption.token
        with self._lock:
            self._heal_at = None  # decided afresh: another leader may have replaced the token
        if best is not None and best.unprobeable:
            self._probe_blind = best  # noted by whoever fetched it: the probe does not fit
        elif best is not None and self.prober is not None:
            # Before it is trusted: a predecessor killed between the IdP's answer and its
            # write leaves a token that its successor's sinks still hold, already revoked.
            probed = self._probe(best, "adopted")
            if probed.outcome == "rejected" and self._rejected(best, now, "probe", True):
                best = None  # dead: the sinks get a new token, not this one
        if best is not self.token:
            self._answered_at = 0.0  # the write window belongs to a token we fetched
        self._copied_once = False
        with self._lock:
            self.token = best
            self.pending = [self.sinks[index] for index in adoption.stale] if best else []
        self.on_token(self.job.name, best)
        at = self._plan(now)
        if best is not None:
            self._emit("reused", None, None, best, at, 0.0, None)
        return at

    def attempt(self) -> float:
        """One attempt: write a held, valid token to the sinks that lack it, or fetch a new
        one if that is due, or nothing.

        A token adopted on start is copied to the sinks that lack it once before anything
        else, even when a refresh is due (the IdP may be down, and a valid token beats none).
        After that, a due refresh wins over retrying a broken sink: the fetch writes every
        sink anyway."""
        now = self.clock()
        self._heal(now)
        if self.failures and self.next_attempt_at is not None and now < self.next_attempt_at:
            # Woken early (a report, an interval probe) while backing off from a failure:
            # the retry stays where the plan put it, whatever the IdP's `Retry-After` was.
            return self.next_attempt_at
        held = self.token
        copy_first = not self._refresh_due(now) or not self._copied_once
        if held is not None and self.pending and held.is_valid(now) and copy_first:
            self._copied_once = True
            return self._write_pending(held, now)
        if not self._refresh_due(now):
            return self._plan(now)  # nothing to do (a retry after an unexpected error)
        return self._fetch_and_write(now)

    def refresh_now(self) -> float:
        """Fetch a new token now, whatever the plan says (for a token known to be dead)."""
        return self._fetch_and_write(self.clock())

    def report(self, fingerprint: str, *, observed: bool = False) -> ReportTicket:
        """A consumer says the API rejected the token with this fingerprint. Answered at once
        when that is not the current token (`stale`) or reports come too fast (`limited`);
        else by the next step, which probes it (`ticket.queued`: the caller wakes the job).
        Reports for a token already waiting join its probe. `observed`: the refresher's own
        proxy saw the API reject it (proxy.py): the job's probe judges it at once, and a job
        without one trusts it as if `trust_rejection_reports` were on."""
        with self._lock:
            token = self.token
            if token is None:
                # Nothing to re-read yet (the first fetch, or a dead token dropped on start
                # while the IdP is down): come back shortly.
                return self.answered_now(ReportAnswer("unavailable", False, None, 1.0))
            if token.fingerprint != fingerprint:
                return self.answered_now(ReportAnswer("stale", False, token.fingerprint))
            if self.prober is None and not self.job.trust_rejection_reports and not observed:
                log.info(
                    "rejection report ignored: the job has no probe to confirm it, and "
                    "trust_rejection_reports is off",
                    extra={"token": self.job.name, "fingerprint": fingerprint},
                )
                return self.answered_now(ReportAnswer("ignored", False, token.fingerprint))
            waiting = self._report
            if waiting is not None and waiting.token.access_token == token.access_token:
                waiting.observed = waiting.observed or observed
                return ReportTicket(waiting.answer, queued=False)
            wait = self._report_bucket.try_take()
            if wait > 0:
                return self.answered_now(ReportAnswer("limited", False, token.fingerprint, wait))
            answer: Future[ReportAnswer] = Future()
            answer.set_running_or_notify_cancel()  # no waiter can cancel it for the others
            self._report = _Report(token, answer, observed)
        if waiting is not None:  # for a token replaced since: its reporters re-read
            self._resolve(waiting, ReportAnswer("stale", False, token.fingerprint))
        return ReportTicket(answer, queued=True)

    def answered_now(self, answer: ReportAnswer) -> ReportTicket:
        """A report answered without a step (counted, unless there was nothing to judge)."""
        if answer.outcome != "unavailable":
            self.stats.record_report(answer.outcome)
        future: Future[ReportAnswer] = Future()
        future.set_result(answer)
        return ReportTicket(future, queued=False)

    def clock_moved(self, seconds: float) -> None:
        """The wall clock jumped by `seconds`. Our times are Unix times read before the jump.

        A backward jump moves them back with the clock: the token dies after as many real
        seconds as before, so its expiry (and the TTL metric) stays true. A forward jump leaves
        them: it may be a correction toward the IdP's clock, after which the token really is
        that much closer to its `exp`; keeping them can only make the next refresh earlier.
        """
        if seconds >= 0:
            return
        with self._lock:
            if self.token is not None:
                self.token = replace(
                    self.token,
                    issued_at=self.token.issued_at + seconds,
                    expires_at=self.token.expires_at + seconds,
                )
            if self.next_attempt_at is not None:
                self.next_attempt_at += seconds
            if self.last_success_at is not None:
                self.last_success_at += seconds
            if self._probe_at is not None:
                self._probe_at += seconds
            if self._heal_at is not None:
                self._heal_at += seconds
            self.rejections = replace(
                self.rejections,
                refreshed_at=tuple(at + seconds for at in self.rejections.refreshed_at),
            )
            token = self.token
        self.on_token(self.job.name, token)

    @property
    def refresh_point(self) -> float | None:
        """When the held token is replaced: the plan's pure function of the job and the
        token (so it moves with the token's times, after a clock jump too)."""
        token = self.token
        return token_refresh_at(self.policy, self.job.name, token) if token else None

    def is_due(self) -> bool:
        now = self.clock()
        return self._refresh_due(now) or bool(self.pending)

    def snapshot(self) -> JobSnapshot:
        with self._lock:
            now = self.clock()
            token = self.token
            return JobSnapshot(
                name=self.job.name,
                expires_at=token.expires_at if token else None,
                next_attempt_at=self.next_attempt_at,
                last_success_at=self.last_success_at,
                consecutive_failures=self.failures,
                last_error=self.last_error.reason.value if self.last_error else None,
                ready=token is not None and token.is_valid(now) and not self.pending,
                contested=self.rejections.contested,
                stats=self.stats,
            )

    # -------------------------------------------------------------------------- internals

    def _refresh_due(self, now: float) -> bool:
        healing = self._heal_at is not None and now >= self._heal_at
        return healing or is_due(now, self.token, self.refresh_point)

    # ------------------------------------------------------------------------ self-healing

    def _heal(self, now: float) -> None:
        """Answer a waiting rejection report and run a due interval probe; a rejection the
        plan acts on makes a refresh due (`_heal_at`)."""
        report = self._report
        token = self.token
        if report is not None and (
            token is None or token.access_token != report.token.access_token
        ):
            self._answer(report, ReportAnswer("stale", False, token.fingerprint if token else None))
            report = None
        probe_due = self._probe_at is not None and now >= self._probe_at
        if token is None or (report is None and not probe_due):
            return
        answer = ReportAnswer("error", False, token.fingerprint)
        try:
            if report is not None and report.observed and self.prober is None:
                # What the proxy saw, trusted without a probe; like a trusted report it waits
                # for the floor: a consumer picks the path it calls, and a path that answers
                # 401 for reasons of its own must not refresh (and revoke) the token at will.
                refreshing = self._rejected(token, now, "proxy", False)
                answer = ReportAnswer("rejected", refreshing, token.fingerprint)
            elif self.prober is not None:
                result = self._probe(token, "report" if report is not None else "interval")
                refreshing = result.outcome == "rejected" and self._rejected(
                    token, now, "probe", True
                )
                answer = ReportAnswer(result.outcome, refreshing, token.fingerprint)
            elif report is not None:  # trust_rejection_reports (`report` ignores the rest)
                refreshing = self._rejected(token, now, "report", False)
                answer = ReportAnswer("rejected", refreshing, token.fingerprint)
        finally:  # answered whatever happened: its callers are waiting
            if report is not None:
                self._answer(report, answer)

    def _answer(self, report: _Report, answer: ReportAnswer) -> None:
        with self._lock:
            if self._report is report:
                self._report = None  # reports arriving from now on need a probe of their own
        self._resolve(report, answer)

    def _resolve(self, report: _Report, answer: ReportAnswer) -> None:
        self.stats.record_report(answer.outcome)
        report.answer.set_result(answer)

    def _probe(self, token: Token, why: str) -> ProbeResult:
        assert self.prober is not None and self.job.probe is not None
        result = self.prober.probe(self.job, token)
        interval = self.job.probe.interval
        with self._lock:  # against `clock_moved`
            self._probe_at = self.clock() + interval if interval is not None else None
        self.stats.record_probe(result.outcome)
        if result.outcome == "accepted":
            self._probe_accepted_once = True
        # A token rejected again (while contested, or while its refresh waits for the IdP)
        # is said once at warning level, then at debug: every interval would be noise.
        again = result.outcome == "rejected" and self._last_rejected == token.access_token
        if result.outcome == "rejected":
            self._last_rejected = token.access_token
        log.log(
            logging.DEBUG if result.outcome == "accepted" or again else logging.WARNING,
            f"probe: token {result.outcome}",
            extra={
                "token": self.job.name,
                "why": why,
                "detail": result.detail,
                "fingerprint": token.fingerprint,
            },
        )
        return result

    def _rejected(self, token: Token, now: float, source: str, confirmed: bool) -> bool:
        """The API rejected `token` (`source`: the probe, or a trusted report). Returns
        whether a refresh is now planned for it."""
        if self._probe_blind is not None and token.access_token == self._probe_blind.access_token:
            return False  # the probe refused it as soon as it was issued: the probe is wrong
        self.stats.record_rejection(source)
        if self._heal_at is not None:
            return True  # a refresh for it is planned already (perhaps the IdP is down)
        verdict = on_rejection(
            self.policy, self.rejections, now=now, held=token, confirmed=confirmed
        )
        with self._lock:
            self.rejections = verdict.state
        fields = {"token": self.job.name, "source": source, "fingerprint": token.fingerprint}
        if verdict.newly_contested:
            log.error(
                "token contested: another client is using the same credentials and scope "
                "(each token request revokes the other's token); not reacting to rejections "
                "until the next scheduled refresh",
                extra={**fields, "next_refresh_at": self.refresh_point},
            )
        if verdict.refresh_at is None:
            return False
        with self._lock:
            self._heal_at = verdict.refresh_at
        log.warning(
            "token rejected by the API; refreshing", extra={**fields, "at": verdict.refresh_at}
        )
        return True

    def _verify(self, token: Token, now: float) -> None:
        """Probe a token the IdP has just issued. Rejected now by a probe that has never
        accepted a token of this job, it was never alive for that probe: the probe URL (or
        the job's scope) does not fit this API, and refreshing again would not help. Once
        the probe has accepted one, a rejection of a fresh token is another client's
        reissue in the few milliseconds since ours (a fight): a rejection like any other."""
        outcome = self._probe(token, "issued").outcome
        if outcome != "rejected":
            self._probe_blind = None
            return
        if self._probe_accepted_once:
            self._rejected(token, now, "probe", True)
            return
        self._probe_blind = token
        log.error(
            "the probe rejects the token the IdP has just issued: check the probe's url and "
            "the job's scopes; rejections of this token are not acted on",
            extra={"token": self.job.name, "fingerprint": token.fingerprint},
        )
        # Noted beside the token, so that a restart (or the next `refresher once`) does not
        # take the probe's word on it and refresh, revoking what consumers hold.
        for sink in self.sinks:
            if sink not in self.pending:
                try:
                    sink.mark_unprobeable(token)
                except Exception:  # a hint only; the sink's own errors are logged there
                    log.exception("cannot note the probe's verdict", extra={"token": self.job.name})

    def _read(self, sink: Sink, now: float) -> Token | None:
        try:
            return sink.read(now)
        except RefreshError as err:
            # Counted like a failed write (reason `sink`), so the failure alerts see it; the
            # sink counts as holding nothing.
            self.stats.record_attempt("failure", err.reason.value)
            log.warning(
                "cannot read sink on start",
                extra={"token": self.job.name, "sink": sink.name, "error": err.message},
            )
            return None

    def _plan(self, now: float) -> float:
        """The next attempt when nothing failed."""
        if self._refresh_due(now):
            at = now
        else:
            refresh_point = self.refresh_point
            assert refresh_point is not None
            at = after_success(now, refresh_point, sinks_pending=bool(self.pending))
            for wake in (self._probe_at, self._heal_at):
                if wake is not None:
                    at = min(at, max(wake, now))
        self.next_attempt_at = at
        return at

    def _fetch_and_write(self, now: float) -> float:
        started = time.perf_counter()
        try:
            token = self.idp.fetch(self.job, still_wanted=self.may_fetch)
        except RefreshError as err:
            duration = time.perf_counter() - started
            self.stats.record_refresh_duration(duration)
            return self._failed(err, now, duration, None)
        if token is None:
            return self._plan(now)  # not the leader (any more): someone else refreshes
        answered = self._answered_at = time.perf_counter()
        duration = answered - started
        self.stats.record_refresh_duration(duration)
        healing = self._heal_at is not None and now >= self._heal_at
        self.on_token(self.job.name, token)  # the token API first: it is the fastest sink
        with self._lock:
            self.token = token
            self.pending = list(self.sinks)
            self.issued_lifetime = token.lifetime
            if healing:
                self.rejections = after_rejection_refresh(self.rejections, now)
            else:
                self.rejections = after_scheduled_refresh(self.rejections)
            self._heal_at = None
        results = self._write(token)
        window = time.perf_counter() - answered
        write_error = self._settle(token, results)
        self.stats.record_write_window(window)
        if self.prober is not None:
            self._verify(token, self.clock())
        if write_error is not None:
            return self._failed(write_error, self.clock(), duration, window)
        return self._succeeded(token, duration, window)

    def _write_pending(self, token: Token, now: float) -> float:
        results = self._write(token)
        # The window of this token closes only now, when its last sink holds it.
        window = time.perf_counter() - self._answered_at if self._answered_at else None
        error = self._settle(token, results)
        if error is not None:
            return self._failed(error, now, 0.0, None)
        if window is not None:
            self.stats.record_write_window(window)
        return self._succeeded(token, 0.0, window)

    def _write(self, token: Token) -> list[SinkWrite]:
        """Write `token` to every pending sink (all are tried, whatever fails). Only the writes
        happen here: this loop is the write window, so counting and follow-up work wait for
        `_settle`."""
        results: list[SinkWrite] = []
        for sink in list(self.pending):
            begun = time.perf_counter()
            error: RefreshError | None = None
            try:
                sink.write(token)
            except RefreshError as err:
                error = err
            except Exception as err:  # a bug in a sink fails that sink, counted, not the job
                log.exception("unexpected error writing a sink", extra={"token": self.job.name})
                error = RefreshError(Reason.SINK, f"cannot write {sink.name}: {type(err).__name__}")
            results.append(SinkWrite(sink, time.perf_counter() - begun, error))
        with self._lock:
            self.pending = [result.sink for result in results if result.error is not None]
        return results

    def _settle(self, token: Token, results: list[SinkWrite]) -> RefreshError | None:
        """Count the writes, let written sinks finish their work; return the first error."""
        for result in results:
            outcome = "failure" if result.error else "success"
            self.stats.record_sink_write(result.sink.name, result.duration, outcome)
            if result.error is None:
                try:
                    result.sink.settle(token)
                except Exception:  # the write stands; what follows it is the sink's own
                    log.exception(
                        "unexpected error settling a sink", extra={"token": self.job.name}
                    )
        return next((result.error for result in results if result.error), None)

    def _succeeded(self, token: Token, duration: float, window: float | None) -> float:
        now = self.clock()
        with self._lock:
            self.failures = 0
            self.last_error = None
            self.last_success_at = now
        self.stats.record_attempt("success")
        at = self._plan(now)
        self._emit("success", None, None, token, at, duration, window)
        return at

    def _failed(
        self, error: RefreshError, now: float, duration: float, window: float | None
    ) -> float:
        with self._lock:
            self.failures += 1
            self.last_error = error
        self.stats.record_attempt("failure", error.reason.value)
        at = after_failure(
            self.policy,
            now=now,
            failures=self.failures,
            held=self.token,
            refresh_point=self.refresh_point,
            sink_retry=error.reason is Reason.SINK and bool(self.pending),
            retry_after=error.retry_after,
            u=self.rng.random(),
        )
        self.next_attempt_at = at
        self._emit("failure", error.reason.value, error.message, self.token, at, duration, window)
        return at

    def _emit(
        self,
        outcome: str,
        reason: str | None,
        message: str | None,
        token: Token | None,
        next_attempt_at: float,
        duration: float,
        window: float | None,
    ) -> None:
        event = RefreshEvent(
            job=self.job.name,
            scope=" ".join(self.job.scopes) or None,
            outcome=outcome,
            reason=reason,
            message=message,
            fingerprint=token.fingerprint if token else None,
            expires_at=token.expires_at if token else None,
            next_attempt_at=next_attempt_at,
            duration=duration,
            write_window=window,
        )
        log_event(event)
        for listener in self.listeners:
            listener(event)


def log_event(event: RefreshEvent) -> None:
    """One log line per attempt, with every field an operator filters on."""
    fields = {
        "token": event.job,
        "scope": event.scope,
        "outcome": event.outcome,
        "reason": event.reason,
        "error": event.message,
        "duration_ms": round(event.duration * 1000, 2),
        "write_window_ms": None
        if event.write_window is None
        else round(event.write_window * 1000, 3),
        "expires_at": event.expires_at,
        "next_refresh_at": event.next_attempt_at,
        "fingerprint": event.fingerprint,
    }
    level = logging.WARNING if event.outcome == "failure" else logging.INFO
    messages = {
        "success": "token refreshed",
        "reused": "token reused from sink",
        "failure": "refresh failed",
    }
    log.log(
        level, messages[event.outcome], extra={k: v for k, v in fields.items() if v is not None}
    )
