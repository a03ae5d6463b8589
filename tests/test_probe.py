"""The probe (refresher/probe.py, rule 11 of docs/design.md) against real servers: the local
token server's protected API, and scripted servers that answer 5xx, time out, redirect,
trickle their headers or send a body without end.

Only a status in `rejected_statuses` means "dead"; everything else that is not a 2xx is an
error that says nothing about the token. The token goes to the probe URL and nowhere else,
and nothing the API answers reaches a log line.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from refresher.config import TokenJobConfig, validate
from refresher.errors import ConfigError
from refresher.idp import IdPClient, new_session
from refresher.probe import Prober, ProbeResult, judge
from refresher.tokens import Token
from testdoubles.idp import LocalIdP
from testdoubles.tls import Connection, ScriptedServer, fixed, response_head, serving
from tests.conftest import CLIENT_SECRET, LogCapture, job_for, offline_job

TOKEN = "eyJhbGciOiJIUzI1NiJ9.probe-token-SECRET-d41c.sig"


def _job(probe: dict[str, Any], tmp_path: Path, **overrides: Any) -> TokenJobConfig:
    return TokenJobConfig.model_validate(offline_job(tmp_path, probe=probe, **overrides))


def _probe(job: TokenJobConfig, token: str = TOKEN) -> ProbeResult:
    return Prober(requests.Session()).probe(job, Token(token, issued_at=0, expires_at=2e9))


def test_only_a_listed_status_means_rejected() -> None:
    assert judge(401, [401]).outcome == "rejected"
    assert judge(200, [401]).outcome == "accepted"
    assert judge(204, [401]).outcome == "accepted"
    for status in (403, 404, 500, 502, 503, 302, 307, 101):
        assert judge(status, [401]).outcome == "error", status
    assert judge(403, [401, 403]).outcome == "rejected"


def test_a_live_token_is_accepted_and_a_revoked_one_rejected(
    make_idp: Any, secret_file: Path, tmp_path: Path
) -> None:
    idp: LocalIdP = make_idp("lucidworks", lifetime=60)
    job = TokenJobConfig.model_validate(
        job_for(idp, secret_file, tmp_path / "token", probe={"url": idp.protected_url})
    )
    session = new_session()
    first = IdPClient(session).fetch(job)
    assert first is not None
    prober = Prober(session)
    assert prober.probe(job, first) == ProbeResult("accepted", "HTTP 200", 200)
    second = IdPClient(session).fetch(job)  # revokes the first (Lucidworks)
    assert second is not None
    assert prober.probe(job, first) == ProbeResult("rejected", "HTTP 401", 401)
    assert prober.probe(job, second).outcome == "accepted"


def test_credential_headers_carry_the_lucidtech_api_key(make_idp: Any, tmp_path: Path) -> None:
    idp: LocalIdP = make_idp("lucidtech", lifetime=60, api_key="lt-api-key-123")
    credentials = tmp_path / "credentials.cfg"
    credentials.write_text(
        f"client_id = refresher-test-client\nclient_secret = {CLIENT_SECRET}\n"
        "api_key = lt-api-key-123\n"
    )
    credentials.chmod(0o600)
    base = {
        "name": "lucidtech",
        "provider": "lucidtech",
        "credentials_file": str(credentials),
        "token_url": idp.token_url,
        "sinks": [{"type": "file", "path": str(tmp_path / "token")}],
    }
    with_key = TokenJobConfig.model_validate(
        {
            **base,
            "probe": {"url": idp.protected_url, "credential_headers": {"x-api-key": "api_key"}},
        }
    )
    without_key = TokenJobConfig.model_validate({**base, "probe": {"url": idp.protected_url}})
    session = new_session()
    token = IdPClient(session).fetch(with_key)
    assert token is not None
    assert Prober(session).probe(with_key, token).outcome == "accepted"
    # Without the key Lucidtech answers 403: not a rejection of the token.
    assert Prober(session).probe(without_key, token) == ProbeResult("error", "HTTP 403", 403)


def test_a_5xx_a_403_and_a_404_are_errors_not_rejections(tmp_path: Path) -> None:
    with serving(fixed(503, {"Retry-After": "5"}, b'{"error":"down"}')) as server:
        job = _job({"url": server.url("/probe")}, tmp_path)
        assert _probe(job) == ProbeResult("error", "HTTP 503", 503)
        for status in (403, 404, 500):
            server.set_script(fixed(status, {}, b""))
            assert _probe(job).outcome == "error"
        server.set_script(fixed(404, {}, b""))
        listed = _job({"url": server.url("/probe")}, tmp_path, rejected_statuses=[401, 404])
        assert _probe(listed).outcome == "rejected"


def test_a_redirect_is_not_followed_and_the_token_goes_nowhere_else(tmp_path: Path) -> None:
    with serving(fixed(200, {}, b"")) as elsewhere:
        moved = fixed(302, {"Location": elsewhere.url("/steal")}, b"")
        with serving(moved) as server:
            job = _job({"url": server.url("/probe")}, tmp_path)
            assert _probe(job) == ProbeResult("error", "HTTP 302 redirect not followed", 302)
            (request,) = server.requests
            assert request.headers["authorization"] == f"Bearer {TOKEN}"
        assert elsewhere.requests == []


def test_a_probe_that_never_answers_is_a_timely_error(tmp_path: Path) -> None:
    def silent(connection: Connection) -> None:
        connection.pause(30)

    with serving(silent) as server:
        job = _job({"url": server.url("/probe"), "read_timeout": 0.3}, tmp_path)
        started = time.monotonic()
        result = _probe(job)
        assert result.outcome == "error"
        assert "timeout" in result.detail
        assert time.monotonic() - started < 10


def test_headers_trickled_a_byte_at_a_time_cannot_hold_the_probe(tmp_path: Path) -> None:
    def trickle(connection: Connection) -> None:
        head = response_head(200, {"X-Padding": "a" * 5000})
        for byte in head:
            if not connection.send(bytes([byte])) or not connection.pause(0.05):
                return

    with serving(trickle) as server:
        # Each byte comes well within the read timeout; the whole head would take minutes.
        job = _job(
            {"url": server.url("/probe"), "connect_timeout": 0.5, "read_timeout": 0.5}, tmp_path
        )
        started = time.monotonic()
        result = _probe(job)
        assert result.outcome == "error"
        assert time.monotonic() - started < 10


def test_a_huge_body_is_never_read(tmp_path: Path) -> None:
    def endless(connection: Connection) -> None:
        if not connection.send(response_head(200, {"Content-Length": str(10**12)})):
            return
        chunk = b"x" * 65536
        while connection.send(chunk):
            pass

    with serving(endless) as server:
        job = _job({"url": server.url("/probe")}, tmp_path)
        started = time.monotonic()
        assert _probe(job).outcome == "accepted"
        assert time.monotonic() - started < 10


def test_method_and_static_headers_are_sent_and_authorization_is_ours(tmp_path: Path) -> None:
    with serving(fixed(204, {}, b"")) as server:
        job = _job(
            {"url": server.url("/probe"), "method": "HEAD", "headers": {"X-Tenant": "acme"}},
            tmp_path,
        )
        assert _probe(job).outcome == "accepted"
        (request,) = server.requests
        assert request.request_line.startswith("HEAD /probe ")
        assert request.headers["x-tenant"] == "acme"
        assert request.headers["authorization"] == f"Bearer {TOKEN}"


def test_nothing_the_api_answers_and_no_token_reaches_the_log(
    tmp_path: Path, all_logs: LogCapture
) -> None:
    body = f'{{"error":"invalid_token","echo":"{TOKEN}","secret":"{CLIENT_SECRET}"}}'.encode()
    with serving(fixed(401, {"WWW-Authenticate": f'Bearer error="{TOKEN}"'}, body)) as server:
        job = _job({"url": server.url("/probe?tenant=acme")}, tmp_path)
        result = _probe(job)
    assert result.outcome == "rejected"
    assert TOKEN not in repr(result) and CLIENT_SECRET not in repr(result)
    logging.getLogger("refresher").warning("after", extra={"detail": result.detail})
    assert TOKEN not in all_logs.text and CLIENT_SECRET not in all_logs.text


@pytest.mark.parametrize(
    ("probe", "problem"),
    [
        ({"url": "http://api.example.test/x"}, "would send the token unencrypted"),
        ({"url": "ftp://api.example.test/x"}, "expected an https:// URL"),
        ({"url": "https://api.example.test/x", "headers": {"Authorization": "x"}},
         "carries the token"),
        ({"url": "https://api.example.test/x", "method": "DELETE"}, "probe.method"),
        ({"url": "https://api.example.test/x", "credential_headers": {"x-api-key": "api_key"}},
         "credentials_file"),
        ({"url": "https://api.example.test/x", "headers": {"X-A": "a\nb"}}, "probe.headers"),
        ({"url": "https://api.example.test/x", "interval": "0s"}, "probe.interval"),
        ({"url": "https://api.example.test/x", "interval": "500ms"}, "probe.interval"),
        ({}, "probe.url"),
    ],
)  # fmt: skip
def test_a_bad_probe_is_a_config_error_with_its_path(
    probe: dict[str, Any], problem: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as caught:
        validate({"tokens": [offline_job(tmp_path, probe=probe)]})
    assert any(
        line.startswith("tokens[0].probe") and problem in line for line in caught.value.problems
    ), caught.value.problems


def test_a_redirected_or_refused_probe_leaves_no_token_in_the_scripted_server_only(
    tmp_path: Path,
) -> None:
    """One connection per probe, and the request carries the token only in Authorization."""
    with ScriptedServer(fixed(200, {}, b"ok")) as server:
        job = _job({"url": server.url("/probe?x=1")}, tmp_path)
        _probe(job)
        (request,) = server.requests
        assert TOKEN not in request.request_line
        assert TOKEN.encode() not in request.body
        carrying = [name for name, value in request.headers.items() if TOKEN in value]
        assert carrying == ["authorization"]
