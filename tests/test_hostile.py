"""Hostile and broken input: IdP answers no honest server sends, TLS nobody vouches for,
configs and credential files that are wrong on purpose, and clocks that disagree.

Every failure here is driven with known secret values in play (the client secret, its
form-encoded and Basic forms, tokens the hostile IdP hands out) and checked for them in the
exception, its repr, every log line and the repr of the objects involved.
"""

from __future__ import annotations

import base64
import gzip
import json
import logging
import socket
import ssl
import struct
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import jwt
import pytest

from refresher.clientauth import ClientAuthentication, KeyMaterial, authenticate
from refresher.config import TokenJobConfig, load_config_text, validate
from refresher.credentials import (
    CredentialRef,
    Credentials,
    lucidtech_credentials,
    read_credentials,
)
from refresher.endpoints import token_url
from refresher.errors import ConfigError, Reason, RefreshError
from refresher.idp import MAX_RESPONSE_BYTES, IdPClient, build_request, new_session
from refresher.localidp import LocalIdP
from refresher.tokens import MAX_LIFETIME_SECONDS, SKEW_WARNING_SECONDS, Token
from testdoubles.tls import Connection, Script, ScriptedServer, fixed, response_head, serving
from tests.conftest import CLIENT_ID, CLIENT_SECRET, LogCapture, job_for

# An access token the hostile IdP hands out in answers the client must refuse: it must not
# show up anywhere either.
LEAKY_TOKEN = "opaque-LEAKY-token-5e6f7a8b9c0d"
BASIC_BLOB = base64.b64encode(
    f"{quote_plus(CLIENT_ID)}:{quote_plus(CLIENT_SECRET)}".encode()
).decode()
SECRETS = {
    "client secret": CLIENT_SECRET,
    "form-encoded client secret": quote_plus(CLIENT_SECRET),
    "Basic credentials": BASIC_BLOB,
    "leaky token": LEAKY_TOKEN,
}
YEAR = 365 * 86400


def _auth(job: TokenJobConfig, credentials: Credentials) -> ClientAuthentication:
    url = token_url(job, credentials)
    return authenticate(
        job, credentials, token_endpoint=url, issuer=None, now=0.0, keys=KeyMaterial()
    )


def assert_secret_free(*texts: str, extra: dict[str, str] | None = None) -> None:
    for what, secret in {**SECRETS, **(extra or {})}.items():
        for text in texts:
            assert secret not in text, f"{what} leaked"
            assert secret[:16] not in text, f"the start of {what} leaked"


def jwt_of(**claims: Any) -> str:
    return jwt.encode(claims, "k" * 32, algorithm="HS256")


def token_answer(**payload: Any) -> Script:
    return fixed(200, {"Content-Type": "application/json"}, json.dumps(payload).encode())


@pytest.fixture
def client() -> IdPClient:
    return IdPClient(new_session())


@pytest.fixture
def job_at(secret_file: Path, tmp_path: Path) -> Callable[..., TokenJobConfig]:
    """A generic job for a URL, with short timeouts so that failures come quickly."""

    def make(url: str, **overrides: Any) -> TokenJobConfig:
        job: dict[str, Any] = {
            "name": "hostile",
            "token_url": url,
            "client_id": CLIENT_ID,
            "client_secret": {"file": str(secret_file)},
            "connect_timeout": 1.0,
            "read_timeout": 2.0,
            "sinks": [{"type": "file", "path": str(tmp_path / "token")}],
        }
        return TokenJobConfig.model_validate({**job, **overrides})

    return make


@pytest.fixture
def refused(client: IdPClient, all_logs: LogCapture) -> Callable[..., RefreshError]:
    """Fetch, expect a RefreshError, and check no secret is in it, its repr, logs or objects."""

    def fetch(job: TokenJobConfig, *, extra: dict[str, str] | None = None) -> RefreshError:
        credentials = read_credentials(job)
        with pytest.raises(RefreshError) as caught:
            client.fetch(job)
        error = caught.value
        assert_secret_free(
            str(error),
            repr(error),
            error.message,
            all_logs.text,
            repr(job),
            repr(credentials),
            repr(build_request(job, _auth(job, credentials), token_url(job, credentials))),
            extra=extra,
        )
        return error

    return fetch


