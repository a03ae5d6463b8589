"""Tests of the local token server's enterprise client authentication (refresher.localidp and
refresher.localidp_clients): private_key_jwt, client_secret_jwt, federated assertions, mTLS,
discovery and the enterprise provider shapes, driven over HTTP(S) with requests, as the
refresher will drive them.

The server's clock is injected (FakeClock), so assertions are dated by it and nothing
sleeps. TLS certificates are judged by the real clock (OpenSSL's), so an expired client
certificate is one that expired in real time.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import hmac
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import jwt
import pytest
import requests
import trustme

from refresher import localidp
from refresher.localidp import ENTRA_TEST_TENANT, SHAPES, Federation, LocalIdP
from refresher.localidp_clients import JWT_BEARER
from refresher.presets import ProviderName
from testdoubles.idp import SigningKey, x5t_s256
from testdoubles.tls import ClientCert, client_cert, idp_tls, self_signed_cert
from tests.conftest import FakeClock

T0 = 1_700_000_000.0
CLIENT = "app-client"
SECRET = "a-client-secret-of-more-than-32-bytes!"  # PyJWT warns about shorter HS256 keys
FORM = "application/x-www-form-urlencoded"
AUDIENCE = "https://api.example.test"
ENTRA_SCOPE = "api://demo/.default"

K8S_ISSUER = "https://kubernetes.default.svc.cluster.local"
K8S_AUDIENCE = "api://AzureADTokenExchange"
SUBJECT = "system:serviceaccount:apps:refresher"


MakeIdP = Callable[..., LocalIdP]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def make_idp(clock: FakeClock) -> Iterator[MakeIdP]:
    started: list[LocalIdP] = []

    def make(shape: str | localidp.ProviderShape = "keycloak", **kwargs: Any) -> LocalIdP:
        kwargs.setdefault("clock", clock)
        kwargs.setdefault("clients", {CLIENT: SECRET})
        idp = LocalIdP(shape, **kwargs).start()
        started.append(idp)
        return idp

    yield make
    for idp in started:
        idp.stop()


# Key generation costs tens of milliseconds (RSA): once per module.
@pytest.fixture(scope="module")
def keys() -> dict[str, SigningKey]:
    return {
        "RS256": SigningKey.generate("RS256", kid="rsa-1"),
        "PS256": SigningKey.generate("PS256", kid="pss-1"),
        "ES256": SigningKey.generate("ES256", kid="ec-1"),
        "other": SigningKey.generate("RS256", kid="rsa-2"),
        "kubernetes": SigningKey.generate("RS256", kid="k8s-1"),
    }


def client_claims(idp: LocalIdP, *, lifetime: float = 300, **changes: Any) -> dict[str, Any]:
    """RFC 7523 claims for CLIENT, dated by the server's clock; a change to None drops it."""
    now = idp._clock()
    claims: dict[str, Any] = {
        "iss": CLIENT,
        "sub": CLIENT,
        "aud": idp.token_url,
        "iat": int(now),
        "exp": int(now + lifetime),
        "jti": uuid.uuid4().hex,
    }
    claims.update(changes)
    return {name: value for name, value in claims.items() if value is not None}


