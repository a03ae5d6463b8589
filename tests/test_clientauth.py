"""Client authentication without the network: the assertion each JWT method signs, the key
material read again when it changes, the mTLS pair checked before any handshake, the
discovery document judged, and every wrong setup a path-named config problem."""

from __future__ import annotations

import base64
import hashlib
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization

from refresher.clientauth import (
    JWT_BEARER,
    KeyMaterial,
    authenticate,
    read_federated_assertion,
)
from refresher.config import TokenJobConfig, url_problem, validate
from refresher.credentials import read_credentials
from refresher.discovery import discovery_urls, metadata_problem, parse_metadata
from refresher.errors import ConfigError, Reason, RefreshError
from refresher.idp import build_request
from testdoubles.keys import KeyPair, ServiceAccountIssuer, new_ec_key

TOKEN_URL = "https://idp.example.test/oauth2/token"
ISSUER = "https://idp.example.test"
NOW = 1_700_000_000.0
LONG_SECRET = "k" * 20 + "-HMAC-SECRET-0123456789"
ENTRA_TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"


def job_model(**fields: Any) -> TokenJobConfig:
    job = {
        "name": "j",
        "token_url": TOKEN_URL,
        "client_id": "client-1",
        "sinks": [{"type": "file", "path": "/tmp/clientauth-unused"}],
        **fields,
    }
    return TokenJobConfig.model_validate(job)


def auth_for(job: TokenJobConfig, keys: KeyMaterial | None = None, now: float = NOW) -> Any:
    credentials = read_credentials(job)
    return authenticate(
        job,
        credentials,
        token_endpoint=TOKEN_URL,
        issuer=job.issuer_url,
        now=now,
        keys=keys or KeyMaterial(),
    )


def assertion_of(auth: Any) -> str:
    form = dict(auth.form)
    assert form["client_assertion_type"] == JWT_BEARER
    assert form["client_id"] == "client-1"
    return str(form["client_assertion"])


def verified(token: str, pair: KeyPair, alg: str) -> dict[str, Any]:
    """The assertion's claims, once its signature verifies with the pair's public key."""
    claims: dict[str, Any] = jwt.decode(
        token,
        pair.public_pem,
        algorithms=[alg],
        audience=TOKEN_URL,
        options={"verify_exp": False, "verify_nbf": False, "verify_iat": False},
    )
    return claims


@pytest.fixture
def pair(tmp_path: Path) -> KeyPair:
    return KeyPair.create(tmp_path / "keys")


# ------------------------------------------------------------------------------ assertions


@pytest.mark.parametrize("alg", ["RS256", "PS256"])
def test_private_key_jwt_signs_an_rfc7523_assertion(pair: KeyPair, alg: str) -> None:
    job = job_model(
        auth="private_key_jwt",
        private_key={"file": str(pair.key_file)},
        certificate={"file": str(pair.cert_file)},
        key_id="key-2026",
        alg=alg,
    )
    auth = auth_for(job)
    token = assertion_of(auth)
    claims = jwt.decode(
        token, pair.public_pem, algorithms=[alg], audience=TOKEN_URL, options={"verify_exp": False}
    )
    assert claims["iss"] == claims["sub"] == "client-1"
    assert claims["aud"] == TOKEN_URL  # one string, not an array
    assert (claims["iat"], claims["exp"]) == (int(NOW), int(NOW) + 300)
    assert "nbf" not in claims
    header = jwt.get_unverified_header(token)
    assert header["alg"] == alg and header["kid"] == "key-2026"
    assert header["x5t#S256"] == pair.x5t_s256
    assert "x5t" not in header
    assert auth.headers == {} and auth.client_cert is None
    assert token in auth.secrets  # what the echo filter withholds


