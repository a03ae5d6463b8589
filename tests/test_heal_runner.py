"""Self-healing in `JobRunner` (rule 11 of docs/design.md): the real IdP client and probe
against the Lucidworks-shaped local token server, which revokes a token when the same client
asks for the same scope again, real file sinks, and one injected clock for the runner and the
server, so that every "later" is a number and no test sleeps.

A rogue client here is one more token request with the job's own credentials: what a
developer with curl, a second deployment or a staging cluster sharing the client does.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from refresher.config import TokenJobConfig
from refresher.idp import IdPClient, new_session
from refresher.probe import Prober
from refresher.refresh import JobRunner, ReportAnswer
from refresher.sinks.file import FileSink
from refresher.tokens import fingerprint
from testdoubles.idp import Fault, LocalIdP
from tests.conftest import (
    CLIENT_ID,
    CLIENT_SECRET,
    FakeClock,
    LogCapture,
    job_for,
    rogue_request,
)

LIFETIME = 60.0


@dataclass
class Rig:
    idp: LocalIdP
    clock: FakeClock
    sink: Path
    secret_file: Path

    def runner(self, **overrides: Any) -> JobRunner:
        overrides.setdefault("probe", {"url": self.idp.protected_url})
        overrides.setdefault("min_refresh_interval", 30)
        job = TokenJobConfig.model_validate(
            job_for(self.idp, self.secret_file, self.sink, **overrides)
        )
        session = new_session()
        return JobRunner(
            job,
            [FileSink(job.sinks[0])],  # type: ignore[arg-type]
            IdPClient(session, self.clock),
            clock=self.clock,
            prober=Prober(session),
            takes_reports=True,
        )

    def held(self) -> str:
        return self.sink.read_text().strip()

    def valid(self) -> bool:
        return self.idp.token_status(self.held()) == "valid"

    def rejected_and_probed(self, runner: JobRunner) -> None:
        """A rogue reissue, then the runner's next interval probe (a second later)."""
        self.rogue_reissue()
        self.clock.now += 1
        runner.step()

    def rogue_reissue(self) -> None:
        """Someone else asks for the job's token: the one the sink holds is revoked."""
        before = self.held()
        self.clock.now += 0.5
        requests_before = self.idp.token_requests
        rogue_request(self.idp)
        assert self.idp.token_requests == requests_before + 1
        assert self.idp.token_status(before) == "revoked"


@pytest.fixture
def rig(secret_file: Path, tmp_path: Path) -> Iterator[Rig]:
    clock = FakeClock(1_900_000_000.0)
    idp = LocalIdP(
        "lucidworks", lifetime=LIFETIME, clients={CLIENT_ID: CLIENT_SECRET}, clock=clock
    ).start()
    try:
        yield Rig(idp, clock, tmp_path / "token", secret_file)
    finally:
        idp.stop()


def _counts(runner: JobRunner) -> dict[str, dict[str, int]]:
    stats = runner.stats
    return {"probes": stats.probes, "rejections": stats.rejections, "reports": stats.reports}


def test_a_stored_token_the_api_rejects_is_replaced_on_start(rig: Rig) -> None:
    """The successor of a leader killed between the IdP's answer and its write finds a
    revoked token in the sink: its probe says so, and it refreshes at once."""
    first = rig.runner()
    first.step()
    rig.rogue_reissue()  # the predecessor's last token, never written

    successor = rig.runner()
    requests_before = rig.idp.token_requests
    successor.step()
    assert rig.idp.token_requests == requests_before + 1
    assert rig.valid()
    assert successor.stats.rejections == {"probe": 1}
    assert successor.stats.probes == {"rejected": 1, "accepted": 1}  # adopted, then issued


def test_a_stored_token_the_api_accepts_is_kept_without_asking_the_idp(rig: Rig) -> None:
    rig.runner().step()
    stored = rig.held()
    requests_before = rig.idp.token_requests
    successor = rig.runner()
    successor.step()
    assert rig.idp.token_requests == requests_before
    assert rig.held() == stored
    assert successor.stats.probes == {"accepted": 1}


def test_a_probe_error_keeps_the_stored_token(rig: Rig, make_idp: Any) -> None:
    rig.runner().step()
    stored = rig.held()
    requests_before = rig.idp.token_requests
    # A probe URL that answers 404 for everything (this server has no such path).
    successor = rig.runner(probe={"url": rig.idp.base_url + "/nowhere"})
    at = successor.step()
    assert rig.idp.token_requests == requests_before
    assert rig.held() == stored
    assert successor.stats.probes == {"error": 1}
    assert successor.stats.rejections == {}
    assert at == successor.refresh_point


