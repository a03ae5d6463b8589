"""The token API (issue 15) on real `refresher run` processes: two replicas behind one Lease
serving consumers through refreshes and a kill -9 of the leader (bench/tokenapi.py, run as a
program), and one replica whose API port is crowded by hostile neighbours.

The harness is a benchmark that prints its figures (`--json`, with its tables on stderr); the
first test runs it from the repository's root and checks them with generous bounds, so the
tests and the benchmarks do not import each other. `pytest -s` shows the tables.
"""

from __future__ import annotations

import contextlib
import json
import re
import select
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from testdoubles.idp import LocalIdP
from tests.conftest import CLIENT_SECRET, job_for, wait_for
from tests.runproc import Refresher, get, run_harness, write_config


def test_every_replica_serves_each_new_token_at_once_and_a_kill_9_takeover_heals() -> None:
    result, table = run_harness(
        "bench.tokenapi",
        "--refreshes", "4",
        "--seconds", "1",
        "--consumers", "4",
        "--after-takeover", "1",
        "--seed", "3",
        "--json",
        timeout=100,
    )  # fmt: skip
    print("\n" + table)
    assert result["problems"] == []

    # Plain GETs: every one answered with the token, on both replicas.
    for replica in ("tokenapi-1", "tokenapi-2"):
        load = result["load"][replica]
        assert load["requests"] > 50
        assert set(load["statuses"]) == {"200"}

    # Every refresh reached both replicas' long polls: the leader within a second of the
    # IdP's answer, the follower (through its Secret watch) within 2 s of the leader.
    before = [r for r in result["refreshes"] if r["before_kill"]]
    assert len(before) >= 4
    for refresh in before:
        assert refresh["issuer"] == "tokenapi-1"
        leader, follower = refresh["windows"]["tokenapi-1"], refresh["windows"]["tokenapi-2"]
        assert leader is not None and follower is not None, refresh
        assert 0 <= leader < 1.0
        assert follower - leader < 2.0
    assert len(result["follower_behind_leader_values"]) == len(before)
    for role in ("leader", "follower"):
        assert result["wakeup_delay"][role]["max"] < 3.0

    # No consumer call was rejected except inside a refresh's dead-token window.
    calls = result["calls"]
    assert calls["accepted"] > 200
    assert calls["rejected_outside"] == 0, result["rejected_outside_windows"]
    assert calls["other"] == 0

    # kill -9 of the leader: the follower takes over, never having asked the IdP while it
    # followed; its consumers keep a token the API accepts throughout.
    takeover = result["takeover"]
    assert takeover["takeover_after_kill"] < 10
    assert takeover["survivor_refreshes_while_following"] == 0
    assert takeover["first_refresh_by"] == "tokenapi-2"
    assert takeover["survivor_rejected_outside_windows"] == 0
    assert takeover["survivor_other_failures_after_kill"] == 0
    assert takeover["survivor_calls_after_kill"] > 20
    assert takeover["survivor_longest_gap_between_accepted_calls"] < 2.0
    assert result["dead_token_window"]["new_leader"]["count"] >= 1
    assert result["dead_token_window"]["new_leader"]["max"] < 1.0
    # Every token the IdP issued was asked for by the replica that led at the time ("?": its
    # log line was dropped, which the log queue may do while the load runs).
    assert set(result["issuers"]) <= {"tokenapi-1", "tokenapi-2", "?"}
    assert result["issuers"]["tokenapi-2"] >= 1
    assert result["idp_token_requests"] == result["issued_tokens"]

    # No client secret and no token in either replica's log; every line is a JSON line.
    assert result["log_lines"] > 50
    assert result["secret_leaks"] == 0, result["leaking_logs"]
    assert result["stray_log_lines"] == 0


# ------------------------------------------------------------------- hostile neighbours

# The head of a request that never ends: a slow client's.
SLOW_HEAD = b"GET /v1/tokens/generic-job HTTP/1.1\r\nHost: refresher\r\n"