# ------------------------------------------------------------------------ huge answers


def _endless_chunks() -> Script:
    """Chunked transfer encoding, 16 KiB chunks, never the final one."""
    piece = (json.dumps({"error_description": CLIENT_SECRET, "pad": "x" * 16_000})).encode()
    frame = b"%x\r\n%s\r\n" % (len(piece), piece)

    def script(connection: Connection) -> None:
        connection.send(response_head(200, {"Transfer-Encoding": "chunked"}))
        while not connection.stopping.is_set() and connection.send(frame):
            pass

    return script


def _gzip_bomb() -> Script:
    # 32 MiB of JSON whitespace compress to ~32 KiB; only the decoded size counts.
    body = gzip.compress(b'{"access_token": "' + LEAKY_TOKEN.encode() + b'"' + b" " * (32 << 20))
    assert len(body) < 64 * 1024
    return fixed(200, {"Content-Type": "application/json", "Content-Encoding": "gzip"}, body)


def _oversized_with_length() -> Script:
    filler = json.dumps({"access_token": LEAKY_TOKEN, "junk": CLIENT_SECRET * 40_000}).encode()
    assert len(filler) > MAX_RESPONSE_BYTES
    return fixed(200, {"Content-Type": "application/json"}, filler)


@pytest.mark.parametrize(
    "make_script",
    [_oversized_with_length, _endless_chunks, _gzip_bomb],
    ids=["content-length", "endless-chunked", "gzip-bomb"],
)
def test_answers_over_1_mib_are_refused_without_being_held_in_memory(
    make_script: Callable[[], Script],
    job_at: Callable[..., TokenJobConfig],
    refused: Callable[..., RefreshError],
) -> None:
    with serving(make_script()) as server:
        job = job_at(server.url())
        tracemalloc.start()
        try:
            error = refused(job)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert error.reason is Reason.INVALID_RESPONSE
    assert "larger than 1024 KiB" in error.message
    # The cap plus one read and the client's own overhead; nowhere near the 32 MiB on offer.
    assert peak < 4 * MAX_RESPONSE_BYTES


def _drip(*, chunked: bool) -> Script:
    """Headers at once, then one byte every 20 ms: each wait is short, the whole is endless."""

    def script(connection: Connection) -> None:
        framing = {"Transfer-Encoding": "chunked"} if chunked else {"Content-Length": "999999"}
        connection.send(response_head(200, {"Content-Type": "application/json", **framing}))
        byte = b"1\r\n \r\n" if chunked else b" "
        while connection.pause(0.02) and connection.send(byte):
            pass

    return script


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_trickling_answer_is_cut_off_at_connect_plus_read_timeout(
    chunked: bool,
    job_at: Callable[..., TokenJobConfig],
    refused: Callable[..., RefreshError],
) -> None:
    with serving(_drip(chunked=chunked)) as server:
        job = job_at(server.url(), connect_timeout=0.3, read_timeout=0.5)
        started = time.monotonic()
        error = refused(job)
        elapsed = time.monotonic() - started
    assert error.reason is Reason.TIMEOUT
    assert "still arriving" in error.message
    # The deadline (0.8 s) plus at most one more wait for a byte; not the ~5.5 h on offer.
    assert 0.75 < elapsed < 3.0


def test_a_slow_but_finite_answer_within_the_deadline_is_fine(
    job_at: Callable[..., TokenJobConfig], client: IdPClient
) -> None:
    body = json.dumps({"access_token": "slow-but-fine", "expires_in": 60}).encode()

    def script(connection: Connection) -> None:
        connection.send(response_head(200, {"Content-Length": str(len(body))}))
        for index in range(0, len(body), 8):
            if not (connection.pause(0.01) and connection.send(body[index : index + 8])):
                return

    with serving(script) as server:
        job = job_at(server.url())
        token = client.fetch(job)
    assert token.access_token == "slow-but-fine"