def test_each_assertion_has_its_own_jti_and_the_configured_lifetime(pair: KeyPair) -> None:
    job = job_model(
        auth="private_key_jwt",
        private_key={"file": str(pair.key_file)},
        assertion={"lifetime": "1m", "not_before": True},
    )
    keys = KeyMaterial()
    first, second = (
        jwt.decode(
            assertion_of(auth_for(job, keys)),
            pair.public_pem,
            algorithms=["RS256"],
            audience=TOKEN_URL,
            options={"verify_exp": False, "verify_nbf": False, "verify_iat": False},
        )
        for _ in range(2)
    )
    assert first["jti"] != second["jti"] and len(first["jti"]) >= 16
    assert first["exp"] - first["iat"] == 60
    assert first["nbf"] == first["iat"]


def test_es256_is_the_default_for_an_ec_key_and_legacy_x5t_is_sha1(tmp_path: Path) -> None:
    pair = KeyPair.create(tmp_path, key=new_ec_key())
    job = job_model(
        auth="private_key_jwt",
        private_key={"file": str(pair.key_file)},
        certificate={"file": str(pair.cert_file)},
        assertion={"legacy_x5t": True},
    )
    token = assertion_of(auth_for(job))
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "ES256"
    der = pair.certificate.public_bytes(serialization.Encoding.DER)
    sha1 = hashlib.sha1(der, usedforsecurity=False).digest()
    assert header["x5t"] == base64.urlsafe_b64encode(sha1).rstrip(b"=").decode()
    verified(token, pair, "ES256")


def test_a_rotated_key_is_used_from_the_next_request_on(pair: KeyPair) -> None:
    job = job_model(auth="private_key_jwt", private_key={"file": str(pair.key_file)})
    keys = KeyMaterial()
    old_public = pair.public_pem
    assert jwt.get_unverified_header(assertion_of(auth_for(job, keys)))["alg"] == "RS256"
    pair.reissue(key=new_ec_key())  # same path, new content (a kubelet Secret update)
    token = assertion_of(auth_for(job, keys))
    assert jwt.get_unverified_header(token)["alg"] == "ES256"
    verified(token, pair, "ES256")
    with pytest.raises(jwt.PyJWTError):
        jwt.decode(token, old_public, algorithms=["ES256"], audience=TOKEN_URL)


def test_client_secret_jwt_is_hs256_with_the_secret(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text(LONG_SECRET)
    job = job_model(
        auth="client_secret_jwt",
        client_secret={"file": str(secret)},
        assertion={"audience": "https://aud.example.test"},
    )
    auth = auth_for(job)
    claims = jwt.decode(
        assertion_of(auth),
        LONG_SECRET,
        algorithms=["HS256"],
        audience="https://aud.example.test",
        options={"verify_exp": False},
    )
    assert claims["iss"] == "client-1"
    assert "client_secret" not in dict(auth.form)  # the secret signs; it is never sent
    assert LONG_SECRET in auth.secrets


def test_client_secret_jwt_signs_with_a_secret_that_is_not_utf8(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    odd = "caf\udce9-" + "x" * 40  # as os.environ decodes bytes that are not UTF-8
    monkeypatch.setenv("ODD_JWT_SECRET", odd)
    job = job_model(auth="client_secret_jwt", client_secret={"env": "ODD_JWT_SECRET"})
    token = assertion_of(auth_for(job))
    key = odd.encode("utf-8", "surrogateescape")  # the bytes the environment held
    jwt.decode(token, key, algorithms=["HS256"], audience=TOKEN_URL, options={"verify_exp": False})


def test_client_secret_jwt_refuses_a_short_secret(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("short-secret")
    job = TokenJobConfig.model_validate(
        {
            "name": "j",
            "token_url": TOKEN_URL,
            "client_id": "client-1",
            "client_secret": {"file": str(secret)},
            "auth": "client_secret_jwt",
            "sinks": [{"type": "file", "path": "/tmp/x"}],
        }
    )
    with pytest.raises(RefreshError) as caught:
        auth_for(job)
    assert caught.value.reason is Reason.CREDENTIALS
    assert "at least 32 bytes" in caught.value.message
    assert "short-secret" not in str(caught.value)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "does not hold a PEM private key"),
        (b"-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n", "PEM private"),
        (None, "encrypted private key"),
    ],
)
def test_an_unusable_key_file_is_a_credentials_failure_naming_the_file(
    tmp_path: Path, content: bytes | None, expected: str
) -> None:
    key_file = tmp_path / "key.pem"
    if content is None:
        content = new_ec_key().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    key_file.write_bytes(content)
    job = job_model(auth="private_key_jwt", private_key={"file": str(key_file)})
    with pytest.raises(RefreshError) as caught:
        auth_for(job)
    assert caught.value.reason is Reason.CREDENTIALS
    assert expected in caught.value.message and str(key_file) in caught.value.message


