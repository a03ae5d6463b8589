"""Prometheus metrics (prefix `refresher_`, label `token` = the job's name).

Every per-job series is produced at scrape time by one custom collector, from the jobs' own
state: time-dependent values (expiry, seconds left, next refresh) are computed then, so
`refresher_token_ttl_seconds` falls between refreshes and goes negative once a token has
expired; counts and histograms are plain numbers in each job's `JobStats`. (prometheus_client's
labelled children hold one locked value object per series and bucket, about 17 KB per job;
plain numbers keep 10,000 jobs within a small pod.) No label carries a token, a secret or an
unbounded value.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from refresher import __version__, logs
from refresher.clock import Clock
from refresher.errors import Reason

REFRESH_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
WRITE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
REASONS = tuple(reason.value for reason in Reason)
# Self-healing (probe.py, refresh.py): fixed label sets, every value exported from the start.
PROBE_OUTCOMES = ("accepted", "rejected", "error")
REJECTION_SOURCES = ("probe", "report", "proxy")
REPORT_OUTCOMES = ("accepted", "rejected", "error", "ignored", "stale", "limited", "forwarded")


class Buckets:
    """One histogram's state: counts per bucket (`le` semantics), sum, and count."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        running = 0
        buckets: list[tuple[str, float]] = []
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            buckets.append((bound, running))
        return buckets


@dataclass
class JobStats:
    """What one job has done so far; written by the job's runner, read by scrapes."""

    sinks: tuple[str, ...] = ()
    # Has a probe or takes rejection reports: only then are the self-healing series exported.
    heals: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    attempts: dict[str, int] = field(default_factory=lambda: {"success": 0, "failure": 0})
    failures: dict[str, int] = field(default_factory=dict)
    sink_writes: dict[tuple[str, str], int] = field(default_factory=dict)
    refresh_duration: Buckets = field(default_factory=lambda: Buckets(REFRESH_BUCKETS))
    write_window: Buckets = field(default_factory=lambda: Buckets(WRITE_BUCKETS))
    sink_write_duration: dict[str, Buckets] = field(default_factory=dict)
    probes: dict[str, int] = field(default_factory=dict)
    rejections: dict[str, int] = field(default_factory=dict)
    reports: dict[str, int] = field(default_factory=dict)

    def _count(self, counts: dict[str, int], key: str) -> None:
        with self.lock:
            counts[key] = counts.get(key, 0) + 1

    def record_probe(self, outcome: str) -> None:
        self._count(self.probes, outcome)

    def record_rejection(self, source: str) -> None:
        self._count(self.rejections, source)

    def record_report(self, outcome: str) -> None:
        self._count(self.reports, outcome)

    def record_attempt(self, outcome: str, reason: str | None = None) -> None:
        with self.lock:
            self.attempts[outcome] += 1
            if reason is not None:
                self.failures[reason] = self.failures.get(reason, 0) + 1

    def record_refresh_duration(self, seconds: float) -> None:
        with self.lock:
            self.refresh_duration.observe(seconds)

    def record_write_window(self, seconds: float) -> None:
        with self.lock:
            self.write_window.observe(seconds)

    def record_sink_write(self, sink: str, seconds: float, outcome: str) -> None:
        with self.lock:
            self.sink_writes[sink, outcome] = self.sink_writes.get((sink, outcome), 0) + 1
            buckets = self.sink_write_duration.get(sink)
            if buckets is None:
                buckets = self.sink_write_duration[sink] = Buckets(WRITE_BUCKETS)
            buckets.observe(seconds)


@dataclass(frozen=True)
class JobSnapshot:
    """What the metrics, `/readyz` and `status` need to know about one job, at one moment."""

    name: str
    expires_at: float | None  # of the token the job holds, None when it holds none
    next_attempt_at: float | None
    last_success_at: float | None
    consecutive_failures: int
    last_error: str | None  # the classified reason of the last failure
    ready: bool  # holds a valid token, written to every sink
    contested: bool = False  # not reacting to rejections: another client fights for the token
    stats: JobStats = field(default_factory=JobStats)