class Crowd(threading.Thread):
    """Keeps `size` connections open to a port, each sending a request head one header line
    every half second and never finishing it; a connection the server closes is replaced
    (paced, so the crowd is a crowd rather than a connect loop)."""

    def __init__(self, port: int, size: int) -> None:
        super().__init__(daemon=True)
        self.port, self.size = port, size
        self.stopping = threading.Event()
        self.closed_by_server = 0
        self._lock = threading.Lock()
        self._held: dict[socket.socket, float] = {}  # -> when it connected

    def standing(self, older_than: float) -> int:
        """Connections held open for more than `older_than` seconds now."""
        now = time.monotonic()
        with self._lock:
            return sum(1 for since in self._held.values() if now - since > older_than)

    def _open(self) -> bool:
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=2)
            sock.sendall(SLOW_HEAD)
        except OSError:
            return False
        with self._lock:
            self._held[sock] = time.monotonic()
        return True

    def _drop(self, sock: socket.socket) -> None:
        self.closed_by_server += 1
        with self._lock:
            del self._held[sock]
        sock.close()

    def run(self) -> None:
        next_drip = time.monotonic()
        try:
            while not self.stopping.is_set():
                while len(self._held) < self.size and self._open():
                    pass
                readable, _, _ = select.select(list(self._held), [], [], 0.1)
                for sock in readable:  # an answer or, far more likely, the server closing it
                    try:
                        data = sock.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        self._drop(sock)
                if time.monotonic() >= next_drip:
                    next_drip = time.monotonic() + 0.5
                    for sock in list(self._held):
                        try:
                            sock.send(b"X-Slow: 1\r\n")
                        except OSError:
                            self._drop(sock)
                self.stopping.wait(0.1)
        finally:
            with self._lock:
                for sock in self._held:
                    sock.close()
                self._held.clear()

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=10)


def _exchange(port: int, data: bytes) -> bytes:
    """Send `data` on a new connection; whatever comes back until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        received = []
        # Closed before it read it all: an answer may still be waiting.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        try:
            while chunk := sock.recv(65536):
                received.append(chunk)
        except ConnectionResetError:
            pass
        return b"".join(received)


def _api_port(proc: Refresher) -> int:
    def logged() -> int | None:
        for line in list(proc.lines):
            if '"serving the token API"' in line:
                return int(json.loads(line)["port"])
        assert proc.alive(), proc.text()
        return None

    wait_for(lambda: logged() is not None, timeout=20)
    port = logged()
    assert port is not None
    return port


def test_hostile_neighbours_on_the_api_port_neither_stop_refreshing_nor_lock_others_out(
    make_idp: Callable[..., Any], secret_file: Path, tmp_path: Path
) -> None:
    idp: LocalIdP = make_idp("generic", lifetime=2)
    sink = tmp_path / "token"
    cap = 8
    config = write_config(
        tmp_path / "c.yaml",
        job_for(idp, secret_file, sink),
        api={"enabled": True, "listen": "127.0.0.1:0", "max_connections": cap},
    )
    proc = Refresher(config)
    path = "/v1/tokens/generic-job"
    try:
        proc.wait_port()
        api = _api_port(proc)
        wait_for(sink.exists, timeout=20)

        # Huge heads: refused with a 4xx or cut, never served, never left hanging.
        line = b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n"
        huge = [
            b"GET " + path.encode() + b"?" + b"a" * 16384 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
            line + b"X-Big: " + b"b" * 65536 + b"\r\n\r\n",
            line + b"X-Many: c\r\n" * 500 + b"\r\n",
            line + b"Authorization: Bearer " + b"d" * 200_000 + b"\r\n\r\n",
        ]
        for head in huge:
            began = time.monotonic()
            answer = _exchange(api, head)
            assert time.monotonic() - began < 8
            assert answer == b"" or re.match(rb"HTTP/1\.[01] 4\d\d ", answer), answer[:300]
            assert sink.read_text() not in answer.decode(errors="replace")

        # Four times as many slow clients as the cap, for a few seconds: refreshing goes on
        # (a token lives 1-2 s, so one is issued every second or so) and the metrics port
        # answers a well-behaved scrape.
        crowd = Crowd(api, 4 * cap)
        crowd.start()
        try:
            wait_for(lambda: crowd.closed_by_server > cap, timeout=10)  # the cap sheds them
            asked = idp.token_requests
            standing = []
            for _ in range(8):
                time.sleep(0.5)
                standing.append(crowd.standing(older_than=1.0))
            assert idp.token_requests - asked >= 2
            status, _, body = proc.get("/metrics", timeout=5)
            assert status == 200 and "refresher_token_ttl_seconds" in body
            # The listener holds at most its cap of them (plus a few waiting to be accepted).
            assert 1 <= max(standing) <= cap + 2, standing
        finally:
            crowd.stop()

        # The crowd gone, a fresh GET on the API port is served the token at once.
        def served() -> bool:
            try:
                status, _, body = get("127.0.0.1", api, path, timeout=5)
            except OSError:
                return False
            return status == 200 and json.loads(body)["access_token"] == sink.read_text()

        wait_for(served, timeout=10, interval=0.1)
        tokens_issued = [t.access_token for t in idp.issued]
    finally:
        code = proc.stop()
    assert code == 0, proc.text()
    records = proc.records()  # every line JSON
    assert not [r for r in records if r["message"] == "refresh failed"], proc.text()
    shed = [r for r in records if r["message"].startswith("http connection cap reached")]
    assert shed and shed[0]["port"] == api, proc.text()
    text = proc.text()
    assert "Traceback" not in text
    for secret in (CLIENT_SECRET, *tokens_issued):
        assert secret not in text