def _gzipped_answer(connection: Connection) -> None:
    body = gzip.compress(json.dumps({"access_token": "zipped", "expires_in": 60}).encode())
    head = {"Content-Encoding": "gzip", "Content-Length": str(len(body))}
    connection.send(response_head(200, head) + body)


def _chunked_answer(connection: Connection) -> None:
    body = json.dumps({"access_token": "chunked", "expires_in": 60}).encode()
    connection.send(response_head(200, {"Transfer-Encoding": "chunked"}))
    for index in range(0, len(body), 10):
        piece = body[index : index + 10]
        connection.send(b"%x\r\n%s\r\n" % (len(piece), piece))
    connection.send(b"0\r\n\r\n")


@pytest.mark.parametrize(
    ("script", "expected"), [(_gzipped_answer, "zipped"), (_chunked_answer, "chunked")]
)
def test_compressed_and_chunked_answers_are_read_whole(
    script: Script, expected: str, job_at: Callable[..., TokenJobConfig], client: IdPClient
) -> None:
    with serving(script) as server:
        job = job_at(server.url())
        assert client.fetch(job).access_token == expected


def _stalls_mid_body(connection: Connection) -> None:
    connection.send(response_head(200, {"Content-Length": "100"}) + b'{"access_token": "')
    connection.pause(5.0)


def _short_body(connection: Connection) -> None:
    connection.send(response_head(200, {"Content-Length": "100"}) + b'{"access_token": "')


def _reset_mid_body(connection: Connection) -> None:
    connection.send(response_head(200, {"Content-Length": "100"}) + b'{"access_token": "')
    connection.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    connection.sock.close()


def _bad_gzip(connection: Connection) -> None:
    body = b"\x1f\x8b not gzip at all " + CLIENT_SECRET.encode()
    head = {"Content-Encoding": "gzip", "Content-Length": str(len(body))}
    connection.send(response_head(200, head) + body)


@pytest.mark.parametrize(
    ("script", "reason"),
    [
        (_stalls_mid_body, Reason.TIMEOUT),
        (_short_body, Reason.NETWORK),
        (_reset_mid_body, Reason.NETWORK),
        (_bad_gzip, Reason.NETWORK),
    ],
    ids=["stalls", "short", "reset", "bad-gzip"],
)
def test_a_body_that_breaks_off_is_classified(
    script: Script,
    reason: Reason,
    job_at: Callable[..., TokenJobConfig],
    refused: Callable[..., RefreshError],
) -> None:
    with serving(script) as server:
        error = refused(job_at(server.url(), read_timeout=0.3))
    assert error.reason is reason
    assert error.message.endswith(f"talking to 127.0.0.1:{server.port}")


@pytest.mark.parametrize(
    "body",
    [b"[" * 100_000, b'{"a":' * 100_000, b'{"access_token": ' + b"[" * 100_000],
    ids=["arrays", "objects", "inside-the-answer"],
)
def test_deeply_nested_json_is_invalid_response(
    body: bytes, job_at: Callable[..., TokenJobConfig], refused: Callable[..., RefreshError]
) -> None:
    with serving(fixed(200, {"Content-Type": "application/json"}, body)) as server:
        error = refused(job_at(server.url()))
    assert error.reason is Reason.INVALID_RESPONSE
    assert "not JSON (application/json)" in error.message


