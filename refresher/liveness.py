"""Liveness: is this process still making progress? What `/healthz` answers.

Two signs, neither of them job lateness (a slow IdP makes jobs legitimately late, and a
liveness probe must not restart a pod that is merely busy):

- **the scheduler's heartbeat**: a tiny job, on an executor of its own (a pool full of slow
  refreshes does not delay it), stamps the monotonic time every `heartbeat_timeout / 6`. The
  scheduler thread may sleep for a day when no token is due, so its own wake-ups prove
  nothing; the heartbeat makes it wake. A stamp older than `heartbeat_timeout` means the
  scheduler (or its thread) is wedged;
- **refresh threads**: every step of a job has an upper bound, because everything it waits
  for has a deadline (the IdP's connect and read timeouts and the body deadline, every
  Kubernetes call's `request_timeout`, the rate limiter's queue); one running far past the
  sum (`stuck_after`) is stuck, not slow.

Both are pure functions of times, so the policy is tested with any clock.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from refresher.config import KubernetesSinkConfig, Settings, TokenJobConfig

HEARTBEATS_PER_TIMEOUT = 6  # with the default 30 s timeout: a beat every 5 s
# Per step, a Kubernetes sink makes at most: a read on start, then up to 5 conflicting
# patches each followed by a re-read, and the last patch (`sinks/kubernetes.py`).
KUBERNETES_CALLS_PER_SINK = 12
FILE_SINK_SECONDS = 30.0  # read on start plus temp file, fsync and rename on a slow disk
PROBES_PER_STEP = 3
SLACK_SECONDS = 60.0  # name resolution (no timeout of its own), GC, a loaded node


def heartbeat_interval(timeout: float) -> float:
    return timeout / HEARTBEATS_PER_TIMEOUT


def stuck_after(job: TokenJobConfig, settings: Settings) -> float:
    """Seconds after which one step of `job` cannot still be legitimately running."""
    # At most `max_concurrent_refreshes` threads queue at one token bucket, each for one slot.
    queue = settings.max_concurrent_refreshes / settings.idp_rate_limit
    # The body deadline is checked between reads, so it can overrun by one read timeout.
    idp = job.connect_timeout + 2 * job.read_timeout
    sinks = sum(
        KUBERNETES_CALLS_PER_SINK * settings.kubernetes.request_timeout
        if isinstance(sink, KubernetesSinkConfig)
        else FILE_SINK_SECONDS
        for sink in job.sinks
    )
    # A step probes at most three times: the adopted token (on start), a reported one or
    # the interval's, and the token it has just fetched; each waited for at most its timeouts.
    probes = (
        PROBES_PER_STEP * (job.probe.connect_timeout + job.probe.read_timeout) if job.probe else 0
    )
    return queue + idp + sinks + probes + SLACK_SECONDS


@dataclass(frozen=True)
class Running:
    """One job step in progress: since when (monotonic) and its `stuck_after` bound."""

    job: str
    started: float
    bound: float


def is_alive(
    now: float, last_beat: float, heartbeat_timeout: float, running: Iterable[Running] = ()
) -> tuple[bool, str]:
    """`(alive, why)` from the monotonic time `now`, the last heartbeat and the steps in
    progress."""
    age = now - last_beat
    if age > heartbeat_timeout:
        return False, (
            f"scheduler heartbeat is {age:.0f} s old (more than {heartbeat_timeout:g} s): "
            "the scheduler is not making progress"
        )
    stuck = sorted(
        (step for step in running if now - step.started > step.bound), key=lambda s: s.started
    )
    if stuck:
        first = stuck[0]
        return False, (
            f"refresh of {first.job} running for {now - first.started:.0f} s "
            f"(a step ends within {first.bound:.0f} s); {len(stuck)} stuck"
        )
    return True, "ok"