# Every per-job family: key -> (type, name, help, labels). One table, so a family's name and
# its labels are written once.
_Family = type[CounterMetricFamily] | type[GaugeMetricFamily] | type[HistogramMetricFamily]
_FAMILY_TABLE: dict[str, tuple[_Family, str, str, tuple[str, ...]]] = {
    "attempts": (
        CounterMetricFamily,
        "refresher_refresh_attempts",
        "Refresh attempts by outcome.",
        ("token", "outcome"),
    ),
    "failures": (
        CounterMetricFamily,
        "refresher_refresh_failures",
        "Failed refresh attempts by reason.",
        ("token", "reason"),
    ),
    "sink_writes": (
        CounterMetricFamily,
        "refresher_sink_writes",
        "Token writes to sinks by outcome.",
        ("token", "sink", "outcome"),
    ),
    "refresh_duration": (
        HistogramMetricFamily,
        "refresher_refresh_duration_seconds",
        "Round trip to the IdP for one token request (with its wait for the rate limit).",
        ("token",),
    ),
    "sink_write_duration": (
        HistogramMetricFamily,
        "refresher_sink_write_duration_seconds",
        "Time to write a token to one sink.",
        ("token", "sink"),
    ),
    "write_window": (
        HistogramMetricFamily,
        "refresher_write_window_seconds",
        "From the IdP's answer to the last sink written: how long consumers of an "
        "invalidate-on-reissue IdP may hold a revoked token.",
        ("token",),
    ),
    "probes": (
        CounterMetricFamily,
        "refresher_probes",
        "Probes of the held token against the real API, by outcome.",
        ("token", "outcome"),
    ),
    "rejections": (
        CounterMetricFamily,
        "refresher_token_rejections",
        "Times the API rejected the held token: seen by the probe, or reported by a "
        "consumer and trusted without one.",
        ("token", "source"),
    ),
    "reports": (
        CounterMetricFamily,
        "refresher_rejection_reports",
        "Rejection reports from consumers, by how they were answered.",
        ("token", "outcome"),
    ),
    "contested": (
        GaugeMetricFamily,
        "refresher_token_contested",
        "1 while the job ignores rejections because another client with the same "
        "credentials and scope keeps revoking its token.",
        ("token",),
    ),
    "expiry": (
        GaugeMetricFamily,
        "refresher_token_expiry_timestamp_seconds",
        "When the token the job holds expires (Unix time).",
        ("token",),
    ),
    "ttl": (
        GaugeMetricFamily,
        "refresher_token_ttl_seconds",
        "Seconds until the held token expires; negative once it has expired.",
        ("token",),
    ),
    "next": (
        GaugeMetricFamily,
        "refresher_next_refresh_timestamp_seconds",
        "When the next refresh (or retry) of the job is scheduled (Unix time).",
        ("token",),
    ),
    "success": (
        GaugeMetricFamily,
        "refresher_last_success_timestamp_seconds",
        "When the job last wrote a new token to every sink (Unix time).",
        ("token",),
    ),
    "consecutive": (
        GaugeMetricFamily,
        "refresher_consecutive_failures",
        "Failed attempts since the last success.",
        ("token",),
    ),
}


# The self-healing counters: JobStats field (and family key) -> every label value.
_HEALING_COUNTS = (
    ("probes", PROBE_OUTCOMES),
    ("rejections", REJECTION_SOURCES),
    ("reports", REPORT_OUTCOMES),
)


def _families() -> dict[str, Any]:  # each value a *MetricFamily with its own add_metric
    return {
        key: family(name, documentation, labels=list(labels))
        for key, (family, name, documentation, labels) in _FAMILY_TABLE.items()
    }


class _JobCollector(Collector):
    def __init__(
        self,
        source: Callable[[], Iterable[JobSnapshot]],
        clock: Clock,
        state_visible: Callable[[], bool],
    ) -> None:
        self._source = source
        self._clock = clock
        self._state_visible = state_visible

    def collect(self) -> Iterator[Metric]:
        now = self._clock()
        # A follower's view of the tokens goes stale while the leader refreshes them; it
        # exports only what it did itself.
        state = self._state_visible()
        f = _families()
        for job in self._source():
            token = [job.name]
            with job.stats.lock:
                s = job.stats
                for outcome, count in s.attempts.items():
                    f["attempts"].add_metric([job.name, outcome], count)
                for reason in REASONS:
                    f["failures"].add_metric([job.name, reason], s.failures.get(reason, 0))
                for key, values in _HEALING_COUNTS if s.heals else ():
                    counts = getattr(s, key)
                    for value in values:
                        f[key].add_metric([job.name, value], counts.get(value, 0))
                for sink in s.sinks:
                    for outcome in ("success", "failure"):
                        f["sink_writes"].add_metric(
                            [job.name, sink, outcome], s.sink_writes.get((sink, outcome), 0)
                        )
                for name, buckets, labels in (
                    ("refresh_duration", s.refresh_duration, token),
                    ("write_window", s.write_window, token),
                    *(
                        ("sink_write_duration", b, [job.name, sink])
                        for sink, b in s.sink_write_duration.items()
                    ),
                ):
                    f[name].add_metric(labels, buckets.cumulative(), sum_value=buckets.total)
            if not state:
                continue
            if job.expires_at is not None:
                f["expiry"].add_metric(token, job.expires_at)
                f["ttl"].add_metric(token, job.expires_at - now)
            if job.next_attempt_at is not None:
                f["next"].add_metric(token, job.next_attempt_at)
            if job.last_success_at is not None:
                f["success"].add_metric(token, job.last_success_at)
            f["consecutive"].add_metric(token, job.consecutive_failures)
            if job.stats.heals:
                f["contested"].add_metric(token, 1 if job.contested else 0)
        yield from f.values()