def test_a_key_of_the_wrong_kind_for_alg_and_a_foreign_certificate(
    tmp_path: Path, pair: KeyPair
) -> None:
    wrong_alg = job_model(
        auth="private_key_jwt", private_key={"file": str(pair.key_file)}, alg="ES256"
    )
    with pytest.raises(RefreshError, match="ES256 needs an EC key"):
        auth_for(wrong_alg)
    other = KeyPair.create(tmp_path / "other")
    foreign = job_model(
        auth="private_key_jwt",
        private_key={"file": str(pair.key_file)},
        certificate={"file": str(other.cert_file)},
    )
    with pytest.raises(RefreshError, match="is not the certificate of the key"):
        auth_for(foreign)


# ------------------------------------------------------------------------------ federated


def test_federated_jwt_sends_the_file_token_read_on_every_request(tmp_path: Path) -> None:
    cluster = ServiceAccountIssuer()
    token_file = tmp_path / "projected" / "token"
    first = cluster.project(token_file, audience="api://AzureADTokenExchange", issued_at=NOW)
    job = job_model(auth="federated_jwt", assertion_file=str(token_file))
    assert assertion_of(auth_for(job)) == first
    second = cluster.project(token_file, audience="api://AzureADTokenExchange", issued_at=NOW + 1)
    assert assertion_of(auth_for(job)) == second != first


def test_an_expired_or_missing_federated_token_is_named(tmp_path: Path) -> None:
    cluster = ServiceAccountIssuer()
    token_file = tmp_path / "token"
    cluster.project(token_file, audience="aud", issued_at=NOW - 7200, lifetime=3600)
    with pytest.raises(RefreshError) as caught:
        read_federated_assertion(token_file, NOW)
    assert caught.value.reason is Reason.CREDENTIALS
    assert "expired at" in caught.value.message and "rotating" in caught.value.message
    token_file.write_text("not a jwt at all")
    with pytest.raises(RefreshError, match="does not hold a JWT"):
        read_federated_assertion(token_file, NOW)
    with pytest.raises(RefreshError, match="cannot read"):
        read_federated_assertion(tmp_path / "absent", NOW)


# ----------------------------------------------------------------------------------- mTLS


def test_tls_client_auth_sends_the_client_id_and_the_certificate_files(pair: KeyPair) -> None:
    job = job_model(
        auth="tls_client_auth",
        client_certificate={"file": str(pair.cert_file)},
        client_key={"file": str(pair.key_file)},
    )
    keys = KeyMaterial()
    auth = auth_for(job, keys, now=time.time())
    assert auth.form == (("client_id", "client-1"),)
    assert auth.headers == {} and auth.secrets == ()
    assert auth.client_cert == (str(pair.cert_file), str(pair.key_file))
    before = auth.client_cert_digest
    assert auth_for(job, keys, now=time.time()).client_cert_digest == before
    pair.reissue()
    assert auth_for(job, keys, now=time.time()).client_cert_digest != before


