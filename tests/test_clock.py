"""Wall-clock jumps: a refresh is neither held back nor fired in a loop.

The in-process tests inject the daemon's wall clock (the runners and the guard see the jump,
APScheduler does not). The subprocess test moves the whole process's wall clock with
libfaketime, so APScheduler sees the jump too: that is the case the guard exists for.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from refresher.clockguard import ClockGuard
from refresher.daemon import Daemon
from testdoubles.idp import Fault, LocalIdP
from tests.conftest import LogCapture, config_of, job_for, running, wait_for


class JumpingClock:
    """Real wall time plus an offset the test moves."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


class Sampler:
    """Reads a token file every 20 ms and asks the IdP how it judges what it read."""

    def __init__(self, idp: LocalIdP, path: Path) -> None:
        self.idp, self.path = idp, path
        self.verdicts: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.02):
            verdict = self.idp.token_status(self.path.read_text())
            self.verdicts[verdict] = self.verdicts.get(verdict, 0) + 1

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ------------------------------------------------------------------------------ the guard alone


def test_a_jump_is_the_change_of_wall_minus_monotonic_beyond_slew() -> None:
    wall, mono = [1000.0], [50.0]
    jumps: list[float] = []
    guard = ClockGuard(
        lambda name: None, jumps.append, wall=lambda: wall[0], monotonic=lambda: mono[0]
    )
    wall[0] += 10.0
    mono[0] += 10.0
    assert guard.check_clock() == 0.0  # both moved together: time passed, nothing jumped
    wall[0] += 3600.4  # an NTP slew over an hour drifts at most ~1.8 s: not a jump
    mono[0] += 3600.0
    assert guard.check_clock() == 0.0
    wall[0] -= 3600.0  # set back an hour
    assert guard.check_clock() == pytest.approx(-3600.0)
    wall[0] += 90.0
    mono[0] += 30.0
    assert guard.check_clock() == pytest.approx(60.0)
    assert jumps == [pytest.approx(-3600.0), pytest.approx(60.0)]


def test_the_guard_reports_each_held_back_deadline_once_and_only_live_ones() -> None:
    overdue: list[str] = []
    clock = JumpingClock()
    guard = ClockGuard(overdue.append, lambda seconds: None, wall=clock, grace=0.0).start()
    try:
        guard.arm("late", 0.3)
        guard.arm("early", 0.05)
        guard.arm("replaced", 0.05)
        guard.arm("replaced", 0.2)  # the later deadline replaces the earlier one
        guard.arm("started", 0.1)
        guard.disarm("started")  # the job started before its deadline: nothing to do
        clock.offset = -3600.0  # every run date is an hour away on the wall clock now
        wait_for(lambda: len(overdue) == 3, timeout=5)
        time.sleep(0.2)
        assert overdue == ["early", "replaced", "late"]
        assert guard.pending() == 0
    finally:
        guard.stop()


def test_a_deadline_the_wall_clock_passed_too_is_left_to_the_scheduler() -> None:
    # Late by both clocks means a busy pool (or a slewed clock), not a held-back job: the
    # scheduler runs it as soon as it can, and "running it now" would only say so wrongly.
    overdue: list[str] = []
    guard = ClockGuard(overdue.append, lambda seconds: None, grace=0.0).start()
    try:
        guard.arm("busy", 0.05)
        wait_for(lambda: guard.pending() == 0, timeout=5)
        assert overdue == []
    finally:
        guard.stop()


# ----------------------------------------------------------------- the daemon, injected clock


# Tokens live 6 s, but the JWT's `exp` is a whole second, so 5-6 s are left when one arrives;
# the refresh comes 2 s before expiry and up to 0.6 s earlier (jitter): one every 2.4-4 s, so
# 3 to 6 in a 14 s window, and at least 2 with one refresh late on a loaded machine (a 10 s
# window once saw 1 in fresh-clone CI). A refresh held back by the jump shows as 0 and an
# expired read; a storm as dozens.
LIFETIME, MARGIN = 6, 2
WINDOW = 14.0
CADENCE = range(2, 8)


@pytest.fixture
def jumping_daemon(
    make_idp: Callable[..., LocalIdP], secret_file: Path, tmp_path: Path
) -> Iterator[tuple[LocalIdP, JumpingClock, Path, Daemon]]:
    idp = make_idp("generic", lifetime=LIFETIME)
    token_file = tmp_path / "token"
    clock = JumpingClock()
    config = config_of(job_for(idp, secret_file, token_file, margin=MARGIN))
    with running(config, clock=clock) as daemon:
        wait_for(token_file.exists)
        yield idp, clock, token_file, daemon


def requests_during(idp: LocalIdP, seconds: float) -> int:
    before = idp.token_requests
    time.sleep(seconds)
    return idp.token_requests - before


