"""The log pipe: logging never blocks the thread that logs, whatever the stream does (a pipe
nobody reads, a closed stderr); what cannot be written is dropped and counted."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import termios
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from refresher import logs
from tests.conftest import job_for, wait_for
from tests.runproc import Refresher, TokenFile, write_config


@pytest.fixture
def full_pipe() -> Iterator[tuple[int, int]]:
    """A pipe of one page that nobody reads: (read end, write end)."""
    read, write = os.pipe()
    fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, 4096)
    yield read, write
    for fd in (read, write):
        with contextlib.suppress(OSError):
            os.close(fd)


def _unread(fd: int) -> int:
    buffer = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, buffer)
    return int.from_bytes(buffer, "little")


def test_logging_to_a_stream_nobody_reads_never_blocks_the_caller(
    full_pipe: tuple[int, int],
) -> None:
    read, write = full_pipe
    before = logs.dropped_records()
    logs.configure("json", "info", _Unbuffered(write))  # type: ignore[arg-type]
    done = threading.Event()

    def log_a_lot() -> None:
        for i in range(5000):
            logging.getLogger("refresher.test").info("line", extra={"i": i, "pad": "x" * 200})
        done.set()

    thread = threading.Thread(target=log_a_lot, daemon=True)
    thread.start()
    try:
        assert done.wait(30), "logging blocked on a pipe nobody reads"
        assert logs.dropped_records() - before > 0
        assert _unread(read) > 0
    finally:
        os.close(read)  # the writer's blocked write fails (EPIPE) and it goes on
        thread.join(timeout=30)
        assert logs.flush(30)  # every queued line refused before the pipe is closed


class _Unbuffered:
    """A text stream straight onto a descriptor: a write blocks while the pipe is full."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, text: str) -> int:
        return os.write(self.fd, text.encode())

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def test_lines_a_closed_stream_refuses_are_counted_not_reported(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    stream = (tmp_path / "log").open("w")
    assert logs.flush(10)
    logs.configure("json", "info", stream)
    stream.close()
    before = logs.write_errors()
    logging.getLogger("refresher.test").warning("into a closed stream")
    assert logs.flush(10)
    assert logs.write_errors() == before + 1
    assert capfd.readouterr().err == ""  # no `--- Logging error ---`


def test_a_daemon_whose_stderr_nobody_reads_keeps_refreshing(
    make_idp: Callable[..., Any],
    secret_file: Path,
    tmp_path: Path,
    full_pipe: tuple[int, int],
) -> None:
    """With debug logging and 30 jobs the one-page pipe fills within a second or two; blocking
    logging would stop every refresh there. The first lines are read (for the port), then
    nothing is."""
    read, write = full_pipe
    idp = make_idp("generic", lifetime=3)
    jobs = [
        job_for(idp, secret_file, tmp_path / f"t{i}", name=f"job{i}", scopes=[f"s{i}"])
        for i in range(30)
    ]
    config = write_config(tmp_path / "c.yaml", *jobs, idp_rate_limit=1000, idp_rate_burst=100)
    proc = Refresher(config, stderr=write, args=("--log-level", "debug"))
    os.close(write)
    try:
        port = None
        seen = b""
        while port is None:  # read until the `serving metrics` line, then never again
            chunk = os.read(read, 65536)
            assert chunk, "the process ended"
            seen += chunk
            for line in seen.split(b"\n"):
                if b'"serving metrics"' in line and line.endswith(b"}"):
                    port = int(line.split(b'"port": ')[1].split(b"}")[0].split(b",")[0])
        proc.port = port
        wait_for(lambda: _unread(read) >= 4096 - 1024, timeout=30)  # the pipe is full
        tokens = TokenFile(tmp_path / "t0")
        tokens.changes_by(4, timeout=30)  # a refresh every ~2 s, long after the pipe filled
        wait_for(lambda: (proc.metric("refresher_log_records_dropped_total") or 0) > 0, 30)
        assert proc.get("/healthz")[:1] == (200,)
    finally:
        code = proc.stop(timeout=20)  # stops cleanly even now
    assert code == 0