def test_an_expired_or_mismatched_client_certificate_fails_before_any_handshake(
    tmp_path: Path, pair: KeyPair
) -> None:
    now = datetime.now(UTC)
    expired = KeyPair.create(
        tmp_path / "old", not_before=now - timedelta(days=2), not_after=now - timedelta(days=1)
    )
    for cert, key, expected in (
        (expired.cert_file, expired.key_file, "expired at"),
        (pair.cert_file, expired.key_file, "is not the certificate of the key"),
    ):
        job = job_model(
            auth="self_signed_tls_client_auth",
            client_certificate={"file": str(cert)},
            client_key={"file": str(key)},
        )
        with pytest.raises(RefreshError) as caught:
            auth_for(job, now=time.time())
        assert caught.value.reason is Reason.CREDENTIALS
        assert expected in caught.value.message


# --------------------------------------------------------------------------- the request


def test_resources_are_repeated_parameters_and_the_secret_methods_keep_their_shape(
    tmp_path: Path,
) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cret")
    job = job_model(
        auth="client_secret_post",
        client_secret={"file": str(secret)},
        resource=["https://a.example.test", "https://b.example.test"],
        scopes=["read"],
    )
    auth = auth_for(job)
    request = build_request(job, auth, TOKEN_URL)
    prepared = requests.Request("POST", TOKEN_URL, data=request.form).prepare()
    body = parse_qsl(str(prepared.body))
    assert [value for name, value in body if name == "resource"] == [
        "https://a.example.test",
        "https://b.example.test",
    ]
    assert ("client_secret", "s3cret") in body and ("client_id", "client-1") in body
    basic = job_model(client_secret={"file": str(secret)}, auth="client_secret_basic")
    assert auth_for(basic).headers["Authorization"].startswith("Basic ")


# ------------------------------------------------------------------------------ discovery


def test_discovery_urls_follow_oidc_and_rfc8414() -> None:
    assert discovery_urls("https://kc.test/realms/demo") == (
        "https://kc.test/realms/demo/.well-known/openid-configuration",
        "https://kc.test/.well-known/oauth-authorization-server/realms/demo",
    )
    assert discovery_urls("https://tenant.auth0.test/") == (
        "https://tenant.auth0.test/.well-known/openid-configuration",
        "https://tenant.auth0.test/.well-known/oauth-authorization-server",
    )


def _parse(document: dict[str, Any]) -> Any:
    import json

    return parse_metadata(
        json.dumps(document).encode(),
        issuer=ISSUER,
        source="doc",
        fetched_at=0.0,
        url_problem=lambda url: url_problem(url, False),
    )


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({"issuer": ISSUER + "/", "token_endpoint": TOKEN_URL}, "names the issuer"),
        ({"issuer": ISSUER}, "names no `token_endpoint`"),
        (
            {"issuer": ISSUER, "token_endpoint": "http://127.0.0.1:8080/t"},
            "plain http:// from an https:// issuer",
        ),
        ({"issuer": ISSUER, "token_endpoint": "ftp://idp.example.test/t"}, "expected an https"),
        ({"issuer": ISSUER, "token_endpoint": TOKEN_URL + "\x1b[2J"}, "not a URL"),
        (
            {
                "issuer": ISSUER,
                "token_endpoint": TOKEN_URL,
                "token_endpoint_auth_methods_supported": ["private_key_jwt\n\x1b[31mforged"],
            },
            "not a list of names",
        ),
        (
            {
                "issuer": ISSUER,
                "token_endpoint": TOKEN_URL,
                "mtls_endpoint_aliases": {"token_endpoint": 5},
            },
            "mtls_endpoint_aliases",
        ),
        (
            {
                "issuer": ISSUER,
                "token_endpoint": TOKEN_URL,
                "token_endpoint_auth_methods_supported": "x",
            },
            "not a list",
        ),
    ],
)
def test_a_bad_discovery_document_is_a_discovery_failure(
    document: dict[str, Any], expected: str
) -> None:
    with pytest.raises(RefreshError) as caught:
        _parse(document)
    assert caught.value.reason is Reason.DISCOVERY
    assert expected in caught.value.message