def test_the_interval_probe_heals_a_revoked_token_before_its_refresh_point(rig: Rig) -> None:
    runner = rig.runner(probe={"url": rig.idp.protected_url, "interval": "2s"})
    next_at = runner.step()
    assert next_at == pytest.approx(rig.clock.now + 2)  # the probe, long before the refresh point
    rig.rogue_reissue()
    assert not rig.valid()
    rig.clock.now = next_at
    runner.step()
    assert rig.valid()
    assert runner.stats.rejections == {"probe": 1}
    # The healed token is probed at once, and then every interval again.
    assert runner.next_attempt_at == pytest.approx(rig.clock.now + 2)


def test_a_confirmed_rejection_refreshes_before_the_floor(rig: Rig) -> None:
    runner = rig.runner(probe={"url": rig.idp.protected_url, "interval": "1s"})
    runner.step()
    issued = rig.clock.now
    rig.rogue_reissue()
    rig.clock.now = issued + 1.5  # far inside the 30 s floor
    requests_before = rig.idp.token_requests
    runner.step()
    assert rig.idp.token_requests == requests_before + 1
    assert rig.valid()


def test_three_rejection_refreshes_in_one_lifetime_mean_contested(
    rig: Rig, all_logs: LogCapture
) -> None:
    runner = rig.runner(probe={"url": rig.idp.protected_url, "interval": "1s"})
    runner.step()
    for _ in range(3):
        rig.rejected_and_probed(runner)
        assert rig.valid()
    assert not runner.snapshot().contested
    requests_before = rig.idp.token_requests + 1  # the rogue's
    rig.rejected_and_probed(runner)
    assert rig.idp.token_requests == requests_before  # no fourth reaction
    assert runner.snapshot().contested
    contested = [line for line in all_logs.lines if "token contested" in line]
    assert contested and "another client is using the same credentials and scope" in contested[0]
    # Still contested: further rejections are counted, never acted on.
    rig.clock.now += 1
    runner.step()
    assert rig.idp.token_requests == requests_before
    assert runner.stats.rejections == {"probe": 5}
    # The scheduled refresh ends it; the fight is still within one lifetime of the last three
    # reactions, so the next rejection finds it contested again without refreshing.
    refresh_point = runner.refresh_point
    assert refresh_point is not None
    rig.clock.now = refresh_point
    runner.step()
    assert rig.idp.token_requests == requests_before + 1
    assert not runner.snapshot().contested
    assert rig.valid()
    rig.rejected_and_probed(runner)
    assert runner.snapshot().contested
    assert rig.idp.token_requests == requests_before + 2  # the scheduled one and the rogue's


def test_rejections_spaced_more_than_a_lifetime_apart_are_never_contested(rig: Rig) -> None:
    runner = rig.runner(probe={"url": rig.idp.protected_url, "interval": "1s"})
    runner.step()
    for _ in range(5):
        rig.rejected_and_probed(runner)
        assert rig.valid()
        assert not runner.snapshot().contested
        # Past one lifetime, through its scheduled refreshes.
        end = rig.clock.now + LIFETIME + 1
        while rig.clock.now < end:
            rig.clock.now = min(runner.next_attempt_at or end, end)
            runner.step()
    assert runner.stats.rejections == {"probe": 5}


def test_a_token_rejected_as_soon_as_issued_points_at_the_probe_not_the_token(
    rig: Rig, make_idp: Any, all_logs: LogCapture
) -> None:
    # Another server's protected API: it knows none of these tokens, so it answers 401.
    elsewhere: LocalIdP = make_idp("lucidworks")
    runner = rig.runner(probe={"url": elsewhere.protected_url, "interval": "1s"})
    runner.step()
    assert rig.idp.token_requests == 1
    assert any(
        "the probe rejects the token the IdP has just issued" in line for line in all_logs.lines
    )
    for _ in range(5):
        rig.clock.now += 1
        runner.step()
    assert rig.idp.token_requests == 1  # never refreshed for it
    assert runner.stats.rejections == {}
    assert not runner.snapshot().contested
    assert runner.stats.probes == {"rejected": 6}


