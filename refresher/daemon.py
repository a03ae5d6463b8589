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

import functools
import logging
import queue
import random
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from types import FrameType
from typing import TYPE_CHECKING, Any

import requests
from apscheduler.events import EVENT_JOB_SUBMITTED, JobSubmissionEvent
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger

from refresher import logs
from refresher.board import TokenBoard
from refresher.clock import Clock
from refresher.clockguard import ClockGuard
from refresher.config import Config, KubernetesSinkConfig
from refresher.credentials import CredentialRef, read_credentials
from refresher.errors import RefreshError
from refresher.idp import IdPClient, new_session
from refresher.liveness import Running, heartbeat_interval, is_alive, stuck_after
from refresher.metrics import ApiStats, JobSnapshot, Metrics, ProxyStats, WatchStats
from refresher.nudge import nudgers
from refresher.probe import Prober
from refresher.ratelimit import RateLimits
from refresher.refresh import JobRunner, Listener, ReportAnswer, ReportTicket
from refresher.sinks import SinkFactory, describe
from refresher.tokens import Token
from refresher.watch import SecretWatch

if TYPE_CHECKING:
    from refresher.config import TlsListenerConfig
    from refresher.consumers import Gate, TokenReviews
    from refresher.http import HttpServer, TlsFiles
    from refresher.http import Listener as HttpListener
    from refresher.leader import LeaseElector
    from refresher.sinks.kubernetes import KubernetesSecretSink

log = logging.getLogger(__name__)

HEARTBEAT = "_heartbeat"
# Ends a forwarded report that the follower's proxy saw the API reject (no probe needed).
OBSERVED = "observed"
# A follower writes a report of a token it still serves again after this many seconds.
FORWARD_AGAIN = 5.0  # not a possible job name (they start with a letter or digit)


