"""`JobRunner` on its own: an injected clock, a scripted token source, real file sinks.

No sockets and no sleeps: each test moves the clock by hand and checks what the runner did
(what it asked the IdP, what each sink holds) and when it asks to run next. The plan behind
those times is tested in test_schedule.py; here it is the carrying out that is checked.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from pathlib import Path

import pytest

from refresher.config import TokenJobConfig
from refresher.errors import Reason, RefreshError
from refresher.formats import render
from refresher.refresh import JobRunner, RefreshEvent
from refresher.schedule import token_refresh_at
from refresher.sinks import Sink
from refresher.sinks.file import FileSink
from refresher.tokens import Token
from tests.conftest import FakeClock

LIFETIME = 600.0


class ScriptedIdP:
    """A `TokenSource` that answers from a script: a lifetime issues a token, an exception
    is raised. Counts the requests that went out."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.script: deque[float | Exception] = deque()
        self.requests = 0
        self.issued: list[Token] = []

    def fetch(self, job: TokenJobConfig, *, still_wanted: Callable[[], bool]) -> Token | None:
        if not still_wanted():
            return None
        self.requests += 1
        outcome = self.script.popleft() if self.script else LIFETIME
        if isinstance(outcome, Exception):
            raise outcome
        now = self.clock()
        token = Token(f"token-{len(self.issued)}", issued_at=now, expires_at=now + outcome)
        self.issued.append(token)
        return token


class BreakableSink:
    """A real file sink whose writes can be made to fail, like a full disk would."""

    def __init__(self, sink: FileSink) -> None:
        self.inner = sink
        self.name = sink.name
        self.broken = False

    def read(self, now: float) -> Token | None:
        return self.inner.read(now)

    def write(self, token: Token) -> None:
        if self.broken:
            raise RefreshError(Reason.SINK, f"cannot write {self.name}: No space left on device")
        self.inner.write(token)

    def settle(self, token: Token) -> None:
        self.inner.settle(token)

    def remove_leftovers(self, now: float) -> None:
        self.inner.remove_leftovers(now)


def job_config(tmp_path: Path, *names: str, **fields: object) -> TokenJobConfig:
    return TokenJobConfig.model_validate(
        {
            "name": "api",
            "token_url": "https://idp.example.test/token",
            "client_id": "client",
            "client_secret": {"env": "UNUSED_HERE"},
            "min_refresh_interval": 1,
            "sinks": [
                {"type": "file", "path": str(tmp_path / name), "format": "json"} for name in names
            ],
            **fields,
        }
    )


def held_by(path: Path) -> str | None:
    return json.loads(path.read_text())["access_token"] if path.exists() else None


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def idp(clock: FakeClock) -> ScriptedIdP:
    return ScriptedIdP(clock)


def runner_for(
    job: TokenJobConfig,
    idp: ScriptedIdP,
    clock: FakeClock,
    sinks: list[Sink] | None = None,
    **kwargs: object,
) -> tuple[JobRunner, list[RefreshEvent]]:
    events: list[RefreshEvent] = []
    sinks = sinks if sinks is not None else [FileSink(sink) for sink in job.sinks]  # type: ignore[arg-type]
    runner = JobRunner(job, sinks, idp, clock=clock, listeners=[events.append], **kwargs)  # type: ignore[arg-type]
    return runner, events


def test_a_first_step_fetches_writes_every_sink_and_waits_for_the_refresh_point(
    tmp_path: Path, idp: ScriptedIdP, clock: FakeClock
) -> None:
    job = job_config(tmp_path, "a.json", "b.json")
    runner, events = runner_for(job, idp, clock)
    at = runner.step()
    token = idp.issued[0]
    assert idp.requests == 1
    assert held_by(tmp_path / "a.json") == held_by(tmp_path / "b.json") == token.access_token
    assert at == token_refresh_at(job.schedule_policy(), "api", token)
    # A third of the lifetime before expiry, made earlier by at most 10 % of it (jitter).
    assert clock.now + LIFETIME * (2 / 3 - 0.1) <= at <= clock.now + LIFETIME * 2 / 3
    assert [event.outcome for event in events] == ["success"]
    assert runner.snapshot().ready


