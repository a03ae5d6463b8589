"""The IdP client against local servers shaped like each provider, healthy and failing."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from refresher.config import TokenJobConfig
from refresher.credentials import read_credentials
from refresher.endpoints import token_url
from refresher.errors import Reason, RefreshError
from refresher.idp import (
    IdPClient,
    basic_authorization,
    new_session,
    parse_retry_after,
    parse_token_response,
)
from testdoubles.idp import Fault, LocalIdP
from tests.conftest import CLIENT_SECRET, SHAPE_SCOPES, job_for
from tests.test_untrusted import Scripted


def job_model(idp: LocalIdP, secret_file: Path, tmp_path: Path, **overrides: Any) -> TokenJobConfig:
    return TokenJobConfig.model_validate(job_for(idp, secret_file, tmp_path / "t", **overrides))


@pytest.fixture
def client() -> IdPClient:
    return IdPClient(new_session())


@pytest.mark.parametrize("provider", sorted(SHAPE_SCOPES))
def test_each_preset_speaks_its_providers_dialect(
    provider: str,
    make_idp: Callable[..., LocalIdP],
    secret_file: Path,
    tmp_path: Path,
    client: IdPClient,
) -> None:
    idp = make_idp(provider, lifetime=3600)
    job = job_model(idp, secret_file, tmp_path)
    before = time.time()
    token = client.fetch(job)
    assert idp.token_status(token.access_token) == "valid"
    assert before + 3590 < token.expires_at <= time.time() + 3600
    issued = idp.issued[-1]
    assert issued.scopes == frozenset(SHAPE_SCOPES[provider])


@pytest.fixture
def generic_idp(make_idp: Callable[..., LocalIdP]) -> LocalIdP:
    return make_idp("generic", lifetime=3600)


@pytest.fixture
def job_of(secret_file: Path, tmp_path: Path) -> Callable[..., TokenJobConfig]:
    return lambda idp, **overrides: job_model(idp, secret_file, tmp_path, **overrides)


def test_proxy_settings_from_the_environment_apply_to_https_only(
    generic_idp: LocalIdP, job_of: Callable[..., TokenJobConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A proxy that records what it is told and forwards nothing. The https token URL names a
    # loopback address where nothing listens: only the proxy hears of it.
    with Scripted() as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        job = job_of(generic_idp, token_url="https://127.0.0.2:9/oauth2/token")
        with pytest.raises(RefreshError) as caught:
            IdPClient(new_session()).fetch(job)
        assert caught.value.reason is Reason.NETWORK
        # A CONNECT tunnel: the credentials would travel inside TLS, never to the proxy.
        (request,) = proxy.requests
        assert (request.method, request.target) == ("CONNECT", "127.0.0.2:9")
        assert "Authorization" not in request.headers and request.body == b""
        # NO_PROXY names the host: straight to it, and nothing answers there.
        monkeypatch.setenv("NO_PROXY", "127.0.0.2")
        with pytest.raises(RefreshError) as caught:
            IdPClient(new_session()).fetch(job)
        assert caught.value.reason is Reason.NETWORK
        # Plain http carries the credentials in clear text: never through a proxy.
        token = IdPClient(new_session()).fetch(job_of(generic_idp))
        assert token is not None and generic_idp.token_status(token.access_token) == "valid"
        assert len(proxy.requests) == 1


def test_a_netrc_never_replaces_the_jobs_credentials(
    generic_idp: LocalIdP,
    job_of: Callable[..., TokenJobConfig],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # requests' convenience path fills in Basic credentials from ~/.netrc for a matching host.
    idp = generic_idp
    home = tmp_path / "home"
    home.mkdir()
    netrc = home / ".netrc"
    netrc.write_text("machine 127.0.0.1 login someone-else password not-ours\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(netrc))
    job = job_of(idp)
    token = IdPClient(new_session()).fetch(job)
    assert idp.token_status(token.access_token) == "valid"
    assert idp.issued[-1].client_id == read_credentials(job).client_id


def test_fusion_combines_two_scopes_in_one_token(
    make_idp: Callable[..., LocalIdP], secret_file: Path, tmp_path: Path, client: IdPClient
) -> None:
    idp = make_idp("fusion")
    job = job_model(idp, secret_file, tmp_path)
    token = client.fetch(job)
    assert token.scope is not None and set(token.scope.split()) == {
        "connectedsearch.query",
        "datasource.push",
    }
    assert idp.token_requests == 1


def test_wrong_parameter_placement_is_what_the_provider_rejects(
    make_idp: Callable[..., LocalIdP], secret_file: Path, tmp_path: Path, client: IdPClient
) -> None:
    # Proves the local server is strict: the preset's query placement is what makes it work.
    idp = make_idp("lucidworks")
    job = job_model(idp, secret_file, tmp_path, scope_in="body")
    with pytest.raises(RefreshError) as caught:
        client.fetch(job)
    assert caught.value.reason is Reason.HTTP_4XX


def test_usage_engine_without_audience_is_a_config_error() -> None:
    from refresher.config import validate
    from refresher.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        validate(
            {
                "tokens": [
                    {
                        "name": "ue",
                        "provider": "usage-engine",
                        "token_url": "https://x.test/t",
                        "client_id": "c",
                        "client_secret": {"env": "HOME"},
                        "sinks": [{"type": "file", "path": "/tmp/x"}],
                    }
                ]
            }
        )
    assert caught.value.problems == [
        "tokens[0].audience: the usage-engine provider needs the API address"
    ]


def test_wrong_secret_is_invalid_client_and_never_echoed(
    make_idp: Callable[..., LocalIdP], tmp_path: Path, client: IdPClient
) -> None:
    idp = make_idp("generic")
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-secret-XYZ")
    job = job_model(idp, wrong, tmp_path)
    with pytest.raises(RefreshError) as caught:
        client.fetch(job)
    assert caught.value.reason is Reason.INVALID_CLIENT
    assert "invalid_client" in caught.value.message
    assert "not-the-secret-XYZ" not in str(caught.value)


def test_basic_auth_form_encodes_before_base64() -> None:
    # RFC 6749 2.3.1: "s3cr:t/+%20 x" -> "s3cr%3At%2F%2B%2520+x"
    import base64

    header = basic_authorization("id 1", "s3cr:t/+%20 x", form_encode=True)
    assert base64.b64decode(header.removeprefix("Basic ")) == b"id+1:s3cr%3At%2F%2B%2520+x"
    raw = basic_authorization("id 1", "s3cr:t", form_encode=False)
    assert base64.b64decode(raw.removeprefix("Basic ")) == b"id 1:s3cr:t"


@pytest.mark.parametrize(
    ("fault", "reason", "retry_after"),
    [
        (Fault.SERVER_ERROR, Reason.HTTP_5XX, None),
        (Fault.UNAVAILABLE, Reason.HTTP_5XX, 7.0),
        (Fault.RATE_LIMITED, Reason.HTTP_4XX, 7.0),
        (Fault.RESET, Reason.NETWORK, None),
        (Fault.HTML, Reason.INVALID_RESPONSE, None),
        (Fault.NO_ACCESS_TOKEN, Reason.INVALID_RESPONSE, None),
        (Fault.NEGATIVE_EXPIRES_IN, Reason.INVALID_RESPONSE, None),
        (Fault.NOT_JSON, Reason.INVALID_RESPONSE, None),
        (Fault.INVALID_CLIENT, Reason.INVALID_CLIENT, None),
    ],
)
def test_each_fault_is_classified(
    fault: Fault,
    reason: Reason,
    retry_after: float | None,
    make_idp: Callable[..., LocalIdP],
    secret_file: Path,
    tmp_path: Path,
    client: IdPClient,
) -> None:
    idp = make_idp("lucidworks")
    idp.fail_next(fault, retry_after=7)
    job = job_model(idp, secret_file, tmp_path)
    with pytest.raises(RefreshError) as caught:
        client.fetch(job)
    assert caught.value.reason is reason
    assert caught.value.retry_after == retry_after
    # The next request succeeds: one attempt was exactly one request, no hidden retry.
    client.fetch(job)
    assert idp.token_requests == 2


def test_slow_idp_is_a_timeout(
    make_idp: Callable[..., LocalIdP], secret_file: Path, tmp_path: Path, client: IdPClient
) -> None:
    idp = make_idp("generic")
    idp.fail_next(Fault.SLOW, slow_seconds=2.0)
    job = job_model(idp, secret_file, tmp_path, read_timeout=0.3)
    with pytest.raises(RefreshError) as caught:
        client.fetch(job)
    assert caught.value.reason is Reason.TIMEOUT
    assert idp.token_requests == 1


def test_unreachable_idp_is_network(secret_file: Path, tmp_path: Path, client: IdPClient) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    job = TokenJobConfig.model_validate(
        {
            "name": "x",
            "token_url": f"http://127.0.0.1:{port}/token",
            "client_id": "c",
            "client_secret": {"file": str(secret_file)},
            "sinks": [{"type": "file", "path": str(tmp_path / "t")}],
        }
    )
    with pytest.raises(RefreshError) as caught:
        client.fetch(job)
    assert caught.value.reason is Reason.NETWORK


class _Scripted(http.server.BaseHTTPRequestHandler):
    """Answers every POST with what the test scripted: status, headers, body."""

    answer: tuple[int, dict[str, str], bytes] = (200, {}, b"")

    def do_POST(self) -> None:
        # Drain the request: closing with unread input makes the kernel reset the connection.
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        status, headers, body = self.answer
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def scripted() -> Iterator[Callable[[int, dict[str, str], bytes], str]]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def script(status: int, headers: dict[str, str], body: bytes) -> str:
        _Scripted.answer = (status, headers, body)
        return f"http://127.0.0.1:{server.server_address[1]}/token"

    yield script
    server.shutdown()
    server.server_close()


def _scripted_job(url: str, secret_file: Path, tmp_path: Path) -> TokenJobConfig:
    return TokenJobConfig.model_validate(
        {
            "name": "x",
            "token_url": url,
            "client_id": "c",
            "client_secret": {"file": str(secret_file)},
            "sinks": [{"type": "file", "path": str(tmp_path / "t")}],
        }
    )


def test_redirect_is_refused_not_followed(
    scripted: Callable[[int, dict[str, str], bytes], str],
    secret_file: Path,
    tmp_path: Path,
    client: IdPClient,
) -> None:
    url = scripted(302, {"Location": "http://evil.example/steal"}, b"")
    job = _scripted_job(url, secret_file, tmp_path)
    with pytest.raises(RefreshError, match="redirect refused") as caught:
        client.fetch(job)
    assert caught.value.reason is Reason.INVALID_RESPONSE


def test_huge_body_is_not_read_into_memory(
    scripted: Callable[[int, dict[str, str], bytes], str],
    secret_file: Path,
    tmp_path: Path,
    client: IdPClient,
) -> None:
    url = scripted(200, {"Content-Type": "application/json"}, b"[" * (2 * 1024 * 1024))
    job = _scripted_job(url, secret_file, tmp_path)
    with pytest.raises(RefreshError, match="larger than") as caught:
        client.fetch(job)
    assert caught.value.reason is Reason.INVALID_RESPONSE


def test_error_description_is_scrubbed_of_the_secret(
    scripted: Callable[[int, dict[str, str], bytes], str],
    secret_file: Path,
    tmp_path: Path,
    client: IdPClient,
) -> None:
    body = (
        '{"error": "invalid_request", "error_description": "bad secret ' + CLIENT_SECRET + '"}'
    ).encode()
    url = scripted(400, {"Content-Type": "application/json"}, body)
    job = _scripted_job(url, secret_file, tmp_path)
    with pytest.raises(RefreshError) as caught:
        client.fetch(job)
    assert caught.value.reason is Reason.HTTP_4XX
    # The code stays; the description may quote the secret, so it is withheld whole.
    assert "invalid_request: (39 characters withheld: they may quote a credential)" in str(
        caught.value
    )
    assert CLIENT_SECRET not in str(caught.value)


JOB = TokenJobConfig.model_validate(
    {
        "name": "x",
        "token_url": "https://idp.test/t",
        "client_id": "c",
        "client_secret": {"env": "HOME"},
        "sinks": [{"type": "file", "path": "/tmp/x"}],
    }
)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"access_token": "", "expires_in": 60}', "no `access_token`"),
        (b'{"access_token": 5, "expires_in": 60}', "no `access_token`"),
        (b'{"access_token": "t", "expires_in": 0}', "not positive"),
        (b'{"access_token": "t", "expires_in": "soon"}', "not a number"),
        (b'{"access_token": "t", "expires_in": true}', "not a number"),
        (b'{"access_token": "t", "expires_in": 60, "token_type": "mac"}', "is not Bearer"),
        (b'["access_token"]', "not a JSON object"),
        (b"[" * 100_000, "not JSON"),
    ],
)
def test_bad_answers_are_invalid_response(body: bytes, message: str) -> None:
    with pytest.raises(RefreshError, match=message) as caught:
        parse_token_response(200, {}, body, received_at=0.0, job=JOB, extras={})
    assert caught.value.reason is Reason.INVALID_RESPONSE


def test_lenient_where_real_idps_differ() -> None:
    token = parse_token_response(
        200,
        {},
        b'{"access_token": "t", "expires_in": "3599", "token_type": "bearer"}',
        received_at=100.0,
        job=JOB,
        extras={},
    )
    assert token.expires_at == 3699.0 and token.token_type == "Bearer"


def test_retry_after_forms() -> None:
    assert parse_retry_after("120", 0.0) == 120.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 1445412470.0) == 10.0
    assert parse_retry_after("garbage", 0.0) is None
    assert parse_retry_after(None, 0.0) is None


def test_every_request_asks_for_json_and_no_cache(
    make_idp: Callable[..., LocalIdP], secret_file: Path, tmp_path: Path
) -> None:
    from refresher.clientauth import KeyMaterial, authenticate
    from refresher.idp import build_request

    for provider in SHAPE_SCOPES:
        job = job_model(make_idp(provider), secret_file, tmp_path)
        credentials = read_credentials(job)
        url = token_url(job, credentials)
        auth = authenticate(
            job, credentials, token_endpoint=url, issuer=None, now=0.0, keys=KeyMaterial()
        )
        headers = build_request(job, auth, url).headers
        assert headers["Accept"] == "application/json"
        assert headers["Cache-Control"] == "no-cache"
        assert headers["Content-Type"] == "application/x-www-form-urlencoded"