def basic_header(client_id: str, secret: str) -> str:
    """RFC 6749 2.3.1 Basic: each half form-urlencoded, then base64."""
    pair = f"{quote_plus(client_id)}:{quote_plus(secret)}"
    return "Basic " + base64.b64encode(pair.encode()).decode()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256(claims: dict[str, Any], secret: bytes, alg: str = "HS256") -> str:
    """An HMAC JWT made by hand: PyJWT refuses a PEM key as an HMAC secret, an attacker not."""
    header = b64url(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    payload = b64url(json.dumps(claims).encode())
    digest = hashlib.sha384 if alg == "HS384" else hashlib.sha256
    signature = hmac.new(secret, f"{header}.{payload}".encode(), digest).digest()
    return f"{header}.{payload}.{b64url(signature)}"


def unsigned(claims: dict[str, Any]) -> str:
    header = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{b64url(json.dumps(claims).encode())}."


def token_post(
    http: requests.Session,
    idp: LocalIdP,
    fields: dict[str, str],
    *,
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> requests.Response:
    data = {"grant_type": "client_credentials", **fields}
    if idp.shape.scope_suffix is not None:
        data.setdefault("scope", ENTRA_SCOPE)
    if idp.shape.requires_audience:
        data.setdefault("audience", AUDIENCE)
    kwargs.setdefault("timeout", 5)
    return http.post(idp.token_url, data=data, headers=headers, **kwargs)


def with_assertion(assertion: str, **fields: str) -> dict[str, str]:
    return {"client_assertion_type": JWT_BEARER, "client_assertion": assertion, **fields}


def assert_granted(response: requests.Response, idp: LocalIdP, client_id: str = CLIENT) -> None:
    assert response.status_code == 200, response.text
    token = response.json()["access_token"]
    assert idp.token_status(token) == "valid"
    assert idp.issued[-1].client_id == client_id
    (last,) = idp.authentications[-1:]
    assert last.ok and last.reason is None and last.client_id == client_id


def assert_outcome(response: requests.Response, idp: LocalIdP, refusal: str | None) -> None:
    """Granted when no refusal is expected, else refused with that description."""
    if refusal is None:
        assert_granted(response, idp)
    else:
        assert_refused(response, refusal)


def assert_refused(response: requests.Response, description: str, status: int = 401) -> None:
    assert response.status_code == status, response.text
    error = "invalid_client" if status == 401 else "invalid_request"
    assert response.json() == {"error": error, "error_description": description}


# ------------------------------------------------------------------- new shapes


@pytest.mark.parametrize(
    ("shape", "issuer_path", "token_path"),
    [
        ("entra", f"/{ENTRA_TEST_TENANT}/v2.0", f"/{ENTRA_TEST_TENANT}/oauth2/v2.0/token"),
        ("okta", "/oauth2/default", "/oauth2/default/v1/token"),
        ("keycloak", "/realms/demo", "/realms/demo/protocol/openid-connect/token"),
        ("auth0", "/", "/oauth/token"),
    ],
)
def test_enterprise_shapes_have_their_issuer_and_token_paths(
    shape: str, issuer_path: str, token_path: str, make_idp: MakeIdP, http: requests.Session
) -> None:
    idp = make_idp(shape)
    assert idp.issuer == idp.base_url + issuer_path
    assert idp.token_url == idp.base_url + token_path
    headers = {"Authorization": basic_header(CLIENT, SECRET)}
    if "client_secret_basic" not in idp.shape.auth_methods:
        headers = {}
    fields = {} if headers else {"client_id": CLIENT, "client_secret": SECRET}
    response = token_post(http, idp, fields, headers=headers)
    assert_granted(response, idp)
    token = response.json()["access_token"]
    assert jwt.decode(token, options={"verify_signature": False})["iss"] == idp.issuer


def test_seed_shapes_keep_one_secret_method_and_the_base_url_as_issuer() -> None:
    expected: dict[ProviderName, tuple[str, ...]] = {
        "generic": ("client_secret_basic",),
        "lucidworks": ("client_secret_basic",),
        "fusion": ("client_secret_basic",),
        "lucidtech": ("client_secret_basic",),
        "usage-engine": ("client_secret_post",),
    }
    assert {name: SHAPES[name].auth_methods for name in expected} == expected
    assert all(SHAPES[name].issuer_path == "" for name in expected)
    assert SHAPES["auth0"].assertion_audiences == "issuer"
    assert SHAPES["entra"].assertion_audiences == SHAPES["okta"].assertion_audiences
    with pytest.raises(ValueError, match="unknown auth methods"):
        localidp.ProviderShape(name="x", auth_methods=("client_secret_magic",))


@pytest.mark.parametrize(
    ("scope", "status"),
    [
        (ENTRA_SCOPE, 200),
        ("api://demo/.default api://other/.default", 200),
        ("api://demo/read", 400),
        ("", 400),
    ],
)
def test_entra_wants_scopes_ending_in_default(
    scope: str, status: int, make_idp: MakeIdP, http: requests.Session
) -> None:
    idp = make_idp("entra")
    response = token_post(http, idp, {"client_id": CLIENT, "client_secret": SECRET, "scope": scope})
    assert response.status_code == status
    if status == 400:
        assert response.json()["error"] == "invalid_scope"


def test_auth0_wants_its_audience(make_idp: MakeIdP, http: requests.Session) -> None:
    idp = make_idp("auth0")
    secret = {"client_id": CLIENT, "client_secret": SECRET}
    missing = http.post(
        idp.token_url, data={"grant_type": "client_credentials", **secret}, timeout=5
    )
    wrong = token_post(http, idp, {**secret, "audience": "https://elsewhere.test"})
    right = token_post(http, idp, secret)
    assert (missing.status_code, wrong.status_code, right.status_code) == (400, 403, 200)


# ------------------------------------------------------------------ private_key_jwt


@pytest.mark.parametrize("alg", ["RS256", "PS256", "ES256"])
def test_private_key_jwt_is_accepted(
    alg: str, keys: dict[str, SigningKey], make_idp: MakeIdP, http: requests.Session
) -> None:
    key = keys[alg]
    idp = make_idp("keycloak", client_keys={CLIENT: key.public_pem})
    assertion = key.sign(client_claims(idp))
    response = token_post(http, idp, with_assertion(assertion, client_id=CLIENT))

    assert_granted(response, idp)
    (record,) = idp.authentications
    assert record.method == "private_key_jwt"
    assert record.assertion_header is not None and record.assertion_header["alg"] == alg
    assert record.assertion_claims is not None and record.assertion_claims["sub"] == CLIENT
    assert record.form_keys == (
        "grant_type",
        "client_assertion_type",
        "client_assertion",
        "client_id",
    )
    assert record.client_cert_sha256 is None


def test_client_secret_jwt_is_accepted(make_idp: MakeIdP, http: requests.Session) -> None:
    idp = make_idp("okta")
    response = token_post(http, idp, with_assertion(hs256(client_claims(idp), SECRET.encode())))
    assert_granted(response, idp)
    assert idp.authentications[-1].method == "client_secret_jwt"


def test_kid_selects_a_jwks_key(
    keys: dict[str, SigningKey], make_idp: MakeIdP, http: requests.Session
) -> None:
    idp = make_idp("okta", client_keys={CLIENT: keys["RS256"].jwks(keys["ES256"])})
    good = token_post(http, idp, with_assertion(keys["ES256"].sign(client_claims(idp))))
    assert_granted(good, idp)

    unknown = SigningKey(keys["ES256"].alg, keys["ES256"].private_key, kid="not-registered")
    response = token_post(http, idp, with_assertion(unknown.sign(client_claims(idp))))
    assert_refused(response, "no registered key matches the assertion's kid")
    # A registered kid on an assertion another key signed.
    impostor = SigningKey("RS256", keys["other"].private_key, kid=keys["RS256"].kid)
    response = token_post(http, idp, with_assertion(impostor.sign(client_claims(idp))))
    assert_refused(response, "signature does not verify")


def test_x5t_s256_picks_a_registered_certificate(
    keys: dict[str, SigningKey], make_idp: MakeIdP, http: requests.Session
) -> None:
    mine, others = keys["RS256"].certificate_pem("mine"), keys["other"].certificate_pem("other")
    idp = make_idp("entra", client_keys={CLIENT: others + mine})
    claims = client_claims(idp)
    good = keys["RS256"].sign(claims, kid=None, **{"x5t#S256": x5t_s256(mine)})
    assert_granted(token_post(http, idp, with_assertion(good, client_id=CLIENT)), idp)

    wrong = keys["RS256"].sign(client_claims(idp), kid=None, **{"x5t#S256": x5t_s256(others)})
    response = token_post(http, idp, with_assertion(wrong, client_id=CLIENT))
    assert_refused(response, "signature does not verify")
    unknown = keys["RS256"].sign(client_claims(idp), kid=None, **{"x5t#S256": b64url(b"x" * 32)})
    response = token_post(http, idp, with_assertion(unknown, client_id=CLIENT))
    assert_refused(response, "no registered key matches the assertion's x5t#S256")


def test_a_rotated_client_key_replaces_the_old_one(
    keys: dict[str, SigningKey], make_idp: MakeIdP, http: requests.Session
) -> None:
    old, new = keys["RS256"], keys["other"]
    idp = make_idp("keycloak", client_keys={CLIENT: old.public_pem})
    assert_granted(token_post(http, idp, with_assertion(old.sign(client_claims(idp)))), idp)

    idp.set_client_keys(CLIENT, new.public_pem)
    response = token_post(http, idp, with_assertion(old.sign(client_claims(idp))))
    assert_refused(response, "signature does not verify")
    assert_granted(token_post(http, idp, with_assertion(new.sign(client_claims(idp)))), idp)

    idp.set_client_keys(CLIENT, None)
    response = token_post(http, idp, with_assertion(new.sign(client_claims(idp))))
    assert_refused(response, "no keys are registered for this client")


# ------------------------------------------------------- each provider's strictness


def signed_as(key: SigningKey, alg: str, claims: dict[str, Any], **headers: Any) -> str:
    """A JWT signed with ``key``'s private key under any ``alg`` PyJWT knows (RS384...)."""
    header = {name: value for name, value in {"kid": key.kid, **headers}.items() if value}
    return jwt.encode(claims, key.private_key, algorithm=alg, headers=header)


@pytest.fixture(scope="module")
def p384() -> SigningKey:
    from cryptography.hazmat.primitives.asymmetric import ec

    return SigningKey("ES256", ec.generate_private_key(ec.SECP384R1()), kid="ec-384")


def jwk_of(key: SigningKey, alg: str | None) -> dict[str, Any]:
    """``key``'s JWK with its own ``alg`` (``None``: without one)."""
    jwk = {name: value for name, value in key.jwk().items() if name != "alg"}
    return jwk if alg is None else {**jwk, "alg": alg}


@pytest.mark.parametrize(
    ("registered", "own_alg", "signer", "alg", "refusal"),
    [
        ("RS256", "RS256", "RS256", "RS256", None),
        ("RS256", "RS256", "RS256", "PS256", "alg does not match the registered key's"),
        ("RS256", "PS256", "RS256", "PS256", None),
        ("RS256", "PS256", "RS256", "RS256", "alg does not match the registered key's"),
        ("ES256", "ES256", "ES256", "ES256", None),
        # Without its own alg an RSA key takes RS256 and PS256, an EC P-256 key ES256 only.
        ("RS256", None, "RS256", "RS256", None),
        ("RS256", None, "RS256", "PS256", None),
        ("ES256", None, "ES256", "ES256", None),
        ("ES256", None, "RS256", "RS256", "no registered key fits the assertion's alg"),
        ("RS256", None, "ES256", "ES256", "no registered key fits the assertion's alg"),
    ],
)
def test_a_jwks_keys_own_alg_is_enforced(
    registered: str,
    own_alg: str | None,
    signer: str,
    alg: str,
    refusal: str | None,
    keys: dict[str, SigningKey],
    make_idp: MakeIdP,
    http: requests.Session,
) -> None:
    key = keys[registered]
    idp = make_idp("keycloak", client_keys={CLIENT: {"keys": [jwk_of(key, own_alg)]}})
    # Signed by `signer`, under the registered key's kid.
    assertion = signed_as(keys[signer], alg, client_claims(idp), kid=key.kid)
    response = token_post(http, idp, with_assertion(assertion))
    assert_outcome(response, idp, refusal)


def test_a_jwks_alg_picks_among_keys_without_a_kid(
    keys: dict[str, SigningKey], make_idp: MakeIdP, http: requests.Session
) -> None:
    # Two registrations of one RSA key, for RS256 and for PS256: each takes its own alg only.
    key = keys["RS256"]
    jwks = {"keys": [jwk_of(key, "PS256") | {"kid": "a"}, jwk_of(key, "RS256") | {"kid": "b"}]}
    idp = make_idp("okta", client_keys={CLIENT: jwks}, auth_methods=("private_key_jwt",))
    assertion = signed_as(key, "RS256", client_claims(idp), kid=None)
    assert_granted(token_post(http, idp, with_assertion(assertion)), idp)
    assertion = signed_as(key, "RS384", client_claims(idp), kid=None)
    assert_refused(
        token_post(http, idp, with_assertion(assertion)), "alg does not match the registered key's"
    )


@pytest.mark.parametrize(
    ("shape", "alg", "accepted"),
    [
        ("entra", "RS256", True),
        ("entra", "PS256", True),
        ("entra", "RS384", False),
        ("entra", "ES256", False),
        ("auth0", "RS256", True),
        ("auth0", "RS384", True),
        ("auth0", "PS256", True),
        ("auth0", "RS512", False),
        ("auth0", "ES256", False),
        ("okta", "RS256", True),
        ("okta", "RS512", True),
        ("okta", "ES256", True),
        ("okta", "ES384", True),
        ("okta", "PS256", False),
        ("keycloak", "RS256", True),
        ("keycloak", "PS256", True),
        ("keycloak", "ES256", True),
        ("keycloak", "RS384", False),
        ("generic", "PS256", True),
    ],
)
def test_each_shape_takes_its_own_assertion_algorithms(
    shape: str,
    alg: str,
    accepted: bool,
    keys: dict[str, SigningKey],
    p384: SigningKey,
    make_idp: MakeIdP,
    http: requests.Session,
) -> None:
    key = {"ES256": keys["ES256"], "ES384": p384}.get(alg, keys["RS256"])
    idp = make_idp(shape, auth_methods=None if shape != "generic" else ("private_key_jwt",))
    headers: dict[str, Any] = {}
    if idp.shape.requires_thumbprint:
        certificate = key.certificate_pem()
        headers = {"kid": None, "x5t#S256": x5t_s256(certificate)}
        idp.set_client_keys(CLIENT, certificate)
    else:
        idp.set_client_keys(CLIENT, key.public_pem)
    assertion = signed_as(key, alg, client_claims(idp, aud=_own_audience(idp)), **headers)
    response = token_post(http, idp, with_assertion(assertion, client_id=CLIENT))
    if accepted:
        assert_granted(response, idp)
        return
    allowed = ", ".join(a for a in idp.shape.assertion_algs if not a.startswith("HS"))
    assert_refused(response, f"alg is not one of {allowed} for private_key_jwt")
    listed = idp.discovery_document()["token_endpoint_auth_signing_alg_values_supported"]
    assert isinstance(listed, list) and alg not in listed


def _own_audience(idp: LocalIdP) -> str:
    return idp.issuer if idp.shape.assertion_audiences == "issuer" else idp.token_url


@pytest.mark.parametrize(
    ("shape", "alg", "accepted"),
    [
        ("okta", "HS256", True),
        ("okta", "HS384", True),
        ("okta", "HS512", True),
        ("keycloak", "HS256", True),
        ("keycloak", "HS512", False),
    ],
)
def test_client_secret_jwt_takes_the_shapes_hmac_algorithms(
    shape: str, alg: str, accepted: bool, make_idp: MakeIdP, http: requests.Session
) -> None:
    idp = make_idp(shape)
    header = b64url(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    payload = b64url(json.dumps(client_claims(idp)).encode())
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    signature = hmac.new(SECRET.encode(), f"{header}.{payload}".encode(), digest).digest()
    response = token_post(http, idp, with_assertion(f"{header}.{payload}.{b64url(signature)}"))
    if accepted:
        assert_granted(response, idp)
        assert idp.authentications[-1].method == "client_secret_jwt"
    else:
        assert_refused(response, "alg is not one of HS256 for client_secret_jwt")


@pytest.mark.parametrize(
    ("shape", "algs"),
    [
        ("entra", ["RS256", "PS256"]),
        ("auth0", ["RS256", "RS384", "PS256"]),
        (
            "okta",
            ["RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "HS256", "HS384", "HS512"],
        ),
        ("keycloak", ["RS256", "PS256", "ES256", "HS256"]),
    ],
)
def test_discovery_lists_the_shapes_assertion_algorithms(
    shape: str, algs: list[str], make_idp: MakeIdP, http: requests.Session
) -> None:
    idp = make_idp(shape)
    document = http.get(idp.openid_configuration_url, timeout=5).json()
    assert document["token_endpoint_auth_signing_alg_values_supported"] == algs
    # Only the algorithms of the methods accepted.
    keys_only = make_idp(shape, auth_methods=("private_key_jwt",)).discovery_document()
    assert keys_only["token_endpoint_auth_signing_alg_values_supported"] == [
        alg for alg in algs if not alg.startswith("HS")
    ]
    secret_only = make_idp(shape, auth_methods=("client_secret_jwt",)).discovery_document()
    hmac_algs = [alg for alg in algs if alg.startswith("HS")]
    if hmac_algs:
        assert secret_only["token_endpoint_auth_signing_alg_values_supported"] == hmac_algs
    else:
        assert "token_endpoint_auth_signing_alg_values_supported" not in secret_only


def test_entra_wants_a_certificate_thumbprint(
    keys: dict[str, SigningKey], make_idp: MakeIdP, http: requests.Session
) -> None:
    key = keys["RS256"]
    certificate = key.certificate_pem("entra-credential")
    idp = make_idp("entra", client_keys={CLIENT: certificate})

    def post(assertion: str) -> requests.Response:
        return token_post(http, idp, with_assertion(assertion, client_id=CLIENT))

    assert_refused(post(key.sign(client_claims(idp))), "x5t#S256 or x5t is required")
    assert_refused(post(key.sign(client_claims(idp), kid=None)), "x5t#S256 or x5t is required")
    # Either thumbprint will do: x5t#S256, or the legacy SHA-1 x5t.
    sha1 = b64url(hashlib.sha1(ssl_der(certificate)).digest())
    assert_granted(post(key.sign(client_claims(idp), kid=None, x5t=sha1)), idp)
    thumbprint = {"x5t#S256": x5t_s256(certificate)}
    assert_granted(post(key.sign(client_claims(idp), kid=None, **thumbprint)), idp)
    assert_refused(
        post(key.sign(client_claims(idp), kid=None, x5t=b64url(b"y" * 20))),
        "no registered key matches the assertion's x5t",
    )

    # The registered key must be a certificate: a bare public key, or a JWK without one, is
    # no Entra credential whatever the header says.
    for bare in (key.public_pem, key.jwks()):
        idp.set_client_keys(CLIENT, bare)
        assert_refused(
            post(key.sign(client_claims(idp), kid=None, **thumbprint)),
            "no certificate is registered for this client",
        )
    # A JWK carrying its certificate (x5c) is one.
    der = base64.b64encode(ssl_der(certificate)).decode()
    idp.set_client_keys(CLIENT, {"keys": [{**key.jwk(), "x5c": [der]}]})
    assert_granted(post(key.sign(client_claims(idp), kid=None, **thumbprint)), idp)
    # Other shapes do without a thumbprint.
    assert not SHAPES["okta"].requires_thumbprint and not SHAPES["keycloak"].requires_thumbprint


def ssl_der(certificate_pem: str) -> bytes:
    import ssl

    return ssl.PEM_cert_to_DER_cert(certificate_pem)


def test_a_federated_token_needs_no_thumbprint_at_entra(
    federated: LocalIdP, keys: dict[str, SigningKey], http: requests.Session
) -> None:
    assert federated.shape.requires_thumbprint
    response = token_post(http, federated, with_assertion(sa_token(keys), client_id=CLIENT))
    assert_granted(response, federated)


@pytest.mark.parametrize(
    ("shape", "lifetime", "override", "refusal"),
    [
        ("auth0", 300, None, None),
        ("auth0", 301, None, "assertion lifetime exceeds 300 s"),
        ("auth0", 600, 600.0, None),
        ("okta", 600, None, None),
        ("okta", 601, None, "assertion lifetime exceeds 600 s"),
        ("keycloak", 120, 60.0, "assertion lifetime exceeds 60 s"),
    ],
)
def test_the_lifetime_cap_is_the_shapes_unless_overridden(
    shape: str,
    lifetime: int,
    override: float | None,
    refusal: str | None,
    keys: dict[str, SigningKey],
    make_idp: MakeIdP,
    http: requests.Session,
) -> None:
    idp = make_idp(
        shape, client_keys={CLIENT: keys["RS256"].public_pem}, max_assertion_lifetime=override
    )
    claims = client_claims(idp, lifetime=lifetime, aud=_own_audience(idp))
    response = token_post(http, idp, with_assertion(keys["RS256"].sign(claims)))
    assert_outcome(response, idp, refusal)


@pytest.mark.parametrize(("ahead", "accepted"), [(10, True), (11, False)])
def test_the_clock_skew_is_the_shapes(
    ahead: int,
    accepted: bool,
    keys: dict[str, SigningKey],
    make_idp: MakeIdP,
    http: requests.Session,
) -> None:
    assert {shape.clock_skew for shape in SHAPES.values()} == {60.0}
    strict = dataclasses.replace(SHAPES["keycloak"], name="strict", clock_skew=10.0)
    idp = make_idp(strict, client_keys={CLIENT: keys["RS256"].public_pem})
    claims = client_claims(idp, iat=int(T0) + ahead, exp=int(T0) + 300)
    response = token_post(http, idp, with_assertion(keys["RS256"].sign(claims)))
    if accepted:
        assert_granted(response, idp)
    else:
        assert_refused(response, "iat is in the future")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"assertion_algs": ("RS256", "EdDSA")}, "unsupported assertion algorithms"),
        ({"assertion_algs": ("none",)}, "unsupported assertion algorithms"),
        ({"max_assertion_lifetime": 0.0}, "max_assertion_lifetime must be positive"),
        ({"clock_skew": -1.0}, "clock_skew must not be negative"),
    ],
)
def test_a_shape_with_impossible_assertion_rules_is_refused(
    changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(SHAPES["generic"], **changes)
    if "max_assertion_lifetime" in changes:
        with pytest.raises(ValueError, match=message):
            LocalIdP("generic", max_assertion_lifetime=changes["max_assertion_lifetime"])


Case = Callable[[LocalIdP, dict[str, SigningKey]], dict[str, str]]


def _signed(**changes: Any) -> Case:
    return lambda idp, keys: with_assertion(keys["RS256"].sign(client_claims(idp, **changes)))


def _lived(lifetime: float) -> Case:
    return lambda idp, keys: with_assertion(
        keys["RS256"].sign(client_claims(idp, lifetime=lifetime))
    )


REJECTIONS: dict[str, tuple[Case, str]] = {
    "wrong-key": (
        lambda idp, keys: with_assertion(keys["other"].sign(client_claims(idp))),
        "signature does not verify",
    ),
    "bad-signature": (
        lambda idp, keys: with_assertion(_tampered(keys["RS256"].sign(client_claims(idp)))),
        "signature does not verify",
    ),
    "alg-none": (
        lambda idp, keys: with_assertion(unsigned(client_claims(idp))),
        "alg none is never accepted",
    ),
    # Alg confusion: HS256 with the public key as the HMAC secret. It is judged as
    # client_secret_jwt, against the client's secret (it has none), never against its key.
    "hs256-with-the-public-key": (
        lambda idp, keys: with_assertion(
            hs256(
                client_claims(idp, iss="keys-only", sub="keys-only"),
                keys["RS256"].public_pem.encode(),
            )
        ),
        "no client secret is registered for this client",
    ),
    "hs256-with-the-public-key-of-a-client-with-a-secret": (
        lambda idp, keys: with_assertion(
            hs256(client_claims(idp), keys["RS256"].public_pem.encode())
        ),
        "signature does not verify",
    ),
    "hs384": (
        lambda idp, keys: with_assertion(hs256(client_claims(idp), SECRET.encode(), "HS384")),
        "alg is not one of HS256 for client_secret_jwt",
    ),
    "wrong-iss": (_signed(iss="someone-else"), "iss and sub must both be the client id"),
    "wrong-sub": (_signed(sub="someone-else"), "iss and sub must both be the client id"),
    "no-iss": (_signed(iss=None), "iss is missing"),
    "client-id-mismatch": (
        lambda idp, keys: with_assertion(
            keys["RS256"].sign(client_claims(idp)), client_id="someone-else"
        ),
        "client_id does not match the assertion's iss",
    ),
    "no-aud": (_signed(aud=None), "aud is missing"),
    "wrong-aud": (_signed(aud="https://elsewhere.test/token"), "aud does not name this server"),
    "aud-list-of-several": (
        lambda idp, keys: with_assertion(
            keys["RS256"].sign(client_claims(idp, aud=[idp.token_url, "https://b.test"]))
        ),
        "aud lists more than one audience",
    ),
    # Keycloak (26.2+) wants one string, not even a list of one.
    "aud-list-of-one": (
        lambda idp, keys: with_assertion(
            keys["RS256"].sign(client_claims(idp, aud=[idp.token_url]))
        ),
        "aud must be a single string, not a list",
    ),
    "expired": (_signed(exp=int(T0) - 1), "client assertion expired"),
    "expires-now": (_signed(exp=int(T0)), "client assertion expired"),
    "no-exp": (_signed(exp=None), "exp is missing"),
    "exp-not-a-number": (_signed(exp="soon"), "exp is not a number"),
    "no-iat": (_signed(iat=None), "iat is missing"),
    "iat-in-the-future": (_signed(iat=int(T0) + 61, exp=int(T0) + 300), "iat is in the future"),
    "nbf-in-the-future": (_signed(nbf=int(T0) + 61), "client assertion is not valid yet (nbf)"),
    "lifetime-over-the-limit": (_lived(601), "assertion lifetime exceeds 600 s"),
    "no-jti": (_signed(jti=None), "jti is missing"),
    "not-a-jwt": (lambda idp, keys: with_assertion("not.a.jwt"), "client assertion is not a JWT"),
    "wrong-assertion-type": (
        lambda idp, keys: {
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:saml2-bearer",
            "client_assertion": keys["RS256"].sign(client_claims(idp)),
        },
        f"client_assertion_type must be {JWT_BEARER}",
    ),
    "no-assertion": (
        lambda idp, keys: {"client_assertion_type": JWT_BEARER},
        "client_assertion is missing",
    ),
    "no-registered-keys": (
        lambda idp, keys: with_assertion(
            keys["RS256"].sign(client_claims(idp, iss="unknown", sub="unknown"))
        ),
        "no keys are registered for this client",
    ),
    "key-of-the-wrong-type": (
        lambda idp, keys: with_assertion(keys["ES256"].sign(client_claims(idp), kid=None)),
        "no registered key fits the assertion's alg",
    ),
}


def _tampered(token: str) -> str:
    head, payload, signature = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
    raw[10] ^= 0xFF
    return f"{head}.{payload}.{b64url(bytes(raw))}"


@pytest.mark.parametrize("case", sorted(REJECTIONS))
def test_a_bad_assertion_is_refused_with_its_reason(
    case: str, keys: dict[str, SigningKey], make_idp: MakeIdP, http: requests.Session
) -> None:
    build, description = REJECTIONS[case]
    idp = make_idp(
        "keycloak",
        client_keys={CLIENT: keys["RS256"].public_pem, "keys-only": keys["RS256"].public_pem},
    )
    response = token_post(http, idp, build(idp, keys))

    assert_refused(response, description)
    assert idp.issued == []
    (record,) = idp.authentications
    assert (record.ok, record.reason) == (False, description)
    assert "WWW-Authenticate" not in response.headers


def test_iat_and_nbf_may_be_a_little_ahead(
    keys: dict[str, SigningKey], make_idp: MakeIdP, http: requests.Session
) -> None:
    idp = make_idp("keycloak", client_keys={CLIENT: keys["RS256"].public_pem})
    ahead = client_claims(idp, iat=int(T0) + 59, nbf=int(T0) + 59)
    assert_granted(token_post(http, idp, with_assertion(keys["RS256"].sign(ahead))), idp)


def test_the_lifetime_cap_is_configurable(
    keys: dict[str, SigningKey], make_idp: MakeIdP, http: requests.Session
) -> None:
    idp = make_idp(
        "keycloak", client_keys={CLIENT: keys["RS256"].public_pem}, max_assertion_lifetime=60
    )
    long = keys["RS256"].sign(client_claims(idp, lifetime=61))
    assert_refused(token_post(http, idp, with_assertion(long)), "assertion lifetime exceeds 60 s")
    short = keys["RS256"].sign(client_claims(idp, lifetime=60))
    assert_granted(token_post(http, idp, with_assertion(short)), idp)


def test_a_jti_is_accepted_once_per_client(
    keys: dict[str, SigningKey], clock: FakeClock, make_idp: MakeIdP, http: requests.Session
) -> None:
    key = keys["RS256"]
    idp = make_idp("keycloak", client_keys={CLIENT: key.public_pem, "b": key.public_pem})
    first = key.sign(client_claims(idp, jti="j-1"))
    assert_granted(token_post(http, idp, with_assertion(first)), idp)
    assert_refused(token_post(http, idp, with_assertion(first)), "jti already used")
    # A new assertion with the same jti is a replay too, while the first could be valid...
    clock.now += 100
    again = key.sign(client_claims(idp, jti="j-1"))
    assert_refused(token_post(http, idp, with_assertion(again)), "jti already used")
    # ...but the jti is the client's own: another client may use it.
    other = key.sign(client_claims(idp, iss="b", sub="b", jti="j-1"))
    assert_granted(token_post(http, idp, with_assertion(other)), idp, client_id="b")
    # A refused assertion does not use up its jti.
    late = key.sign(client_claims(idp, jti="j-2", aud="https://elsewhere.test"))
    assert_refused(token_post(http, idp, with_assertion(late)), "aud does not name this server")
    assert_granted(
        token_post(http, idp, with_assertion(key.sign(client_claims(idp, jti="j-2")))), idp
    )


def test_the_replay_memory_is_bounded() -> None:
    from refresher.localidp_clients import ReplayCache

    cache = ReplayCache(capacity=3)
    assert all(cache.claim("c", f"j{n}", T0 + 10 + n, T0) for n in range(5))
    assert len(cache) == 3
    assert not cache.claim("c", "j4", T0 + 20, T0)  # the latest are still remembered
    assert cache.claim("c", "j0", T0 + 20, T0)  # the soonest to expire were forgotten
    assert cache.claim("c", "j9", T0 + 99, T0 + 50) and len(cache) == 1  # expired ones go


def registered_and_signed(
    idp: LocalIdP, key: SigningKey, claims: dict[str, Any]
) -> tuple[str, dict[str, str]]:
    """What to register for ``key`` and how to sign with it, as the shape wants: Entra a
    certificate named by ``x5t#S256``, the others the public key."""
    if not idp.shape.requires_thumbprint:
        return key.public_pem, with_assertion(key.sign(claims), client_id=CLIENT)
    certificate = key.certificate_pem()
    assertion = key.sign(claims, kid=None, **{"x5t#S256": x5t_s256(certificate)})
    return certificate, with_assertion(assertion, client_id=CLIENT)


@pytest.mark.parametrize(
    ("shape", "aud", "refusal"),
    [
        ("okta", "token_url", None),
        ("okta", "issuer", "aud does not name this server"),
        ("okta", "[token_url]", None),
        ("okta", "[token_url, issuer]", "aud lists more than one audience"),
        ("entra", "token_url", None),
        ("entra", "issuer", "aud does not name this server"),
        ("entra", "[token_url]", None),
        ("auth0", "issuer", None),
        ("auth0", "token_url", "aud does not name this server"),
        ("auth0", "[issuer]", None),
        ("auth0", "[issuer, elsewhere]", "aud lists more than one audience"),
        ("keycloak", "issuer", None),
        ("keycloak", "token_url", None),
        ("keycloak", "[issuer]", "aud must be a single string, not a list"),
        ("keycloak", "[elsewhere, issuer]", "aud lists more than one audience"),
        ("generic", "[token_url]", None),
        ("generic", "[elsewhere]", "aud does not name this server"),
    ],
)
def test_the_assertion_audience_is_the_shapes(
    shape: str,
    aud: str,
    refusal: str | None,
    keys: dict[str, SigningKey],
    make_idp: MakeIdP,
    http: requests.Session,
) -> None:
    idp = make_idp(shape, auth_methods=None if shape != "generic" else ("private_key_jwt",))
    names = {"issuer": idp.issuer, "token_url": idp.token_url, "elsewhere": "https://else.test"}
    audience: object
    if aud.startswith("["):
        audience = [names[name.strip()] for name in aud.strip("[]").split(",")]
    else:
        audience = names[aud]
    registered, fields = registered_and_signed(idp, keys["RS256"], client_claims(idp, aud=audience))
    idp.set_client_keys(CLIENT, registered)
    response = token_post(http, idp, fields)
    assert_outcome(response, idp, refusal)


def test_the_mtls_alias_is_no_assertion_audience(
    keys: dict[str, SigningKey], make_idp: MakeIdP, http: requests.Session
) -> None:
    alias = "https://mtls.example.test/realms/demo/protocol/openid-connect/token"
    idp = make_idp(
        "keycloak", client_keys={CLIENT: keys["RS256"].public_pem}, mtls_endpoint_alias=alias
    )
    assertion = keys["RS256"].sign(client_claims(idp, aud=alias))
    assert_refused(
        token_post(http, idp, with_assertion(assertion)), "aud does not name this server"
    )
    assertion = keys["RS256"].sign(client_claims(idp))
    assert_granted(token_post(http, idp, with_assertion(assertion)), idp)


def test_the_audience_rule_can_be_overridden(
    keys: dict[str, SigningKey], make_idp: MakeIdP, http: requests.Session
) -> None:
    idp = make_idp(
        "okta", client_keys={CLIENT: keys["RS256"].public_pem}, assertion_audiences="issuer"
    )
    assertion = keys["RS256"].sign(client_claims(idp, aud=idp.issuer))
    assert_granted(token_post(http, idp, with_assertion(assertion)), idp)


def test_one_method_per_request(
    keys: dict[str, SigningKey], make_idp: MakeIdP, http: requests.Session
) -> None:
    idp = make_idp("keycloak", client_keys={CLIENT: keys["RS256"].public_pem})
    basic = {"Authorization": basic_header(CLIENT, SECRET)}
    both = [
        token_post(
            http, idp, with_assertion(keys["RS256"].sign(client_claims(idp))), headers=basic
        ),
        token_post(
            http,
            idp,
            with_assertion(keys["RS256"].sign(client_claims(idp)), client_secret=SECRET),
        ),
        token_post(http, idp, {"client_id": CLIENT, "client_secret": SECRET}, headers=basic),
    ]
    for response in both:
        assert_refused(response, "Use one client authentication method, not several", 400)
    assert [r.method for r in idp.authentications] == [
        "client_secret_basic+client_assertion",
        "client_secret_post+client_assertion",
        "client_secret_basic+client_secret_post",
    ]


def test_a_method_the_server_does_not_list_is_refused(
    keys: dict[str, SigningKey], make_idp: MakeIdP, http: requests.Session
) -> None:
    idp = make_idp(
        "keycloak",
        client_keys={CLIENT: keys["RS256"].public_pem},
        auth_methods=("client_secret_basic",),
    )
    assertion = with_assertion(keys["RS256"].sign(client_claims(idp)))
    assert_refused(
        token_post(http, idp, assertion), "private_key_jwt is not accepted by this token endpoint"
    )
    secret_jwt = with_assertion(hs256(client_claims(idp), SECRET.encode()))
    assert_refused(
        token_post(http, idp, secret_jwt),
        "client_secret_jwt is not accepted by this token endpoint",
    )
    # A secret sent the wrong way keeps the server's vague answer (and its Basic challenge);
    # the record says why.
    post = token_post(http, idp, {"client_id": CLIENT, "client_secret": SECRET})
    assert_refused(post, "Client authentication failed")
    assert post.headers["WWW-Authenticate"].startswith("Basic ")
    record = idp.authentications[-1]
    assert (record.method, record.reason) == (
        "client_secret_post",
        "client_secret_post is not accepted by this token endpoint",
    )
    assert idp.discovery_document()["token_endpoint_auth_methods_supported"] == [
        "client_secret_basic"
    ]


def test_wrong_secrets_are_recorded_with_their_reason(
    make_idp: MakeIdP, http: requests.Session
) -> None:
    idp = make_idp("okta")
    token_post(http, idp, {"client_id": CLIENT, "client_secret": "wrong"})
    token_post(http, idp, {"client_id": "nobody", "client_secret": SECRET})
    token_post(http, idp, {"client_id": CLIENT})
    assert [(r.method, r.client_id, r.reason) for r in idp.authentications] == [
        ("client_secret_post", CLIENT, "wrong client secret"),
        ("client_secret_post", "nobody", "unknown client"),
        ("none", None, "no client credentials"),
    ]


# --------------------------------------------------------------------- federation


@pytest.fixture
def federated(keys: dict[str, SigningKey], make_idp: MakeIdP) -> LocalIdP:
    """Entra, trusting the cluster's service-account tokens for SUBJECT -> CLIENT."""
    federation = Federation(
        issuer=K8S_ISSUER,
        audience=K8S_AUDIENCE,
        keys=keys["kubernetes"].jwks(),
        subjects={SUBJECT: CLIENT, "system:serviceaccount:apps:other": "other-client"},
    )
    return make_idp("entra", federation=federation)


def sa_token(keys: dict[str, SigningKey], *, key: str = "kubernetes", **changes: Any) -> str:
    """A projected service-account token as the kubelet writes it: an hour, aud a list."""
    claims: dict[str, Any] = {
        "iss": K8S_ISSUER,
        "sub": SUBJECT,
        "aud": [K8S_AUDIENCE],
        "iat": int(T0) - 600,
        "nbf": int(T0) - 600,
        "exp": int(T0) + 3000,
        "kubernetes.io": {"namespace": "apps", "serviceaccount": {"name": "refresher"}},
    }
    claims.update(changes)
    signer = keys[key]
    if key != "kubernetes":  # another key, under the cluster's kid
        signer = SigningKey(signer.alg, signer.private_key, kid=keys["kubernetes"].kid)
    return signer.sign({name: value for name, value in claims.items() if value is not None})


def test_a_federated_token_is_accepted_and_may_be_reused(
    federated: LocalIdP, keys: dict[str, SigningKey], http: requests.Session
) -> None:
    token = sa_token(keys)
    for _ in range(2):
        assert_granted(
            token_post(http, federated, with_assertion(token, client_id=CLIENT)), federated
        )
    record = federated.authentications[-1]
    assert record.method == "federated_jwt"
    assert record.assertion_claims is not None and record.assertion_claims["sub"] == SUBJECT


@pytest.mark.parametrize(
    ("changes", "client_id", "description"),
    [
        ({"iss": "https://other-cluster.test"}, CLIENT, "iss is not the federation's issuer"),
        ({"aud": ["api://something-else"]}, CLIENT, "aud is not the federation's audience"),
        ({"aud": None}, CLIENT, "aud is missing"),
        ({"sub": "system:serviceaccount:apps:stranger"}, CLIENT, "sub is not a trusted subject"),
        ({}, "other-client", "sub stands for another client"),
        ({}, None, "client_id is required with a federated assertion"),
        ({"exp": int(T0)}, CLIENT, "client assertion expired"),
        ({"nbf": int(T0) + 61}, CLIENT, "client assertion is not valid yet (nbf)"),
        ({"key": "other"}, CLIENT, "signature does not verify"),
    ],
    ids=[
        "wrong-issuer",
        "wrong-audience",
        "no-audience",
        "unknown-subject",
        "another-clients-subject",
        "no-client-id",
        "expired",
        "not-yet-valid",
        "another-key",
    ],
)
def test_a_bad_federated_token_is_refused(
    changes: dict[str, Any],
    client_id: str | None,
    description: str,
    federated: LocalIdP,
    keys: dict[str, SigningKey],
    http: requests.Session,
) -> None:
    key = changes.pop("key", "kubernetes")
    fields = with_assertion(sa_token(keys, key=key, **changes))
    if client_id is not None:
        fields["client_id"] = client_id
    assert_refused(token_post(http, federated, fields), description)
    assert federated.authentications[-1].method == "federated_jwt"


def test_federation_needs_private_key_jwt_accepted(
    keys: dict[str, SigningKey], make_idp: MakeIdP, http: requests.Session
) -> None:
    federation = Federation(
        K8S_ISSUER, K8S_AUDIENCE, keys["kubernetes"].public_pem, {SUBJECT: CLIENT}
    )
    idp = make_idp("okta", federation=federation, auth_methods=("client_secret_basic",))
    response = token_post(http, idp, with_assertion(sa_token(keys), client_id=CLIENT))
    assert_refused(response, "private_key_jwt is not accepted by this token endpoint")


# ---------------------------------------------------------------------------- mTLS


@pytest.fixture(scope="module")
def server_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def client_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pki")


@pytest.fixture(scope="module")
def alice(client_ca: trustme.CA, pki_dir: Path) -> ClientCert:
    return client_cert(client_ca, pki_dir, "alice")


def tls_post(
    http: requests.Session,
    idp: LocalIdP,
    cert: ClientCert | None,
    client_id: str = CLIENT,
) -> requests.Response:
    return token_post(
        http,
        idp,
        {"client_id": client_id},
        verify=idp.ca_bundle,
        cert=None if cert is None else cert.requests_cert,
    )


def test_an_https_server_serves_everything_over_tls(
    server_ca: trustme.CA, pki_dir: Path, make_idp: MakeIdP, http: requests.Session
) -> None:
    idp = make_idp("okta", tls=idp_tls(server_ca, pki_dir))
    assert idp.base_url.startswith("https://127.0.0.1:") and idp.issuer.startswith("https://")
    secret = {"client_id": CLIENT, "client_secret": SECRET}
    response = token_post(http, idp, secret, verify=idp.ca_bundle)
    assert_granted(response, idp)
    token = response.json()["access_token"]
    api = http.get(
        idp.protected_url, headers={"Authorization": f"Bearer {token}"}, verify=idp.ca_bundle
    )
    assert api.status_code == 200
    with pytest.raises(requests.exceptions.SSLError):
        token_post(http, idp, secret)  # the system's trust store does not know the CA


def test_tls_client_auth_matches_the_subject_dn(
    server_ca: trustme.CA,
    client_ca: trustme.CA,
    pki_dir: Path,
    alice: ClientCert,
    make_idp: MakeIdP,
    http: requests.Session,
) -> None:
    bob = client_cert(client_ca, pki_dir, "bob")
    tls = idp_tls(server_ca, pki_dir, client_ca=client_ca, tls_clients={CLIENT: alice.subject_dn})
    idp = make_idp("keycloak", tls=tls)

    assert_granted(tls_post(http, idp, alice), idp)
    record = idp.authentications[-1]
    assert (record.method, record.client_cert_sha256) == ("tls_client_auth", alice.sha256)
    assert_refused(tls_post(http, idp, bob), "certificate subject does not match this client")
    assert_refused(tls_post(http, idp, None), "no client certificate was presented")
    assert_refused(
        tls_post(http, idp, alice, client_id="unregistered"),
        "client is not registered for tls_client_auth",
    )

    # cert-manager renews: a new certificate, the same subject.
    renewed = client_cert(client_ca, pki_dir, "alice", organization=None)
    assert renewed.sha256 != alice.sha256
    idp.set_tls_client(CLIENT, renewed.subject_dn)
    assert_granted(tls_post(http, idp, renewed), idp)
    assert idp.authentications[-1].client_cert_sha256 == renewed.sha256


def test_a_required_client_certificate_is_checked_in_the_handshake(
    server_ca: trustme.CA,
    client_ca: trustme.CA,
    pki_dir: Path,
    alice: ClientCert,
    make_idp: MakeIdP,
    http: requests.Session,
    capfd: pytest.CaptureFixture[str],
) -> None:
    tls = idp_tls(
        server_ca,
        pki_dir,
        client_ca=client_ca,
        require_client_cert=True,
        tls_clients={CLIENT: alice.subject_dn},
    )
    idp = make_idp("keycloak", tls=tls)
    stranger = client_cert(trustme.CA(), pki_dir, "alice")  # the right name, another CA
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    expired = client_cert(
        client_ca, pki_dir, "alice", not_before=past - datetime.timedelta(days=30), not_after=past
    )
    for refused in (None, stranger, expired):
        with pytest.raises(requests.exceptions.ConnectionError):
            tls_post(http, idp, refused)
    assert idp.token_requests == 0  # refused before any request was read

    assert_granted(tls_post(http, idp, alice), idp)
    idp.stop()
    assert capfd.readouterr() == ("", "")  # a refused handshake is no traceback


def test_self_signed_tls_client_auth_matches_the_registered_certificate(
    server_ca: trustme.CA, pki_dir: Path, make_idp: MakeIdP, http: requests.Session
) -> None:
    old, new, others = (self_signed_cert(pki_dir, name) for name in ("svc", "svc", "other"))
    tls = idp_tls(
        server_ca,
        pki_dir,
        self_signed_clients={CLIENT: old.cert_pem, "other-client": others.cert_pem},
    )
    idp = make_idp("auth0", tls=tls)

    assert_granted(tls_post(http, idp, old), idp)
    assert idp.authentications[-1].method == "self_signed_tls_client_auth"
    assert_refused(tls_post(http, idp, others), "certificate is not registered for this client")
    with pytest.raises(requests.exceptions.ConnectionError):
        tls_post(http, idp, new)  # not registered yet: the handshake does not trust it

    # Rotation: both registered while clients move over, then only the new one.
    idp.set_self_signed_client(CLIENT, old.cert_pem + new.cert_pem)
    assert_granted(tls_post(http, idp, new), idp)
    assert_granted(tls_post(http, idp, old), idp)
    idp.set_self_signed_client(CLIENT, new.cert_pem)
    with pytest.raises(requests.exceptions.ConnectionError):
        tls_post(http, idp, old)
    assert_granted(tls_post(http, idp, new), idp)


def test_tls_client_auth_wants_a_certificate_from_the_client_ca(
    server_ca: trustme.CA,
    client_ca: trustme.CA,
    pki_dir: Path,
    make_idp: MakeIdP,
    http: requests.Session,
) -> None:
    # A self-signed certificate the handshake trusts (registered for another client), whose
    # subject is the one tls_client_auth expects for CLIENT.
    forged = self_signed_cert(pki_dir, "svc")
    tls = idp_tls(
        server_ca,
        pki_dir,
        client_ca=client_ca,
        tls_clients={CLIENT: forged.subject_dn},
        self_signed_clients={"other-client": forged.cert_pem},
    )
    idp = make_idp("keycloak", tls=tls)
    assert_refused(tls_post(http, idp, forged), "certificate is not issued by the client CA")


def test_a_self_signed_client_is_refused_where_that_method_is_not_listed(
    server_ca: trustme.CA, pki_dir: Path, make_idp: MakeIdP, http: requests.Session
) -> None:
    cert = self_signed_cert(pki_dir, "svc")
    idp = make_idp(
        "keycloak", tls=idp_tls(server_ca, pki_dir, self_signed_clients={CLIENT: cert.cert_pem})
    )
    assert_refused(
        tls_post(http, idp, cert),
        "self_signed_tls_client_auth is not accepted by this token endpoint",
    )


@pytest.mark.parametrize("keep_alive", [True, False])
def test_the_token_endpoint_keeps_tls_connections_alive_when_asked(
    keep_alive: bool,
    server_ca: trustme.CA,
    client_ca: trustme.CA,
    pki_dir: Path,
    alice: ClientCert,
    make_idp: MakeIdP,
    http: requests.Session,
) -> None:
    tls = idp_tls(server_ca, pki_dir, client_ca=client_ca, tls_clients={CLIENT: alice.subject_dn})
    idp = make_idp("keycloak", tls=tls, token_keep_alive=keep_alive)
    responses = [tls_post(http, idp, alice) for _ in range(3)]

    assert [r.status_code for r in responses] == [200] * 3
    assert {r.raw.version for r in responses} == {11 if keep_alive else 10}
    connections = {record.connection for record in idp.authentications}
    assert len(connections) == (1 if keep_alive else 3)
    # An error with a body that is read keeps the connection too.
    assert tls_post(http, idp, alice, client_id="unregistered").status_code == 401
    assert len({record.connection for record in idp.authentications}) == (1 if keep_alive else 4)


# ------------------------------------------------------------------------ discovery


@pytest.mark.parametrize(
    ("shape", "openid", "oauth"),
    [
        (
            "keycloak",
            "/realms/demo/.well-known/openid-configuration",
            "/.well-known/oauth-authorization-server/realms/demo",
        ),
        ("auth0", "/.well-known/openid-configuration", "/.well-known/oauth-authorization-server"),
        ("generic", "/.well-known/openid-configuration", "/.well-known/oauth-authorization-server"),
        (
            "entra",
            f"/{ENTRA_TEST_TENANT}/v2.0/.well-known/openid-configuration",
            f"/.well-known/oauth-authorization-server/{ENTRA_TEST_TENANT}/v2.0",
        ),
    ],
)
def test_both_discovery_documents_are_served(
    shape: str, openid: str, oauth: str, make_idp: MakeIdP, http: requests.Session
) -> None:
    idp = make_idp(shape)
    assert (idp.openid_configuration_url, idp.oauth_metadata_url) == (
        idp.base_url + openid,
        idp.base_url + oauth,
    )
    documents = [http.get(idp.base_url + path, timeout=5) for path in (openid, oauth)]
    assert [d.status_code for d in documents] == [200, 200]
    document = documents[0].json()
    assert documents[1].json() == document
    assert document["issuer"] == idp.issuer
    assert document["token_endpoint"] == idp.token_url
    assert document["token_endpoint_auth_methods_supported"] == list(idp.shape.auth_methods)
    assert document["grant_types_supported"] == ["client_credentials"]
    assert idp.discovery_requests == 2
    assert idp.discovery_requests_by_path == {openid: 1, oauth: 1}


def test_discovery_lists_the_signing_algorithms_and_the_mtls_alias(
    make_idp: MakeIdP, http: requests.Session
) -> None:
    alias = "https://mtls.example.test/token"
    document = http.get(
        make_idp("keycloak", mtls_endpoint_alias=alias).openid_configuration_url, timeout=5
    ).json()
    assert document["token_endpoint_auth_signing_alg_values_supported"] == [
        "RS256",
        "PS256",
        "ES256",
        "HS256",
    ]
    assert document["mtls_endpoint_aliases"] == {"token_endpoint": alias}
    plain = http.get(make_idp("generic").openid_configuration_url, timeout=5).json()
    assert "token_endpoint_auth_signing_alg_values_supported" not in plain
    assert "mtls_endpoint_aliases" not in plain


@pytest.mark.parametrize(
    ("discovery", "openid", "oauth"),
    [("openid", 200, 404), ("oauth", 404, 200), ("none", 404, 404), ("both", 200, 200)],
)
def test_discovery_paths_can_be_turned_off(
    discovery: str, openid: int, oauth: int, make_idp: MakeIdP, http: requests.Session
) -> None:
    idp = make_idp("okta", discovery=discovery)
    urls = (idp.openid_configuration_url, idp.oauth_metadata_url)
    assert [http.get(url, timeout=5).status_code for url in urls] == [openid, oauth]
    assert idp.discovery_requests == 2  # counted, served or not


def test_discovery_overrides_change_the_document(make_idp: MakeIdP, http: requests.Session) -> None:
    idp = make_idp("okta")
    idp.discovery_overrides = {
        "issuer": "https://wrong.test",
        "token_endpoint_auth_methods_supported": None,
    }
    document = http.get(idp.oauth_metadata_url, timeout=5).json()
    assert document["issuer"] == "https://wrong.test"
    assert "token_endpoint_auth_methods_supported" not in document
    idp.discovery_overrides["token_endpoint"] = "https://elsewhere.test/token"
    assert (
        http.get(idp.oauth_metadata_url, timeout=5).json()["token_endpoint"]
        == "https://elsewhere.test/token"
    )
    idp.discovery_overrides = {}
    assert http.get(idp.oauth_metadata_url, timeout=5).json()["issuer"] == idp.issuer
    assert http.post(idp.oauth_metadata_url, timeout=5).status_code == 405


# ------------------------------------------------------------ records and secrecy


def test_resource_parameters_are_kept_in_order(make_idp: MakeIdP, http: requests.Session) -> None:
    idp = make_idp("keycloak")
    body = (
        "grant_type=client_credentials&resource=https%3A%2F%2Fa.test&client_id=app-client"
        f"&client_secret={SECRET}&resource=https%3A%2F%2Fb.test"
    )
    response = http.post(idp.token_url, data=body, headers={"Content-Type": FORM}, timeout=5)
    assert_granted(response, idp)
    record = idp.authentications[-1]
    assert record.resource == ("https://a.test", "https://b.test")
    assert record.form_keys == ("grant_type", "resource", "client_id", "client_secret")
    repeated = body + "&client_id=app-client"
    response = http.post(idp.token_url, data=repeated, headers={"Content-Type": FORM}, timeout=5)
    assert response.status_code == 400  # other parameters still may not repeat


def test_no_secret_appears_in_records_or_answers(
    keys: dict[str, SigningKey], federated: LocalIdP, make_idp: MakeIdP, http: requests.Session
) -> None:
    idp = make_idp("okta", client_keys={CLIENT: keys["RS256"].public_pem})
    good = keys["RS256"].sign(client_claims(idp))
    secret_jwt = hs256(client_claims(idp), SECRET.encode())
    sa = sa_token(keys)
    basic = {"Authorization": basic_header(CLIENT, SECRET)}
    responses = [
        token_post(http, idp, with_assertion(good)),
        token_post(http, idp, with_assertion(good)),  # replayed
        token_post(http, idp, with_assertion(secret_jwt)),
        token_post(http, idp, with_assertion(hs256(client_claims(idp), b"wrong"))),
        token_post(http, idp, {"client_id": CLIENT, "client_secret": SECRET + "x"}),
        token_post(http, idp, with_assertion(good), headers=basic),
        token_post(http, idp, {}, headers=basic),
        token_post(http, federated, with_assertion(sa, client_id=CLIENT)),
        token_post(http, federated, with_assertion(sa, client_id="other-client")),
    ]
    assert {r.status_code for r in responses} == {200, 400, 401}
    secrets = {
        SECRET,
        good,
        good.rsplit(".", 1)[1],
        secret_jwt.rsplit(".", 1)[1],
        sa,
        sa.rsplit(".", 1)[1],
        basic["Authorization"].split()[1],
    }
    exposed = [repr(idp.authentications), repr(federated.authentications)]
    exposed += [r.text for r in responses if r.status_code != 200]
    for text in exposed:
        assert not any(secret in text for secret in secrets)
    assert "PRIVATE" not in repr(keys["RS256"]) and SECRET not in repr(idp.shape)