class _LogCollector(Collector):
    """The log pipeline's process-wide counts (see `logs.py`)."""

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "refresher_log_records_dropped",
            "Log lines dropped because the log stream did not keep up (a full queue).",
            value=logs.dropped_records(),
        )
        yield CounterMetricFamily(
            "refresher_log_write_errors",
            "Log lines the log stream refused (closed, broken pipe).",
            value=logs.write_errors(),
        )


API_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
AUTH_REASONS = ("missing", "invalid", "not_allowed", "review_error", "rate_limited")


class ApiStats(Collector):
    """The API listener's counts (api.py): requests by job and status, their duration (long
    poll waits excluded), consumers refused by reason. The `token` label is a configured
    job's name or `(unknown)`, never what a caller typed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str], int] = {}
        self._duration = Buckets(API_BUCKETS)
        self._auth_failures = dict.fromkeys(AUTH_REASONS, 0)

    def record_request(self, job: str | None, status: int, seconds: float) -> None:
        key = (job or "(unknown)", str(status))
        with self._lock:
            self._requests[key] = self._requests.get(key, 0) + 1
            self._duration.observe(max(seconds, 0.0))

    def record_auth_failure(self, reason: str) -> None:
        with self._lock:
            self._auth_failures[reason] = self._auth_failures.get(reason, 0) + 1

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "refresher_api_requests",
            "Token API requests by job and HTTP status.",
            labels=["token", "code"],
        )
        duration = HistogramMetricFamily(
            "refresher_api_request_duration_seconds",
            "Time to answer a token API request, long-poll waits excluded.",
        )
        failures = CounterMetricFamily(
            "refresher_consumer_auth_failures",
            "Callers of the API listener refused, by reason.",
            labels=["reason"],
        )
        with self._lock:
            for (job, code), count in sorted(self._requests.items()):
                requests.add_metric([job, code], count)
            duration.add_metric([], self._duration.cumulative(), sum_value=self._duration.total)
            for reason, count in self._auth_failures.items():
                failures.add_metric([reason], count)
        yield requests
        yield duration
        yield failures


PROXY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0
)  # fmt: skip
# What happened to a request the upstream rejected (proxy.py): replayed and then accepted or
# rejected again, the replay failed, or it was not replayed (no newer token came within
# `replay_wait`, or its body was streamed).
REPLAY_OUTCOMES = ("accepted", "rejected", "failed", "no_new_token", "not_replayable")
UPSTREAM_ERRORS = ("connect", "connect_timeout", "timeout", "reset", "tls", "protocol")
PROXY_PARTS = ("upstream", "added")


class ProxyStats(Collector):
    """The proxies' counts (proxy.py), by job: answers by status, replays by outcome, upstream
    errors by reason, and where the time went (`upstream`: waiting for the upstream's answer
    heads; `added`: the rest, until the answer's head went back to the consumer)."""

    def __init__(self, jobs: Iterable[str]) -> None:
        self._lock = threading.Lock()
        self._jobs = tuple(jobs)
        self._requests: dict[tuple[str, str], int] = {}
        self._replays = {(job, outcome): 0 for job in self._jobs for outcome in REPLAY_OUTCOMES}
        self._errors = {(job, reason): 0 for job in self._jobs for reason in UPSTREAM_ERRORS}
        self._duration = {
            (job, part): Buckets(PROXY_BUCKETS) for job in self._jobs for part in PROXY_PARTS
        }

    def record_request(self, job: str, status: int, upstream: float, added: float) -> None:
        key = (job, str(status))
        with self._lock:
            self._requests[key] = self._requests.get(key, 0) + 1
            self._duration[(job, "upstream")].observe(max(upstream, 0.0))
            self._duration[(job, "added")].observe(max(added, 0.0))

    def record_replay(self, job: str, outcome: str) -> None:
        with self._lock:
            self._replays[(job, outcome)] += 1

    def record_upstream_error(self, job: str, reason: str) -> None:
        with self._lock:
            self._errors[(job, reason)] += 1

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "refresher_proxy_requests",
            "Requests answered by a job's proxy, by HTTP status sent to the consumer.",
            labels=["token", "code"],
        )
        replays = CounterMetricFamily(
            "refresher_proxy_replays",
            "Requests the upstream rejected, by what the proxy did: replayed with a newer "
            "token (accepted, rejected, failed) or not (no_new_token, not_replayable).",
            labels=["token", "outcome"],
        )
        errors = CounterMetricFamily(
            "refresher_proxy_upstream_errors",
            "Requests the upstream did not answer, by reason.",
            labels=["token", "reason"],
        )
        duration = HistogramMetricFamily(
            "refresher_proxy_request_duration_seconds",
            "Per proxied request: seconds from sending it upstream to the upstream's answer "
            "head, the HTTP client's own work included (part=upstream), and the handler's "
            "other seconds until the answer's head was sent (part=added).",
            labels=["token", "part"],
        )
        with self._lock:
            for (job, code), count in sorted(self._requests.items()):
                requests.add_metric([job, code], count)
            for (job, outcome), count in self._replays.items():
                replays.add_metric([job, outcome], count)
            for (job, reason), count in self._errors.items():
                errors.add_metric([job, reason], count)
            for (job, part), buckets in self._duration.items():
                duration.add_metric([job, part], buckets.cumulative(), sum_value=buckets.total)
        yield requests
        yield replays
        yield errors
        yield duration


