"""Prometheus metrics (prefix `refresher_`, label `token` = the job's name).

Events (attempts, failures, sink writes, durations) are counted as they happen. Values that
depend on time (expiry, seconds left, next refresh) are computed at scrape time from the
jobs' state by a custom collector, so `refresher_token_ttl_seconds` falls between refreshes
and goes negative once a token has expired, with no background thread updating gauges.
No label carries a token, a secret or an unbounded value.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from refresher import __version__
from refresher.errors import Reason

Clock = Callable[[], float]

_REFRESH_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_WRITE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


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


class _JobStateCollector(Collector):
    def __init__(self, source: Callable[[], Iterable[JobSnapshot]], clock: Clock) -> None:
        self._source = source
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        now = self._clock()
        families = {
            "expiry": GaugeMetricFamily(
                "refresher_token_expiry_timestamp_seconds",
                "When the token the job holds expires (Unix time).",
                labels=["token"],
            ),
            "ttl": GaugeMetricFamily(
                "refresher_token_ttl_seconds",
                "Seconds until the held token expires; negative once it has expired.",
                labels=["token"],
            ),
            "next": GaugeMetricFamily(
                "refresher_next_refresh_timestamp_seconds",
                "When the next refresh (or retry) of the job is scheduled (Unix time).",
                labels=["token"],
            ),
            "success": GaugeMetricFamily(
                "refresher_last_success_timestamp_seconds",
                "When the job last wrote a new token to every sink (Unix time).",
                labels=["token"],
            ),
            "failures": GaugeMetricFamily(
                "refresher_consecutive_failures",
                "Failed attempts since the last success.",
                labels=["token"],
            ),
        }
        for job in self._source():
            if job.expires_at is not None:
                families["expiry"].add_metric([job.name], job.expires_at)
                families["ttl"].add_metric([job.name], job.expires_at - now)
            if job.next_attempt_at is not None:
                families["next"].add_metric([job.name], job.next_attempt_at)
            if job.last_success_at is not None:
                families["success"].add_metric([job.name], job.last_success_at)
            families["failures"].add_metric([job.name], job.consecutive_failures)
        yield from families.values()


class Metrics:
    """The refresher's metrics, in a registry of their own (tests run many side by side)."""

    def __init__(self, registry: CollectorRegistry | None = None, clock: Clock = time.time) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.clock = clock
        r = self.registry
        self.attempts = Counter(
            "refresher_refresh_attempts",
            "Refresh attempts by outcome.",
            ["token", "outcome"],
            registry=r,
        )
        self.failures = Counter(
            "refresher_refresh_failures",
            "Failed refresh attempts by reason.",
            ["token", "reason"],
            registry=r,
        )
        self.refresh_duration = Histogram(
            "refresher_refresh_duration_seconds",
            "Round trip to the IdP for one token request.",
            ["token"],
            buckets=_REFRESH_BUCKETS,
            registry=r,
        )
        self.sink_writes = Counter(
            "refresher_sink_writes",
            "Token writes to sinks by outcome.",
            ["token", "sink", "outcome"],
            registry=r,
        )
        self.sink_write_duration = Histogram(
            "refresher_sink_write_duration_seconds",
            "Time to write a token to one sink.",
            ["token", "sink"],
            buckets=_WRITE_BUCKETS,
            registry=r,
        )
        self.write_window = Histogram(
            "refresher_write_window_seconds",
            "From the IdP's answer to the last sink written: how long consumers of an "
            "invalidate-on-reissue IdP may hold a revoked token.",
            ["token"],
            buckets=_WRITE_BUCKETS,
            registry=r,
        )
        self.leader = Gauge(
            "refresher_leader",
            "1 when this replica refreshes tokens, 0 when it follows.",
            registry=r,
        )
        self.leader.set(1)
        build_info = Gauge("refresher_build_info", "The running version.", ["version"], registry=r)
        build_info.labels(version=__version__).set(1)

    def bind_jobs(self, source: Callable[[], Iterable[JobSnapshot]]) -> None:
        """Serve the time-dependent gauges from `source`, called at every scrape."""
        self.registry.register(_JobStateCollector(source, self.clock))

    def add_job(self, name: str, sinks: Iterable[str]) -> None:
        """Create every series of a job at zero, so rates and alerts work from the start."""
        for outcome in ("success", "failure"):
            self.attempts.labels(token=name, outcome=outcome)
        for reason in Reason:
            self.failures.labels(token=name, reason=reason.value)
        for sink in sinks:
            for outcome in ("success", "failure"):
                self.sink_writes.labels(token=name, sink=sink, outcome=outcome)