def build_runners(
    config: Config,
    *,
    session: requests.Session | None = None,
    clock: Clock = time.time,
    listeners: Sequence[Listener] = (),
    rng: random.Random | None = None,
    sinks: SinkFactory | None = None,
    may_fetch: Callable[[], bool] = lambda: True,
    on_token: Callable[[str, Token | None], None] | None = None,
) -> list[JobRunner]:
    limits = RateLimits(config.settings.idp_rate_limit, config.settings.idp_rate_burst)
    session = session or new_session(config.settings.max_concurrent_refreshes)
    idp = IdPClient(session, clock, rate_limits=limits)
    rng = rng or random.Random()
    sinks = sinks or SinkFactory(config.settings.kubernetes)
    prober = Prober(session, workers=2 * config.settings.max_concurrent_refreshes)
    return [
        JobRunner(
            job,
            [sinks.build(sink, job=job.name) for sink in job.sinks],
            idp,
            clock=clock,
            rng=rng,  # one generator for all: each holds ~2.5 KB of state
            listeners=listeners,
            may_fetch=may_fetch,
            prober=prober,
            takes_reports=config.settings.api.enabled or job.proxy is not None,
            on_token=on_token,
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
        # Taken to change leadership and to publish a watched token (`_watched`).
        self._board_lock = threading.Lock()
        # What the token API serves (api.py): each job's current token.
        self.board = TokenBoard([job.name for job in config.jobs])
        self.runners = build_runners(
            config,
            session=session,
            clock=clock,
            listeners=listeners,
            sinks=self.sinks,
            may_fetch=self._leading.is_set,
            on_token=self._runner_token,
        )
        self.metrics.bind_jobs(self.snapshots, state_visible=self._leading.is_set)
        proxied = [job for job in config.jobs if job.proxy is not None]
        self.api_stats = ApiStats()
        if config.settings.api.enabled or proxied:
            self.metrics.registry.register(self.api_stats)
        self.proxy_stats = ProxyStats([job.name for job in proxied])
        if proxied:
            self.metrics.registry.register(self.proxy_stats)
        self.scheduler = BackgroundScheduler(
            timezone=UTC,
            executors={
                "default": ThreadPoolExecutor(config.settings.max_concurrent_refreshes),
                "heartbeat": ThreadPoolExecutor(1),  # never behind a pool of slow refreshes
            },
            # The heartbeat has a store of its own: dropping every token job keeps it.
            jobstores={"default": MemoryJobStore(), "heartbeat": MemoryJobStore()},
            # Two instances, so that a run asked for while one is running (a rejection
            # report) is never dropped by the scheduler; `_run` lets one step run at a time.
            job_defaults={"misfire_grace_time": None, "coalesce": True, "max_instances": 2},
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
        # With leader election, every replica watches the Secret of each job it serves (by
        # the token API or a proxy), and serves what it holds while following (watch.py).
        self.watches: dict[str, SecretWatch] = {}
        if election.enabled:
            served = {
                job.name
                for job in config.jobs
                if config.settings.api.enabled or job.proxy is not None
            }
            self.watches = self._secret_watches(served)
        self.metrics.registry.register(WatchStats(self._watch_states))
        if any(
            isinstance(sink, KubernetesSinkConfig) and sink.nudge is not None
            for job in config.jobs
            for sink in job.sinks
        ):
            self.metrics.registry.register(self.sinks.nudge_stats)
        # Liveness (see liveness.py): the heartbeat's last stamp and the steps in progress.
        self._heartbeat_timeout = config.settings.metrics.heartbeat_timeout
        self._last_beat = time.monotonic()
        self._stuck_after = {job.name: stuck_after(job, config.settings) for job in config.jobs}
        self._in_flight: dict[str, float] = {}
        self._run_again: set[str] = set()  # asked to run while running (`_run`)
        # Rejection reports sent through the Secret: by this follower, seen by this leader.
        self._forwarded: dict[str, tuple[str, float]] = {}  # job -> (what was said, monotonic)
        self._forwards_seen: dict[str, str] = {}
        self._watched_tokens: dict[str, Token | None] = {}  # with the credentials' extras
        self._in_flight_lock = threading.Lock()
        self._by_name = {runner.job.name: runner for runner in self.runners}
        # One HTTP stack for every listener: the metrics port is `http`, the API listener
        # `api` (each bound here already, so a port in use fails before anything starts, and
        # port 0 has its number).
        self.server: HttpServer | None = None
        self.http: HttpListener | None = None
        self.api: HttpListener | None = None
        self.proxies: dict[str, HttpListener] = {}  # by job
        self.gates: list[Gate] = []
        metrics_on = config.settings.metrics.enabled if serve_http is None else serve_http
        api_on = config.settings.api.enabled and serve_http is not False
        proxies_on = bool(proxied) and serve_http is not False
        if metrics_on or api_on or proxies_on:
            from refresher.http import HttpServer, Limits  # aiohttp: 0.3 s to import

            self.server = HttpServer()
        if metrics_on and self.server is not None:
            from refresher.server import endpoints

            settings = config.settings.metrics
            app = endpoints(self.server, self.metrics.registry, self.healthy, self.ready)
            self.http = self.server.add_listener(
                settings.bind, settings.port, app, Limits(max_connections=settings.max_connections)
            )
        reviews: TokenReviews | None = None
        if (api_on or proxies_on) and any(
            job.consumers is not None and job.consumers.kubernetes for job in config.jobs
        ):
            from refresher.consumers import TokenReviews

            reviews = TokenReviews(
                lambda: self.sinks.kube().authentication(),
                config.settings.kubernetes.request_timeout,
            )
        if api_on and self.server is not None:
            from refresher import api
            from refresher.consumers import Gate

            settings_api = config.settings.api
            gate = Gate(
                {job.name: job for job in config.jobs},
                loopback=settings_api.loopback,
                reviews=reviews,
            )
            self.gates.append(gate)
            context = api.ApiContext(
                server=self.server,
                gate=gate,
                board=self.board,
                report=self.report,
                accepting=self._accepting_reports,
                stats=self.api_stats,
                clock=clock,
            )
            host, port = settings_api.address
            self.api = self.server.add_listener(
                host,
                port,
                api.endpoints(context),
                Limits(
                    max_connections=settings_api.max_connections,
                    # On loopback every caller is 127.0.0.1 (the pod's own containers).
                    max_per_peer=None
                    if settings_api.loopback
                    else settings_api.max_connections_per_address,
                    request_timeout=api.REQUEST_TIMEOUT,
                ),
                _tls_files(settings_api.tls),
            )
        if proxies_on and self.server is not None:
            from refresher import proxy
            from refresher.consumers import Gate

            for job in proxied:
                assert job.proxy is not None
                # A gate per listener: anonymous callers are welcome on loopback only.
                gate = Gate({job.name: job}, loopback=job.proxy.loopback, reviews=reviews)
                self.gates.append(gate)
                proxy_context = proxy.ProxyContext(
                    job=job,
                    server=self.server,
                    gate=gate,
                    board=self.board,
                    report=self._proxy_report,
                    stats=self.proxy_stats,
                    auth_failure=self.api_stats.record_auth_failure,
                    leading=self._leading.is_set,
                    clock=clock,
                )
                host, port = job.proxy.address
                self.proxies[job.name] = self.server.add_listener(
                    host,
                    port,
                    proxy.Proxy(proxy_context).app(),
                    proxy.limits(job.proxy),
                    _tls_files(job.proxy.tls),
                )

    def _proxy_report(self, name: str, fingerprint: str) -> ReportTicket | None:
        return self.report(name, fingerprint, observed=True)

    def _secret_watches(self, served: set[str]) -> dict[str, SecretWatch]:
        from refresher.sinks.kubernetes import KubernetesSecretSink

        watches: dict[str, SecretWatch] = {}
        for runner in self.runners:
            if runner.job.name not in served:
                continue
            sink = next(
                (each for each in runner.sinks if isinstance(each, KubernetesSecretSink)), None
            )
            assert sink is not None  # config.py: a job served by followers has a Secret sink
            name = runner.job.name
            watches[name] = SecretWatch(
                name,
                sink.namespace,
                sink.config.name,
                core=self.sinks.kube().core,
                token_of=sink.token_of,
                publish=functools.partial(self._watched, name),
                mark_stale=functools.partial(self._watch_stale, name),
                reported=functools.partial(self._forwarded_report, name, sink),
                request_timeout=self.config.settings.kubernetes.request_timeout,
                max_staleness=self.config.settings.api.max_staleness,
                clock=self.clock,
            )
        return watches

    def _forwarded_report(self, name: str, sink: KubernetesSecretSink, secret: Any) -> None:
        """On the leader: a follower's report found on the Secret (`<fingerprint> <when>`,
        then `observed` when the follower's proxy saw the API reject it); handled as a report
        made here (probe, limits) once per annotation written."""
        reported = sink.reported(secret)
        if reported is None or not self._leading.is_set():
            return
        if self._forwards_seen.get(name) == reported:
            return
        self._forwards_seen[name] = reported
        log.info("rejection report forwarded by a follower", extra={"token": name})
        fingerprint, *rest = reported.split(" ")
        self.report(name, fingerprint, observed=rest[1:2] == [OBSERVED])

    def _forward_report(self, runner: JobRunner, fingerprint: str, observed: bool) -> ReportTicket:
        """On a follower: the report goes to the leader through the Secret it watches: one
        write per reported token, again after FORWARD_AGAIN seconds if it is still held (the
        leader's probe may have accepted an earlier report of it)."""
        name = runner.job.name
        entry = self.board.current(name)
        token = entry.token if entry is not None else None
        if token is None:
            return runner.answered_now(ReportAnswer("unavailable", False, None, 1.0))
        if token.fingerprint != fingerprint:
            return runner.answered_now(ReportAnswer("stale", False, token.fingerprint))
        last = self._forwarded.get(name)
        now = time.monotonic()
        said = f"{fingerprint} {OBSERVED}" if observed else fingerprint
        if last is None or last[0] != said or now - last[1] >= FORWARD_AGAIN:
            from refresher.sinks.kubernetes import KubernetesSecretSink

            sink = next(s for s in runner.sinks if isinstance(s, KubernetesSecretSink))
            self._forwarded[name] = (said, now)  # also after a failure: no write storm
            stamp = int(self.clock() * 1000)
            try:
                sink.note_rejected(f"{fingerprint} {stamp}" + (f" {OBSERVED}" if observed else ""))
            except RefreshError as err:
                log.warning("cannot forward a rejection report", extra={"error": err.message})
                return runner.answered_now(ReportAnswer("error", False, fingerprint))
        # Whether the token is dead is the leader's probe's to say: no promise of a refresh.
        return runner.answered_now(ReportAnswer("forwarded", False, fingerprint))

    def _runner_token(self, name: str, token: Token | None) -> None:
        # An IdP answer that lands after this replica stopped leading must not replace what
        # the watch shows: the new leader's token may be newer.
        with self._board_lock:
            if self._leading.is_set():
                self.board.publish(name, token)

    def _watched(self, name: str, token: Token | None) -> None:
        job = self._by_name[name].job
        if token is not None and not token.extras and job.credentials_file is not None:
            # A Secret does not say which of its keys are credential extras (Lucidtech's
            # `api_key`); the credentials do, and the token API serves them beside the token.
            try:
                token = replace(token, extras=read_credentials(job).extras)
            except RefreshError as err:
                log.warning("cannot read the credentials' extras", extra={"error": err.message})
        # Under the lock `_lead` takes to become leader: a watch event that saw a follower
        # cannot land after the new leader's runner published its own token.
        with self._board_lock:
            self._watched_tokens[name] = token
            if not self._leading.is_set():  # the leader's runner publishes its own tokens
                self.board.publish(name, token)

    def _watch_stale(self, name: str, why: str | None) -> None:
        with self._board_lock:
            if not self._leading.is_set():
                self.board.mark_stale(name, why)

    def _watch_states(self) -> list[tuple[str, bool, int]]:
        return [(name, watch.up, watch.restarts) for name, watch in self.watches.items()]

    # --------------------------------------------------------------------------- lifecycle

    def start(self) -> Daemon:
        self._last_beat = time.monotonic()
        self.scheduler.start()
        self.scheduler.add_job(
            self._beat,
            "interval",
            seconds=heartbeat_interval(self._heartbeat_timeout),
            next_run_time=datetime.now(UTC),
            id=HEARTBEAT,
            jobstore="heartbeat",
            executor="heartbeat",
            max_instances=1,
        )
        self.guard.start()
        if self.server is not None:
            self.server.start()
            assert self.server.loop is not None
            self.board.bind(self.server.loop)
        if self.http is not None:
            log.info("serving metrics", extra={"bind": self.http.host, "port": self.http.port})
        if self.api is not None:
            log.info("serving the token API", extra={"bind": self.api.host, "port": self.api.port})
        for name, listener in self.proxies.items():
            log.info(
                "serving the proxy",
                extra={"token": name, "bind": listener.host, "port": listener.port},
            )
        log.info(
            "started",
            extra={"jobs": len(self.runners), "config": redacted_summary(self.config)},
        )
        for watch in self.watches.values():
            watch.start()
        if self.elector is not None:
            self._follow()  # until the Lease says otherwise
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
        self.board.close()  # long polls are answered now, not at the end of the grace period
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)
        self.guard.stop()
        if self.elector is not None:
            self.elector.stop()
        for watch in self.watches.values():
            watch.stop()
        if self.server is not None:
            self.server.stop()
        for gate in self.gates:
            gate.close()
        for nudger in nudgers(sink for runner in self.runners for sink in runner.sinks):
            nudger.close()  # a successor nudges from now on
        for idp in {id(runner.idp): runner.idp for runner in self.runners}.values():
            if isinstance(idp, IdPClient):
                idp.close()  # the client certificates' sessions and their connections
        self._stopped.set()
        log.info("stopped")

    # -------------------------------------------------------------------------- leadership

    def _lead(self) -> None:
        """This replica refreshes from now on; every job re-reads its sinks first, since the
        previous leader may have refreshed them."""
        with self._board_lock:
            self._leading.set()
            for runner in self.runners:
                self.board.mark_stale(runner.job.name, None)
        self.metrics.leader.set(1)
        for runner in self.runners:
            runner.restart()
            self._schedule(runner, self.clock())

    def _follow(self) -> None:
        """Stop refreshing at once. A refresh in flight may finish its write; no new one starts."""
        with self._board_lock:
            self._leading.clear()
            self._show_watched()
        self.metrics.leader.set(0)
        self.scheduler.remove_all_jobs(jobstore="default")
        self.guard.clear()

    def _show_watched(self) -> None:
        """A follower serves what its watches hold (called under `_board_lock`)."""
        for runner in self.runners:
            name = runner.job.name
            watch = self.watches.get(name)
            if watch is None:  # without the API's Secret watch, only the leader can vouch
                self.board.mark_stale(name, "this replica follows: ask the leader")
            else:
                self.board.show(name, self._watched_tokens.get(name), watch.stale_reason)

    @property
    def is_leader(self) -> bool:
        return self._leading.is_set()

    def run_forever(self) -> None:
        """Run until SIGTERM or SIGINT, then stop cleanly. SIGHUP, SIGUSR1 and SIGUSR2 are
        handled (`_on_signal`) and the daemon runs on. The handler only queues the signal
        (`SimpleQueue.put` is safe there); the main thread does the work."""
        received: queue.SimpleQueue[int] = queue.SimpleQueue()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            received.put(signum)

        handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
        previous = {sig: signal.signal(sig, on_signal) for sig in handled}
        try:
            self.start()
            while True:
                signum = received.get()
                name = signal.Signals(signum).name
                if signum in (signal.SIGTERM, signal.SIGINT):
                    log.info("signal received, stopping", extra={"signal": name})
                    break
                self._on_signal(signum)
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            log.info("SIGHUP received; reload is not supported yet, keeping the running config")
        elif signum == signal.SIGUSR1:
            self.log_state()
        elif signum == signal.SIGUSR2:
            debug = logs.toggle_debug()
            log.warning(f"SIGUSR2 received; debug logging {'on' if debug else 'off'}")

    def log_state(self) -> None:
        """One line per job (SIGUSR1): what it holds and plans; a fingerprint, never a token."""
        alive, why = self.healthy()
        with self._in_flight_lock:
            refreshing = sorted(self._in_flight)
        log.info(
            "state",
            extra={
                "jobs": len(self.runners),
                "leader": self.is_leader,
                "alive": alive,
                "health": why,
                "refreshing": refreshing,
            },
        )
        for runner in self.runners:
            job = runner.snapshot()
            token = runner.token
            log.info(
                "job state",
                extra={
                    "token": job.name,
                    "fingerprint": token.fingerprint if token else None,
                    "expires_at": job.expires_at,
                    "next_refresh_at": job.next_attempt_at,
                    "consecutive_failures": job.consecutive_failures,
                    "last_error": job.last_error,
                    "ready": job.ready,
                },
            )

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

    # ------------------------------------------------------------------ rejection reports

    def report(self, name: str, fingerprint: str, *, observed: bool = False) -> ReportTicket | None:
        """A consumer's rejection report (api.py), or one the proxy saw (`observed`,
        proxy.py); None when no job has that name."""
        runner = self._by_name.get(name)
        if runner is None:
            return None
        if not self.is_leader and name in self.watches:
            return self._forward_report(runner, fingerprint, observed)
        ticket = runner.report(fingerprint, observed=observed)
        if ticket.queued:
            source = "rejection seen by the proxy" if observed else "rejection report received"
            self._run_now(
                name, f"{source}; " + ("probing the token" if runner.prober else "refreshing")
            )
        return ticket

    def _accepting_reports(self) -> tuple[bool, str]:
        if self._stopping.is_set():
            return False, "stopping"
        if not self.is_leader and not self.watches:
            return False, "this replica does not refresh tokens (it follows); report to the leader"
        return True, "ok"

    def _submitted(self, event: JobSubmissionEvent) -> None:
        self.guard.disarm(event.job_id)

    def _run(self, runner: JobRunner) -> None:
        if self._stopping.is_set() or not self._leading.is_set():
            return
        name = runner.job.name
        with self._in_flight_lock:
            if name in self._in_flight:
                # Asked to run while a step of this job runs (a report arrived): one step
                # per job at a time, so the running one runs again as soon as it ends.
                self._run_again.add(name)
                return
            self._in_flight[name] = time.monotonic()
        self.guard.check_clock()
        try:
            at = runner.step()
        except Exception:  # step() classifies its own failures; this is a last resort
            log.exception("runner failed", extra={"token": name})
            at = self.clock() + 30.0
        finally:
            with self._in_flight_lock:
                self._in_flight.pop(name, None)
                again = name in self._run_again
                self._run_again.discard(name)
        if again:
            at = min(at, self.clock())
        if self._leading.is_set() and not self._stopping.is_set():
            self._schedule(runner, at)
            if runner.report_waiting:
                # A report arrived after the step looked, and its wake-up may have been
                # overwritten by the schedule just set: wake the job again.
                self._run_now(name, "answering a rejection report")

    # ------------------------------------------------------------------------------ health

    def snapshots(self) -> list[JobSnapshot]:
        self.guard.check_clock()  # a scrape sees expiries moved with a jump, not stale ones
        return [runner.snapshot() for runner in self.runners]

    def _beat(self) -> None:
        """The heartbeat job. Also armed with the guard, as token jobs are, so a wall clock
        set back does not hold the next beat back (and fail /healthz) for as long. It also
        has each Secret watch judge its staleness, whatever its own thread is blocked on."""
        self._last_beat = time.monotonic()
        for watch in self.watches.values():
            watch.check_stale()
        self.guard.arm(HEARTBEAT, heartbeat_interval(self._heartbeat_timeout))

    def healthy(self) -> tuple[bool, str]:
        """Alive (liveness.py): the scheduler runs, its heartbeat is recent and no refresh
        step has run past its bound. Cheap: answered on the HTTP loop itself."""
        if not self.scheduler.running or self._stopped.is_set():
            return False, "scheduler not running"
        with self._in_flight_lock:
            running = [
                Running(name, started, self._stuck_after[name])
                for name, started in self._in_flight.items()
            ]
        return is_alive(time.monotonic(), self._last_beat, self._heartbeat_timeout, running)

    def ready(self) -> tuple[bool, str]:
        if self.elector is not None and not self.is_leader:
            if self.watches:  # it serves the token API: ready only if it can serve every job
                now = self.clock()
                cannot = [
                    f"{name}: {why}"
                    for name in self.watches
                    if (entry := self.board.current(name)) is not None
                    and (why := entry.unservable(now)) is not None
                ]
                if cannot:
                    return False, "follower that cannot serve: " + "; ".join(cannot)
            return True, f"follower (leader: {self.elector.holder or 'unknown'})"
        waiting = [job.name for job in self.snapshots() if not job.ready]
        if waiting:
            return False, "no valid token yet: " + ", ".join(waiting)
        return True, "ok"


def _tls_files(tls: TlsListenerConfig | None) -> TlsFiles | None:
    if tls is None:
        return None
    from refresher.http import TlsFiles

    return TlsFiles(tls.cert_file, tls.key_file)


def redacted_summary(config: Config) -> dict[str, Any]:
    """The effective config for the start-up log line: where and what, never a secret."""
    return {
        "tokens": [
            {
                "name": job.name,
                "provider": job.provider,
                "token_url": (job.token_url or "(credentials_file)").split("?")[0],
                "scopes": job.scopes,
                "client_secret": (
                    CredentialRef.of(job.client_secret).describe() if job.client_secret else None
                ),
                "margin": job.margin,
                "sinks": [describe(sink) for sink in job.sinks],
                **(
                    {"proxy": {"listen": job.proxy.listen, "upstream": job.proxy.upstream}}
                    if job.proxy is not None
                    else {}
                ),
            }
            for job in config.jobs
        ],
        "leader_election": config.settings.leader_election.enabled,
        "max_concurrent_refreshes": config.settings.max_concurrent_refreshes,
    }
