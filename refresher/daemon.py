"""The daemon: wires config, IdP client, sinks, runners, scheduler, metrics and HTTP together.

Each token job is one APScheduler job that runs `JobRunner.step()`; after each run its next
run time is set to the time the runner asks for. APScheduler traps avoided on purpose:
- `misfire_grace_time=None`: the default of 1 s silently drops a job that is already late
  (a busy pool, a suspended VM), which here would mean a token that is never refreshed;
- a date job is gone once it has run, and adding one costs a signature check and a new Job:
  a third of a refresh's own CPU. So the trigger (`_Backstop`) keeps the job, and the next
  run is set with the cheap `modify_job`;
- a job that raises is not retried by the scheduler, so `_run` never lets one escape.
The thread pool is bounded (`max_concurrent_refreshes`): a slow IdP holds at most that many
threads and other jobs still run when a thread frees up.

Runners plan in Unix time (token expiries are Unix times); the scheduler is handed the *delay*
until then, and `ClockGuard` keeps the same delay on the monotonic clock, so a wall-clock jump
neither holds a refresh back nor fires it in a loop (see `clockguard.py`).
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from types import FrameType
from typing import TYPE_CHECKING, Any

import requests
from apscheduler.events import EVENT_JOB_SUBMITTED, JobSubmissionEvent
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger

from refresher.clockguard import ClockGuard
from refresher.config import Config
from refresher.idp import IdPClient, new_session
from refresher.metrics import JobSnapshot, Metrics
from refresher.ratelimit import RateLimits
from refresher.refresh import JobRunner, Listener
from refresher.server import MetricsServer
from refresher.sinks import SinkFactory, describe

if TYPE_CHECKING:
    from refresher.leader import LeaseElector

log = logging.getLogger("refresher.daemon")

Clock = Callable[[], float]


def build_runners(
    config: Config,
    *,
    session: requests.Session | None = None,
    clock: Clock = time.time,
    listeners: Sequence[Listener] = (),
    rng: random.Random | None = None,
    sinks: SinkFactory | None = None,
    may_fetch: Callable[[], bool] = lambda: True,
) -> list[JobRunner]:
    idp = IdPClient(session or new_session(config.settings.max_concurrent_refreshes), clock)
    rng = rng or random.Random()
    sinks = sinks or SinkFactory(config.settings.kubernetes)
    limits = RateLimits(config.settings.idp_rate_limit, config.settings.idp_rate_burst)
    return [
        JobRunner(
            job,
            [sinks.build(sink, job=job.name) for sink in job.sinks],
            idp,
            clock=clock,
            rng=rng,  # one generator for all: each holds ~2.5 KB of state
            listeners=listeners,
            may_fetch=may_fetch,
            rate_limit=limits.for_url(job.token_url or str(job.credentials_file)),
        )
        for job in config.jobs
    ]


class _Backstop(BaseTrigger):  # type: ignore[misc]  # apscheduler ships no types
    """Proposes a run a day after the last one. `Daemon._run` replaces that with the time the
    runner asks for as soon as a run ends; the proposal only keeps the job alive meanwhile (a
    trigger that proposes nothing has its job removed), and would retry a job whose run
    somehow never rescheduled it."""

    __slots__ = ()
    INTERVAL = timedelta(days=1)

    def get_next_fire_time(
        self, previous_fire_time: datetime | None, now: datetime
    ) -> datetime | None:
        return (previous_fire_time or now) + self.INTERVAL


class Daemon:
    def __init__(
        self,
        config: Config,
        *,
        clock: Clock = time.time,
        monotonic: Clock = time.monotonic,
        session: requests.Session | None = None,
        metrics: Metrics | None = None,
        listeners: Sequence[Listener] = (),
        serve_http: bool | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.guard = ClockGuard(
            self._run_overdue, self._clock_jumped, wall=clock, monotonic=monotonic
        )
        self.metrics = metrics or Metrics(clock=clock)
        self.sinks = SinkFactory(config.settings.kubernetes)
        self._leading = threading.Event()
        self.runners = build_runners(
            config,
            session=session,
            clock=clock,
            listeners=listeners,
            sinks=self.sinks,
            may_fetch=self._leading.is_set,
        )
        self.metrics.bind_jobs(self.snapshots, state_visible=self._leading.is_set)
        self.scheduler = BackgroundScheduler(
            timezone=UTC,
            executors={"default": ThreadPoolExecutor(config.settings.max_concurrent_refreshes)},
            job_defaults={"misfire_grace_time": None, "coalesce": True, "max_instances": 1},
        )
        # Handed to the pool is no longer held back, even if it waits there for a thread.
        self.scheduler.add_listener(self._submitted, EVENT_JOB_SUBMITTED)
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self.elector: LeaseElector | None = None
        election = config.settings.leader_election
        if election.enabled:
            from refresher.leader import LeaseElector

            self.elector = LeaseElector(
                self.sinks.kube(),
                election,
                on_started_leading=self._lead,
                on_stopped_leading=self._follow,
            )
        self.metrics.leader.set(0)
        serve = config.settings.metrics.enabled if serve_http is None else serve_http
        self.http: MetricsServer | None = None
        if serve:
            settings = config.settings.metrics
            self.http = MetricsServer(
                settings.bind, settings.port, self.metrics.registry, self.healthy, self.ready
            )

    # --------------------------------------------------------------------------- lifecycle

    def start(self) -> Daemon:
        self.scheduler.start()
        self.guard.start()
        if self.http is not None:
            self.http.start()
            log.info("serving metrics", extra={"port": self.http.port})
        log.info(
            "started",
            extra={"jobs": len(self.runners), "config": redacted_summary(self.config)},
        )
        if self.elector is not None:
            self.elector.start()
        else:
            self._lead()
        return self

    def stop(self) -> None:
        """Stop scheduling; wait for refreshes in flight so no write is cut off; then give
        up the lease so a successor takes over at once."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self.scheduler.shutdown(wait=True)
        self.guard.stop()
        if self.elector is not None:
            self.elector.stop()
        if self.http is not None:
            self.http.stop()
        self._stopped.set()
        log.info("stopped")

    # -------------------------------------------------------------------------- leadership

    def _lead(self) -> None:
        """This replica refreshes from now on; every job re-reads its sinks first, since the
        previous leader may have refreshed them."""
        self._leading.set()
        self.metrics.leader.set(1)
        for runner in self.runners:
            runner.restart()
            self._schedule(runner, self.clock())

    def _follow(self) -> None:
        """Stop refreshing at once. A refresh in flight may finish its write; no new one starts."""
        self._leading.clear()
        self.metrics.leader.set(0)
        self.scheduler.remove_all_jobs()
        self.guard.clear()

    @property
    def is_leader(self) -> bool:
        return self._leading.is_set()

    def run_forever(self) -> None:
        """Run until SIGTERM or SIGINT, then stop cleanly."""
        stop_requested = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            log.info("signal received, stopping", extra={"signal": signal.Signals(signum).name})
            stop_requested.set()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            stop_requested.wait()
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    # --------------------------------------------------------------------------- scheduling

    def _schedule(self, runner: JobRunner, at: float) -> None:
        delay = max(at - self.clock(), 0.0)
        self.guard.arm(runner.job.name, delay)
        # APScheduler compares run dates with its own reading of the wall clock.
        run_date = datetime.now(UTC) + timedelta(seconds=delay)
        try:
            self.scheduler.modify_job(runner.job.name, next_run_time=run_date)
        except JobLookupError:  # the first run since this replica started leading
            self.scheduler.add_job(
                self._run,
                trigger=_Backstop(),
                next_run_time=run_date,
                args=[runner],
                id=runner.job.name,
                replace_existing=True,  # two threads may both have found it missing
            )

    def _run_overdue(self, name: str) -> None:
        """The guard saw `name`'s monotonic deadline pass while the scheduler still holds it
        back (the wall clock went back)."""
        self._run_now(name, "running a job the wall clock held back")

    def _clock_jumped(self, seconds: float) -> None:
        for runner in self.runners:
            runner.clock_moved(seconds)
            # After a forward jump, a job whose refresh point the clock passed runs now, once
            # (its next run is planned from the new time), whichever clock the scheduler saw.
            # A job the guard holds no deadline for is running (it plans its next run when
            # it ends) or the daemon is not leading. Should a run end between this check and
            # the change, the scheduler skips the second instance and proposes the backstop;
            # the guard still holds the planned deadline, so the job runs then, late by the
            # guard's grace.
            name = runner.job.name
            if seconds > 0 and self.guard.is_armed(name) and runner.is_due():
                self._run_now(name, "refreshing now: the wall clock jumped past it")

    def _run_now(self, name: str, why: str) -> None:
        try:
            self.scheduler.modify_job(name, next_run_time=datetime.now(UTC))
        except JobLookupError:
            return  # the daemon stopped leading meanwhile
        log.info(why, extra={"token": name})

    def _submitted(self, event: JobSubmissionEvent) -> None:
        self.guard.disarm(event.job_id)

    def _run(self, runner: JobRunner) -> None:
        if self._stopping.is_set() or not self._leading.is_set():
            return
        self.guard.check_clock()
        try:
            at = runner.step()
        except Exception:  # step() classifies its own failures; this is a last resort
            log.exception("runner failed", extra={"token": runner.job.name})
            at = self.clock() + 30.0
        if self._leading.is_set() and not self._stopping.is_set():
            self._schedule(runner, at)

    # ------------------------------------------------------------------------------ health

    def snapshots(self) -> list[JobSnapshot]:
        self.guard.check_clock()  # a scrape sees expiries moved with a jump, not stale ones
        return [runner.snapshot() for runner in self.runners]

    def healthy(self) -> tuple[bool, str]:
        alive = self.scheduler.running and not self._stopped.is_set()
        return alive, "ok" if alive else "scheduler not running"

    def ready(self) -> tuple[bool, str]:
        if self.elector is not None and not self.is_leader:
            return True, f"follower (leader: {self.elector.holder or 'unknown'})"
        waiting = [job.name for job in self.snapshots() if not job.ready]
        if waiting:
            return False, "no valid token yet: " + ", ".join(waiting)
        return True, "ok"


def redacted_summary(config: Config) -> dict[str, Any]:
    """The effective config for the start-up log line: where and what, never a secret."""
    return {
        "tokens": [
            {
                "name": job.name,
                "provider": job.provider,
                "token_url": (job.token_url or "(credentials_file)").split("?")[0],
                "scopes": job.scopes,
                "client_secret": job.client_secret.ref().describe() if job.client_secret else None,
                "margin": job.margin,
                "sinks": [describe(sink) for sink in job.sinks],
            }
            for job in config.jobs
        ],
        "leader_election": config.settings.leader_election.enabled,
        "max_concurrent_refreshes": config.settings.max_concurrent_refreshes,
    }