def test_a_deeply_nested_jwt_payload_counts_as_opaque(
    job_at: Callable[..., TokenJobConfig], client: IdPClient
) -> None:
    def segment(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    # Ten thousand deep: past any recursion limit, within the 16 KiB a token may have.
    access_token = ".".join([segment(b'{"alg":"HS256"}'), segment(b"[" * 10_000), segment(b"sig")])
    with serving(token_answer(access_token=access_token, expires_in=60)) as server:
        job = job_at(server.url())
        before = time.time()
        token = client.fetch(job)
    assert before + 60 <= token.expires_at <= time.time() + 60


# --------------------------------------------------------------------- token lifetimes


def test_a_jwt_already_expired_is_invalid_response_even_with_expires_in(
    job_at: Callable[..., TokenJobConfig], refused: Callable[..., RefreshError]
) -> None:
    dead = jwt_of(exp=int(time.time()) - 30, iat=int(time.time()) - 3630)
    answer = token_answer(access_token=dead, expires_in=3600, token_type="Bearer")
    with serving(answer) as server:
        error = refused(job_at(server.url()), extra={"dead token": dead})
    assert error.reason is Reason.INVALID_RESPONSE
    assert "already expired" in error.message


def test_a_jwt_exp_a_century_away_is_bounded_by_expires_in(
    job_at: Callable[..., TokenJobConfig],
) -> None:
    received_at = time.time()
    century = jwt_of(exp=int(received_at) + 100 * YEAR)
    with serving(token_answer(access_token=century, expires_in=3600)) as server:
        job = job_at(server.url())
        token = IdPClient(new_session(), clock=lambda: received_at).fetch(job)
    assert (token.issued_at, token.expires_at) == (received_at, received_at + 3600)


def test_a_far_exp_without_expires_in_is_refused_unless_the_job_sets_a_lifetime(
    job_at: Callable[..., TokenJobConfig], refused: Callable[..., RefreshError]
) -> None:
    received_at = time.time()
    century = jwt_of(exp=int(received_at) + 100 * YEAR)
    # An `exp` in milliseconds is the classic way to get here. (With `iat` in milliseconds
    # too, `exp - iat` makes one hour look like 41.7 days: plausible, so it is believed.)
    millis = jwt_of(exp=int(received_at * 1000) + 3_600_000)
    for access_token in (century, millis):
        with serving(token_answer(access_token=access_token)) as server:
            error = refused(job_at(server.url()), extra={"far token": access_token})
            assert error.reason is Reason.INVALID_RESPONSE
            assert "set `lifetime`" in error.message
            assert f"more than {MAX_LIFETIME_SECONDS / 86400:.0f}" in error.message

            job = job_at(server.url(), lifetime="45m")
            client = IdPClient(new_session(), clock=lambda: received_at)
            token = client.fetch(job)
            assert token.expires_at == received_at + 2700


def test_a_lifetime_of_up_to_a_year_is_believed(job_at: Callable[..., TokenJobConfig]) -> None:
    received_at = time.time()
    with serving(token_answer(access_token=jwt_of(exp=int(received_at) + 300 * 86400))) as s:
        job = job_at(s.url())
        token = IdPClient(new_session(), clock=lambda: received_at).fetch(job)
    assert token.expires_at == int(received_at) + 300 * 86400


@pytest.mark.parametrize(
    ("expires_in", "accepted"),
    [
        ("3600", True),
        (" 3600 ", True),
        (3600.5, True),
        ("soon", False),
        ("", False),
        (0, False),
        ("0", False),
        (-60, False),
        ("NaN", False),
        ("Infinity", False),
        (True, False),
        ([3600], False),
        ({"seconds": 3600}, False),
        (MAX_LIFETIME_SECONDS + 1, False),
    ],
)
def test_expires_in_forms(
    expires_in: object,
    accepted: bool,
    job_at: Callable[..., TokenJobConfig],
    refused: Callable[..., RefreshError],
) -> None:
    answer = token_answer(access_token=LEAKY_TOKEN, expires_in=expires_in)
    with serving(answer) as server:
        job = job_at(server.url())
        if accepted:
            received_at = time.time()
            client = IdPClient(new_session(), clock=lambda: received_at)
            token = client.fetch(job)
            assert token.expires_at == received_at + float(str(expires_in))
        else:
            assert refused(job).reason is Reason.INVALID_RESPONSE


def test_an_expires_in_of_four_hundred_digits_is_invalid_response(
    job_at: Callable[..., TokenJobConfig], refused: Callable[..., RefreshError]
) -> None:
    body = b'{"access_token": "' + LEAKY_TOKEN.encode() + b'", "expires_in": ' + b"9" * 400 + b"}"
    with serving(fixed(200, {"Content-Type": "application/json"}, body)) as server:
        error = refused(job_at(server.url()))
    assert error.reason is Reason.INVALID_RESPONSE
    assert "expires_in" in error.message


@pytest.mark.parametrize(
    "token_type", ["mac", "DPoP", "N_A", "", "Bearer " + LEAKY_TOKEN, 5, None, ["Bearer"]]
)
def test_non_bearer_token_types_are_refused(
    token_type: object,
    job_at: Callable[..., TokenJobConfig],
    refused: Callable[..., RefreshError],
) -> None:
    answer = token_answer(access_token=LEAKY_TOKEN, expires_in=60, token_type=token_type)
    with serving(answer) as server:
        error = refused(job_at(server.url()))
    assert error.reason is Reason.INVALID_RESPONSE
    assert "is not Bearer" in error.message


# ------------------------------------------------------------------------------ redirects


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_to_another_host_never_receives_the_credentials(
    status: int,
    job_at: Callable[..., TokenJobConfig],
    refused: Callable[..., RefreshError],
) -> None:
    with serving(token_answer(access_token=LEAKY_TOKEN, expires_in=60)) as elsewhere:
        # "localhost" is another host than "127.0.0.1" as far as HTTP is concerned.
        location = elsewhere.url("/steal?token=" + LEAKY_TOKEN, host="localhost")
        with serving(fixed(status, {"Location": location}, b"")) as idp:
            error = refused(job_at(idp.url()))
            (request,) = idp.requests
        assert elsewhere.requests == []
    assert error.reason is Reason.INVALID_RESPONSE
    assert error.message == f"HTTP {status} redirect refused"
    assert request.headers["authorization"] == "Basic " + BASIC_BLOB  # sent where configured


# ------------------------------------------------------------------------------------ TLS


@pytest.fixture(scope="module")
def trustme() -> Any:
    return pytest.importorskip("trustme")


@pytest.fixture(scope="module")
def authority(trustme: Any) -> Any:
    return trustme.CA()


@pytest.fixture
def tls_server(authority: Any) -> Iterator[ScriptedServer]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    with serving(token_answer(access_token="tls-token", expires_in=60), tls=context) as server:
        yield server


def test_tls_with_an_unknown_ca_fails_as_network_and_sends_nothing(
    tls_server: ScriptedServer,
    job_at: Callable[..., TokenJobConfig],
    refused: Callable[..., RefreshError],
) -> None:
    error = refused(job_at(tls_server.url()))
    assert error.reason is Reason.NETWORK
    assert "TLS" in error.message and "ca_bundle" in error.message
    assert tls_server.requests == []  # the handshake failed before a byte of the request


def test_tls_with_the_ca_in_ca_bundle_succeeds(
    authority: Any,
    tls_server: ScriptedServer,
    job_at: Callable[..., TokenJobConfig],
    client: IdPClient,
    tmp_path: Path,
) -> None:
    bundle = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(bundle))
    job = job_at(tls_server.url(), ca_bundle=str(bundle))
    token = client.fetch(job)
    assert token.access_token == "tls-token"
    assert len(tls_server.requests) == 1