def test_a_valid_stored_token_is_reused_without_asking_the_idp(
    tmp_path: Path, idp: ScriptedIdP, clock: FakeClock
) -> None:
    job = job_config(tmp_path, "a.json")
    stored = Token("stored", issued_at=clock.now - 60, expires_at=clock.now + 540)
    (tmp_path / "a.json").write_bytes(render(stored, "json"))
    runner, events = runner_for(job, idp, clock)
    at = runner.step()
    assert idp.requests == 0
    assert runner.token is not None and runner.token.access_token == "stored"
    assert at == token_refresh_at(job.schedule_policy(), "api", runner.token)
    assert [event.outcome for event in events] == ["reused"]
    # At the refresh point it fetches.
    clock.now = at
    runner.step()
    assert idp.requests == 1 and held_by(tmp_path / "a.json") == idp.issued[0].access_token


def test_a_stored_token_reaches_the_sinks_that_lack_it_before_anything_is_fetched(
    tmp_path: Path, idp: ScriptedIdP, clock: FakeClock
) -> None:
    job = job_config(tmp_path, "a.json", "b.json")
    stored = Token("stored", issued_at=clock.now - 60, expires_at=clock.now + 540)
    (tmp_path / "a.json").write_bytes(render(stored, "json"))
    runner, _ = runner_for(job, idp, clock)
    at = runner.step()  # b.json lacks the token: written in the same step
    assert idp.requests == 0
    assert held_by(tmp_path / "b.json") == "stored"
    assert runner.token is not None and not runner.pending
    assert at == token_refresh_at(job.schedule_policy(), "api", runner.token)


def test_a_stored_expiry_further_ahead_than_the_job_lifetime_is_not_believed(
    tmp_path: Path, idp: ScriptedIdP, clock: FakeClock
) -> None:
    job = job_config(tmp_path, "a.json", lifetime=LIFETIME)
    edited = Token("edited", issued_at=clock.now - 60, expires_at=clock.now + 300 * 86400)
    (tmp_path / "a.json").write_bytes(render(edited, "json"))
    runner, _ = runner_for(job, idp, clock)
    runner.step()
    assert idp.requests == 1
    assert held_by(tmp_path / "a.json") == idp.issued[0].access_token


def test_an_idp_failure_keeps_the_sinks_and_retries_with_backoff(
    tmp_path: Path, idp: ScriptedIdP, clock: FakeClock
) -> None:
    job = job_config(tmp_path, "a.json")
    runner, events = runner_for(job, idp, clock)
    runner.step()
    first = idp.issued[0]
    clock.now = runner.next_attempt_at or 0.0
    idp.script.extend([RefreshError(Reason.HTTP_5XX, "HTTP 503")] * 2)
    at = runner.step()
    assert held_by(tmp_path / "a.json") == first.access_token  # nothing destroyed
    assert runner.failures == 1 and runner.last_error is not None
    assert clock.now + 0.5 <= at <= clock.now + 1.0  # the first backoff step
    clock.now = at
    second = runner.step()
    assert runner.failures == 2 and clock.now + 1.0 <= second <= clock.now + 2.0
    clock.now = second
    runner.step()
    assert runner.failures == 0 and held_by(tmp_path / "a.json") == idp.issued[-1].access_token
    assert [event.outcome for event in events] == ["success", "failure", "failure", "success"]
    assert [event.reason for event in events if event.reason] == ["http_5xx", "http_5xx"]


