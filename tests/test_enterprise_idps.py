"""Enterprise IdPs end to end (issue 17): each client authentication method against the
local token server shaped like Entra ID, Okta, Keycloak and Auth0, found by discovery,
refreshed several times by the daemon; keys, certificates and federated tokens rotated on
disk without a restart; and each wrong setup a classified failure with a clear message.

The server verifies what a real IdP verifies (refresher/localidp_clients.py): assertion
signatures against registered keys, `iss`/`sub`/`aud`/`exp`/`iat`, replayed `jti`s and
over-long lifetimes; federated tokens against the signing key of a cluster the test runs
(`ServiceAccountIssuer`); client certificates in a real TLS handshake (trustme CAs).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import trustme

from refresher.cli import main
from refresher.daemon import build_runners
from refresher.errors import Reason, RefreshError
from refresher.idp import IdPClient
from refresher.localidp import Federation
from testdoubles.idp import LocalIdP
from testdoubles.keys import (
    KeyPair,
    ServiceAccountIssuer,
    new_ec_key,
    new_rsa_key,
    write_atomically,
)
from testdoubles.tls import ClientCert, client_cert, idp_tls, self_signed_cert
from tests.conftest import AUDIENCE, CLIENT_ID, LogCapture, config_of, running, wait_for
from tests.test_cli import write_config

ENTRA_SCOPE = "api://refresher-test/.default"
JWT_SECRET = "a-client-secret-long-enough-for-HS256-0123456789"
FEDERATED_AUDIENCE = "api://AzureADTokenExchange"
SERVICE_ACCOUNT = "system:serviceaccount:apps:refresher"


@dataclass
class Setup:
    """One IdP and what a job needs to authenticate to it with one method."""

    idp: LocalIdP
    job: dict[str, Any]
    rotate: Callable[[], None] | None = None  # replace the key material on disk (and at the IdP)


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def cluster() -> ServiceAccountIssuer:
    return ServiceAccountIssuer()


@pytest.fixture
def started() -> Iterator[list[LocalIdP]]:
    servers: list[LocalIdP] = []
    yield servers
    for server in servers:
        server.stop()


def base_job(idp: LocalIdP, sink: Path, **fields: Any) -> dict[str, Any]:
    job: dict[str, Any] = {
        "name": "enterprise",
        "provider": idp.shape.name,
        "issuer": idp.issuer,
        "client_id": CLIENT_ID,
        "min_refresh_interval": 0.2,
        "sinks": [{"type": "file", "path": str(sink)}],
    }
    if idp.shape.name == "entra":
        job["scopes"] = [ENTRA_SCOPE]
    if idp.shape.name == "auth0":
        job["audience"] = AUDIENCE
    job.update(fields)
    return job


class Builder:
    """Makes a `Setup` per (shape, method), with its files under `folder`."""

    def __init__(
        self,
        folder: Path,
        started: list[LocalIdP],
        ca: trustme.CA,
        cluster: ServiceAccountIssuer,
    ) -> None:
        self.folder = folder
        self.started = started
        self.ca = ca
        self.cluster = cluster
        self.sink = folder / "token"
        self.server: type[LocalIdP] = LocalIdP

    def idp(self, shape: str, **kwargs: Any) -> LocalIdP:
        kwargs.setdefault("clients", {CLIENT_ID: JWT_SECRET})
        kwargs.setdefault("audience", AUDIENCE)
        kwargs.setdefault("lifetime", 2)
        server = self.server(shape, **kwargs).start()
        self.started.append(server)
        return server

    def secret_file(self) -> Path:
        path = self.folder / "client-secret"
        path.write_text(JWT_SECRET + "\n")
        path.chmod(0o600)
        return path

    def secret(self, shape: str, method: str) -> Setup:
        idp = self.idp(shape)
        return Setup(
            idp,
            base_job(idp, self.sink, auth=method, client_secret={"file": str(self.secret_file())}),
        )

    def private_key(self, shape: str, *, by: str = "key", ec: bool = False) -> Setup:
        """private_key_jwt; the IdP knows the key by its public key, its `kid` in a JWKS,
        or its certificate (`x5t#S256`, as Entra registers certificate credentials)."""
        pair = KeyPair.create(self.folder / "keys", key=new_ec_key() if ec else None)
        idp = self.idp(shape, client_keys={CLIENT_ID: self._registered(pair, by)})
        fields: dict[str, Any] = {
            "auth": "private_key_jwt",
            "private_key": {"file": str(pair.key_file)},
        }
        if by == "kid":
            fields["key_id"] = "key-1"
        if by == "certificate":
            fields["certificate"] = {"file": str(pair.cert_file)}

        def rotate() -> None:
            pair.reissue(key=new_ec_key() if ec else new_rsa_key())  # a new key of its kind
            idp.set_client_keys(CLIENT_ID, self._registered(pair, by))

        return Setup(idp, base_job(idp, self.sink, **fields), rotate)

    @staticmethod
    def _registered(pair: KeyPair, by: str) -> Any:
        if by == "certificate":
            return pair.certificate_pem
        if by == "kid":
            from jwt.algorithms import ECAlgorithm, RSAAlgorithm

            algorithm = ECAlgorithm if hasattr(pair.key, "curve") else RSAAlgorithm
            jwk = algorithm.to_jwk(pair.key.public_key(), as_dict=True)
            return {"keys": [{**jwk, "kid": "key-1"}]}
        return pair.public_pem

    def federated(self, shape: str) -> Setup:
        token_file = self.folder / "projected" / "token"
        self.cluster.project(token_file, audience=FEDERATED_AUDIENCE, issued_at=time.time())
        trust = Federation(
            issuer=self.cluster.issuer,
            audience=FEDERATED_AUDIENCE,
            keys=self.cluster.public_pem,
            subjects={SERVICE_ACCOUNT: CLIENT_ID},
        )
        idp = self.idp(shape, federation=trust)

        def rotate() -> None:  # the kubelet's rotation: a new token in the same file
            self.cluster.project(token_file, audience=FEDERATED_AUDIENCE, issued_at=time.time() + 1)

        return Setup(
            idp,
            base_job(idp, self.sink, auth="federated_jwt", assertion_file=str(token_file)),
            rotate,
        )

    def tls_client(self, shape: str, *, self_signed: bool = False) -> Setup:
        """mTLS at an endpoint that requires a client certificate, found through the
        discovery document's `mtls_endpoint_aliases` (the document itself is served without
        one); its connections are kept alive, so a certificate rotation must close them."""
        files = self.folder / "client-cert"
        files.mkdir(exist_ok=True)
        cert_file, key_file = files / "tls.crt", files / "tls.key"

        def issue() -> ClientCert:
            issued = (
                self_signed_cert(files, "refresher-client")
                if self_signed
                else client_cert(self.ca, files, "refresher-client")
            )
            write_atomically(cert_file, issued.cert_pem)
            write_atomically(key_file, Path(issued.key_file).read_bytes())
            return issued

        current = issue()
        clients = {CLIENT_ID: current.subject_dn}
        tls = idp_tls(
            self.ca,
            self.folder,
            client_ca=None if self_signed else self.ca,
            require_client_cert=True,
            tls_clients={} if self_signed else clients,
            self_signed_clients={CLIENT_ID: current.cert_pem} if self_signed else {},
        )
        mtls = self.idp(shape, tls=tls, token_keep_alive=True)
        front = self.idp(
            shape,
            tls=idp_tls(self.ca, self.folder),
            mtls_endpoint_alias=mtls.token_url,
        )
        self.mtls = mtls
        self.certificates = [current]

        def rotate() -> None:
            renewed = issue()
            self.certificates.append(renewed)
            if self_signed:  # the new certificate registered beside the old, as in a rollover
                mtls.set_self_signed_client(CLIENT_ID, current.cert_pem + renewed.cert_pem)
            else:
                # cert-manager renews with the same subject; trustme gives each certificate an
                # OU of its own, so the IdP is told the new subject (and refuses the old one:
                # a connection still presenting it fails).
                mtls.set_tls_client(CLIENT_ID, renewed.subject_dn)

        method = "self_signed_tls_client_auth" if self_signed else "tls_client_auth"
        job = base_job(
            front,
            self.sink,
            auth=method,
            client_certificate={"file": str(cert_file)},
            client_key={"file": str(key_file)},
            ca_bundle=tls.ca_bundle,
        )
        return Setup(mtls, job, rotate)


@pytest.fixture
def builder(
    tmp_path: Path, started: list[LocalIdP], ca: trustme.CA, cluster: ServiceAccountIssuer
) -> Builder:
    return Builder(tmp_path, started, ca, cluster)


# (shape, method, how) for every method each shape's real IdP takes.
CASES = [
    ("entra", "client_secret_post", {}),
    ("entra", "private_key_jwt", {"by": "certificate"}),
    ("entra", "federated_jwt", {}),
    ("okta", "client_secret_basic", {}),
    ("okta", "client_secret_jwt", {}),
    ("okta", "private_key_jwt", {"by": "kid"}),
    ("keycloak", "client_secret_post", {}),
    ("keycloak", "private_key_jwt", {"ec": True}),
    ("keycloak", "federated_jwt", {}),
    ("keycloak", "tls_client_auth", {}),
    ("auth0", "client_secret_basic", {}),
    ("auth0", "private_key_jwt", {}),
    ("auth0", "self_signed_tls_client_auth", {}),
]


def setup_for(builder: Builder, shape: str, method: str, how: dict[str, Any]) -> Setup:
    if method.startswith("client_secret"):
        return builder.secret(shape, method)
    if method == "private_key_jwt":
        return builder.private_key(shape, **how)
    if method == "federated_jwt":
        return builder.federated(shape)
    return builder.tls_client(shape, self_signed=method.startswith("self_signed"))


@pytest.mark.parametrize(("shape", "method", "how"), CASES, ids=[f"{s}-{m}" for s, m, _ in CASES])
def test_each_method_refreshes_again_and_again_found_by_discovery(
    builder: Builder, shape: str, method: str, how: dict[str, Any]
) -> None:
    setup = setup_for(builder, shape, method, how)
    idp = setup.idp
    with running(config_of(setup.job)):
        wait_for(lambda: len(idp.issued) >= 3, timeout=20)
        held = builder.sink.read_text()
    issued = idp.issued
    for previous, current in itertools.pairwise(issued):
        assert current.issued_at < previous.expires_at  # never a gap
    assert held in {token.access_token for token in issued[-2:]}
    seen = [auth for auth in idp.authentications if auth.client_id == CLIENT_ID]
    assert seen and all(auth.ok for auth in seen), [auth.reason for auth in seen]
    assert {auth.method for auth in seen} == {method}
    if method in ("private_key_jwt", "client_secret_jwt"):
        jtis = [auth.assertion_claims["jti"] for auth in seen if auth.assertion_claims]
        assert len(set(jtis)) == len(seen)  # a fresh assertion for every request
    # Discovery was read once for all those refreshes (the front server, for mTLS).
    front = builder.started[-1] if method.endswith("tls_client_auth") else idp
    assert front.discovery_requests == 1


@pytest.mark.parametrize(
    ("shape", "method", "how"),
    [
        ("okta", "private_key_jwt", {}),
        ("entra", "private_key_jwt", {"by": "certificate"}),
        ("keycloak", "federated_jwt", {}),
        ("keycloak", "tls_client_auth", {}),
        ("auth0", "self_signed_tls_client_auth", {}),
    ],
    ids=["key", "certificate", "federated-token", "client-certificate", "self-signed"],
)
def test_key_material_rotated_on_disk_is_used_without_a_restart(
    builder: Builder, shape: str, method: str, how: dict[str, Any], all_logs: LogCapture
) -> None:
    setup = setup_for(builder, shape, method, how)
    assert setup.rotate is not None
    idp = setup.idp
    with running(config_of(setup.job)) as daemon:
        wait_for(lambda: len(idp.issued) >= 2, timeout=20)
        setup.rotate()
        rotated_at = len(idp.authentications)
        wait_for(lambda: sum(auth.ok for auth in idp.authentications[rotated_at:]) >= 2, timeout=20)
    after = [auth for auth in idp.authentications[rotated_at:] if auth.ok]
    if method.endswith("tls_client_auth"):
        # The kept-alive connection of the old certificate was closed: the IdP sees the new one.
        new = builder.certificates[-1].sha256
        assert after[-1].client_cert_sha256 == new != builder.certificates[0].sha256
        assert "client certificate changed; its pooled connections closed" in all_logs.text
        client = daemon.runners[0].idp
        assert isinstance(client, IdPClient) and not client._tls_sessions  # closed at stop
    elif method == "federated_jwt":
        assert after[-1].assertion_claims is not None
        assert after[-1].assertion_claims["iat"] > idp.authentications[0].assertion_claims["iat"]  # type: ignore[index]
    else:
        assert after[-1].assertion_header is not None  # signed with the new key: it verified


# ------------------------------------------------------------------- each wrong setup


def first_failure(job: dict[str, Any]) -> RefreshError:
    (runner,) = build_runners(config_of(job))
    runner.step()
    assert runner.last_error is not None, "the refresh did not fail"
    return runner.last_error


def test_a_key_the_idp_does_not_have_is_invalid_client_with_a_hint(builder: Builder) -> None:
    setup = builder.private_key("okta")
    setup.idp.set_client_keys(CLIENT_ID, KeyPair.create(builder.folder / "other").public_pem)
    error = first_failure(setup.job)
    assert error.reason is Reason.INVALID_CLIENT
    assert "signature does not verify" in error.message
    assert "does the IdP have this key" in error.message


def test_a_client_certificate_that_expired_fails_before_the_handshake(
    builder: Builder, ca: trustme.CA
) -> None:
    import datetime

    setup = builder.tls_client("keycloak")
    (runner,) = build_runners(config_of(setup.job))
    runner.step()
    assert runner.last_error is None, runner.last_error
    now = datetime.datetime.now(datetime.UTC)
    expired = client_cert(
        ca,
        builder.folder,
        "refresher-client",
        not_before=now - datetime.timedelta(days=2),
        not_after=now - datetime.timedelta(days=1),
    )
    write_atomically(Path(setup.job["client_certificate"]["file"]), expired.cert_pem)
    write_atomically(Path(setup.job["client_key"]["file"]), Path(expired.key_file).read_bytes())
    requests_before = setup.idp.token_requests
    runner.refresh_now()
    error = runner.last_error
    assert error is not None and error.reason is Reason.CREDENTIALS
    assert "expired at" in error.message and "tls.crt" in error.message
    assert setup.idp.token_requests == requests_before


def test_an_idp_listing_no_methods_gets_the_rfc8414_default_in_the_hint(builder: Builder) -> None:
    setup = builder.private_key("okta")
    setup.idp.discovery_overrides = {"token_endpoint_auth_methods_supported": None}
    setup.idp.set_client_keys(CLIENT_ID, KeyPair.create(builder.folder / "other").public_pem)
    error = first_failure(setup.job)
    assert error.reason is Reason.INVALID_CLIENT
    assert "lists no authentication methods" in error.message


def test_an_audience_the_idp_does_not_accept_is_invalid_client(builder: Builder) -> None:
    setup = builder.private_key("auth0")  # Auth0 wants the tenant, the issuer, as `aud`
    error = first_failure({**setup.job, "assertion": {"audience": "token_endpoint"}})
    assert error.reason is Reason.INVALID_CLIENT
    assert "aud does not name this server" in error.message


def test_clock_skew_beyond_the_assertion_lifetime_is_invalid_client(
    builder: Builder, tmp_path: Path
) -> None:
    pair = KeyPair.create(tmp_path / "skew")
    idp = builder.idp(
        "keycloak", client_keys={CLIENT_ID: pair.public_pem}, clock=lambda: time.time() + 400
    )
    job = base_job(
        idp, builder.sink, auth="private_key_jwt", private_key={"file": str(pair.key_file)}
    )
    error = first_failure({**job, "assertion": {"lifetime": "5m"}})
    assert error.reason is Reason.INVALID_CLIENT
    assert "client assertion expired" in error.message and "clock" in error.message


def test_a_method_the_discovery_document_does_not_list_is_a_discovery_failure(
    builder: Builder, tmp_path: Path
) -> None:
    pair = KeyPair.create(tmp_path / "k")
    idp = builder.idp(
        "keycloak",
        auth_methods=("client_secret_basic", "client_secret_post"),
        client_keys={CLIENT_ID: pair.public_pem},
    )
    job = base_job(
        idp, builder.sink, auth="private_key_jwt", private_key={"file": str(pair.key_file)}
    )
    error = first_failure(job)
    assert error.reason is Reason.DISCOVERY
    assert "private_key_jwt is not among the methods" in error.message
    assert idp.token_requests == 0  # nothing was sent that the IdP would refuse
    # `refresher check` says so at config time, as a config error with the job's path.
    config = write_config(tmp_path / "c.yaml", job)
    assert main(["check", "-c", str(config)]) == 2


def test_an_algorithm_the_key_chose_is_checked_against_discovery_before_sending(
    builder: Builder,
) -> None:
    setup = builder.private_key("keycloak", ec=True)  # no `alg`: the EC key means ES256
    setup.idp.discovery_overrides = {"token_endpoint_auth_signing_alg_values_supported": ["RS256"]}
    error = first_failure(setup.job)
    assert error.reason is Reason.DISCOVERY
    assert error.message.startswith("alg: ES256 is not among the assertion algorithms")
    assert setup.idp.token_requests == 0


def test_an_issuer_mismatch_is_a_discovery_failure(builder: Builder) -> None:
    setup = builder.secret("okta", "client_secret_basic")
    setup.idp.discovery_overrides = {"issuer": "https://elsewhere.example.test"}
    error = first_failure(setup.job)
    assert error.reason is Reason.DISCOVERY
    assert "names the issuer 'https://elsewhere.example.test'" in error.message


def test_discovery_falls_back_to_rfc8414_and_resources_repeat(builder: Builder) -> None:
    idp = builder.idp("keycloak", discovery="oauth")
    job = base_job(
        idp,
        builder.sink,
        auth="client_secret_basic",
        client_secret={"file": str(builder.secret_file())},
        resource=["https://api-a.example.test", "https://api-b.example.test"],
    )
    (runner,) = build_runners(config_of(job))
    runner.step()
    assert runner.last_error is None, runner.last_error
    assert idp.authentications[-1].resource == (
        "https://api-a.example.test",
        "https://api-b.example.test",
    )
    assert idp.discovery_requests == 2  # openid-configuration (404), then RFC 8414's


def test_discovery_is_read_again_after_a_404_and_an_outage_is_retried(builder: Builder) -> None:
    setup = builder.secret("okta", "client_secret_basic")
    idp = setup.idp
    # The cached document names an endpoint that has gone away...
    idp.discovery_overrides = {"token_endpoint": idp.base_url + "/moved/token"}
    (runner,) = build_runners(config_of(setup.job))
    runner.step()
    assert runner.last_error is not None and runner.last_error.status == 404
    # ...so the next attempt reads the document again, and finds the new one.
    idp.discovery_overrides = {}
    runner.refresh_now()
    assert runner.last_error is None, runner.last_error
    assert idp.discovery_requests == 2
    # An outage: the token request fails (so the document is forgotten), then the document
    # cannot be fetched: each a classified failure, retried, never an exit...
    idp.stop()
    for _ in range(2):
        runner.refresh_now()
        assert runner.last_error is not None and runner.last_error.reason is Reason.NETWORK
    # ...until the IdP is back.
    idp.start()
    runner.refresh_now()
    assert runner.last_error is None, runner.last_error


def test_check_shows_the_discovered_endpoint(
    builder: Builder, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    setup = builder.secret("auth0", "client_secret_post")
    config = write_config(tmp_path / "c.yaml", setup.job)
    assert main(["check", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"token endpoint {setup.idp.token_url} (discovered)" in out
    assert f"issuer={setup.idp.issuer}" in out
    assert main(["check", "-c", str(config), "--offline"]) == 0


def test_the_token_works_at_the_api(builder: Builder) -> None:
    setup = builder.federated("entra")
    with running(config_of(setup.job)):
        wait_for(lambda: builder.sink.exists())
        token = builder.sink.read_text()
    answer = requests.get(
        setup.idp.protected_url, headers={"Authorization": f"Bearer {token}"}, timeout=5
    )
    assert answer.status_code == 200