def test_tls_with_another_ca_in_ca_bundle_fails(
    trustme: Any,
    tls_server: ScriptedServer,
    job_at: Callable[..., TokenJobConfig],
    refused: Callable[..., RefreshError],
    tmp_path: Path,
) -> None:
    bundle = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(bundle))
    error = refused(job_at(tls_server.url(), ca_bundle=str(bundle)))
    assert error.reason is Reason.NETWORK and "TLS" in error.message
    assert tls_server.requests == []


# ---------------------------------------------------------------- config: plain http, keys


def _config_with(monkeypatch: pytest.MonkeyPatch, **job: Any) -> dict[str, Any]:
    monkeypatch.setenv("HOSTILE_TEST_SECRET", CLIENT_SECRET)
    base: dict[str, Any] = {
        "name": "j",
        "token_url": "https://idp.example.com/token",
        "client_id": "c",
        "client_secret": {"env": "HOSTILE_TEST_SECRET"},
        "sinks": [{"type": "file", "path": "/tmp/hostile-test-token"}],
    }
    return {"tokens": [{**base, **job}], "metrics": {"enabled": False}}


@pytest.mark.parametrize(
    "url",
    [
        "http://idp.example.com/token",
        "HTTP://idp.example.com/token",
        "http://localhost.example.com/token",
        "http://10.0.0.1/token",
        "http://0.0.0.0/token",
        "http://[::ffff:127.0.0.1]/token",
    ],
)
def test_plain_http_to_a_non_loopback_host_is_refused_unless_allowed(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError) as caught:
        validate(_config_with(monkeypatch, token_url=url))
    (problem,) = caught.value.problems
    assert problem.startswith("tokens[0].token_url: plain http:// would send the client secret")
    assert CLIENT_SECRET not in str(caught.value)

    config = validate(_config_with(monkeypatch, token_url=url, allow_insecure_http=True))
    assert config.jobs[0].token_url == url


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8080/t", "http://127.9.9.9/t", "http://localhost/t", "http://[::1]/t"]
)
def test_plain_http_to_loopback_is_allowed(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert validate(_config_with(monkeypatch, token_url=url)).jobs[0].token_url == url


def test_unknown_keys_are_rejected_everywhere_with_their_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = _config_with(
        monkeypatch,
        client_secrt={"file": "/x"},
        client_id={"env": "HOSTILE_TEST_SECRET", "default": "x"},
        sinks=[
            {"type": "file", "path": "/tmp/a", "permissions": "0600"},
            {"type": "kubernetes", "name": "s", "nmae": "t"},
        ],
    )
    data.update(tokenz=[], metrics={"enabled": False, "prot": 1}, leader_election={"ttl": 3})
    with pytest.raises(ConfigError) as caught:
        validate(data)
    assert sorted(caught.value.problems) == [
        "leader_election.ttl: unknown key",
        "metrics.prot: unknown key",
        "tokens[0].client_id.default: unknown key",
        "tokens[0].client_secrt: unknown key",
        "tokens[0].sinks[0].permissions: unknown key",
        "tokens[0].sinks[1].nmae: unknown key",
        "tokenz: unknown key",
    ]


# ------------------------------------------------------------------------ credential files


def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "readable by every user" in r.getMessage()]