def test_the_method_and_algorithm_must_be_listed_when_the_document_lists_them(
    pair: KeyPair,
) -> None:
    metadata = _parse(
        {
            "issuer": ISSUER,
            "token_endpoint": TOKEN_URL,
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": ["RS256"],
            "mtls_endpoint_aliases": {"token_endpoint": "https://mtls.idp.example.test/t"},
        }
    )
    assert metadata.mtls_token_endpoint == "https://mtls.idp.example.test/t"
    key = {"file": str(pair.key_file)}
    assert metadata_problem(job_model(auth="private_key_jwt", private_key=key), metadata) is None
    assert metadata_problem(job_model(auth="federated_jwt", assertion_file="/t"), metadata) is None
    assert (
        metadata_problem(job_model(auth="basic", client_secret={"env": "PATH"}), metadata) is None
    )
    problem = metadata_problem(job_model(auth="body", client_secret={"env": "PATH"}), metadata)
    assert problem is not None and problem.startswith("auth: body (that is client_secret_post)")
    problem = metadata_problem(
        job_model(auth="private_key_jwt", private_key=key, alg="PS256"), metadata
    )
    assert problem is not None and problem.startswith("alg: PS256")
    unlisted = _parse({"issuer": ISSUER, "token_endpoint": TOKEN_URL})
    assert (
        metadata_problem(
            job_model(auth="tls_client_auth", client_certificate=key, client_key=key), unlisted
        )
        is None
    )


class _Fetches:
    """The network under a `Discovery`: a document, or a failure, and who asked when."""

    def __init__(self) -> None:
        self.answer: tuple[int, bytes] | RefreshError = (200, b"")
        self.calls = 0
        self.now = 1000.0

    def fetch(self, url: str, job: TokenJobConfig) -> tuple[int, bytes]:
        self.calls += 1
        time.sleep(0.05)  # long enough for the other threads to queue behind the reader
        if isinstance(self.answer, RefreshError):
            raise self.answer
        return self.answer