def test_a_failed_sink_keeps_the_issued_token_and_is_retried_without_a_new_request(
    tmp_path: Path, idp: ScriptedIdP, clock: FakeClock
) -> None:
    job = job_config(tmp_path, "good.json", "full.json")
    good = FileSink(job.sinks[0])  # type: ignore[arg-type]
    full = BreakableSink(FileSink(job.sinks[1]))  # type: ignore[arg-type]
    full.broken = True
    runner, events = runner_for(job, idp, clock, sinks=[good, full])
    at = runner.step()
    token = idp.issued[0]
    assert held_by(tmp_path / "good.json") == token.access_token
    assert not (tmp_path / "full.json").exists()
    assert runner.token == token and runner.pending == [full]
    assert events[-1].reason == "sink"
    assert at <= clock.now + job.schedule_policy().retry_floor + 1e-9  # at once, not after 1 s
    for _ in range(5):  # the disk stays full for a while
        clock.now = at
        at = runner.step()
    assert idp.requests == 1  # never a new token for a sink's sake
    full.broken = False
    clock.now = at
    after = runner.step()
    assert held_by(tmp_path / "full.json") == token.access_token
    assert idp.requests == 1 and runner.failures == 0 and not runner.pending
    assert after == token_refresh_at(job.schedule_policy(), "api", token)


def test_a_sink_retry_never_postpones_the_next_fetch(
    tmp_path: Path, idp: ScriptedIdP, clock: FakeClock
) -> None:
    job = job_config(tmp_path, "full.json")
    full = BreakableSink(FileSink(job.sinks[0]))  # type: ignore[arg-type]
    full.broken = True
    runner, _ = runner_for(job, idp, clock, sinks=[full])
    at = runner.step()
    refresh_point = runner.refresh_point
    assert refresh_point is not None
    while at < refresh_point:  # backoff grows, yet the plan stops at the refresh point
        clock.now = at
        at = runner.step()
    assert at == refresh_point
    assert idp.requests == 1


def test_after_expiry_retries_stay_seconds_apart_whatever_the_failure_count(
    tmp_path: Path, idp: ScriptedIdP, clock: FakeClock
) -> None:
    job = job_config(tmp_path, "a.json")
    runner, _ = runner_for(job, idp, clock)
    runner.step()
    token = idp.issued[0]
    idp.script.extend([RefreshError(Reason.HTTP_5XX, "HTTP 503")] * 60)
    clock.now = runner.next_attempt_at or 0.0
    waits_after_expiry: list[float] = []
    while idp.script:
        at = runner.step()
        if clock.now >= token.expires_at:
            waits_after_expiry.append(at - clock.now)
        clock.now = at
    assert runner.failures == 60
    assert (
        waits_after_expiry and max(waits_after_expiry) <= job.schedule_policy().no_token_backoff_cap
    )
    runner.step()  # the IdP is back: the very next attempt succeeds
    assert runner.failures == 0 and held_by(tmp_path / "a.json") == idp.issued[-1].access_token


def test_leadership_lost_before_the_request_sends_nothing_and_changes_nothing(
    tmp_path: Path, idp: ScriptedIdP, clock: FakeClock
) -> None:
    job = job_config(tmp_path, "a.json")
    leading = [True]
    runner, events = runner_for(job, idp, clock, may_fetch=lambda: leading[0])
    runner.step()
    first = idp.issued[0]
    leading[0] = False  # lost while the job waited for its refresh point
    clock.now = runner.next_attempt_at or 0.0
    runner.step()
    assert idp.requests == 1
    assert held_by(tmp_path / "a.json") == first.access_token
    assert runner.failures == 0 and [event.outcome for event in events] == ["success"]


def test_an_unexpected_error_is_counted_as_a_failure_and_retried(
    tmp_path: Path, idp: ScriptedIdP, clock: FakeClock
) -> None:
    job = job_config(tmp_path, "a.json")
    runner, events = runner_for(job, idp, clock)
    idp.script.append(UnicodeEncodeError("utf-8", "\udc80", 0, 1, "surrogates not allowed"))
    at = runner.step()
    assert runner.failures == 1 and events[-1].reason == "internal"
    assert runner.stats.failures == {"internal": 1}
    clock.now = at
    runner.step()
    assert runner.failures == 0 and held_by(tmp_path / "a.json") == idp.issued[0].access_token


def test_restart_reads_the_sinks_again_and_adopts_what_another_replica_wrote(
    tmp_path: Path, idp: ScriptedIdP, clock: FakeClock
) -> None:
    job = job_config(tmp_path, "a.json")
    runner, _ = runner_for(job, idp, clock)
    runner.step()
    newer = Token("from-the-other-leader", issued_at=clock.now + 10, expires_at=clock.now + 610)
    clock.now += 10
    (tmp_path / "a.json").write_bytes(render(newer, "json"))
    runner.restart()
    at = runner.step()
    assert idp.requests == 1  # only the first fetch
    assert runner.token is not None and runner.token.access_token == newer.access_token
    assert at == token_refresh_at(job.schedule_policy(), "api", newer)