def test_a_world_readable_secret_file_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, all_logs: LogCapture
) -> None:
    path = tmp_path / "world-readable-secret"
    path.write_text(CLIENT_SECRET + "\n")
    path.chmod(0o644)
    ref = CredentialRef(file=path)
    assert ref.read() == ref.read() == CLIENT_SECRET
    (warning,) = _warnings(caplog)
    assert warning.levelno == logging.WARNING
    assert getattr(warning, "path", None) == str(path)
    assert_secret_free(all_logs.text)


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o640, 0o440])
def test_owner_or_group_readable_secret_files_do_not_warn(
    mode: int, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Group-readable is how a Secret volume with fsGroup shares a secret: deliberate, quiet.
    path = tmp_path / f"secret-{mode:o}"
    path.write_text(CLIENT_SECRET)
    path.chmod(mode)
    assert CredentialRef(file=path).read() == CLIENT_SECRET
    assert _warnings(caplog) == []


def test_a_world_readable_lucidtech_file_warns_too(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, all_logs: LogCapture
) -> None:
    path = tmp_path / "credentials.cfg"
    path.write_text(f"client_id = {CLIENT_ID}\nclient_secret = {CLIENT_SECRET}\n")
    path.chmod(0o604)
    assert lucidtech_credentials(path).client_secret == CLIENT_SECRET
    assert len(_warnings(caplog)) == 1
    assert_secret_free(all_logs.text)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\xff\xfe" + CLIENT_SECRET.encode("utf-16-le"), "not UTF-8 text"),
        (CLIENT_SECRET.encode() * 5000, "longer than 65536 bytes"),
    ],
    ids=["binary", "huge"],
)
def test_a_secret_file_that_is_not_a_secret_is_a_credentials_error(
    content: bytes, message: str, tmp_path: Path, all_logs: LogCapture
) -> None:
    path = tmp_path / "not-a-secret"
    path.write_bytes(content)
    with pytest.raises(RefreshError) as caught:
        CredentialRef(file=path).read()
    assert caught.value.reason is Reason.CREDENTIALS
    assert message in caught.value.message
    assert_secret_free(str(caught.value), repr(caught.value), all_logs.text)


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_an_endless_or_huge_secret_file_is_not_read_forever(tmp_path: Path) -> None:
    with pytest.raises(RefreshError, match="not a regular file"):
        CredentialRef(file=Path("/dev/zero")).read()
    huge = tmp_path / "huge"
    huge.write_bytes(b"x" * (1024 * 1024))
    with pytest.raises(RefreshError, match="longer than"):
        CredentialRef(file=huge).read()