def test_discovery_reads_once_shares_a_failure_and_keeps_an_old_document() -> None:
    import json
    import threading

    from refresher.config import url_problem
    from refresher.discovery import FAILURE_HOLD, MAX_AGE, Discovery

    net = _Fetches()
    document = {"issuer": ISSUER, "token_endpoint": TOKEN_URL}
    net.answer = (200, json.dumps(document).encode())
    discovery = Discovery(net.fetch, lambda: net.now, lambda u, j: url_problem(u, False))
    job = job_model(token_url=None, issuer=ISSUER, client_secret={"env": "PATH"})

    def many(count: int) -> list[object]:
        results: list[object] = []

        def one() -> None:
            try:
                results.append(discovery.metadata(job))
            except RefreshError as err:
                results.append(err)

        threads = [threading.Thread(target=one) for _ in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return results

    assert all(r is not None and not isinstance(r, RefreshError) for r in many(5))
    assert net.calls == 1  # five jobs of one issuer: one read
    # An IdP down: a forgotten document is tried once, and the old one kept meanwhile.
    net.answer = RefreshError(Reason.NETWORK, "ConnectionError talking to idp")
    discovery.forget(job)
    assert not any(isinstance(r, RefreshError) for r in many(5))
    assert net.calls == 2
    # Without a document, waiters share the first failure instead of each trying again.
    fresh = Discovery(net.fetch, lambda: net.now, lambda u, j: url_problem(u, False))
    discovery = fresh
    results = many(4)
    assert all(isinstance(r, RefreshError) and r.reason is Reason.NETWORK for r in results)
    assert net.calls == 3
    assert "discovery: ConnectionError" in str(results[0])
    net.now += FAILURE_HOLD + 1  # ...until the hold is over
    net.answer = (200, json.dumps(document).encode())
    assert not isinstance(many(1)[0], RefreshError)
    assert net.calls == 4
    net.now += MAX_AGE  # and a day later, read again
    many(1)
    assert net.calls == 5


# ---------------------------------------------------------------------------- config rules


def problems_of(**fields: Any) -> list[str]:
    job = {"name": "j", "client_id": "client-1", "sinks": [{"type": "file", "path": "/tmp/x"}]}
    job.update(fields)
    with pytest.raises(ConfigError) as caught:
        validate({"tokens": [job]})
    return caught.value.problems


def test_every_wrong_setup_is_a_path_named_problem(tmp_path: Path, pair: KeyPair) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cret")
    key = {"file": str(pair.key_file)}
    cases: list[tuple[dict[str, Any], str]] = [
        (
            {"token_url": TOKEN_URL, "auth": "private_key_jwt"},
            "tokens[0].private_key: required by auth: private_key_jwt",
        ),
        ({"token_url": TOKEN_URL, "auth": "federated_jwt"}, "tokens[0].assertion_file: required"),
        (
            {"token_url": TOKEN_URL, "auth": "tls_client_auth"},
            "tokens[0].client_certificate: required",
        ),
        (
            {
                "token_url": TOKEN_URL,
                "auth": "private_key_jwt",
                "private_key": key,
                "client_secret": {"file": str(secret)},
            },
            "tokens[0].client_secret: not used by auth: private_key_jwt",
        ),
        (
            {"token_url": TOKEN_URL, "client_secret": {"file": str(secret)}, "private_key": key},
            "tokens[0].private_key: not used by auth: basic",
        ),
        (
            {"token_url": TOKEN_URL, "auth": "private_key_jwt", "private_key": key, "alg": "HS256"},
            "tokens[0].alg: HS256 signs",
        ),
        (
            {
                "token_url": TOKEN_URL,
                "auth": "private_key_jwt",
                "private_key": key,
                "assertion": {"audience": "issuer"},
            },
            "tokens[0].assertion.audience: `issuer` needs",
        ),
        (
            {
                "token_url": TOKEN_URL,
                "auth": "private_key_jwt",
                "private_key": key,
                "assertion": {"lifetime": "1h"},
            },
            "tokens[0].assertion.lifetime",
        ),
        (
            {"token_url": TOKEN_URL, "issuer": ISSUER, "client_secret": {"file": str(secret)}},
            "tokens[0].issuer: give token_url or issuer",
        ),
        (
            {"issuer": ISSUER + "/?tenant=x", "client_secret": {"file": str(secret)}},
            "tokens[0].issuer: an issuer has no query",
        ),
        (
            {
                "provider": "keycloak",
                "issuer": "https://kc.test/auth",
                "client_secret": {"file": str(secret)},
            },
            "tokens[0].issuer: a keycloak issuer is the realm's URL",
        ),
        (
            {"provider": "okta", "client_secret": {"file": str(secret)}},
            "tokens[0].issuer: required",
        ),
        (
            {
                "provider": "entra",
                "client_secret": {"file": str(secret)},
                "scopes": ["api://x/.default"],
            },
            "tokens[0].tenant_id: required",
        ),
        (
            {
                "provider": "entra",
                "tenant_id": "contoso.onmicrosoft.com",
                "client_secret": {"file": str(secret)},
                "scopes": ["api://x/.default"],
            },
            "tokens[0].tenant_id: the Directory (tenant) ID, a GUID",
        ),
        (
            {
                "provider": "entra",
                "tenant_id": "72f988bf-86f1-41af-91ab-2d7cd011db47",
                "client_secret": {"file": str(secret)},
                "scopes": ["User.Read"],
            },
            "tokens[0].scopes: 'User.Read' does not end in /.default",
        ),
        (
            {
                "provider": "okta",
                "issuer": ISSUER,
                "tenant_id": "72f988bf-86f1-41af-91ab-2d7cd011db47",
                "client_secret": {"file": str(secret)},
            },
            "tokens[0].tenant_id: only the entra provider",
        ),
        (
            {"provider": "auth0", "issuer": ISSUER, "client_secret": {"file": str(secret)}},
            "tokens[0].audience: the auth0 provider needs",
        ),
        (
            {"token_url": TOKEN_URL, "client_secret": {"file": str(secret)}, "resource": ["api"]},
            "tokens[0].resource[0]: an absolute URI",
        ),
        (
            {
                "token_url": TOKEN_URL,
                "auth": "client_secret_jwt",
                "client_secret": {"file": str(secret)},
            },
            "tokens[0].client_secret: client_secret_jwt signs with it",
        ),
        (
            {
                "token_url": TOKEN_URL,
                "auth": "private_key_jwt",
                "private_key": {"file": str(pair.cert_file)},
            },
            "tokens[0].private_key: ",
        ),
        (
            {
                "token_url": TOKEN_URL,
                "client_secret": {"file": str(secret)},
                "form_params": {"audience": "x"},
            },
            "tokens[0].form_params: `audience` is set by the refresher",
        ),
        (
            {
                "token_url": TOKEN_URL,
                "client_secret": {"file": str(secret)},
                "query_params": {"client_id": "x"},
            },
            "tokens[0].query_params: `client_id`",
        ),
        (
            {
                "token_url": TOKEN_URL,
                "client_secret": {"file": str(secret)},
                "headers": {"authorization": "x"},
            },
            "tokens[0].headers: `Authorization` carries",
        ),
        (
            {"issuer": "https://[::1", "client_secret": {"file": str(secret)}},
            "tokens[0].issuer: not a valid URL",
        ),
        (
            {
                "token_url": TOKEN_URL,
                "client_secret": {"file": str(secret)},
                "resource": ["https://[::1"],
            },
            "tokens[0].resource[0]",
        ),
        (
            {
                "provider": "entra",
                "tenant_id": ENTRA_TENANT,
                "scopes": ["api://x/.default"],
                "auth": "private_key_jwt",
                "private_key": key,
            },
            "tokens[0].certificate: required: entra finds the key",
        ),
        (
            {
                "provider": "entra",
                "tenant_id": ENTRA_TENANT,
                "scopes": ["api://x/.default"],
                "client_secret": {"file": str(secret)},
                "resource": ["https://graph.microsoft.com"],
            },
            "tokens[0].resource: entra refuses",
        ),
        (
            {
                "provider": "entra",
                "tenant_id": ENTRA_TENANT,
                "scopes": ["api://x/.default"],
                "auth": "private_key_jwt",
                "private_key": key,
                "certificate": {"file": str(pair.cert_file)},
                "alg": "ES256",
            },
            "tokens[0].alg: entra takes RS256, PS256",
        ),
        (
            {
                "provider": "auth0",
                "issuer": ISSUER,
                "audience": "x:y",
                "auth": "private_key_jwt",
                "private_key": key,
                "assertion": {"lifetime": "6m"},
            },
            "tokens[0].assertion.lifetime: auth0 takes assertions of at most 300 s",
        ),
        (
            {
                "provider": "auth0",
                "issuer": ISSUER,
                "audience": "x:y",
                "auth": "client_secret_jwt",
                "client_secret": {"file": str(secret)},
            },
            "tokens[0].auth: auth0 does not take client_secret_jwt",
        ),
        (
            {
                "token_url": TOKEN_URL,
                "auth": "private_key_jwt",
                "private_key": key,
                "certificate": {"file": str(secret)},
            },
            "tokens[0].certificate: ",
        ),
    ]
    for fields, expected in cases:
        found = problems_of(**fields)
        assert any(problem.startswith(expected) for problem in found), (fields, found)


def test_no_sink_may_write_a_key_certificate_or_assertion_file(
    tmp_path: Path, pair: KeyPair
) -> None:
    cluster = ServiceAccountIssuer()
    token_file = tmp_path / "sa-token"
    cluster.project(token_file, audience="aud", issued_at=time.time())
    jobs = [
        {
            "auth": "private_key_jwt",
            "private_key": {"file": str(pair.key_file)},
            "certificate": {"file": str(pair.cert_file)},
        },
        {"auth": "federated_jwt", "assertion_file": str(token_file)},
        {
            "auth": "tls_client_auth",
            "client_certificate": {"file": str(pair.cert_file)},
            "client_key": {"file": str(pair.key_file)},
        },
    ]
    targets = [pair.key_file, token_file, pair.cert_file]
    for fields, target in zip(jobs, targets, strict=True):
        job = {
            "name": "j",
            "token_url": TOKEN_URL,
            "client_id": "client-1",
            "sinks": [{"type": "file", "path": str(target)}],
            **fields,
        }
        with pytest.raises(ConfigError) as caught:
            validate({"tokens": [job]})
        assert any(
            p.startswith("tokens[0].sinks[0].path:") and "a refresh would overwrite it" in p
            for p in caught.value.problems
        ), caught.value.problems


def test_one_writer_key_includes_audience_and_resource(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cret")

    def job(name: str, **fields: Any) -> dict[str, Any]:
        return {
            "name": name,
            "provider": "auth0",
            "issuer": "https://tenant.auth0.test",
            "client_id": "client-1",
            "client_secret": {"file": str(secret)},
            "sinks": [{"type": "file", "path": str(tmp_path / name)}],
            **fields,
        }

    config = validate(
        {"tokens": [job("a", audience="https://api-a"), job("b", audience="https://api-b")]}
    )
    assert [j.issuer_url for j in config.jobs] == ["https://tenant.auth0.test/"] * 2
    validate(
        {
            "tokens": [
                job("a", audience="x:a", resource=["https://r1"]),
                job("b", audience="x:a", resource=["https://r2"]),
            ]
        }
    )
    with pytest.raises(ConfigError) as caught:
        validate({"tokens": [job("a", audience="x:a"), job("b", audience="x:a")]})
    assert any("requests the same token as tokens[0]" in p for p in caught.value.problems)


def test_the_client_auth_benchmark_runs_and_prints_every_method() -> None:
    import json
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "bench.clientauth", "--rounds", "5", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    figures = json.loads(done.stdout)
    assert {"client_secret_basic", "private_key_jwt RS256", "federated_jwt"} <= set(figures)
    assert all(row["median_ms"] > 0 for row in figures.values())
    assert figures["private_key_jwt RS256"]["after_rotation_median_ms"] > 0


def test_validity_times_are_a_refreshs_to_judge_not_the_configs(tmp_path: Path) -> None:
    # A certificate cert-manager renews late, or a federated token the kubelet has not
    # rotated yet, must not stop the daemon from starting: it is a failure to retry.
    now = datetime.now(UTC)
    expired = KeyPair.create(
        tmp_path / "old", not_before=now - timedelta(days=2), not_after=now - timedelta(days=1)
    )
    token_file = tmp_path / "token"
    ServiceAccountIssuer().project(token_file, audience="a", issued_at=NOW - 7200)
    for fields in (
        {
            "auth": "tls_client_auth",
            "client_certificate": {"file": str(expired.cert_file)},
            "client_key": {"file": str(expired.key_file)},
        },
        {"auth": "federated_jwt", "assertion_file": str(token_file)},
    ):
        job = {
            "name": "j",
            "token_url": TOKEN_URL,
            "client_id": "client-1",
            "sinks": [{"type": "file", "path": str(tmp_path / "t")}],
            **fields,
        }
        validate({"tokens": [job]})


def test_a_secret_that_is_not_utf8_is_no_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ODD_SECRET", "caf\udce9-not-utf8")  # as os.environ decodes bad bytes
    job = {
        "name": "j",
        "token_url": TOKEN_URL,
        "client_id": "client-1",
        "client_secret": {"env": "ODD_SECRET"},
        "sinks": [{"type": "file", "path": "/tmp/x"}],
    }
    validate({"tokens": [job]})
    with pytest.raises(ConfigError) as caught:
        validate({"tokens": [{**job, "auth": "client_secret_jwt"}]})
    assert any(
        p.startswith("tokens[0].client_secret: client_secret_jwt") for p in caught.value.problems
    )
