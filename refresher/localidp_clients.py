"""Client authentication beyond a client secret, for the local token server.

:mod:`refresher.localidp` decides which method a token request uses; this module verifies
the methods that need more than comparing a secret, as a real identity provider does:

* ``private_key_jwt`` and ``client_secret_jwt`` (RFC 7523 section 3, OpenID Connect Core
  section 9): a JWT the client signs with its private key or with its client secret, sent as
  ``client_assertion``, with one of the algorithms the endpoint's :class:`AuthPolicy` lists
  (each provider its own, among :data:`SUPPORTED_ALGORITHMS`). The registered keys are a PEM
  public key, X.509 certificates (``x5t#S256`` / ``x5t`` headers pick one) or a JWKS
  (``kid`` picks one; a JWK's ``alg``, when it has one, is the only algorithm it takes, as
  Auth0 and Okta hold a credential to the algorithm it was registered with). Otherwise an RSA
  key takes the RS and PS algorithms, an EC key the ES one of its curve (P-256: ES256).
  ``iss`` and ``sub`` are the client id, ``aud`` names this server (a string, or a list of
  one where the policy allows a list), ``exp`` and ``iat`` are required, the lifetime is
  capped, clocks may differ by the policy's skew and a ``jti`` is accepted once. A policy
  may require a certificate thumbprint header (Entra: its credentials are certificates).
* federated assertions (workload identity, as Entra ID and Keycloak do it): the assertion is
  a token someone else issued, e.g. a Kubernetes service-account token, checked against that
  issuer's keys (:class:`Federation`); its ``sub`` stands for a client id. It arrives like
  ``private_key_jwt`` and is told apart by its ``iss`` (or ``sub``) being the federation's.
  It may be reused until it expires (a projected token file is), and its lifetime is its own.
* ``tls_client_auth`` and ``self_signed_tls_client_auth`` (RFC 8705 section 2): the client
  certificate of the TLS connection, matched by subject DN (a certificate from the client
  CA) or by the SHA-256 of a registered self-signed certificate (:class:`TlsClients`).

Every failure is a :class:`ClientAuthFailure` whose reason is fixed text: it names no secret,
key or token and echoes nothing from the request, so it can be the ``error_description``.

``cryptography`` (which PyJWT needs for RS256, PS256 and ES256) is imported only when keys
are registered, so a server without any (the demo's) never loads it.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import hmac
import re
import secrets
import ssl
import tempfile
import threading
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias, cast
from urllib.parse import unquote_plus

import jwt

from refresher.presets import (
    KEY_ALGORITHMS,
    REGISTERED_AUTH_METHODS,
    TLS_METHODS,
    RegisteredAuthMethod,
)

__all__ = [
    "AUTH_METHODS",
    "CLOCK_SKEW",
    "FEDERATED",
    "JWT_BEARER",
    "KEY_ALGORITHMS",
    "MAX_ASSERTION_LIFETIME",
    "SECRET_ALGORITHMS",
    "SECRET_FAILURE",
    "SUPPORTED_ALGORITHMS",
    "TLS_METHODS",
    "Assertion",
    "AuthMethod",
    "AuthPolicy",
    "Authentication",
    "ClientAuthFailure",
    "ClientAuthenticator",
    "ClientKeys",
    "ClientRequest",
    "ClientVerifier",
    "Federation",
    "IdPTls",
    "KeySet",
    "PeerCertificate",
    "ReplayCache",
    "TlsClients",
    "basic_credentials",
    "certificate_sha256s",
    "peer_certificate",
    "rfc4514_string",
    "same_secret",
]

AuthMethod = RegisteredAuthMethod
"""The token endpoint authentication methods, by their RFC 7591 names."""
AUTH_METHODS: tuple[AuthMethod, ...] = REGISTERED_AUTH_METHODS

FEDERATED = "federated_jwt"
"""What :attr:`Authentication.method` says of a federated assertion (not an RFC 7591 name:
it is accepted wherever ``private_key_jwt`` is, when a :class:`Federation` is trusted)."""

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
"""What a ``private_key_jwt`` assertion may be signed with by default, and a federated
assertion always."""
SECRET_ALGORITHMS = ("HS256",)
"""What a ``client_secret_jwt`` assertion may be signed with by default."""
CLOCK_SKEW = 60.0
"""Seconds an ``iat`` or ``nbf`` may be ahead of the server's clock, by default."""
MAX_ASSERTION_LIFETIME = 600.0
"""Seconds a client's own assertion may live (``exp - iat``), by default."""
REPLAY_CAPACITY = 10_000
"""``jti`` values remembered at most (each only until its assertion expires)."""

ClientKeys: TypeAlias = str | bytes | Mapping[str, Any]
"""A PEM public key, PEM X.509 certificate(s), or a JWKS ``{"keys": [...]}``."""

# The key type each algorithm needs: RSA, or the EC curve of its ES algorithm (RFC 7518 3.4).
_KEY_TYPE = {
    **{f"{family}{bits}": "RSA" for family in ("RS", "PS") for bits in (256, 384, 512)},
    "ES256": "P-256",
    "ES384": "P-384",
    "ES512": "P-521",
}
# The hash of each HMAC algorithm (RFC 7518 3.2).
_HMAC_HASH = {"HS256": "sha256", "HS384": "sha384", "HS512": "sha512"}
SUPPORTED_ALGORITHMS: tuple[str, ...] = (*_KEY_TYPE, *_HMAC_HASH)
"""Every algorithm this server can verify an assertion of (a policy picks among them)."""
_JWS = jwt.PyJWS()