@pytest.mark.parametrize(
    "source", [{"file": "/tmp/a\x00b"}, {"file": "/tmp/\udc80\ud800"}, {"env": "\ud800"}]
)
def test_impossible_secret_sources_are_config_problems_not_crashes(
    source: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError) as caught:
        validate(_config_with(monkeypatch, client_secret=source))
    (problem,) = caught.value.problems
    assert problem.startswith("tokens[0].client_secret: ")


# ---------------------------------------------------------------------------- clock skew


@pytest.mark.parametrize("send_expires_in", [True, False])
def test_an_idp_clock_ahead_of_ours_cannot_stretch_the_lifetime(
    send_expires_in: bool,
    make_idp: Callable[..., LocalIdP],
    secret_file: Path,
    tmp_path: Path,
    client: IdPClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    idp = make_idp(
        "generic", lifetime=3600, send_expires_in=send_expires_in, clock=lambda: time.time() + 600
    )
    job = TokenJobConfig.model_validate(job_for(idp, secret_file, tmp_path / "t"))
    before = time.time()
    token = client.fetch(job)
    after = time.time()
    # exp says now + 70 min on our clock; the token lives 60 from when it was issued.
    assert before + 3599 <= token.expires_at <= after + 3600
    (record,) = [r for r in caplog.records if r.getMessage().startswith("clock skew")]
    assert -601 <= getattr(record, "skew_seconds", 0) <= -599
    assert getattr(record, "token", None) == job.name


def test_an_idp_clock_behind_ours_gives_the_earlier_expiry(
    make_idp: Callable[..., LocalIdP],
    secret_file: Path,
    tmp_path: Path,
    client: IdPClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    idp = make_idp("generic", lifetime=3600, clock=lambda: time.time() - 600)
    job = TokenJobConfig.model_validate(job_for(idp, secret_file, tmp_path / "t"))
    before = time.time()
    token = client.fetch(job)
    # receipt + expires_in says 60 min; the IdP's exp says 50 on our clock: the earlier wins.
    assert before + 2999 <= token.expires_at <= time.time() + 3000
    assert any(r.getMessage().startswith("clock skew") for r in caplog.records)


def test_an_idp_clock_behind_by_more_than_the_lifetime_is_refused(
    make_idp: Callable[..., LocalIdP], secret_file: Path, tmp_path: Path, client: IdPClient
) -> None:
    idp = make_idp("generic", lifetime=600, clock=lambda: time.time() - 3600)
    job = TokenJobConfig.model_validate(job_for(idp, secret_file, tmp_path / "t"))
    with pytest.raises(RefreshError, match="already expired") as caught:
        client.fetch(job)
    assert caught.value.reason is Reason.INVALID_RESPONSE
    (issued,) = idp.issued
    assert issued.access_token not in str(caught.value)


def test_skew_within_the_threshold_is_not_logged(
    make_idp: Callable[..., LocalIdP],
    secret_file: Path,
    tmp_path: Path,
    client: IdPClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    skew = SKEW_WARNING_SECONDS / 3
    idp = make_idp("generic", lifetime=3600, clock=lambda: time.time() + skew)
    job = TokenJobConfig.model_validate(job_for(idp, secret_file, tmp_path / "t"))
    client.fetch(job)
    assert not any("clock skew" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------ echoed secrets


def test_an_idp_echoing_the_request_has_every_form_of_the_secret_scrubbed(
    job_at: Callable[..., TokenJobConfig], refused: Callable[..., RefreshError]
) -> None:
    description = (
        f"bad request client_secret={quote_plus(CLIENT_SECRET)} "
        f"Authorization: Basic {BASIC_BLOB} raw={CLIENT_SECRET}"
    )
    body = json.dumps({"error": "invalid_request", "error_description": description}).encode()
    with serving(fixed(400, {"Content-Type": "application/json"}, body)) as server:
        error = refused(job_at(server.url()))
    assert error.reason is Reason.HTTP_4XX
    # Not scrubbed piecemeal but withheld whole: an echo may be in any encoding (see
    # tests/test_untrusted.py); the error code and the length remain.
    assert error.message == (
        f"HTTP 400 (invalid_request: ({len(description)} characters withheld: they may "
        "quote a credential))"
    )


@pytest.mark.parametrize("offset", [172, 180, 188, 196])
def test_a_secret_straddling_the_description_limit_is_not_half_shown(
    offset: int, job_at: Callable[..., TokenJobConfig], refused: Callable[..., RefreshError]
) -> None:
    # Descriptions are cut at 200 characters: the secret starts before the cut, ends after.
    description = "x" * offset + CLIENT_SECRET
    body = json.dumps({"error": "invalid_request", "error_description": description}).encode()
    with serving(fixed(400, {"Content-Type": "application/json"}, body)) as server:
        error = refused(job_at(server.url()))
    assert CLIENT_SECRET[:4] not in error.message


def test_a_token_type_quoting_the_token_does_not_leak_it(
    job_at: Callable[..., TokenJobConfig], refused: Callable[..., RefreshError]
) -> None:
    answer = token_answer(access_token=LEAKY_TOKEN, token_type="x" * 180 + LEAKY_TOKEN)
    with serving(answer) as server:
        error = refused(job_at(server.url()))
    assert "is not Bearer" in error.message
    assert LEAKY_TOKEN[:4] not in error.message


def test_objects_holding_secrets_have_secret_free_reprs(
    job_at: Callable[..., TokenJobConfig],
) -> None:
    job = job_at("https://idp.example.com/token", auth="body")
    credentials = read_credentials(job)
    token = Token(LEAKY_TOKEN, 0.0, 60.0, extras={"api_key": CLIENT_SECRET})
    for text in (
        repr(job),
        repr(credentials),
        repr(build_request(job, _auth(job, credentials), token_url(job, credentials))),
        repr(token),
    ):
        assert_secret_free(text)


def test_config_text_problems_never_quote_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOSTILE_TEST_SECRET", CLIENT_SECRET)
    texts = [
        # A secret written literally, under several keys.
        f"tokens: [{{name: x, token_url: 'https://i.test/t', client_id: a,"
        f" client_secret: {{value: '{CLIENT_SECRET}'}}, sinks: [{{type: file, path: /x}}]}}]",
        f"tokens: [{{name: '{CLIENT_SECRET}'}}]",
        # A secret pulled in from the environment where it does not belong.
        "tokens: [{name: x, margin: '${HOSTILE_TEST_SECRET}', sinks: [{type: file, path: /x}]}]",
        "tokens: [{name: '${HOSTILE_TEST_SECRET}'}]",
    ]
    for text in texts:
        with pytest.raises(ConfigError) as caught:
            load_config_text(text)
        assert CLIENT_SECRET not in str(caught.value), text
