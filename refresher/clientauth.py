"""How a job's client proves who it is to the token endpoint.

`authenticate` turns a job's `auth` method into what its token request carries: form fields
and headers, the client certificate for the TLS handshake, and every value an IdP might echo
back in an error (which `idp` never prints). The methods:

* `client_secret_basic` (alias `basic`; `basic_raw` without RFC 6749's form-urlencoding) and
  `client_secret_post` (alias `body`): the client secret, in a Basic header or the body;
* `client_secret_jwt` and `private_key_jwt` (RFC 7523 section 2.2): a fresh assertion for every
  request, HS256-signed with the secret, or RS256/PS256/ES256-signed with a private key;
* `federated_jwt`: a token someone else issued (a projected service-account token) read from
  its file for every request and sent as the assertion: workload identity, no secret at all;
* `tls_client_auth` and `self_signed_tls_client_auth` (RFC 8705): a client certificate.

Key material is read from its files on every request and parsed again only when the bytes
changed (`KeyMaterial`), so a rotated key or certificate is used from the next request on.
Nothing here ever puts a key, a secret or an assertion into a message.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar, cast
from urllib.parse import quote_plus

import jwt
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from refresher.credentials import Credentials, read_credential_file
from refresher.errors import Reason, RefreshError
from refresher.presets import TLS_METHODS
from refresher.tokens import token_problem

if TYPE_CHECKING:
    from refresher.config import TokenJobConfig

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

# RFC 7518 3.2: an HS256 key has at least 256 bits; IdPs refuse shorter secrets for
# client_secret_jwt (Okta asks for 32 characters).
MIN_HMAC_SECRET_BYTES = 32
MIN_RSA_BITS = 2048

SigningKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
T = TypeVar("T")


@dataclass(frozen=True)
class ClientAuthentication:
    """What a token request carries to authenticate its client."""

    form: tuple[tuple[str, str], ...] = field(repr=False)
    headers: dict[str, str] = field(repr=False)
    # (certificate file, key file) for the TLS handshake, and a digest of their content: a
    # new digest means a rotated certificate, whose pooled connections must go.
    client_cert: tuple[str, str] | None = None
    client_cert_digest: str | None = None
    # What an IdP might echo back (the secret, the Basic credentials, the assertion).
    secrets: tuple[str, ...] = field(default=(), repr=False)
    # What the assertion was signed with (None: no assertion of ours).
    alg: str | None = None


def basic_authorization(client_id: str, client_secret: str, *, form_encode: bool) -> str:
    """The Basic header value. RFC 6749 2.3.1 form-urlencodes id and secret before base64."""
    if form_encode:
        client_id, client_secret = quote_plus(client_id), quote_plus(client_secret)
    # surrogateescape: an environment variable's bytes that are not UTF-8, sent as they were.
    raw = f"{client_id}:{client_secret}".encode("utf-8", "surrogateescape")
    return "Basic " + base64.b64encode(raw).decode("ascii")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


# ---------------------------------------------------------------------------- key material


@dataclass(frozen=True)
class SigningMaterial:
    key: SigningKey = field(repr=False)
    alg: str
    headers: dict[str, str]  # kid, x5t#S256, x5t


@dataclass(frozen=True)
class ClientCertificate:
    cert_file: Path
    key_file: Path
    digest: str  # of both files' content: what a pooled connection presents


class KeyMaterial:
    """Keys and certificates by path, parsed again only when a file's bytes change (a
    rotation by cert-manager, or the kubelet's update of a mounted Secret)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # (parser, path) -> (SHA-256 of the bytes parsed, what they parsed into)
        self._parsed: dict[tuple[str, Path], tuple[bytes, object]] = {}

    def _cached(self, path: Path, data: bytes, parse: Callable[[Path, bytes], T]) -> T:
        digest = hashlib.sha256(data).digest()
        key = (parse.__name__, path)
        with self._lock:
            known = self._parsed.get(key)
        if known is not None and known[0] == digest:
            return cast(T, known[1])
        value = parse(path, data)
        with self._lock:
            self._parsed[key] = (digest, value)
        return value

    def private_key(self, path: Path) -> SigningKey:
        return self._cached(path, read_credential_file(path), _parse_private_key)

    def certificate(self, path: Path) -> x509.Certificate:
        return self._cached(path, read_credential_file(path), _parse_certificate)

    def signing_material(self, job: TokenJobConfig) -> SigningMaterial:
        """private_key_jwt's key, algorithm and header, checked against each other."""
        assert job.private_key is not None
        key = self.private_key(job.private_key.file)
        alg = job.alg or ("ES256" if isinstance(key, ec.EllipticCurvePrivateKey) else "RS256")
        problem = _algorithm_problem(key, alg)
        if problem is not None:
            raise RefreshError(Reason.CREDENTIALS, f"{job.private_key.file}: {problem}")
        headers: dict[str, str] = {}
        if job.key_id is not None:
            headers["kid"] = job.key_id
        if job.certificate is not None:
            cert = self.certificate(job.certificate.file)
            _check_pair(cert, key, job.certificate.file, job.private_key.file)
            der = cert.public_bytes(serialization.Encoding.DER)
            headers["x5t#S256"] = _b64url(hashlib.sha256(der).digest())
            if job.assertion.legacy_x5t:
                headers["x5t"] = _b64url(hashlib.sha1(der, usedforsecurity=False).digest())
        return SigningMaterial(key=key, alg=alg, headers=headers)

    def client_certificate(self, job: TokenJobConfig, now: float | None) -> ClientCertificate:
        """The mTLS certificate and key: readable, a pair, and valid `now` (not checked when
        None: the config check, since a certificate cert-manager renews late is a failure to
        retry, not a config that cannot run)."""
        assert job.client_certificate is not None and job.client_key is not None
        cert_file, key_file = job.client_certificate.file, job.client_key.file
        cert_bytes = read_credential_file(cert_file)
        cert = self._cached(cert_file, cert_bytes, _parse_certificate)
        key_bytes = read_credential_file(key_file)
        key = self._cached(key_file, key_bytes, _parse_private_key)
        _check_pair(cert, key, cert_file, key_file)
        not_before = cert.not_valid_before_utc.timestamp()
        not_after = cert.not_valid_after_utc.timestamp()
        if now is not None and now >= not_after:
            raise RefreshError(
                Reason.CREDENTIALS,
                f"the client certificate in {cert_file} expired at {_iso(not_after)}; the "
                "token endpoint would refuse the TLS handshake (is it still being renewed?)",
            )
        if now is not None and now < not_before:
            raise RefreshError(
                Reason.CREDENTIALS,
                f"the client certificate in {cert_file} is valid only from {_iso(not_before)} "
                "(is this machine's clock right?)",
            )
        digest = hashlib.sha256(cert_bytes + b"\0" + key_bytes).hexdigest()
        return ClientCertificate(cert_file, key_file, digest)