NUDGE_OUTCOMES = ("nudged", "gone", "forbidden", "error", "list_failed")
NEVER_UPDATED_REASONS = ("subpath", "env")
NUDGE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class NudgeStats(Collector):
    """Nudges of consumer pods after Secret writes (nudge.py), by job: each pod's outcome
    (`list_failed`: one per nudge whose pod list failed), each nudge's duration, and the
    pods a nudge cannot help, from the last list."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nudges: dict[tuple[str, str], int] = {}
        self._never: dict[tuple[str, str], int] = {}
        self._duration = Buckets(NUDGE_BUCKETS)
        self.jobs: set[str] = set()

    def add_job(self, job: str) -> None:
        with self._lock:
            self.jobs.add(job)
            for outcome in NUDGE_OUTCOMES:
                self._nudges.setdefault((job, outcome), 0)
            for reason in NEVER_UPDATED_REASONS:
                self._never.setdefault((job, reason), 0)

    def record_nudge(self, job: str, outcome: str) -> None:
        with self._lock:
            self._nudges[(job, outcome)] = self._nudges.get((job, outcome), 0) + 1

    def record_nudge_duration(self, seconds: float) -> None:
        with self._lock:
            self._duration.observe(max(seconds, 0.0))

    def set_never_updated(self, job: str, counts: dict[str, int]) -> None:
        with self._lock:
            for reason, count in counts.items():
                self._never[(job, reason)] = count

    def collect(self) -> Iterator[Metric]:
        nudges = CounterMetricFamily(
            "refresher_pod_nudges",
            "Consumer pods annotated after a Secret write, by outcome (list_failed: a nudge "
            "whose pod list failed).",
            labels=["token", "outcome"],
        )
        duration = HistogramMetricFamily(
            "refresher_pod_nudge_duration_seconds",
            "Time to list and annotate a Secret's consumer pods after a write.",
        )
        never = GaugeMetricFamily(
            "refresher_consumers_never_updated",
            "Pods (from the last nudge's list) whose copy of the Secret the kubelet never "
            "updates: a subPath mount, or environment variables.",
            labels=["token", "reason"],
        )
        with self._lock:
            for (job, outcome), count in sorted(self._nudges.items()):
                nudges.add_metric([job, outcome], count)
            duration.add_metric([], self._duration.cumulative(), sum_value=self._duration.total)
            for (job, reason), count in sorted(self._never.items()):
                never.add_metric([job, reason], count)
        yield nudges
        yield duration
        yield never


class WatchStats(Collector):
    """Each replica's Secret watches (watch.py): `(job, up, restarts)` from `source`."""

    def __init__(self, source: Callable[[], Iterable[tuple[str, bool, int]]]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "refresher_secret_watch_up",
            "1 while this replica's watch of the job's Secret is connected.",
            labels=["token"],
        )
        restarts = CounterMetricFamily(
            "refresher_secret_watch_restarts",
            "Times the watch of the job's Secret listed again after breaking or expiring.",
            labels=["token"],
        )
        for job, connected, count in self._source():
            up.add_metric([job], 1 if connected else 0)
            restarts.add_metric([job], count)
        yield up
        yield restarts


class Metrics:
    """The refresher's metrics, in a registry of their own (tests run many side by side)."""

    def __init__(self, registry: CollectorRegistry | None = None, clock: Clock = time.time) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.clock = clock
        self.leader = Gauge(
            "refresher_leader",
            "1 when this replica refreshes tokens, 0 when it follows.",
            registry=self.registry,
        )
        self.leader.set(1)
        build_info = Gauge(
            "refresher_build_info", "The running version.", ["version"], registry=self.registry
        )
        build_info.labels(version=__version__).set(1)
        self.registry.register(_LogCollector())

    def bind_jobs(
        self,
        source: Callable[[], Iterable[JobSnapshot]],
        state_visible: Callable[[], bool] = lambda: True,
    ) -> None:
        """Serve every per-job series from `source`, called at every scrape."""
        self.registry.register(_JobCollector(source, self.clock, state_visible))
