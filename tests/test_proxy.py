"""The header-injecting proxy (refresher/proxy.py, rule 13 of docs/design.md) on a running
daemon, over real HTTP.

The upstream is the Lucidworks-shaped local token server's protected API (it revokes a token
when the same client asks again, and accepts only live tokens), or, where a test needs an
upstream that answers one thing to everything, `FixedUpstream`. Consumers are plain
`requests` clients; hostile ones speak raw HTTP over sockets.
"""

from __future__ import annotations

import hashlib
import json
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from refresher.config import ProxyConfig, validate
from refresher.daemon import Daemon
from refresher.errors import ConfigError
from refresher.loopback import LoopbackServer, QuietHandler, owner_of
from refresher.proxy import request_headers, response_headers, upstream_target
from refresher.tokens import Token
from testdoubles.idp import LocalIdP
from testdoubles.kubeapi import FakeKubeAPI
from tests.conftest import (
    CLIENT_SECRET,
    LogCapture,
    config_of,
    job_for,
    offline_job,
    rogue_request,
    running,
    wait_for,
)
from tests.conftest import (
    metric_value as _metric,
)

JOB = "lucidworks-job"


# ------------------------------------------------------------------------- test doubles


class _FixedHandler(QuietHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        upstream: FixedUpstream = owner_of(self)
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        upstream.seen.append((self.command, self.path, dict(self.headers.items())))
        body = upstream.body
        self.send_response(upstream.status)
        self.send_header("Content-Type", "application/json")
        if upstream.chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if upstream.chunked:
            for start in range(0, len(body), 10_000):
                piece = body[start : start + 10_000]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.wfile.write(body)

    do_POST = do_PUT = do_DELETE = do_HEAD = do_GET


class FixedUpstream(LoopbackServer):
    """An upstream that answers `status` to every request and remembers what it got."""

    def __init__(
        self, status: int = 200, body: bytes = b'{"fixed": true}', chunked: bool = False
    ) -> None:
        super().__init__(_FixedHandler, name="fixed-upstream")
        self.status = status
        self.body = body
        self.chunked = chunked
        self.seen: list[tuple[str, str, dict[str, str]]] = []

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


class _Silent:
    """A port that accepts connections and never answers (counts them)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self.sock.settimeout(0.1)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        held = []
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            held.append(conn)
        for conn in held:
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


# ------------------------------------------------------------------------------ helpers


def _proxy_job(
    upstream: str, idp: LocalIdP, secret_file: Path, sink: Path, **proxy: Any
) -> dict[str, Any]:
    job = job_for(idp, secret_file, sink)
    job["proxy"] = {"listen": "127.0.0.1:0", "upstream": upstream, **proxy}
    return job


@contextmanager
def _proxying(
    idp: LocalIdP, secret_file: Path, tmp_path: Path, upstream: str | None = None, **proxy: Any
) -> Iterator[tuple[Daemon, str, Path]]:
    """A daemon whose job has a proxy to `upstream` (the IdP's own API by default), with its
    first token written; its proxy's base URL; its sink."""
    sink = tmp_path / "token"
    job = _proxy_job(upstream or idp.base_url, idp, secret_file, sink, **proxy)
    with running(config_of(job)) as daemon:
        wait_for(lambda: sink.exists() and daemon.runners[0].snapshot().ready)
        yield daemon, f"http://127.0.0.1:{daemon.proxies[JOB].port}", sink


def _replays(daemon: Daemon, outcome: str) -> float:
    return _metric(daemon, "refresher_proxy_replays_total", token=JOB, outcome=outcome)


def _raw(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes; what comes back until the server closes or goes quiet."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (TimeoutError, ConnectionResetError):
            pass
        return b"".join(chunks)


@pytest.fixture
def idp(make_idp: Any) -> LocalIdP:
    return make_idp("lucidworks", lifetime=600)  # no scheduled refresh during a test


@pytest.fixture
def fixed() -> Iterator[Any]:
    started: list[FixedUpstream] = []

    def make(
        status: int = 200, body: bytes = b'{"fixed": true}', chunked: bool = False
    ) -> FixedUpstream:
        upstream = FixedUpstream(status, body, chunked).start()
        started.append(upstream)
        return upstream

    yield make
    for upstream in started:
        upstream.stop()


# ------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/", "/v1/"),
        ("/a/b?x=1&y=%20", "/v1/a/b?x=1&y=%20"),
        ("/a/./b", "/v1/a/b"),
        ("/a/../b", "/v1/b"),
        ("/a/%2e%2E/b", "/v1/b"),
        ("/a/b/", "/v1/a/b/"),
        ("/a//b", "/v1/a//b"),
        ("//evil.example/x", "/v1//evil.example/x"),
        ("/a/%2541/b", "/v1/a/%2541/b"),  # a percent sign, encoded
        ("/a/%252e%252e/b", None),  # a dot segment to an upstream that decodes twice
        ("/a/..;x/b", None),  # `..` to Java servers (path parameters)
        ("/a/%2e%2e;x/b", None),
        ("/a/%c0%ae%c0%ae/b", None),  # overlong UTF-8 for `..`
        ("/a/%25%32%66/b", None),  # `/` after two decodings
        ("/a%0ab", None),  # a newline, encoded: refused here, not left to the router
        ("/a/b;jsessionid=1", "/v1/a/b;jsessionid=1"),
        ("/..", None),
        ("/a/../../b", None),
        ("/%2e%2e/x", None),
        ("/a%2fb", None),
        ("/a%5cb", None),
        ("/a%00b", None),
        ("http://evil.example/x", None),
        ("evil.example:443", None),
        ("*", None),
        ("/a b", None),
        ("/a\r\nb", None),
        ("/a#frag", None),
        ("/caf\u00e9", None),
    ],
)
def test_request_targets_stay_below_the_base_path(raw: str, expected: str | None) -> None:
    assert upstream_target("/v1", raw) == expected


def test_the_root_base_path() -> None:
    assert upstream_target("", "/x/y?z") == "/x/y?z"
    assert upstream_target("", "/x/..") == "/"


def _headers(*pairs: tuple[str, str]) -> Any:
    from multidict import CIMultiDict, CIMultiDictProxy

    return CIMultiDictProxy(CIMultiDict(pairs))


def _proxy_config(**proxy: Any) -> ProxyConfig:
    return ProxyConfig.model_validate(
        {"listen": "0", "upstream": "https://api.example.test/v1", **proxy}
    )


def test_what_goes_upstream_and_what_does_not() -> None:
    token = Token(access_token="the-token", expires_at=2e9, issued_at=1e9, extras={"api_key": "k1"})
    config = _proxy_config(headers={"X-Tenant": "t1"}, credential_headers={"x-api-key": "api_key"})
    incoming = _headers(
        ("Host", "refresher.tokens.svc:9470"),
        ("Authorization", "Bearer consumer-own"),
        ("X-Refresher-Authorization", "Bearer consumer-credential"),
        ("Connection", "keep-alive, X-Drop-Me"),
        ("X-Drop-Me", "1"),
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Upgrade", "websocket"),
        ("Proxy-Authorization", "Basic xxx"),
        ("X-Forwarded-For", "10.0.0.9"),
        ("X-Forwarded-Prefix", "/admin"),
        ("Forwarded", "for=10.0.0.9;host=evil.example"),
        ("X-Real-IP", "10.0.0.9"),
        ("X-Original-URL", "/admin"),
        ("x-api-key", "consumer-said"),
        ("X-Tenant", "consumer-said"),
        ("Accept", "application/json"),
        ("Content-Type", "application/json"),
        ("Content-Length", "12"),
        ("X-Request-Id", "abc"),
    )
    sent = request_headers(
        incoming, config, token, upstream_host="api.example.test", peer="10.1.2.3", scheme="http"
    )
    assert dict(sent) == {
        "Accept": "application/json",
        "Content-Type": "application/json",
        "Content-Length": "12",
        "X-Request-Id": "abc",
        "Host": "api.example.test",
        "Authorization": "Bearer the-token",
        "X-Tenant": "t1",
        "x-api-key": "k1",
    }
    forwarded = request_headers(
        incoming,
        _proxy_config(forwarded_headers=True),
        token,
        upstream_host="api.example.test",
        peer="10.1.2.3",
        scheme="http",
    )
    assert forwarded["X-Forwarded-For"] == "10.1.2.3"  # the peer, not what the consumer said
    assert forwarded["X-Forwarded-Proto"] == "http"
    assert forwarded["X-Forwarded-Host"] == "refresher.tokens.svc:9470"


def test_what_comes_back() -> None:
    back = response_headers(
        _headers(
            ("Content-Type", "text/plain"),
            ("Content-Length", "5"),
            ("Transfer-Encoding", "chunked"),
            ("Connection", "close, X-Hop"),
            ("X-Hop", "1"),
            ("Set-Cookie", "a=b"),
            ("Set-Cookie", "c=d"),
        )
    )
    assert list(back.items()) == [
        ("Content-Type", "text/plain"),
        ("Set-Cookie", "a=b"),
        ("Set-Cookie", "c=d"),
    ]


# ------------------------------------------------------------------------------ config


def test_proxy_config_problems_are_listed_with_their_paths(tmp_path: Path) -> None:
    jobs = [
        offline_job(
            tmp_path,
            name="one",
            proxy={"listen": "0.0.0.0:9470", "upstream": "http://api.example.test/v1?x=1"},
        ),
        offline_job(
            tmp_path,
            name="two",
            scopes=["two"],
            sinks=[{"type": "file", "path": str(tmp_path / "two")}],
            proxy={
                "listen": "127.0.0.1:9470",
                "upstream": "https://api.example.test/v1/../admin",
                "credential_headers": {"x-api-key": "api_key"},
                "ca_bundle": str(tmp_path / "missing.pem"),
            },
        ),
        offline_job(
            tmp_path,
            name="three",
            scopes=["three"],
            sinks=[{"type": "file", "path": str(tmp_path / "three")}],
            proxy={"listen": "127.0.0.1:9464", "upstream": "https://user:pw@api.example.test"},
        ),
    ]
    with pytest.raises(ConfigError) as caught:
        validate({"tokens": jobs})
    problems = caught.value.problems
    expected = [
        "tokens[0].proxy.upstream: plain http:// would send the token unencrypted",
        "tokens[0].consumers: required: tokens[0].proxy.listen (0.0.0.0:9470) is not a loopback",
        "tokens[1].proxy.upstream: the base path cannot hold `.` or `..` segments",
        "tokens[1].proxy.ca_bundle: no such file",
        "tokens[1].proxy.credential_headers: the credentials' extras come from a",
        "tokens[1].proxy.listen: port 9470 is already tokens[0].proxy.listen",
        "tokens[2].proxy.upstream: credentials do not belong in the URL",
        "tokens[2].proxy.listen: port 9464 is already metrics.port",
    ]
    for start in expected:
        assert any(problem.startswith(start) for problem in problems), (start, problems)
    assert len(problems) == len(expected), problems


@pytest.mark.parametrize(
    ("proxy", "message"),
    [
        ({"headers": {"Authorization": "x"}}, "`Authorization` is set by the proxy itself"),
        ({"headers": {"Host": "x"}}, "`Host` is set by the proxy itself"),
        ({"credential_headers": {"Connection": "api_key"}}, "`Connection` is set by the proxy"),
        ({"headers": {"X-Bad": "a\r\nb"}}, "tokens[0].proxy.headers.X-Bad"),
        ({"listen": "example.com:80"}, "tokens[0].proxy.listen"),
        ({"max_replay_body": "1 TB"}, "tokens[0].proxy.max_replay_body"),
        ({"max_replay_body": "128MiB"}, "tokens[0].proxy.max_replay_body"),
        ({"replay_wait": "1m"}, "tokens[0].proxy.replay_wait"),
        ({"surprise": 1}, "tokens[0].proxy.surprise"),
        ({"replay_buffer": "512KiB"}, "tokens[0].proxy.replay_buffer: smaller than"),
        ({"listen": "127.0.0.1:9479", "upstream": "http://localhost:9479/v1"}, "a loop"),
    ],
)
def test_bad_proxy_keys_are_clear_errors(
    tmp_path: Path, proxy: dict[str, Any], message: str
) -> None:
    job = offline_job(
        tmp_path, proxy={"listen": "127.0.0.1:0", "upstream": "https://api.example.test", **proxy}
    )
    with pytest.raises(ConfigError) as caught:
        validate({"tokens": [job]})
    assert any(message in problem for problem in caught.value.problems), caught.value.problems


def test_sizes_and_a_bare_port(tmp_path: Path) -> None:
    job = offline_job(
        tmp_path,
        proxy={
            "listen": 9470,
            "upstream": "https://api.example.test/v1/",
            "max_replay_body": "256KiB",
        },
    )
    proxy = validate({"tokens": [job]}).jobs[0].proxy
    assert proxy is not None
    assert proxy.listen == "127.0.0.1:9470" and proxy.loopback
    assert proxy.max_replay_body == 256 * 1024
    assert proxy.upstream_base == ("https://api.example.test", "/v1")


# ------------------------------------------------------------------ forwarding, replays


def test_a_request_goes_upstream_with_the_current_token_and_nothing_of_the_consumers(
    idp: LocalIdP, secret_file: Path, tmp_path: Path
) -> None:
    with _proxying(idp, secret_file, tmp_path) as (daemon, base, sink):
        answer = requests.get(
            f"{base}/api/protected?q=1",
            headers={
                "Authorization": "Bearer not-for-the-api",
                "Host": "evil.example",
                "X-Request-Id": "r-1",
            },
            timeout=10,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["ok"] is True
        seen = idp.protected_requests[-1]
        headers = {name.lower(): value for name, value in seen.headers}
        assert headers["authorization"] == f"Bearer {sink.read_text().strip()}"
        assert headers["host"] == f"127.0.0.1:{idp.port}"
        assert headers["x-request-id"] == "r-1"
        assert "x-refresher-authorization" not in headers
        assert "x-forwarded-for" not in headers
        assert seen.query == "q=1"
        # Counted once the answer is written, which the consumer may see first.
        wait_for(
            lambda: _metric(daemon, "refresher_proxy_requests_total", token=JOB, code="200") == 1
        )


def test_a_rogue_reissue_is_healed_by_one_replay_the_consumer_never_sees_the_401(
    idp: LocalIdP, secret_file: Path, tmp_path: Path, all_logs: LogCapture
) -> None:
    with _proxying(idp, secret_file, tmp_path) as (daemon, base, sink):
        session = requests.Session()
        body = json.dumps({"query": "x" * 5000}).encode()
        for round_ in range(3):
            dead = sink.read_text().strip()
            rogue_request(idp)  # another client with our credentials: our token is revoked
            answer = session.post(f"{base}/api/protected/items?n={round_}", data=body, timeout=10)
            assert answer.status_code == 200, answer.text
            # The replay carried the same body.
            assert answer.json()["body_sha256"] == hashlib.sha256(body).hexdigest()
            wait_for(lambda dead=dead: sink.read_text().strip() != dead)
        assert _replays(daemon, "accepted") == 3
        assert idp.protected_unauthorized == 3  # one 401 per reissue, each replayed
        replayed = [line for line in all_logs.lines if "rejected request replayed" in line]
        assert replayed and all("/api/protected/items" in line for line in replayed)
        assert not any("n=0" in line for line in replayed)  # the path, never the query
        assert _metric(daemon, "refresher_token_rejections_total", token=JOB, source="proxy") == 3


def test_a_token_replaced_while_a_request_was_in_flight_is_replayed_at_once(
    idp: LocalIdP, secret_file: Path, tmp_path: Path
) -> None:
    with _proxying(idp, secret_file, tmp_path, replay_wait=0) as (daemon, base, sink):
        old = sink.read_text().strip()
        results: list[requests.Response] = []
        slow = threading.Thread(
            target=lambda: results.append(
                requests.get(f"{base}/api/protected?delay=0.8", timeout=10)
            )
        )
        slow.start()
        time.sleep(0.3)  # the request waits at the upstream
        daemon.runners[0].refresh_now()  # revokes `old` on this IdP, while the request waits
        assert sink.read_text().strip() != old
        slow.join()
        # With replay_wait 0 the proxy does not wait: it replays because the token it sent
        # is no longer the current one.
        assert results[0].status_code == 200, results[0].text
        assert _replays(daemon, "accepted") == 1


def test_an_upstream_that_rejects_everything_gets_one_replay_per_request_and_no_loop(
    idp: LocalIdP, secret_file: Path, tmp_path: Path, fixed: Any
) -> None:
    upstream = fixed(401, b'{"error": "invalid_token"}')
    with _proxying(idp, secret_file, tmp_path, upstream.base_url) as (daemon, base, sink):
        kept = sink.read_text().strip()
        answers = [requests.get(f"{base}/x", timeout=10) for _ in range(6)]
        assert [a.status_code for a in answers] == [401] * 6
        assert all(a.json() == {"error": "invalid_token"} for a in answers)  # the upstream's
        # Never more than one replay per request; once the job sees its fresh token rejected
        # too it stops refreshing (contested), and later rejections pass through at once.
        assert len(upstream.seen) <= 12
        replayed = _replays(daemon, "rejected")
        assert 1 <= replayed <= 6
        assert replayed + _replays(daemon, "no_new_token") == 6
        assert idp.token_requests <= 4  # no refresh loop
        assert daemon.runners[0].snapshot().ready  # a valid token is still held
        assert sink.exists() and (kept == sink.read_text().strip() or idp.token_requests > 1)


def test_a_body_larger_than_max_replay_body_is_streamed_and_not_replayed(
    idp: LocalIdP, secret_file: Path, tmp_path: Path
) -> None:
    with _proxying(idp, secret_file, tmp_path, max_replay_body="64KiB") as (daemon, base, _sink):
        big = bytes(range(256)) * 1024  # 256 KiB
        ok = requests.post(f"{base}/api/protected/upload", data=big, timeout=10)
        assert ok.status_code == 200 and ok.json()["body_bytes"] == len(big)
        assert ok.json()["body_sha256"] == hashlib.sha256(big).hexdigest()
        # Chunked, of unknown length: streamed too, once past the limit.
        chunked = requests.post(
            f"{base}/api/protected/upload", data=iter([big[:100_000], big[100_000:]]), timeout=10
        )
        assert chunked.status_code == 200 and chunked.json()["body_bytes"] == len(big)
        rogue_request(idp)
        before = idp.protected_unauthorized
        refused = requests.post(f"{base}/api/protected/upload", data=big, timeout=10)
        assert refused.status_code == 401  # passed through: a streamed body cannot be sent again
        assert idp.protected_unauthorized == before + 1
        assert _replays(daemon, "not_replayable") == 1
        # The rejection was still reported: the job heals, and the next call works.
        wait_for(lambda: requests.get(f"{base}/api/protected", timeout=10).status_code == 200)


def test_large_and_chunked_answers_stream_through_whole(
    idp: LocalIdP, secret_file: Path, tmp_path: Path
) -> None:
    from refresher.localidp import pattern_bytes

    size = 20 * 1024 * 1024
    expected = hashlib.sha256(pattern_bytes(size)).hexdigest()
    with _proxying(idp, secret_file, tmp_path) as (_, base, _sink):
        for query in ("", "?chunked=1"):
            with requests.get(
                f"{base}/api/protected/bytes/{size}{query}", stream=True, timeout=30
            ) as answer:
                assert answer.status_code == 200
                if query:
                    assert answer.headers.get("Transfer-Encoding") == "chunked"
                else:
                    assert answer.headers["Content-Length"] == str(size)
                digest = hashlib.sha256()
                for chunk in answer.iter_content(65536):
                    digest.update(chunk)
            assert digest.hexdigest() == expected


# ---------------------------------------------------------------------------- faults


def test_upstream_faults_are_502_or_504_with_a_reason_and_refreshing_goes_on(
    idp: LocalIdP, secret_file: Path, tmp_path: Path, all_logs: LogCapture
) -> None:
    silent = _Silent()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]  # nothing listens here once closed
    try:
        with _proxying(idp, secret_file, tmp_path, timeouts={"read": 0.5, "connect": 0.5}) as (
            daemon,
            base,
            _sink,
        ):
            slow = requests.get(f"{base}/api/protected?delay=3", timeout=10)
            assert slow.status_code == 504 and slow.json()["reason"] == "timeout"
            reset = requests.get(f"{base}/api/protected?reset=1", timeout=10)
            assert reset.status_code == 502 and reset.json()["reason"] == "reset"
            # Cut after the head went back: the consumer's connection is cut too.
            with pytest.raises(requests.exceptions.RequestException):
                cut = requests.get(
                    f"{base}/api/protected/bytes/1000000?reset_after=100000", timeout=10
                )
                cut.raise_for_status()
            before = daemon.runners[0].token
            daemon.runners[0].refresh_now()
            assert daemon.runners[0].token is not before  # refreshing goes on
            assert (
                _metric(
                    daemon, "refresher_proxy_upstream_errors_total", token=JOB, reason="timeout"
                )
                == 1
            )
            assert (
                _metric(daemon, "refresher_proxy_upstream_errors_total", token=JOB, reason="reset")
                == 2
            )
        for upstream, reason, status in (
            (f"http://127.0.0.1:{closed_port}", "connect", 502),
            (f"http://127.0.0.1:{silent.port}", "timeout", 504),
        ):
            with _proxying(
                idp, secret_file, tmp_path, upstream, timeouts={"read": 0.5, "connect": 0.5}
            ) as (daemon, base, _):
                answer = requests.get(f"{base}/x", timeout=10)
                assert answer.status_code == status and answer.json()["reason"] == reason
                assert "Bearer" not in answer.text
    finally:
        silent.close()
    assert "upstream" in all_logs.text


def test_a_5xx_is_the_upstreams_answer_passed_through(
    idp: LocalIdP, secret_file: Path, tmp_path: Path, fixed: Any
) -> None:
    upstream = fixed(503, b'{"busy": true}')
    with _proxying(idp, secret_file, tmp_path, upstream.base_url) as (daemon, base, _):
        answer = requests.get(f"{base}/x", timeout=10)
        assert answer.status_code == 503 and answer.json() == {"busy": True}
        assert len(upstream.seen) == 1  # not a rejection: no replay, no report
        assert _replays(daemon, "no_new_token") == 0
        assert daemon.runners[0].stats.rejections == {} or not any(
            daemon.runners[0].stats.rejections.values()
        )


# --------------------------------------------------------------------------- security


def test_nothing_reaches_another_host(
    idp: LocalIdP, secret_file: Path, tmp_path: Path, fixed: Any, all_logs: LogCapture
) -> None:
    evil = fixed(200, b"evil")
    with _proxying(idp, secret_file, tmp_path) as (daemon, base, sink):
        port = daemon.proxies[JOB].port
        other = f"127.0.0.1:{evil.port}"
        hostile = [
            f"GET http://{other}/x HTTP/1.1\r\nHost: {other}\r\n\r\n".encode(),
            f"CONNECT {other} HTTP/1.1\r\nHost: {other}\r\n\r\n".encode(),
            b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /a/../../x HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /a/%2e%2e/%2e%2e/x HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /a%2f..%2f..%2fx HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /a\r\nb HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /x HTTP/1.1\r\nHost: x\r\nX-Bad: a\rb\r\n\r\n",
            b"GET /x HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
            b"GET /x HTTP/1.1\r\nHost: x\r\n"
            + b"".join(b"X-%d: 1\r\n" % i for i in range(200))
            + b"\r\n",
        ]
        before = len(idp.protected_requests)
        for data in hostile:
            answer = _raw(port, data)
            status = answer.split(b"\r\n", 1)[0]
            assert status.split(b" ")[1] in (b"400", b"431"), (data[:60], status)
        assert evil.seen == []
        assert len(idp.protected_requests) == before  # nothing was sent anywhere
        # A Host header naming another host: sent to the upstream, with the upstream's Host.
        answer = requests.get(f"{base}/api/protected", headers={"Host": other}, timeout=10)
        assert answer.status_code == 200 and evil.seen == []
        headers = dict(idp.protected_requests[-1].headers)
        assert {k.lower(): v for k, v in headers.items()}["host"] == f"127.0.0.1:{idp.port}"
        token = sink.read_text().strip()
        assert token not in all_logs.text


def test_a_consumer_without_a_valid_credential_gets_401_and_nothing_reaches_the_upstream(
    idp: LocalIdP, secret_file: Path, tmp_path: Path, all_logs: LogCapture
) -> None:
    key = tmp_path / "consumer-key"
    key.write_text("consumer-key-5c2f9b0e\n")
    sink = tmp_path / "token"
    job = _proxy_job(idp.base_url, idp, secret_file, sink)
    job["consumers"] = {"bearer_key_file": str(key)}
    with running(config_of(job)) as daemon:
        wait_for(lambda: sink.exists())
        base = f"http://127.0.0.1:{daemon.proxies[JOB].port}"
        before = len(idp.protected_requests)
        for headers in (
            {},
            {"X-Refresher-Authorization": "Bearer wrong"},
            {"Authorization": "Bearer consumer-key-5c2f9b0e"},  # the wrong header
        ):
            answer = requests.get(f"{base}/api/protected", headers=headers, timeout=10)
            assert answer.status_code == 401, headers
            assert "X-Refresher-Authorization" in answer.json()["error"]
        assert len(idp.protected_requests) == before
        ok = requests.get(
            f"{base}/api/protected",
            headers={"X-Refresher-Authorization": "Bearer consumer-key-5c2f9b0e"},
            timeout=10,
        )
        assert ok.status_code == 200
        seen = {k.lower() for k, _ in idp.protected_requests[-1].headers}
        assert "x-refresher-authorization" not in seen
        assert "consumer-key-5c2f9b0e" not in all_logs.text
        assert _metric(daemon, "refresher_consumer_auth_failures_total", reason="missing") == 2
        assert sink.read_text().strip() not in all_logs.text


def test_slow_and_idle_clients_are_bounded_and_refreshing_goes_on(
    idp: LocalIdP, secret_file: Path, tmp_path: Path
) -> None:
    with _proxying(idp, secret_file, tmp_path, max_connections=16) as (daemon, base, sink):
        port = daemon.proxies[JOB].port
        held = []
        try:
            for _ in range(40):
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                sock.sendall(b"GET /api/protected HTTP/1.1\r\nHost: x\r\n")  # never finished
                held.append(sock)
            listener = daemon.proxies[JOB]
            wait_for(lambda: listener.shed > 0)
            assert listener.connections <= 16
            old = sink.read_text().strip()
            daemon.runners[0].refresh_now()
            assert sink.read_text().strip() != old
        finally:
            for sock in held:
                sock.close()
        wait_for(lambda: requests.get(f"{base}/api/protected", timeout=10).status_code == 200)


def test_no_token_in_any_answer_or_log(
    idp: LocalIdP, secret_file: Path, tmp_path: Path, fixed: Any, all_logs: LogCapture
) -> None:
    upstream = fixed(401, b'{"error": "invalid_token"}')
    with _proxying(idp, secret_file, tmp_path, upstream.base_url) as (_daemon, base, _sink):
        answers = [
            requests.get(f"{base}/x", timeout=10),
            requests.get(f"{base}/a/../../x", timeout=10),
            requests.request("CONNECT", f"{base}/x", timeout=10),
        ]
        tokens = {token.access_token for token in idp.issued}
        for answer in answers:
            for token in tokens:
                assert token not in answer.text
                assert all(token not in value for value in answer.headers.values())
        for token in tokens:
            assert token not in all_logs.text
        assert CLIENT_SECRET not in all_logs.text


# ---------------------------------------------------------------------------- replicas

NS = "tokens"
FAST = {"lease_duration": 2.0, "renew_deadline": 1.5, "retry_period": 0.25}


def test_a_follower_proxies_with_the_watched_token_and_its_rejection_heals_the_leader(
    idp: LocalIdP, secret_file: Path, tmp_path: Path, all_logs: LogCapture
) -> None:
    with FakeKubeAPI() as kube, ExitStack() as stack:
        replicas = []
        for identity in ("one", "two"):
            kubeconfig = kube.write_kubeconfig(tmp_path / f"kubeconfig-{identity}", namespace=NS)
            job = _proxy_job(idp.base_url, idp, secret_file, tmp_path / f"unused-{identity}")
            job["sinks"] = [{"type": "kubernetes", "name": "proxy-token", "create": True}]
            config = config_of(
                job,
                kubernetes={"kubeconfig": str(kubeconfig), "request_timeout": 2},
                leader_election={"enabled": True, "namespace": NS, "identity": identity, **FAST},
            )
            daemon = Daemon(config)
            replicas.append(daemon.start())
            stack.callback(daemon.stop)
            if identity == "one":
                wait_for(lambda d=daemon: d.is_leader and d.runners[0].snapshot().ready)
        _leader, follower = replicas
        base = f"http://127.0.0.1:{follower.proxies[JOB].port}"
        wait_for(lambda: requests.get(f"{base}/api/protected", timeout=10).status_code == 200)
        assert idp.token_requests == 1  # the follower never asks the IdP
        for _ in range(2):
            rogue_request(idp)
            # No probe and no trust_rejection_reports: the proxy's own observation is enough.
            answer = requests.get(f"{base}/api/protected", timeout=10)
            assert answer.status_code == 200, answer.text
        assert _replays(follower, "accepted") == 2
        assert "rejection report forwarded by a follower" in all_logs.text
        assert idp.token_requests == 5  # the first token, two rogue reissues, two refreshes


# ------------------------------------------------------------------ review follow-ups


def test_trace_is_refused_so_the_injected_token_cannot_be_echoed(
    idp: LocalIdP, secret_file: Path, tmp_path: Path
) -> None:
    with _proxying(idp, secret_file, tmp_path) as (_, base, _sink):
        before = len(idp.protected_requests)
        answer = requests.request("TRACE", f"{base}/api/protected", timeout=10)
        assert answer.status_code == 405
        track = requests.request("TRACK", f"{base}/api/protected", timeout=10)
        assert track.status_code in (400, 405)  # not even an HTTP method to the parser
        assert len(idp.protected_requests) == before


def test_a_long_chunked_rejection_passes_whole(
    idp: LocalIdP, secret_file: Path, tmp_path: Path, fixed: Any
) -> None:
    body = bytes(range(256)) * 800  # 200 KiB: longer than what is kept of a rejection
    upstream = fixed(401, body, chunked=True)
    with _proxying(idp, secret_file, tmp_path, upstream.base_url) as (daemon, base, _):
        answer = requests.get(f"{base}/x", timeout=10)
        assert answer.status_code == 401
        assert answer.content == body
        assert _replays(daemon, "not_replayable") == 1
        head = requests.head(f"{base}/x", timeout=10)
    with _proxying(idp, secret_file, tmp_path, fixed(401, body[:50]).base_url) as (_, base, _):
        head = requests.head(f"{base}/x", timeout=10)
        assert head.status_code == 401 and head.headers["Content-Length"] == "50"


def test_a_rejection_that_is_not_replayed_still_heals_the_job(
    idp: LocalIdP, secret_file: Path, tmp_path: Path
) -> None:
    with _proxying(idp, secret_file, tmp_path, max_replay_body="1KiB") as (_, base, sink):
        dead = sink.read_text().strip()
        rogue_request(idp)
        upload = requests.post(f"{base}/api/protected/up", data=b"x" * 4096, timeout=10)
        assert upload.status_code == 401  # streamed: passed through
        # No other request: the job was told, and replaces the token by itself.
        wait_for(lambda: sink.read_text().strip() != dead)
        again = requests.post(f"{base}/api/protected/up", data=b"x" * 4096, timeout=10)
        assert again.status_code == 200


def test_bodies_beyond_the_replay_buffer_are_streamed_not_held(
    idp: LocalIdP, secret_file: Path, tmp_path: Path
) -> None:
    with _proxying(idp, secret_file, tmp_path, max_replay_body="64KiB", replay_buffer="64KiB") as (
        daemon,
        base,
        _,
    ):
        body = b"y" * 60_000
        held: list[requests.Response] = []
        first = threading.Thread(
            target=lambda: held.append(
                requests.post(f"{base}/api/protected/a?delay=1.5", data=body, timeout=10)
            )
        )
        first.start()  # holds 60,000 bytes of the 64 KiB buffer while the upstream waits
        time.sleep(0.3)
        rogue_request(idp)
        second = requests.post(f"{base}/api/protected/b", data=body, timeout=10)
        assert second.status_code == 401  # did not fit: streamed, so not replayable
        first.join()
        # The first one was buffered: its token died while it waited, and it was replayed.
        assert held[0].status_code == 200
        assert held[0].json()["body_sha256"] == hashlib.sha256(body).hexdigest()
        assert _replays(daemon, "not_replayable") == 1
        assert _replays(daemon, "accepted") == 1


def test_with_a_probe_a_path_that_rejects_for_its_own_reasons_refreshes_nothing(
    idp: LocalIdP, secret_file: Path, tmp_path: Path, fixed: Any
) -> None:
    """A consumer picks the path: 401s from it are judged by the probe, which finds the token
    alive, so the token is not refreshed (and revoked) for everyone on a consumer's say-so."""
    upstream = fixed(401, b'{"error": "not for you"}')
    sink = tmp_path / "token"
    job = _proxy_job(upstream.base_url, idp, secret_file, sink, replay_wait="5s")
    job["probe"] = {"url": idp.protected_url}
    with running(config_of(job)) as daemon:
        wait_for(lambda: sink.exists() and daemon.runners[0].snapshot().ready)
        base = f"http://127.0.0.1:{daemon.proxies[JOB].port}"
        token = sink.read_text().strip()
        started = time.monotonic()
        answers = [requests.get(f"{base}/admin", timeout=10) for _ in range(5)]
        assert [a.status_code for a in answers] == [401] * 5
        # The probe said "alive" (or would not probe again so soon): no wait for a token
        # that will not come, though replay_wait is 5 s.
        assert time.monotonic() - started < 5
        assert sink.read_text().strip() == token and idp.token_requests == 1
        assert not daemon.runners[0].snapshot().contested
        assert _metric(daemon, "refresher_token_rejections_total", token=JOB, source="proxy") == 0


_ANY = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=6,
)
_OFFLINE = Path(tempfile.mkdtemp(prefix="proxy-config-"))  # one folder for every example
_PROXY_KEYS = [
    "listen", "upstream", "headers", "credential_headers", "max_replay_body", "replay_buffer",
    "replay_wait", "timeouts", "upstream_connections", "ca_bundle", "allow_insecure_http",
    "forwarded_headers", "max_connections", "max_connections_per_address", "tls",
]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(_PROXY_KEYS) | st.text(max_size=6), _ANY, max_size=4))
def test_any_proxy_value_is_a_clean_config_error_with_its_path(values: dict[str, Any]) -> None:
    proxy = {"listen": "127.0.0.1:0", "upstream": "https://api.example.test", **values}
    job = offline_job(_OFFLINE, proxy=proxy)
    try:
        validate({"tokens": [job]})
    except ConfigError as err:
        assert err.problems and all(problem.startswith("tokens[0]") for problem in err.problems)
