"""Real processes for the tests: a `refresher run` (for the HTTP port, logging and signals)
and a benchmark harness run as a program (for the crash and soak tests).

The process runs this checkout's package (`PYTHONPATH` is the repository), writes JSON log
lines to a stderr the test chooses (collected line by line by default), and is reached over
its real metrics port with fresh connections.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import wait_for

ROOT = Path(__file__).parent.parent


def write_config(path: Path, *jobs: dict[str, Any], **settings: Any) -> Path:
    settings.setdefault("metrics", {"enabled": True, "bind": "127.0.0.1", "port": 0})
    path.write_text(yaml.safe_dump({"tokens": list(jobs), **settings}))
    return path


def get(host: str, port: int, path: str, timeout: float = 5.0) -> tuple[int, dict[str, str], str]:
    """One GET on a new connection: (status, headers, body)."""
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", path, headers={"Connection": "close"})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read().decode()
    finally:
        connection.close()


class Refresher:
    """`refresher run -c config` in a child process.

    `stderr`: None collects the lines in `lines`; anything else (a descriptor, DEVNULL) is
    handed to the child as it is. `preexec_fn` runs in the child before it starts.
    `log_format` None leaves the choice to the command (JSON unless stderr is a terminal).
    """

    def __init__(
        self,
        config: Path,
        *,
        stderr: int | IO[Any] | None = None,
        preexec_fn: Callable[[], None] | None = None,
        args: tuple[str, ...] = (),
        log_format: str | None = "json",
    ) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT)
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "refresher", "run", "-c", str(config),
             *(("--log-format", log_format) if log_format else ()), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE if stderr is None else stderr,
            env=env,
            preexec_fn=preexec_fn,
        )  # fmt: skip
        self._reader: threading.Thread | None = None
        if stderr is None:
            self._reader = threading.Thread(target=self._collect, daemon=True)
            self._reader.start()
        self.host = "127.0.0.1"
        self.port: int | None = None

    def _collect(self) -> None:
        assert self.process.stderr is not None
        for raw in self.process.stderr:
            with self._lock:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    def text(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    def records(self) -> list[dict[str, Any]]:
        """Every stderr line parsed as JSON; fails the test on a line that is not."""
        with self._lock:
            lines = list(self.lines)
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except ValueError:
                raise AssertionError(
                    f"not a JSON log line: {line!r}\n" + "\n".join(lines)
                ) from None
        return records

    def wait_port(self, timeout: float = 20.0) -> int:
        """The metrics port, from the `serving metrics` line."""

        def logged() -> bool:
            for line in list(self.lines):
                if '"serving metrics"' in line:
                    self.port = int(json.loads(line)["port"])
                    return True
            assert self.process.poll() is None, f"exited {self.process.returncode}: {self.text()}"
            return False

        wait_for(logged, timeout=timeout)
        assert self.port is not None
        return self.port

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, dict[str, str], str]:
        assert self.port is not None
        return get(self.host, self.port, path, timeout)

    def metric(self, name: str) -> float | None:
        """The value of the unlabelled sample `name` on /metrics, None when absent."""
        status, _, body = self.get("/metrics", timeout=10)
        assert status == 200, body
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                if sample.name == name and not sample.labels:
                    return float(sample.value)
        return None

    def alive(self) -> bool:
        return self.process.poll() is None

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        finally:
            self.kill()
        if self._reader is not None:
            self._reader.join(timeout=5)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


class TokenFile:
    """Counts the distinct tokens a file sink has held, as seen by `changes()`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen: list[str] = []

    def look(self) -> int:
        try:
            token = self.path.read_text()
        except FileNotFoundError:
            return len(self.seen)
        if token and (not self.seen or self.seen[-1] != token):
            self.seen.append(token)
        return len(self.seen)

    def changes_by(self, count: int, timeout: float) -> None:
        """Wait until the file has held `count` more tokens than now."""
        target = self.look() + count
        wait_for(lambda: self.look() >= target, timeout=timeout, interval=0.05)


def closed_by_peer(sock: socket.socket, within: float) -> bool:
    """Whether the server closes `sock` (EOF or reset) within `within` seconds, reading and
    discarding whatever it sends first."""
    sock.settimeout(within)
    deadline = time.monotonic() + within
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return False


def run_harness(*args: str, timeout: float = 110) -> tuple[dict[str, Any], str]:
    """Run `python -m <args>` from the repository's root; its JSON figures and its stderr.

    The harness runs in a process group of its own, so a timeout ends it together with any
    daemon it started.
    """
    with subprocess.Popen(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as harness:
        try:
            out, err = harness.communicate(timeout=timeout)
        except BaseException as stopped:  # the timeout, or the test itself stopped
            os.killpg(harness.pid, signal.SIGKILL)
            _, err = harness.communicate()
            if isinstance(stopped, subprocess.TimeoutExpired):
                raise AssertionError(f"{args[0]} took over {timeout} s:\n{err[-3000:]}") from None
            raise
    assert harness.returncode == 0, err[-3000:]
    figures: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return figures, err
