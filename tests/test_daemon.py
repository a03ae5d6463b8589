"""The daemon against local token servers, with real time and token lifetimes of seconds."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from refresher.refresh import RefreshEvent
from refresher.schedule import token_refresh_at
from refresher.sinks.file import FileSink
from testdoubles.idp import Fault, LocalIdP
from tests.conftest import SHAPE_SCOPES, config_of, job_for, running, wait_for


class Events:
    """Collects RefreshEvents with the wall time each was emitted (after the sink writes)."""

    def __init__(self) -> None:
        self.items: list[tuple[float, RefreshEvent]] = []
        self._lock = threading.Lock()

    def __call__(self, event: RefreshEvent) -> None:
        with self._lock:
            self.items.append((time.time(), event))

    def of(self, outcome: str) -> list[tuple[float, RefreshEvent]]:
        with self._lock:
            return [(at, e) for at, e in self.items if e.outcome == outcome]


@pytest.mark.parametrize("provider", sorted(SHAPE_SCOPES))
def test_each_provider_is_refreshed_before_expiry_again_and_again(
    provider: str, make_idp: Callable[..., LocalIdP], secret_file: Path, tmp_path: Path
) -> None:
    idp = make_idp(provider, lifetime=3)
    token_file = tmp_path / "token"
    config = config_of(job_for(idp, secret_file, token_file))
    with running(config):
        wait_for(lambda: len(idp.issued) >= 3, timeout=15)
        held = token_file.read_text()
    issued = idp.issued
    # Each new token was asked for while the previous one was still alive...
    for previous, current in itertools.pairwise(issued):
        assert current.issued_at < previous.expires_at
    # ...and the file holds a token the API accepts.
    assert held in {t.access_token for t in issued[-2:]}
    if provider in ("lucidworks", "fusion"):
        assert all(t.revoked_at is not None for t in issued[:-2])


def test_restart_reuses_a_valid_stored_token_without_asking(
    make_idp: Callable[..., LocalIdP], secret_file: Path, tmp_path: Path
) -> None:
    idp = make_idp("lucidworks", lifetime=6)
    token_file = tmp_path / "token"
    config = config_of(job_for(idp, secret_file, token_file))
    with running(config):
        wait_for(lambda: token_file.exists())
    assert idp.token_requests == 1
    stored = FileSink(config.jobs[0].sinks[0]).read(time.time())  # type: ignore[arg-type]
    assert stored is not None
    events = Events()
    with running(config, listeners=[events]) as daemon:
        wait_for(lambda: len(events.of("reused")) == 1)
        # No request, and the next one planned at the stored token's refresh point (when
        # exactly is the plan's business: tests/test_runner.py and test_schedule.py).
        runner = daemon.runners[0]
        assert idp.token_requests == 1
        assert runner.next_attempt_at == token_refresh_at(runner.policy, runner.job.name, stored)
    assert events.of("reused")[0][1].fingerprint == stored.fingerprint


def test_failures_keep_the_last_good_token_back_off_and_recover(
    make_idp: Callable[..., LocalIdP], secret_file: Path, tmp_path: Path
) -> None:
    idp = make_idp("generic", lifetime=8)
    token_file = tmp_path / "token"
    events = Events()
    with running(config_of(job_for(idp, secret_file, token_file)), listeners=[events]):
        wait_for(lambda: token_file.exists())
        good = token_file.read_text()
        idp.set_fault(Fault.SERVER_ERROR)
        wait_for(lambda: len(events.of("failure")) >= 2, timeout=15)
        assert token_file.read_text() == good  # a failure never touches the sink
        idp.set_fault(None)
        wait_for(lambda: token_file.read_text() != good, timeout=10)
    # The backoff's numbers are the plan's (tests/test_runner.py); here: classified, recovered.
    assert {e.reason for _, e in events.of("failure")} == {"http_5xx"}
    assert idp.token_status(token_file.read_text()) == "valid"


def test_a_failed_sink_is_retried_without_asking_the_idp_again(
    make_idp: Callable[..., LocalIdP], secret_file: Path, tmp_path: Path
) -> None:
    idp = make_idp("lucidworks", lifetime=30)
    good, blocked_dir = tmp_path / "good", tmp_path / "blocked"
    blocked_dir.write_text("a file where a folder should be")
    job = job_for(idp, secret_file, good)
    job["sinks"].append({"type": "file", "path": str(blocked_dir / "token")})
    events = Events()
    with running(config_of(job), listeners=[events]):
        wait_for(lambda: len(events.of("failure")) >= 2)
        assert {e.reason for _, e in events.of("failure")} == {"sink"}
        assert good.exists()  # the healthy sink got the token at once
        blocked_dir.unlink()
        blocked_dir.mkdir()
        wait_for(lambda: (blocked_dir / "token").exists(), timeout=10)
    assert (blocked_dir / "token").read_text() == good.read_text()
    # On an IdP that revokes on reissue, asking again would have killed the good sink's token.
    assert idp.token_requests == 1


def test_a_slow_idp_does_not_hold_up_other_jobs(
    make_idp: Callable[..., LocalIdP], secret_file: Path, tmp_path: Path
) -> None:
    slow, fast = make_idp("generic", lifetime=60), make_idp("usage-engine", lifetime=60)
    slow.set_fault(Fault.SLOW, slow_seconds=5)
    config = config_of(
        job_for(slow, secret_file, tmp_path / "slow", read_timeout=10),
        job_for(fast, secret_file, tmp_path / "fast"),
        max_concurrent_refreshes=2,
    )
    started = time.monotonic()
    with running(config):
        wait_for(lambda: (tmp_path / "fast").exists(), timeout=3)
        assert time.monotonic() - started < 3
        slow.set_fault(None)


def test_revoke_on_reissue_consumers_see_no_401_outside_the_write_window(
    make_idp: Callable[..., LocalIdP], secret_file: Path, tmp_path: Path
) -> None:
    """A consumer reads the file every few ms and calls the API, over 20+ refreshes."""
    import requests

    idp = make_idp("lucidworks", lifetime=2)
    token_file = tmp_path / "token"
    events = Events()
    reads: list[tuple[float, str, int]] = []  # (read time, token, HTTP status)
    stop = threading.Event()

    def consumer() -> None:
        session = requests.Session()
        while not stop.is_set():
            try:
                token = token_file.read_text()
            except FileNotFoundError:
                continue
            read_at = time.time()
            status = session.get(
                idp.protected_url, headers={"Authorization": f"Bearer {token}"}
            ).status_code
            reads.append((read_at, token, status))
            time.sleep(0.003)

    with running(
        config_of(job_for(idp, secret_file, token_file, min_refresh_interval=0.1)),
        listeners=[events],
    ):
        wait_for(lambda: token_file.exists())
        thread = threading.Thread(target=consumer)
        thread.start()
        wait_for(lambda: len(events.of("success")) >= 21, timeout=60)
        stop.set()
        thread.join()

    written_at = [at for at, _ in events.of("success")]
    inside = outside = 0
    for read_at, token, status in reads:
        if status == 200:
            continue
        # Inside the window: revoked by a reissue whose write finished after this read.
        if idp.token_status(token) == "revoked" and any(
            read_at <= w <= read_at + 1 for w in written_at
        ):
            inside += 1
        else:
            outside += 1
    windows = sorted(e.write_window for _, e in events.of("success") if e.write_window is not None)
    print(
        f"\nrevoke-on-reissue: {len(windows)} refreshes, {len(reads)} consumer calls, "
        f"{inside} rejected inside the write window, {outside} outside; write window "
        f"median {windows[len(windows) // 2] * 1000:.3f} ms, max {windows[-1] * 1000:.3f} ms"
    )
    assert len(reads) > 500
    assert outside == 0