def test_a_backward_jump_neither_holds_refreshes_back_nor_storms(
    jumping_daemon: tuple[LocalIdP, JumpingClock, Path, Daemon],
) -> None:
    idp, clock, token_file, daemon = jumping_daemon
    with Sampler(idp, token_file) as sampler:
        clock.offset = -3600.0
        # A scrape right after the jump already shows the true time left, not an hour more.
        expires_at = daemon.snapshots()[0].expires_at
        assert expires_at is not None
        ttl = expires_at - clock()
        assert 0 < ttl <= LIFETIME
        during = requests_during(idp, WINDOW)
    assert during in CADENCE, during
    assert sampler.verdicts.get("valid", 0) > 100
    assert set(sampler.verdicts) == {"valid"}, sampler.verdicts


def test_a_forward_jump_refreshes_once_at_once_then_keeps_the_cadence(
    jumping_daemon: tuple[LocalIdP, JumpingClock, Path, Daemon],
) -> None:
    idp, clock, token_file, daemon = jumping_daemon
    with Sampler(idp, token_file) as sampler:
        clock.offset = -3600.0  # the host's clock is set an hour behind the IdP's...
        behind = requests_during(idp, 2.5)
        before = idp.token_requests
        clock.offset = 0.0  # ...and NTP steps it right: a forward jump
        daemon.snapshots()  # a scrape notices the jump
        # At once: well inside the 2.4-4 s cadence (a generous bound for a loaded machine).
        wait_for(lambda: idp.token_requests > before, timeout=2.0)
        during = requests_during(idp, WINDOW)
    assert behind <= 2, behind
    assert during in CADENCE, during
    assert set(sampler.verdicts) == {"valid"}, sampler.verdicts


def test_a_job_waiting_for_a_pool_thread_is_not_taken_for_one_held_back(
    make_idp: Callable[..., LocalIdP], secret_file: Path, tmp_path: Path, all_logs: LogCapture
) -> None:
    # One thread, two jobs due at once, the first answer slow: the second job waits in the
    # pool past its deadline. That is a busy pool, not a clock jump: running it "again" would
    # only make the scheduler skip a second instance (and say so).
    idp = make_idp("generic", lifetime=3600)
    idp.fail_next(Fault.SLOW, slow_seconds=1.5)
    jobs = [
        job_for(idp, secret_file, tmp_path / name, name=name, scopes=[name])
        for name in ("first", "second")
    ]
    with running(config_of(*jobs, max_concurrent_refreshes=1)):
        wait_for(lambda: (tmp_path / "first").exists() and (tmp_path / "second").exists())
        time.sleep(0.5)
    assert idp.token_requests == 2
    assert "held back" not in all_logs.text
    assert "skipped" not in all_logs.text


# ------------------------------------------------------------- the whole process, libfaketime

LIBFAKETIME = next(iter(sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))), None)


@pytest.mark.skipif(
    LIBFAKETIME is None and not os.environ.get("CI"),
    reason="libfaketime is not installed (apt-get install faketime); .ci/run installs it",
)
def test_a_real_backward_jump_of_the_process_clock_does_not_hold_refreshes_back(
    make_idp: Callable[..., LocalIdP], secret_file: Path, tmp_path: Path
) -> None:
    assert LIBFAKETIME is not None, "CI must install libfaketime (.ci/run does)"
    idp = make_idp("generic", lifetime=LIFETIME)
    token_file = tmp_path / "token"
    config_file = tmp_path / "config.yaml"
    job = job_for(idp, secret_file, token_file, margin=MARGIN)
    config_file.write_text(yaml.safe_dump({"tokens": [job], "metrics": {"enabled": False}}))
    offset_file = tmp_path / "faketime"
    offset_file.write_text("+0\n")
    env = {
        **os.environ,
        "LD_PRELOAD": LIBFAKETIME,
        "FAKETIME_TIMESTAMP_FILE": str(offset_file),
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",  # the monotonic clock is the one no jump moves
    }
    log_file = tmp_path / "daemon.log"
    with log_file.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "refresher", "run", "--config", str(config_file)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for(token_file.exists, timeout=10)
            # Jump just after a refresh was planned, so the scheduler holds a run date from
            # before the jump (a jump during a refresh is planned around, not held back).
            first = token_file.read_text()
            wait_for(lambda: token_file.read_text() != first, timeout=LIFETIME)
            time.sleep(0.3)
            with Sampler(idp, token_file) as sampler:
                offset_file.write_text("-3600\n")  # every clock_gettime(REALTIME) moves back
                during = requests_during(idp, WINDOW)
        finally:
            process.terminate()
            process.wait(timeout=10)
    lines = [json.loads(line) for line in log_file.read_text().splitlines() if line.startswith("{")]
    messages = [line["message"] for line in lines]
    assert during in CADENCE, (during, messages)
    assert set(sampler.verdicts) == {"valid"}, sampler.verdicts
    assert "wall clock jumped" in messages
    assert "running a job the wall clock held back" in messages
    assert process.returncode == 0