def _reported(runner: JobRunner, fingerprint_: str) -> ReportAnswer:
    ticket = runner.report(fingerprint_)
    if ticket.queued:
        runner.step()
    return ticket.answer.result(timeout=5)


def test_a_report_is_probed_and_heals(rig: Rig) -> None:
    runner = rig.runner()
    runner.step()
    rig.rogue_reissue()
    dead = fingerprint(rig.held())
    answer = _reported(runner, dead)
    assert answer == ReportAnswer("rejected", True, dead)
    assert rig.valid()
    assert _counts(runner)["reports"] == {"rejected": 1}
    assert runner.stats.rejections == {"probe": 1}


def test_a_report_of_a_live_token_is_answered_accepted(rig: Rig) -> None:
    runner = rig.runner()
    runner.step()
    requests_before = rig.idp.token_requests
    answer = _reported(runner, fingerprint(rig.held()))
    assert answer.outcome == "accepted" and not answer.refreshing
    assert rig.idp.token_requests == requests_before


def test_a_stale_report_is_answered_at_once_with_the_current_fingerprint(rig: Rig) -> None:
    runner = rig.runner()
    runner.step()
    current = fingerprint(rig.held())
    ticket = runner.report("00000000")
    assert not ticket.queued
    assert ticket.answer.result(timeout=0) == ReportAnswer("stale", False, current)
    assert runner.stats.probes == {"accepted": 1}  # only the issue-time probe


def test_reports_for_one_token_join_one_probe_and_a_flood_is_limited(rig: Rig) -> None:
    runner = rig.runner()
    runner.step()
    current = fingerprint(rig.held())
    tickets = [runner.report(current) for _ in range(50)]
    assert sum(ticket.queued for ticket in tickets) == 1
    runner.step()
    assert {ticket.answer.result(timeout=5).outcome for ticket in tickets} == {"accepted"}
    assert runner.stats.probes == {"accepted": 2}  # issued, then one for all 50 reports
    outcomes = [_reported(runner, current).outcome for _ in range(10)]
    assert "limited" in outcomes
    limited = runner.report(current).answer.result(timeout=0)
    assert limited.outcome == "limited" and limited.retry_after is not None
    assert runner.stats.probes["accepted"] < 2 + 10


def test_without_a_probe_a_report_is_ignored_unless_trusted(rig: Rig) -> None:
    ignoring = rig.runner(probe=None)
    ignoring.step()
    rig.rogue_reissue()
    requests_before = rig.idp.token_requests
    answer = _reported(ignoring, fingerprint(rig.held()))
    assert answer.outcome == "ignored" and not answer.refreshing
    assert rig.idp.token_requests == requests_before


def test_a_trusted_report_waits_for_the_floor(rig: Rig) -> None:
    runner = rig.runner(probe=None, trust_rejection_reports=True)
    runner.step()
    issued = rig.clock.now
    rig.rogue_reissue()
    requests_before = rig.idp.token_requests
    ticket = runner.report(fingerprint(rig.held()))
    at = runner.step()
    assert ticket.answer.result(timeout=0) == ReportAnswer(
        "rejected", True, fingerprint(rig.held())
    )
    assert rig.idp.token_requests == requests_before  # a consumer's word is not proof
    assert at == pytest.approx(issued + 30)
    rig.clock.now = at
    runner.step()
    assert rig.idp.token_requests == requests_before + 1
    assert rig.valid()
    assert runner.stats.rejections == {"report": 1}


def test_no_token_or_secret_in_any_log_line_of_healing(rig: Rig, all_logs: LogCapture) -> None:
    runner = rig.runner(probe={"url": rig.idp.protected_url, "interval": "1s"})
    runner.step()
    tokens = [rig.held()]
    for _ in range(4):
        rig.rogue_reissue()
        rig.clock.now += 1
        _reported(runner, fingerprint(rig.held()))
        tokens.append(rig.held())
    text = all_logs.text
    assert "probe: token rejected" in text
    for secret in (*tokens, CLIENT_SECRET):
        assert secret not in text