def test_retry_after_from_the_idp_is_honoured(
    tmp_path: Path, idp: ScriptedIdP, clock: FakeClock
) -> None:
    job = job_config(tmp_path, "a.json")
    runner, _ = runner_for(job, idp, clock)
    idp.script.append(RefreshError(Reason.HTTP_4XX, "HTTP 429", status=429, retry_after=7.0))
    at = runner.step()
    assert at == clock.now + 7.0  # plain backoff would have waited 0.5 to 1 s
    clock.now = at
    runner.step()
    assert runner.failures == 0 and idp.requests == 2


def test_a_stored_issue_time_in_the_future_does_not_push_the_refresh_past_expiry(
    tmp_path: Path, idp: ScriptedIdP, clock: FakeClock
) -> None:
    job = job_config(tmp_path, "a.json")
    edited = Token("edited", issued_at=9.9e9, expires_at=clock.now + 540)
    (tmp_path / "a.json").write_bytes(render(edited, "json"))
    runner, _ = runner_for(job, idp, clock)
    at = runner.step()
    assert idp.requests == 0
    assert clock.now < at < clock.now + 540  # refreshed before it expires, not in 300 years


def test_leadership_regained_keeps_the_token_it_fetched_when_a_sink_missed_it(
    tmp_path: Path, idp: ScriptedIdP, clock: FakeClock
) -> None:
    job = job_config(tmp_path, "full.json")
    full = BreakableSink(FileSink(job.sinks[0]))  # type: ignore[arg-type]
    runner, _ = runner_for(job, idp, clock, sinks=[full])
    runner.step()
    old = idp.issued[0]
    clock.now = runner.refresh_point or 0.0
    full.broken = True  # the API server went down: the write fails (and so did the lease)
    runner.step()
    new = idp.issued[1]  # issued, and on a revoke-on-reissue IdP `old` is dead now
    assert held_by(tmp_path / "full.json") == old.access_token
    full.broken = False
    runner.restart()  # leading again
    runner.step()
    assert runner.token == new and idp.requests == 2
    assert held_by(tmp_path / "full.json") == new.access_token


def test_an_adopted_token_reaches_an_empty_sink_even_when_due_and_the_idp_is_down(
    tmp_path: Path, idp: ScriptedIdP, clock: FakeClock
) -> None:
    job = job_config(tmp_path, "a.json", "b.json")
    due = Token("due", issued_at=clock.now - 500, expires_at=clock.now + 100)
    (tmp_path / "a.json").write_bytes(render(due, "json"))
    idp.script.extend([RefreshError(Reason.HTTP_5XX, "HTTP 503")] * 3)
    runner, _ = runner_for(job, idp, clock)
    at = runner.step()
    assert held_by(tmp_path / "b.json") == "due"  # copied first
    clock.now = at
    at = runner.step()  # then the due refresh, which fails: an IdP backoff, not the sink floor
    assert idp.requests == 1 and runner.failures == 1
    assert at - clock.now >= 0.5


def test_a_retry_after_an_unexpected_error_fetches_only_if_a_refresh_is_due(
    tmp_path: Path, idp: ScriptedIdP, clock: FakeClock
) -> None:
    job = job_config(tmp_path, "a.json")
    events: list[RefreshEvent] = []

    def broken_listener(event: RefreshEvent) -> None:
        events.append(event)
        if len(events) == 1:
            raise RuntimeError("a bug after the write")

    runner = JobRunner(job, [FileSink(job.sinks[0])], idp, clock=clock, listeners=[broken_listener])  # type: ignore[arg-type]
    at = runner.step()
    assert runner.failures == 1 and idp.requests == 1
    clock.now = at
    runner.step()
    assert idp.requests == 1  # the token is fresh: nothing to fetch
