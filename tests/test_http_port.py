"""The metrics port under hostile or careless clients: floods of idle connections, clients
that go away mid-request, a stuck scrape; and what it tells about itself (`Server`). Against a
real `refresher run` process where the harm would be to the process (descriptors, stderr).
The stack's own deadlines and cap are tested in `test_http_stack.py`.
"""

from __future__ import annotations

import resource
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from refresher.metrics import Metrics
from tests.conftest import config_of, job_for, running, wait_for
from tests.runproc import Refresher, TokenFile, get, write_config

METRICS_ON = {"enabled": True, "bind": "127.0.0.1", "port": 0}


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a client that crashed or timed out does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# ------------------------------------------------------------------ against a real process


def test_an_idle_connection_flood_is_shed_and_refreshing_goes_on(
    make_idp: Callable[..., Any], secret_file: Path, tmp_path: Path
) -> None:
    """2,000 connections that never send a byte, to a process whose descriptor limit is 256:
    a thread and a descriptor each would exhaust it (`Too many open files` on the secret file
    and the sink); the cap sheds them, the header deadline frees the admitted ones."""
    flood = 2000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < flood + 200:
        if hard != resource.RLIM_INFINITY and hard < flood + 200:
            pytest.skip(f"the test needs {flood + 200} descriptors; ulimit -Hn is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (flood + 200, hard))

    def few_descriptors() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    idp = make_idp("generic", lifetime=3)
    token = tmp_path / "token"
    config = write_config(tmp_path / "c.yaml", job_for(idp, secret_file, token))
    proc = Refresher(config, preexec_fn=few_descriptors)
    idle: list[socket.socket] = []
    try:
        port = proc.wait_port()
        tokens = TokenFile(token)
        tokens.changes_by(1, timeout=20)
        for i in range(flood):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))  # completes in the background
            idle.append(sock)
            if i % 100 == 99:
                time.sleep(0.05)  # paced so the listen backlog rarely overflows
        # Refreshing goes on while the flood holds its connections (a refresh every ~2 s).
        tokens.changes_by(3, timeout=30)
        # A fresh connection is answered once the idle ones are shed or timed out.
        wait_for(lambda: _healthz_ok(proc), timeout=30, interval=0.2)
        tokens.changes_by(1, timeout=20)
    finally:
        for sock in idle:
            sock.close()
        code = proc.stop()
    assert code == 0, proc.text()
    assert "too many open files" not in proc.text().lower()
    records = proc.records()  # every line JSON
    assert not [r for r in records if r["message"] == "refresh failed"], proc.text()


def _healthz_ok(proc: Refresher) -> bool:
    try:
        return proc.get("/healthz", timeout=2)[0] == 200
    except OSError:
        return False


def test_clients_that_go_away_mid_request_leave_no_traceback_on_stderr(
    make_idp: Callable[..., Any], secret_file: Path, tmp_path: Path
) -> None:
    idp = make_idp("generic", lifetime=60)
    token = tmp_path / "token"
    config = write_config(tmp_path / "c.yaml", job_for(idp, secret_file, token))
    proc = Refresher(config)
    try:
        port = proc.wait_port()
        wait_for(token.exists, timeout=20)
        sent = [
            b"",  # connect, then reset
            b"GET /metr",  # half a request line, then reset
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n",  # a head without its end
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",  # a whole request, answer unread
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 3,  # pipelined, then gone
            b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nxx",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS hello on a plain port
        ]
        for _ in range(10):
            for data in sent:
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                if data:
                    sock.sendall(data)
                _reset(sock)
            for data in sent[3:]:  # and closed politely, without reading
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                sock.sendall(data)
                sock.close()
        wait_for(lambda: _healthz_ok(proc), timeout=10)
    finally:
        code = proc.stop()
    assert code == 0, proc.text()
    assert "Traceback" not in proc.text()
    records = proc.records()  # fails on any line that is not JSON
    assert records[-1]["message"] == "stopped"
    assert not [r for r in records if r["level"] in ("error", "critical")], proc.text()


# ---------------------------------------------------------------------- against the stack


def test_the_server_header_names_no_versions(
    make_idp: Callable[..., Any], secret_file: Path, tmp_path: Path
) -> None:
    idp = make_idp("generic", lifetime=60)
    with running(
        config_of(job_for(idp, secret_file, tmp_path / "token"), metrics=METRICS_ON)
    ) as daemon:
        assert daemon.http is not None
        port = daemon.http.port
        for path in ("/healthz", "/metrics", "/readyz", "/nothing-here"):
            _, headers, _ = get("127.0.0.1", port, path)
            assert headers["Server"] == "refresher", (path, headers)
        response = requests.post(f"http://127.0.0.1:{port}/healthz", timeout=5)
        assert response.status_code in (405, 501)
        assert response.headers["Server"] == "refresher"
        # A malformed request is answered by the HTTP parser itself, before any handler.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"BR0KEN\x01 / HTTP/1.1\r\n\r\n")
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
        head = answer.split(b"\r\n\r\n", 1)[0].decode()
        assert head.split(" ")[1] == "400", head
        assert "Server: refresher" in head and "Python" not in answer.decode(errors="replace")


class _Stuck(Collector):
    """A collector that blocks each scrape until released, as one waiting on a lock would."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)

    def collect(self) -> Iterator[Metric]:
        self.entered.release()
        self.release.wait(30)
        yield GaugeMetricFamily("test_stuck", "A scrape that was held up.", value=1)


def test_healthz_answers_while_scrapes_are_stuck(
    make_idp: Callable[..., Any], secret_file: Path, tmp_path: Path
) -> None:
    idp = make_idp("generic", lifetime=60)
    metrics = Metrics()
    stuck = _Stuck()
    config = config_of(job_for(idp, secret_file, tmp_path / "token"), metrics=METRICS_ON)
    with running(config, metrics=metrics) as daemon:
        assert daemon.http is not None
        port = daemon.http.port
        metrics.registry.register(stuck)
        results: list[int] = []
        scrapes = [
            threading.Thread(
                target=lambda: results.append(get("127.0.0.1", port, "/metrics", 20)[0])
            )
            for _ in range(4)
        ]
        for thread in scrapes:
            thread.start()
        assert stuck.entered.acquire(timeout=10)  # a scrape is inside the collector
        try:
            for _ in range(5):
                assert get("127.0.0.1", port, "/healthz", timeout=5)[:1] == (200,)
        finally:
            stuck.release.set()
        for thread in scrapes:
            thread.join(timeout=20)
        assert results == [200] * 4
