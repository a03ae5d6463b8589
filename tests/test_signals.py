"""Signals a real `refresher run` gets from people and tools (SIGHUP from a terminal going
away or a reload habit, SIGUSR1/SIGUSR2 by hand), and a start with stderr closed."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import job_for, wait_for
from tests.runproc import Refresher, TokenFile, write_config


def test_hup_usr1_and_usr2_leave_it_refreshing_and_term_still_stops_it_cleanly(
    make_idp: Callable[..., Any], secret_file: Path, tmp_path: Path
) -> None:
    idp = make_idp("generic", lifetime=3)
    first, second = tmp_path / "first", tmp_path / "second"
    config = write_config(
        tmp_path / "c.yaml",
        job_for(idp, secret_file, first, name="first", scopes=["a"]),
        job_for(idp, secret_file, second, name="second", scopes=["b"]),
    )
    proc = Refresher(config)
    tokens = TokenFile(first)
    try:
        proc.wait_port()
        tokens.changes_by(1, timeout=20)

        def logged(message: str, count: int = 1) -> bool:
            return len([r for r in proc.records() if r["message"] == message]) >= count

        proc.signal(signal.SIGHUP)
        wait_for(lambda: logged(
            "SIGHUP received; reload is not supported yet, keeping the running config"
        ))  # fmt: skip
        tokens.changes_by(1, timeout=20)

        proc.signal(signal.SIGUSR1)
        wait_for(lambda: logged("job state", 2))
        tokens.changes_by(1, timeout=20)

        proc.signal(signal.SIGUSR2)
        wait_for(lambda: logged("SIGUSR2 received; debug logging on"))
        wait_for(lambda: any(r["level"] == "debug" for r in proc.records()), timeout=20)
        proc.signal(signal.SIGUSR2)
        wait_for(lambda: logged("SIGUSR2 received; debug logging off"))
        tokens.changes_by(1, timeout=20)
        assert proc.alive()
        assert proc.get("/healthz")[0] == 200
    finally:
        code = proc.stop()
    assert code == 0, proc.text()
    records = proc.records()
    assert records[-1]["message"] == "stopped"
    states = {r["token"]: r for r in records if r["message"] == "job state"}
    assert set(states) == {"first", "second"}
    for state in states.values():
        assert len(state["fingerprint"]) == 8
        assert state["expires_at"] > time.time() - 60 and state["next_refresh_at"]
        assert state["consecutive_failures"] == 0 and state["ready"] is True
    text = proc.text()
    for token in [*tokens.seen, second.read_text()]:
        assert token not in text  # a fingerprint, never the token


def test_started_with_stderr_closed_it_runs_and_counts_the_lines_it_cannot_write(
    make_idp: Callable[..., Any], secret_file: Path, tmp_path: Path
) -> None:
    idp = make_idp("generic", lifetime=3)
    token = tmp_path / "token"
    config = write_config(tmp_path / "c.yaml", job_for(idp, secret_file, token))

    def close_stderr() -> None:
        os.close(2)  # as `refresher run 2>&-` does

    # The test's stderr, closed in the child; the log format left to `refresher` to choose.
    proc = Refresher(config, stderr=2, preexec_fn=close_stderr, log_format=None)
    try:
        tokens = TokenFile(token)
        wait_for(lambda: tokens.look() >= 3 or not proc.alive(), timeout=30, interval=0.05)
        assert proc.alive(), f"exited with {proc.process.returncode}"
        # No log line says which port it took: find it as a client would, by asking.
        proc.port = _listening_port(proc.process.pid)
        assert proc.get("/healthz")[0] == 200
        unwritten = proc.metric("refresher_log_write_errors_total")
        assert unwritten is not None and unwritten >= 3  # started, serving, refreshed...
    finally:
        code = proc.stop()
    assert code == 0


def _listening_port(pid: int) -> int:
    """The TCP port `pid` listens on, from /proc (its sockets' inodes in /proc/net/tcp)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                    return int(fields[1].rsplit(":", 1)[1], 16)
    raise AssertionError("the process listens on no TCP port")