class ClientAuthFailure(Exception):
    """A client authentication that failed.

    ``reason`` is what went wrong, fixed non-secret text (it is recorded in
    :attr:`Authentication.reason`); ``description`` is what the client is told (the reason,
    unless the server keeps a secret failure vague); ``challenge``: answer with a Basic
    ``WWW-Authenticate`` (RFC 6749 section 5.2).
    """

    def __init__(
        self,
        reason: str,
        *,
        status: int = 401,
        error: str = "invalid_client",
        description: str | None = None,
        challenge: bool = False,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.error = error
        self.description = reason if description is None else description
        self.challenge = challenge


@dataclass(frozen=True)
class Authentication:
    """How the token endpoint judged one request's client authentication.

    Kept by :attr:`refresher.localidp.LocalIdP.authentications`. Nothing secret is kept: no
    client secret, no assertion (only its decoded header and claims, which are not secret;
    never its signature), no key.
    """

    method: str
    """The method detected: an RFC 7591 name, ``federated_jwt``, ``none`` (no credentials)
    or several names joined by ``+`` (refused: one method per request)."""
    client_id: str | None
    """The client the request claimed to be (authenticated when ``ok``)."""
    ok: bool
    reason: str | None
    """Why it failed (``None`` when ok); more precise than the answer for secret methods."""
    assertion_header: dict[str, Any] | None
    assertion_claims: dict[str, Any] | None
    client_cert_sha256: str | None
    """Hex SHA-256 of the DER of the client certificate the TLS connection presented."""
    form_keys: tuple[str, ...]
    """The names of the form's fields, in order (each once)."""
    resource: tuple[str, ...]
    """Every ``resource`` parameter (RFC 8707), in order."""
    connection: int = 0
    """Which of the server's connections the request came on (see ProtectedRequest)."""


@dataclass(frozen=True)
class Federation:
    """Trust in another issuer's tokens as client assertions (workload identity federation).

    ``subjects`` maps a token's ``sub`` (e.g. ``system:serviceaccount:ns:sa``) to the client
    id it stands for; the request must name that client in ``client_id``.
    """

    issuer: str
    audience: str
    keys: ClientKeys = field(repr=False)
    """The issuer's public keys: a PEM public key or certificate, or a JWKS."""
    subjects: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Assertion:
    """A client assertion, decoded but not (yet) verified."""

    text: str = field(repr=False)
    header: dict[str, Any]
    claims: dict[str, Any]

    @classmethod
    def parse(cls, text: str) -> Assertion:
        try:
            header = jwt.get_unverified_header(text)
            claims = jwt.decode(text, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise ClientAuthFailure("client assertion is not a JWT") from None
        return cls(text, dict(header), dict(claims))

    @property
    def alg(self) -> object:
        return self.header.get("alg")


# ------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class _PublicKey:
    key: Any = field(repr=False)  # a cryptography public key
    key_type: str  # "RSA", an EC curve ("P-256"...), or something no algorithm takes
    kid: str | None = None
    x5t: str | None = None
    x5t_s256: str | None = None
    alg: str | None = None  # a JWK's own "alg": the only one it may be used with

    @property
    def is_certificate(self) -> bool:
        """Registered as a certificate (PEM, or a JWK with ``x5c``, ``x5t`` or ``x5t#S256``)."""
        return self.x5t is not None or self.x5t_s256 is not None


# The header that names a key, and the field of _PublicKey it is matched against.
_KEY_HINTS = (("kid", "kid"), ("x5t#S256", "x5t_s256"), ("x5t", "x5t"))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _key_type(key: Any) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if isinstance(key, rsa.RSAPublicKey):
        return "RSA"
    if isinstance(key, ec.EllipticCurvePublicKey):
        curves = {ec.SECP256R1: "P-256", ec.SECP384R1: "P-384", ec.SECP521R1: "P-521"}
        return curves.get(type(key.curve), key.curve.name)
    return type(key).__name__


def _thumbprints(der: bytes) -> dict[str, str]:
    """RFC 7515 4.1.7-8: the base64url SHA-1 and SHA-256 of a certificate's DER."""
    return {
        "x5t": _b64url(hashlib.sha1(der).digest()),
        "x5t_s256": _b64url(hashlib.sha256(der).digest()),
    }


def _from_jwk(jwk: Mapping[str, Any]) -> _PublicKey:
    public = jwt.PyJWK(dict(jwk)).key
    if hasattr(public, "public_key"):  # a private JWK was registered: only its public half
        public = public.public_key()
    prints: dict[str, str] = {}
    chain = jwk.get("x5c")
    if isinstance(chain, list) and chain:
        prints = _thumbprints(base64.b64decode(chain[0]))
    alg = jwk.get("alg")
    return _PublicKey(
        public,
        _key_type(public),
        kid=jwk.get("kid"),
        x5t=jwk.get("x5t", prints.get("x5t")),
        x5t_s256=jwk.get("x5t#S256", prints.get("x5t_s256")),
        alg=alg if isinstance(alg, str) else None,
    )


def _from_pem(pem: bytes) -> tuple[_PublicKey, ...]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    if b"-----BEGIN CERTIFICATE-----" in pem:
        keys = []
        for certificate in x509.load_pem_x509_certificates(pem):
            der = certificate.public_bytes(serialization.Encoding.DER)
            public = certificate.public_key()
            keys.append(_PublicKey(public, _key_type(public), **_thumbprints(der)))
        return tuple(keys)
    key = serialization.load_pem_public_key(pem)
    return (_PublicKey(key, _key_type(key)),)


@dataclass(frozen=True)
class KeySet:
    """The public keys an assertion may be signed with."""

    keys: tuple[_PublicKey, ...]

    @classmethod
    def load(cls, material: ClientKeys) -> KeySet:
        """Read a PEM public key, PEM certificate(s) or a JWKS (needs ``cryptography``)."""
        try:
            if isinstance(material, Mapping):
                keys = tuple(_from_jwk(jwk) for jwk in material["keys"])
            else:
                keys = _from_pem(material.encode() if isinstance(material, str) else material)
        except ImportError:  # pragma: no cover - installed wherever keys are registered
            raise RuntimeError("verifying signed client assertions needs `cryptography`") from None
        if not keys:
            raise ValueError("no keys in the key material")
        return cls(keys)

    def candidates(
        self, header: Mapping[str, Any], alg: str, *, certificate: bool = False
    ) -> list[_PublicKey]:
        """The keys that may have signed an assertion with this header.

        A ``kid``, ``x5t#S256`` or ``x5t`` header narrows the choice when the registered keys
        carry that kind of name (a bare PEM key has none, so every key is tried). A key with
        its own ``alg`` takes that one only; otherwise its type says (RSA: RS and PS, EC: the
        ES of its curve). With ``certificate`` only registered certificates count, picked by
        the thumbprint header the caller made sure of.
        """
        keys = list(self.keys)
        if certificate:
            keys = [key for key in keys if key.is_certificate]
            if not keys:
                raise ClientAuthFailure("no certificate is registered for this client")
        for hint, attribute in _KEY_HINTS:
            wanted = header.get(hint)
            if wanted is None or not any(getattr(key, attribute) for key in keys):
                continue
            keys = [key for key in keys if getattr(key, attribute) == wanted]
            if not keys:
                raise ClientAuthFailure(f"no registered key matches the assertion's {hint}")
        fitting = [key for key in keys if key.alg in (None, alg)]
        if not fitting:
            raise ClientAuthFailure("alg does not match the registered key's")
        fitting = [key for key in fitting if key.key_type == _KEY_TYPE[alg]]
        if not fitting:
            raise ClientAuthFailure("no registered key fits the assertion's alg")
        return fitting


def _verify_signed(
    assertion: Assertion, keys: KeySet, alg: str, *, certificate: bool = False
) -> None:
    for candidate in keys.candidates(assertion.header, alg, certificate=certificate):
        try:
            _JWS.decode_complete(assertion.text, candidate.key, algorithms=[alg])
        except jwt.PyJWTError:
            continue
        return
    raise ClientAuthFailure("signature does not verify")


def _verify_hmac(assertion: Assertion, secret: str, alg: str) -> None:
    # By hand rather than with PyJWT, which warns about secrets shorter than 32 bytes: a
    # client's secret is what it is.
    signing_input, _, signature = assertion.text.rpartition(".")
    expected = hmac.new(secret.encode(), signing_input.encode(), _HMAC_HASH[alg]).digest()
    try:
        given = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
    except ValueError:
        given = b""
    if not hmac.compare_digest(expected, given):
        raise ClientAuthFailure("signature does not verify")


# ----------------------------------------------------------------------- claims


def _number(claims: Mapping[str, Any], name: str, *, required: bool) -> float | None:
    value = claims.get(name)
    if value is None:
        if required:
            raise ClientAuthFailure(f"{name} is missing")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ClientAuthFailure(f"{name} is not a number")
    return float(value)


def _check_times(
    claims: Mapping[str, Any],
    now: float,
    *,
    require_iat: bool,
    max_lifetime: float | None,
    skew: float,
) -> float:
    """Check exp, iat and nbf against the server's clock (``skew`` seconds of leeway for a
    client's clock ahead of it); return exp."""
    exp = cast(float, _number(claims, "exp", required=True))
    if now >= exp:  # RFC 7519 4.1.4: used *before* exp
        raise ClientAuthFailure("client assertion expired")
    iat = _number(claims, "iat", required=require_iat)
    if iat is not None and iat > now + skew:
        raise ClientAuthFailure("iat is in the future")
    nbf = _number(claims, "nbf", required=False)
    if nbf is not None and nbf > now + skew:
        raise ClientAuthFailure("client assertion is not valid yet (nbf)")
    if max_lifetime is not None and iat is not None and exp - iat > max_lifetime:
        raise ClientAuthFailure(f"assertion lifetime exceeds {max_lifetime:g} s")
    return exp


def _names_any(aud: object, wanted: Collection[str]) -> bool:
    """A string ``aud``, or a list of them (RFC 7519 4.1.3), naming one of ``wanted``."""
    if isinstance(aud, str):
        return aud in wanted
    return isinstance(aud, list) and any(isinstance(a, str) and a in wanted for a in aud)


def _check_audience(claims: Mapping[str, Any], wanted: Collection[str], failure: str) -> None:
    if "aud" not in claims:
        raise ClientAuthFailure("aud is missing")
    if not _names_any(claims["aud"], wanted):
        raise ClientAuthFailure(failure)


def _check_client_audience(claims: Mapping[str, Any], policy: AuthPolicy) -> None:
    """A client's own assertion names this server, and only it: a string, or (where the
    policy allows a list) a list of that one string."""
    aud = claims.get("aud")
    if isinstance(aud, list):
        if len(aud) > 1:
            raise ClientAuthFailure("aud lists more than one audience")
        if not policy.audience_list:
            raise ClientAuthFailure("aud must be a single string, not a list")
    _check_audience(claims, policy.assertion_audiences, "aud does not name this server")


def _is_hmac(alg: str) -> bool:
    return alg.upper().startswith("HS")


def _check_alg(assertion: Assertion, allowed: Iterable[str], kind: str) -> str:
    alg = assertion.alg
    if not isinstance(alg, str) or alg.lower() == "none":
        raise ClientAuthFailure("alg none is never accepted")
    allowed = tuple(allowed)
    if alg not in allowed:
        if not allowed:
            raise ClientAuthFailure(f"no alg is accepted for {kind}")
        raise ClientAuthFailure(f"alg is not one of {', '.join(allowed)} for {kind}")
    return alg


class ReplayCache:
    """The ``jti`` of each accepted assertion, per client, until the assertion expires.

    Bounded: beyond ``capacity`` live entries the one expiring soonest is forgotten (with
    assertions living at most minutes, a test never gets there).
    """

    def __init__(self, capacity: int = REPLAY_CAPACITY) -> None:
        self._capacity = capacity
        self._seen: dict[tuple[str, str], float] = {}
        self._by_expiry: list[tuple[float, tuple[str, str]]] = []  # a heap
        self._lock = threading.Lock()

    def claim(self, client_id: str, jti: str, expires_at: float, now: float) -> bool:
        """Remember this jti; ``False`` when it was already used (and still remembered)."""
        key = (client_id, jti)
        with self._lock:
            self._drop(lambda expiry: expiry <= now)
            if key in self._seen:
                return False
            if len(self._seen) >= self._capacity:
                self._drop(lambda _: len(self._seen) >= self._capacity)
            self._seen[key] = expires_at
            heapq.heappush(self._by_expiry, (expires_at, key))
            return True

    def _drop(self, condition: Any) -> None:
        """Forget the soonest-expiring entries while ``condition(expiry)`` holds."""
        while self._by_expiry and condition(self._by_expiry[0][0]):
            expiry, key = heapq.heappop(self._by_expiry)
            if self._seen.get(key) == expiry:
                del self._seen[key]

    def __len__(self) -> int:
        with self._lock:
            return len(self._seen)


class ClientVerifier:
    """One server's registered client keys, federation trust and jti memory. Thread-safe."""

    def __init__(
        self, *, client_keys: Mapping[str, ClientKeys], federation: Federation | None
    ) -> None:
        self.federation = federation
        self._federation_keys = None if federation is None else KeySet.load(federation.keys)
        self._keys = {client_id: KeySet.load(keys) for client_id, keys in client_keys.items()}
        self._lock = threading.Lock()
        self._replays = ReplayCache()

    def set_client_keys(self, client_id: str, keys: ClientKeys | None) -> None:
        """Register (replace) a client's keys; ``None`` removes them."""
        loaded = None if keys is None else KeySet.load(keys)
        with self._lock:
            if loaded is None:
                self._keys.pop(client_id, None)
            else:
                self._keys[client_id] = loaded

    def method_of(self, assertion: Assertion) -> str:
        """Which method an assertion is: federated when its ``iss`` is the federation's (or
        its ``sub`` one of its subjects), ``client_secret_jwt`` for an HMAC alg, else
        ``private_key_jwt``."""
        federation, claims = self.federation, assertion.claims
        if federation is not None and (
            claims.get("iss") == federation.issuer or _in(claims.get("sub"), federation.subjects)
        ):
            return FEDERATED
        alg = assertion.alg
        if isinstance(alg, str) and _is_hmac(alg):
            return "client_secret_jwt"
        return "private_key_jwt"

    def verify_client_jwt(
        self,
        method: str,
        assertion: Assertion,
        *,
        form_client_id: str | None,
        secret: str | None,
        policy: AuthPolicy,
        now: float,
    ) -> str:
        """Verify a ``private_key_jwt`` or ``client_secret_jwt`` assertion (RFC 7523 3) as
        ``policy`` says; return the client id."""
        claims = assertion.claims
        client_id = claims.get("iss")
        if not isinstance(client_id, str) or not client_id:
            raise ClientAuthFailure("iss is missing")
        if claims.get("sub") != client_id:
            raise ClientAuthFailure("iss and sub must both be the client id")
        if form_client_id is not None and form_client_id != client_id:
            raise ClientAuthFailure("client_id does not match the assertion's iss")
        if method == "client_secret_jwt":
            alg = _check_alg(assertion, policy.secret_algs, method)
            if secret is None:
                raise ClientAuthFailure("no client secret is registered for this client")
            _verify_hmac(assertion, secret, alg)
        else:
            alg = _check_alg(assertion, policy.key_algs, method)
            header = assertion.header
            certificate = policy.requires_thumbprint
            if certificate and header.get("x5t#S256") is None and header.get("x5t") is None:
                raise ClientAuthFailure("x5t#S256 or x5t is required")
            with self._lock:
                keys = self._keys.get(client_id)
            if keys is None:
                raise ClientAuthFailure("no keys are registered for this client")
            _verify_signed(assertion, keys, alg, certificate=certificate)
        _check_client_audience(claims, policy)
        exp = _check_times(
            claims,
            now,
            require_iat=True,
            max_lifetime=policy.max_assertion_lifetime,
            skew=policy.clock_skew,
        )
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            raise ClientAuthFailure("jti is missing")
        if not self._replays.claim(client_id, jti, exp, now):
            raise ClientAuthFailure("jti already used")
        return client_id

    def verify_federated(
        self, assertion: Assertion, *, form_client_id: str | None, policy: AuthPolicy, now: float
    ) -> str:
        """Verify a federated assertion; return the client id its subject stands for.

        No jti memory and no lifetime cap: a projected service-account token is reused until
        the kubelet replaces it, and lives as long as its issuer says. Its ``alg`` is one of
        :data:`KEY_ALGORITHMS` (the issuer's, not the client policy's), its ``aud`` may be a
        list (a service-account token's is), and the policy's clock skew applies.
        """
        federation, keys = self.federation, self._federation_keys
        assert federation is not None and keys is not None  # method_of said federated
        claims = assertion.claims
        if form_client_id is None:
            raise ClientAuthFailure("client_id is required with a federated assertion")
        if claims.get("iss") != federation.issuer:
            raise ClientAuthFailure("iss is not the federation's issuer")
        _verify_signed(assertion, keys, _check_alg(assertion, KEY_ALGORITHMS, FEDERATED))
        _check_audience(claims, (federation.audience,), "aud is not the federation's audience")
        _check_times(claims, now, require_iat=False, max_lifetime=None, skew=policy.clock_skew)
        subject = claims.get("sub")
        client_id = federation.subjects.get(subject) if isinstance(subject, str) else None
        if client_id is None:
            raise ClientAuthFailure("sub is not a trusted subject")
        if client_id != form_client_id:
            raise ClientAuthFailure("sub stands for another client")
        return client_id


def _in(value: object, mapping: Mapping[str, str]) -> bool:
    return isinstance(value, str) and value in mapping


# -------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class IdPTls:
    """What the token server needs to serve HTTPS, and whom it takes client certificates from.

    PEM material, not an :class:`ssl.SSLContext`: the server builds (and, when a self-signed
    registration changes, rebuilds) its context itself. ``testdoubles.tls.idp_tls`` makes one
    from trustme CAs.
    """

    cert_chain_pem: bytes
    """The server's certificate (for 127.0.0.1), then any intermediates."""
    private_key_pem: bytes = field(repr=False)
    client_ca_pem: bytes | None = None
    """CA certificate(s) whose client certificates the handshake accepts (tls_client_auth)."""
    require_client_cert: bool = False
    """Refuse the handshake without a client certificate, as a dedicated mTLS endpoint does.
    Otherwise one is asked for but optional."""
    tls_clients: Mapping[str, str] = field(default_factory=dict)
    """tls_client_auth: client id -> the subject DN its certificate must have (RFC 8705
    ``tls_client_auth_subject_dn``), as an RFC 4514 string the way ``cryptography``'s
    ``Name.rfc4514_string()`` writes it (most specific first: ``CN=svc,OU=Team,O=Org``)."""
    self_signed_clients: Mapping[str, str | bytes] = field(default_factory=dict)
    """self_signed_tls_client_auth: client id -> its registered self-signed certificate(s),
    PEM (several blocks for a rotation). The handshake trusts them; the token endpoint
    matches the presented one by SHA-256."""
    ca_bundle: str | None = None
    """Path of the PEM file a client should trust for this server (not read by the server)."""


@dataclass(frozen=True)
class PeerCertificate:
    """The client certificate a TLS connection presented (and the handshake verified)."""

    sha256: str
    """Hex SHA-256 of its DER."""
    subject_dn: str
    issuer_dn: str


# OpenSSL's long attribute names as getpeercert() gives them -> RFC 4514 short names, or the
# dotted OID where cryptography's rfc4514_string() writes one.
_RFC4514_NAMES = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
    "emailAddress": "1.2.840.113549.1.9.1",
}


def _escape_dn_value(value: str) -> str:
    """RFC 4514 section 2.4, as cryptography escapes."""
    if not value:
        return ""
    for special in ("\\", '"', "+", ",", ";", "<", ">"):
        value = value.replace(special, "\\" + special)
    value = value.replace("\0", "\\00")
    if value[0] in ("#", " "):
        value = "\\" + value
    if value[-1] == " ":
        value = value[:-1] + "\\ "
    return value


def rfc4514_string(name: Iterable[Iterable[tuple[str, str]]]) -> str:
    """A distinguished name as ``getpeercert()`` gives it, as an RFC 4514 string."""
    rdns = [
        "+".join(f"{_RFC4514_NAMES.get(key, key)}={_escape_dn_value(value)}" for key, value in rdn)
        for rdn in name
    ]
    return ",".join(reversed(rdns))  # RFC 4514 2.1: the last RDN first


def peer_certificate(sock: object) -> PeerCertificate | None:
    """The verified client certificate of a TLS socket; ``None`` without one (or TLS)."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    der = sock.getpeercert(binary_form=True)
    if not der:
        return None
    info = cast(dict[str, Any], sock.getpeercert() or {})
    return PeerCertificate(
        hashlib.sha256(der).hexdigest(),
        rfc4514_string(info.get("subject", ())),
        rfc4514_string(info.get("issuer", ())),
    )


_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\s.*?-----END CERTIFICATE-----", re.DOTALL
)


def _certificate_blocks(pem: str | bytes) -> tuple[bytes, ...]:
    blocks = tuple(_PEM_CERTIFICATE.findall(pem.encode() if isinstance(pem, str) else pem))
    if not blocks:
        raise ValueError("no PEM certificate in the registered material")
    return blocks


def certificate_sha256s(pem: str | bytes) -> frozenset[str]:
    """The hex SHA-256 of the DER of every certificate in a PEM text."""
    return frozenset(
        hashlib.sha256(ssl.PEM_cert_to_DER_cert(block.decode("ascii"))).hexdigest()
        for block in _certificate_blocks(pem)
    )


def _server_context(tls: IdPTls, trusted_self_signed: Iterable[bytes]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # load_cert_chain reads files only: the key is on disk, in a private directory, for the
    # moment it takes to load it.
    with tempfile.TemporaryDirectory(prefix="localidp-") as folder:
        cert, key = Path(folder, "cert.pem"), Path(folder, "key.pem")
        cert.write_bytes(tls.cert_chain_pem)
        key.touch(mode=0o600)
        key.write_bytes(tls.private_key_pem)
        context.load_cert_chain(cert, key)
    trusted = b"\n".join(
        [*([tls.client_ca_pem] if tls.client_ca_pem else []), *trusted_self_signed]
    )
    if trusted:
        context.load_verify_locations(cadata=trusted.decode("ascii"))
        # A registered self-signed certificate is its own trust anchor: accept a chain that
        # ends at any trusted certificate, not only at a self-signed CA.
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    elif tls.require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED  # nobody is trusted: every handshake fails
    return context


class TlsClients:
    """The TLS context of one server and its client certificate registrations. Thread-safe:
    registrations may change while it serves (connections accepted afterwards see them)."""

    def __init__(self, tls: IdPTls) -> None:
        self.tls = tls
        self._lock = threading.Lock()
        self._subjects = dict(tls.tls_clients)
        self._self_signed: dict[str, tuple[bytes, ...]] = {}
        self._fingerprints: dict[str, frozenset[str]] = {}
        for client_id, pem in tls.self_signed_clients.items():
            self._register(client_id, pem)
        self._context = self._build()

    @property
    def context(self) -> ssl.SSLContext:
        with self._lock:
            return self._context

    def set_tls_client(self, client_id: str, subject_dn: str | None) -> None:
        """Register (replace) the subject DN of a tls_client_auth client; ``None`` removes it."""
        with self._lock:
            if subject_dn is None:
                self._subjects.pop(client_id, None)
            else:
                self._subjects[client_id] = subject_dn

    def set_self_signed_client(self, client_id: str, pem: str | bytes | None) -> None:
        """Register (replace) a client's self-signed certificate(s); ``None`` removes them.
        New connections' handshakes trust the new set at once."""
        with self._lock:
            if pem is None:
                self._self_signed.pop(client_id, None)
                self._fingerprints.pop(client_id, None)
            else:
                self._register(client_id, pem)
            self._context = self._build()

    def _register(self, client_id: str, pem: str | bytes) -> None:
        self._self_signed[client_id] = _certificate_blocks(pem)
        self._fingerprints[client_id] = certificate_sha256s(pem)

    def _build(self) -> ssl.SSLContext:
        blocks = [block for pems in self._self_signed.values() for block in pems]
        return _server_context(self.tls, blocks)

    def method_for(self, client_id: str, cert: PeerCertificate | None) -> str:
        """Which TLS method a request for ``client_id`` is: self-signed when the client has
        self-signed registrations (and no subject DN, or the certificate is one of them)."""
        with self._lock:
            prints = self._fingerprints.get(client_id)
            has_subject = client_id in self._subjects
        if prints is not None and (not has_subject or (cert is not None and cert.sha256 in prints)):
            return "self_signed_tls_client_auth"
        return "tls_client_auth"

    def verify(self, method: str, client_id: str, cert: PeerCertificate | None) -> None:
        if cert is None:
            raise ClientAuthFailure("no client certificate was presented")
        with self._lock:
            prints = self._fingerprints.get(client_id, frozenset())
            any_self_signed = frozenset().union(*self._fingerprints.values())
            subject = self._subjects.get(client_id)
        if method == "self_signed_tls_client_auth":
            if cert.sha256 not in prints:
                raise ClientAuthFailure("certificate is not registered for this client")
            return
        if subject is None:
            raise ClientAuthFailure("client is not registered for tls_client_auth")
        # The handshake trusts the client CA and the registered self-signed certificates:
        # only a certificate of the former is a CA-issued one.
        if cert.sha256 in any_self_signed or cert.subject_dn == cert.issuer_dn:
            raise ClientAuthFailure("certificate is not issued by the client CA")
        if cert.subject_dn != subject:
            raise ClientAuthFailure("certificate subject does not match this client")


# ---------------------------------------------------------- the token endpoint's judge

SECRET_FAILURE = "Client authentication failed"
"""What a client is told when a secret did not do: no hint of whether the id or the secret
was wrong (the precise reason is in :attr:`Authentication.reason`)."""


def same_secret(given: str | None, expected: str) -> bool:
    """Constant-time comparison, so the demo server does not teach timing leaks."""
    return given is not None and secrets.compare_digest(given.encode(), expected.encode())


def _is_basic(header: str | None) -> bool:
    return (header or "").strip().partition(" ")[0].lower() == "basic"


def basic_credentials(header: str | None, *, urlencoded: bool) -> tuple[str, str] | None:
    """Decode ``Authorization: Basic ...``; ``None`` for anything malformed.

    With ``urlencoded`` both halves are form-urldecoded after base64, as RFC 6749
    section 2.3.1 requires, so a secret with ``:`` ``+`` ``%`` or a space only matches
    when the client encoded it.
    """
    if header is None or not _is_basic(header):
        return None
    encoded = header.strip().partition(" ")[2]
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        client_id, colon, secret = decoded.partition(":")
        if urlencoded:
            client_id = unquote_plus(client_id, errors="strict")
            secret = unquote_plus(secret, errors="strict")
    except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
        return None
    return (client_id, secret) if colon else None


@dataclass(frozen=True)
class AuthPolicy:
    """What one token endpoint accepts, from its provider shape."""

    methods: tuple[str, ...]
    basic_urlencoded: bool
    """RFC 6749 2.3.1 Basic (each half form-urlencoded), or the pair as is."""
    assertion_audiences: frozenset[str]
    """The ``aud`` values a client's own assertion may name."""
    assertion_algs: tuple[str, ...] = (*KEY_ALGORITHMS, *SECRET_ALGORITHMS)
    """The algorithms a client's own assertion may be signed with: the HMAC ones for
    ``client_secret_jwt``, the others for ``private_key_jwt``."""
    requires_thumbprint: bool = False
    """A ``private_key_jwt`` assertion must carry ``x5t#S256`` or ``x5t`` and be signed by a
    registered certificate's key (Entra)."""
    audience_list: bool = True
    """A one-member list is as good as a string ``aud`` (never a longer list)."""
    max_assertion_lifetime: float = MAX_ASSERTION_LIFETIME
    """Seconds a client's own assertion may live (``exp - iat``)."""
    clock_skew: float = CLOCK_SKEW
    """Seconds an assertion's ``iat`` or ``nbf`` may be ahead of the server's clock."""

    def __post_init__(self) -> None:
        unknown = set(self.assertion_algs) - set(SUPPORTED_ALGORITHMS)
        if unknown:
            raise ValueError(f"unsupported assertion algorithms {sorted(unknown)}")
        if self.max_assertion_lifetime <= 0:
            raise ValueError("max_assertion_lifetime must be positive")
        if self.clock_skew < 0:
            raise ValueError("clock_skew must not be negative")

    @property
    def key_algs(self) -> tuple[str, ...]:
        return tuple(alg for alg in self.assertion_algs if not _is_hmac(alg))

    @property
    def secret_algs(self) -> tuple[str, ...]:
        return tuple(alg for alg in self.assertion_algs if _is_hmac(alg))

    def signing_algs(self) -> list[str]:
        """What discovery lists: the algorithms of the assertion methods accepted."""
        return [
            alg
            for alg in self.assertion_algs
            if ("client_secret_jwt" if _is_hmac(alg) else "private_key_jwt") in self.methods
        ]


@dataclass(frozen=True)
class ClientRequest:
    """What of a token request client authentication reads."""

    authorization: str | None = field(repr=False)
    fields: Mapping[str, str] = field(repr=False)
    form_keys: tuple[str, ...] = ()
    resource: tuple[str, ...] = ()
    cert: PeerCertificate | None = None
    connection: int = 0


@dataclass
class _Attempt:
    """What is known of an authentication so far, for its record."""

    method: str = "none"
    client_id: str | None = None
    header: dict[str, Any] | None = None
    claims: dict[str, Any] | None = None

    def record(self, request: ClientRequest, reason: str | None) -> Authentication:
        return Authentication(
            method=self.method,
            client_id=self.client_id,
            ok=reason is None,
            reason=reason,
            assertion_header=self.header,
            assertion_claims=self.claims,
            client_cert_sha256=None if request.cert is None else request.cert.sha256,
            form_keys=request.form_keys,
            resource=request.resource,
            connection=request.connection,
        )


class ClientAuthenticator:
    """Tells which method a token request authenticates with, and judges it.

    One method per request (RFC 6749 2.3): a Basic header, a ``client_secret``, a
    ``client_assertion`` (any two: 400 invalid_request); with none of them, a ``client_id``
    and the connection's client certificate (when a TLS method is accepted).
    """

    def __init__(
        self,
        *,
        clients: Mapping[str, str],
        verifier: ClientVerifier,
        tls: TlsClients | None,
    ) -> None:
        self._clients = clients  # the server's own dict: client id -> secret
        self.verifier = verifier
        self.tls = tls

    def authenticate(
        self, policy: AuthPolicy, request: ClientRequest, now: float
    ) -> tuple[Authentication, ClientAuthFailure | None]:
        """The record of the judgement, and the failure to answer with (``None``: ok)."""
        attempt = _Attempt()
        try:
            self._identify(policy, request, now, attempt)
        except ClientAuthFailure as failure:
            return attempt.record(request, failure.reason), failure
        return attempt.record(request, None), None

    def _identify(
        self, policy: AuthPolicy, request: ClientRequest, now: float, attempt: _Attempt
    ) -> None:
        fields = request.fields
        sent = {
            "client_secret_basic": _is_basic(request.authorization),
            "client_secret_post": "client_secret" in fields,
            "client_assertion": "client_assertion" in fields or "client_assertion_type" in fields,
        }
        used = [name for name, present in sent.items() if present]
        if len(used) > 1:
            attempt.method = "+".join(used)
            raise ClientAuthFailure(
                "more than one client authentication method",
                status=400,
                error="invalid_request",
                description="Use one client authentication method, not several",
            )
        if used == ["client_assertion"]:
            self._by_assertion(policy, request, now, attempt)
        elif used:
            self._by_secret(used[0], policy, request, attempt)
        else:
            self._by_certificate(policy, request, attempt)

    @staticmethod
    def _secret_failure(policy: AuthPolicy, reason: str) -> ClientAuthFailure:
        # A Basic challenge wherever Basic is accepted (RFC 6749 5.2), as the server always did.
        basic = "client_secret_basic" in policy.methods
        return ClientAuthFailure(reason, description=SECRET_FAILURE, challenge=basic)

    def _by_secret(
        self, method: str, policy: AuthPolicy, request: ClientRequest, attempt: _Attempt
    ) -> None:
        attempt.method = method
        pair: tuple[str | None, str | None] | None
        if method == "client_secret_basic":
            pair = basic_credentials(request.authorization, urlencoded=policy.basic_urlencoded)
        else:
            pair = (request.fields.get("client_id"), request.fields["client_secret"])
        client_id, secret = pair or (None, None)
        attempt.client_id = client_id
        expected = None if client_id is None else self._clients.get(client_id)
        if method not in policy.methods:
            reason = f"{method} is not accepted by this token endpoint"
        elif client_id is None:
            reason = "malformed client credentials"
        elif expected is None:
            reason = "unknown client"
        elif not same_secret(secret, expected):
            reason = "wrong client secret"
        else:
            return
        raise self._secret_failure(policy, reason)

    def _by_certificate(
        self, policy: AuthPolicy, request: ClientRequest, attempt: _Attempt
    ) -> None:
        client_id = request.fields.get("client_id")
        if client_id is None or not TLS_METHODS.intersection(policy.methods):
            raise self._secret_failure(policy, "no client credentials")
        attempt.client_id = client_id
        attempt.method = "tls_client_auth"
        if self.tls is None:
            raise ClientAuthFailure("no client certificate was presented")
        attempt.method = method = self.tls.method_for(client_id, request.cert)
        if method not in policy.methods:
            raise ClientAuthFailure(f"{method} is not accepted by this token endpoint")
        self.tls.verify(method, client_id, request.cert)

    def _by_assertion(
        self, policy: AuthPolicy, request: ClientRequest, now: float, attempt: _Attempt
    ) -> None:
        fields = request.fields
        form_client_id = fields.get("client_id")
        attempt.method, attempt.client_id = "private_key_jwt", form_client_id
        if fields.get("client_assertion_type") != JWT_BEARER:
            raise ClientAuthFailure(f"client_assertion_type must be {JWT_BEARER}")
        text = fields.get("client_assertion")
        if not text:
            raise ClientAuthFailure("client_assertion is missing")
        assertion = Assertion.parse(text)
        attempt.header, attempt.claims = assertion.header, assertion.claims
        attempt.method = method = self.verifier.method_of(assertion)
        # A federated assertion is sent as private_key_jwt is, and accepted where it is.
        needed = "private_key_jwt" if method == FEDERATED else method
        if method == FEDERATED:
            if needed not in policy.methods:
                raise ClientAuthFailure(f"{needed} is not accepted by this token endpoint")
            attempt.client_id = self.verifier.verify_federated(
                assertion, form_client_id=form_client_id, policy=policy, now=now
            )
            return
        issuer = assertion.claims.get("iss")
        if isinstance(issuer, str):
            attempt.client_id = issuer
        if needed not in policy.methods:
            raise ClientAuthFailure(f"{needed} is not accepted by this token endpoint")
        self.verifier.verify_client_jwt(
            method,
            assertion,
            form_client_id=form_client_id,
            secret=self._clients.get(issuer) if isinstance(issuer, str) else None,
            policy=policy,
            now=now,
        )