def test_while_the_idp_is_down_reports_neither_bypass_the_backoff_nor_make_a_fight(
    rig: Rig,
) -> None:
    runner = rig.runner()
    runner.step()
    rig.rogue_reissue()
    dead = fingerprint(rig.held())
    rig.idp.set_fault(Fault.UNAVAILABLE, retry_after=60)
    requests_before = rig.idp.token_requests
    assert _reported(runner, dead) == ReportAnswer("rejected", True, dead)
    assert rig.idp.token_requests == requests_before + 1  # the healing fetch, refused
    retry_at = runner.next_attempt_at
    # Retry-After is honoured up to half the time the held token has left (30 s here).
    assert retry_at is not None and retry_at >= rig.clock.now + 15
    for _ in range(10):
        rig.clock.now += 1
        answer = _reported(runner, dead)
        assert answer.refreshing or answer.outcome == "limited"  # the bucket runs on real time
    assert rig.idp.token_requests == requests_before + 1  # the backoff holds
    assert not runner.snapshot().contested  # the same dead token, no refresh: no fight
    rig.idp.set_fault(None)
    rig.clock.now = retry_at
    runner.step()
    assert rig.valid()
    assert rig.idp.token_requests == requests_before + 2
    assert not runner.snapshot().contested


def test_a_report_before_the_first_token_is_told_to_come_back(rig: Rig) -> None:
    runner = rig.runner()
    answer = runner.report("abcdef12").answer.result(timeout=0)
    assert answer.outcome == "unavailable" and answer.retry_after == 1.0
    assert runner.stats.reports == {}


def test_reporters_of_a_replaced_token_are_answered_stale_not_forgotten(rig: Rig) -> None:
    runner = rig.runner()
    runner.step()
    old = runner.report(fingerprint(rig.held()))
    assert old.queued
    runner.refresh_now()  # another path replaced the token before the report was answered
    new = runner.report(fingerprint(rig.held()))
    assert new.queued
    assert old.answer.result(timeout=0) == ReportAnswer("stale", False, fingerprint(rig.held()))


def test_a_heal_planned_before_leadership_was_lost_is_dropped_when_it_returns(
    rig: Rig,
) -> None:
    runner = rig.runner()
    runner.step()
    rig.rogue_reissue()
    rig.idp.set_fault(Fault.SERVER_ERROR)
    _reported(runner, fingerprint(rig.held()))  # heal planned, its fetch failed
    rig.idp.set_fault(None)
    # Meanwhile another leader refreshed and wrote the sink.
    rig.runner().refresh_now()
    live = rig.held()
    runner.restart()
    requests_before = rig.idp.token_requests
    rig.clock.now += 1
    runner.step()
    assert rig.idp.token_requests == requests_before  # the live token is kept
    assert rig.held() == live and rig.valid()


@pytest.mark.parametrize("fmt", ["raw", "json"])
def test_a_token_the_probe_rejected_at_issue_is_not_refreshed_after_a_restart_either(
    rig: Rig, make_idp: Any, fmt: str
) -> None:
    """With a probe URL that fits no token, a restart (or the next `refresher once`) must
    not take the probe's word on the stored token and revoke what consumers hold."""
    elsewhere: LocalIdP = make_idp("lucidworks")
    wrong = {"url": elsewhere.protected_url}
    sinks = [{"type": "file", "path": str(rig.sink), "format": fmt}]
    rig.runner(probe=wrong, sinks=sinks).step()
    assert rig.idp.token_requests == 1
    for _ in range(3):
        again = rig.runner(probe=wrong, sinks=sinks)
        again.step()
        assert again.token is not None and again.token.unprobeable
    assert rig.idp.token_requests == 1
    assert again.stats.probes == {}  # not even asked: its verdict on this token is known


class _RogueFollows:
    """The real IdP client, with another client's token request right after each of ours:
    the fetch-to-probe window of a fight, made certain."""

    def __init__(self, inner: Any, idp: LocalIdP) -> None:
        self.inner = inner
        self.idp = idp

    def fetch(self, job: TokenJobConfig, *, still_wanted: Any) -> Any:
        token = self.inner.fetch(job, still_wanted=still_wanted)
        rogue_request(self.idp)
        return token


def test_a_fresh_token_revoked_before_its_probe_is_a_fight_not_a_wrong_probe(
    rig: Rig, all_logs: LogCapture
) -> None:
    runner = rig.runner()
    runner.step()  # the probe accepts this job's tokens
    honest = runner.idp
    runner.idp = _RogueFollows(honest, rig.idp)
    runner.refresh_now()
    assert not rig.valid()
    assert runner.token is not None and not runner.token.unprobeable
    assert "the probe rejects the token the IdP has just issued" not in all_logs.text
    assert runner.stats.rejections == {"probe": 1}
    runner.idp = honest
    assert runner.next_attempt_at == rig.clock.now  # healed at once
    runner.step()
    assert rig.valid()