def _iso(seconds: float) -> str:
    try:
        return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, ValueError, OSError):  # an `exp` of -1e300 or 1e300
        return f"{seconds:g} (out of range)"


def _check_pair(cert: x509.Certificate, key: SigningKey, cert_file: Path, key_file: Path) -> None:
    """The certificate is the one of this key (the same public key)."""
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise RefreshError(
            Reason.CREDENTIALS, f"{cert_file} is not the certificate of the key in {key_file}"
        )


def hmac_secret_problem(secret: str) -> str | None:
    """Why a client secret cannot sign client_secret_jwt's HS256 assertion (None: it can)."""
    if len(hmac_key(secret)) < MIN_HMAC_SECRET_BYTES:
        return (
            f"client_secret_jwt signs with it (the client secret), so it must be at least "
            f"{MIN_HMAC_SECRET_BYTES} bytes (RFC 7518 3.2); this one is shorter"
        )
    return None


def hmac_key(secret: str) -> bytes:
    # surrogateescape: an environment variable's bytes that are not UTF-8, as they were.
    return secret.encode("utf-8", "surrogateescape")


def _parse_private_key(path: Path, data: bytes) -> SigningKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise RefreshError(
            Reason.CREDENTIALS, f"{path} holds an encrypted private key; give it unencrypted"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise RefreshError(
            Reason.CREDENTIALS, f"{path} does not hold a PEM private key (RSA or EC)"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise RefreshError(
            Reason.CREDENTIALS, f"{path} holds a {type(key).__name__}; use an RSA or EC key"
        )
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size < MIN_RSA_BITS:
        raise RefreshError(
            Reason.CREDENTIALS,
            f"{path} holds a {key.key_size}-bit RSA key; IdPs refuse keys under "
            f"{MIN_RSA_BITS} bits",
        )
    return key


def _parse_certificate(path: Path, data: bytes) -> x509.Certificate:
    try:
        # A cert-manager tls.crt holds the chain, leaf first.
        return x509.load_pem_x509_certificates(data)[0]
    except (ValueError, IndexError):
        raise RefreshError(Reason.CREDENTIALS, f"{path} does not hold a PEM certificate") from None


def _algorithm_problem(key: SigningKey, alg: str) -> str | None:
    if alg in ("RS256", "PS256"):
        return None if isinstance(key, rsa.RSAPrivateKey) else f"{alg} needs an RSA key"
    if alg == "ES256":
        if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
            return None
        return "ES256 needs an EC key on the P-256 curve"
    return f"{alg} is not a private key algorithm (HS256 is client_secret_jwt's)"


# ------------------------------------------------------------------------------ assertions


def client_assertion(
    *,
    client_id: str,
    audience: str,
    issued_at: float,
    lifetime: float,
    key: SigningKey | bytes,
    alg: str,
    headers: dict[str, str],
    not_before: bool = False,
    jti: str | None = None,
) -> str:
    """An RFC 7523 client assertion: the client is its own issuer and subject, for one
    audience, with a unique `jti` and a short lifetime."""
    iat = int(issued_at)
    claims: dict[str, object] = {
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
        "jti": jti or secrets.token_urlsafe(24),
        "iat": iat,
        "exp": iat + int(lifetime),
    }
    if not_before:
        claims["nbf"] = iat
    return jwt.encode(claims, key, algorithm=alg, headers=headers or None)


def read_federated_assertion(path: Path, now: float | None) -> str:
    """The token in `path` (read on every request: the kubelet rotates it), checked to be a
    JWT that has not expired by `now` (not checked when None), so a stale file is named as
    such instead of the IdP's answer."""
    data = read_credential_file(path)
    try:
        token = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise RefreshError(Reason.CREDENTIALS, f"{path} does not hold a JWT") from None
    if not token or token_problem(token) is not None:
        raise RefreshError(Reason.CREDENTIALS, f"{path} does not hold a JWT")
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise RefreshError(Reason.CREDENTIALS, f"{path} does not hold a JWT") from None
    expires = claims.get("exp")
    if (
        now is not None
        and isinstance(expires, int | float)
        and not isinstance(expires, bool)
        and expires <= now
    ):
        raise RefreshError(
            Reason.CREDENTIALS,
            f"the token in {path} expired at {_iso(float(expires))}; is the kubelet (or the "
            "workload identity webhook) still rotating it?",
        )
    return token


def assertion_audience(job: TokenJobConfig, token_endpoint: str, issuer: str | None) -> str:
    audience = job.assertion.audience
    if audience == "token_endpoint":
        return token_endpoint
    if audience == "issuer":
        if issuer is None:  # validation makes this unreachable
            raise RefreshError(Reason.CREDENTIALS, "assertion.audience is `issuer`, but no issuer")
        return issuer
    return audience


# ----------------------------------------------------------------------------- the methods


def authenticate(
    job: TokenJobConfig,
    credentials: Credentials,
    *,
    token_endpoint: str,
    issuer: str | None,
    now: float,
    keys: KeyMaterial,
) -> ClientAuthentication:
    """What this job's token request to `token_endpoint` carries, now. Raises RefreshError
    (CREDENTIALS) when key material is unreadable or unusable."""
    client_id, secret = credentials.client_id, credentials.client_secret
    method = job.auth
    if method in ("client_secret_basic", "basic", "basic_raw"):
        header = basic_authorization(client_id, secret, form_encode=method != "basic_raw")
        return ClientAuthentication(
            form=(),
            headers={"Authorization": header},
            secrets=(secret, header.removeprefix("Basic ")),
        )
    if method in ("client_secret_post", "body"):
        return ClientAuthentication(
            form=(("client_id", client_id), ("client_secret", secret)),
            headers={},
            secrets=(secret,),
        )
    if method in TLS_METHODS:
        pair = keys.client_certificate(job, now)
        return ClientAuthentication(
            form=(("client_id", client_id),),
            headers={},
            client_cert=(str(pair.cert_file), str(pair.key_file)),
            client_cert_digest=pair.digest,
        )
    if method == "federated_jwt":
        assert job.assertion_file is not None
        assertion = read_federated_assertion(job.assertion_file, now)
        alg = None
    elif method == "client_secret_jwt":
        problem = hmac_secret_problem(secret)
        if problem is not None:
            raise RefreshError(Reason.CREDENTIALS, problem)
        headers = {"kid": job.key_id} if job.key_id is not None else {}
        alg = "HS256"
        assertion = _signed(
            job, client_id, token_endpoint, issuer, now, hmac_key(secret), alg, headers
        )
    else:  # private_key_jwt
        material = keys.signing_material(job)
        alg = material.alg
        assertion = _signed(
            job, client_id, token_endpoint, issuer, now, material.key, alg, material.headers
        )
    secret_values = (secret, assertion) if secret else (assertion,)
    return ClientAuthentication(
        form=(
            ("client_id", client_id),
            ("client_assertion_type", JWT_BEARER),
            ("client_assertion", assertion),
        ),
        headers={},
        secrets=secret_values,
        alg=alg,
    )


def assertion_alg(job: TokenJobConfig, keys: KeyMaterial) -> str | None:
    """What the job's own assertions are signed with (private_key_jwt: its key decides when
    `alg` is unset); None when it signs none. Raises RefreshError for an unusable key."""
    if job.auth == "private_key_jwt":
        return keys.signing_material(job).alg
    return "HS256" if job.auth == "client_secret_jwt" else None


def _signed(
    job: TokenJobConfig,
    client_id: str,
    token_endpoint: str,
    issuer: str | None,
    now: float,
    key: SigningKey | bytes,
    alg: str,
    headers: dict[str, str],
) -> str:
    return client_assertion(
        client_id=client_id,
        audience=assertion_audience(job, token_endpoint, issuer),
        issued_at=now,
        lifetime=job.assertion.lifetime,
        key=key,
        alg=alg,
        headers=headers,
        not_before=job.assertion.not_before,
    )


def check_key_material(job: TokenJobConfig, path: str) -> list[str]:
    """For config validation: the job's key, certificate or token files, read and checked as
    a token request would (except for validity times, which are a refresh's to judge: a
    late renewal is retried, not a config that cannot start), each with its config path."""
    keys = KeyMaterial()
    steps: list[tuple[str, Callable[[], object]]] = []
    if job.auth == "private_key_jwt" and job.private_key is not None:
        key_file = job.private_key.file
        steps.append(("private_key", lambda: keys.private_key(key_file)))
        if job.certificate is not None:
            cert_file = job.certificate.file
            steps.append(("certificate", lambda: keys.certificate(cert_file)))
        steps.append(("private_key", lambda: keys.signing_material(job)))
    elif job.auth == "federated_jwt" and job.assertion_file is not None:
        token_file = job.assertion_file
        steps.append(("assertion_file", lambda: read_federated_assertion(token_file, None)))
    elif job.client_certificate is not None and job.client_key is not None:
        cert_file, key_file = job.client_certificate.file, job.client_key.file
        steps.append(("client_certificate", lambda: keys.certificate(cert_file)))
        steps.append(("client_key", lambda: keys.private_key(key_file)))
        steps.append(("client_key", lambda: keys.client_certificate(job, None)))
    for name, step in steps:
        try:
            step()
        except RefreshError as err:
            return [f"{path}.{name}: {err.message}"]
    return []
