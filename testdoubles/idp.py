"""The local token server of :mod:`refresher.localidp`, told to fail in every way an IdP fails.

:class:`LocalIdP` here is :class:`refresher.localidp.LocalIdP` (the provider-shaped server
that ``refresher demo`` ships) with a fault injector on its one hook,
:meth:`~refresher.localidp.LocalIdP._before_grant`: :meth:`LocalIdP.fail_next` queues faults
for the next token requests, :meth:`LocalIdP.set_fault` sets one for every request until
cleared. Everything else (shapes, validation, issuance, revocation, the protected endpoint,
the counters) is the shipped server's, so a test against this double tests what ships.

:class:`SigningKey` is a key pair to sign client assertions with (a client's own for
``private_key_jwt``, or a federation issuer's, such as a Kubernetes API server's), in the
forms the server registers: a PEM public key, a JWKS, a certificate.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal, assert_never

import jwt

from refresher import localidp
from refresher.localidp import RESET, Reply, Request

__all__ = ["Fault", "LocalIdP", "SigningKey", "x5t_s256"]


class Fault(Enum):
    """Ways the token endpoint can be told to fail (see :meth:`LocalIdP.fail_next`)."""

    SERVER_ERROR = "server_error"  # 500
    UNAVAILABLE = "unavailable"  # 503 with Retry-After
    RATE_LIMITED = "rate_limited"  # 429 with Retry-After
    SLOW = "slow"  # wait slow_seconds, then answer normally
    RESET = "reset"  # TCP reset, no response at all
    HTML = "html"  # 200 text/html, as from a captive portal or a misrouted proxy
    NO_ACCESS_TOKEN = "no_access_token"  # 200 JSON without access_token
    NEGATIVE_EXPIRES_IN = "negative_expires_in"  # 200 JSON, real-looking token, expires_in -60
    NOT_JSON = "not_json"  # 200 application/json whose body does not parse
    INVALID_CLIENT = "invalid_client"  # 401, as after the secret was rotated


@dataclass(frozen=True)
class _FaultPlan:
    fault: Fault
    retry_after: float | None
    slow_seconds: float


def _number(value: float) -> int | float:
    """``1.0`` -> ``1`` (what providers send), but keep ``0.5`` as it is."""
    return int(value) if float(value).is_integer() else value


class LocalIdP(localidp.LocalIdP):
    """:class:`refresher.localidp.LocalIdP` whose token endpoint can be told to fail.

    Takes the same arguments. A fault replaces the answer to a POST to the token path (it is
    still counted in :attr:`token_requests`); other requests are never faulted.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._queued_faults: deque[_FaultPlan] = deque()
        self._standing_fault: _FaultPlan | None = None

    def fail_next(
        self,
        fault: Fault,
        count: int = 1,
        *,
        retry_after: float | None = None,
        slow_seconds: float = 0.0,
    ) -> None:
        """Give the next ``count`` token requests this fault.

        Queued faults are used in order, before any fault set with :meth:`set_fault`.
        ``retry_after`` is the Retry-After of UNAVAILABLE and RATE_LIMITED (default 1).
        """
        if count < 0 or slow_seconds < 0:
            raise ValueError("count and slow_seconds must not be negative")
        plan = _FaultPlan(fault, retry_after, slow_seconds)
        with self._lock:
            self._queued_faults.extend([plan] * count)

    def set_fault(
        self,
        fault: Fault | None,
        *,
        retry_after: float | None = None,
        slow_seconds: float = 0.0,
    ) -> None:
        """Give every token request this fault until ``set_fault(None)``."""
        if slow_seconds < 0:
            raise ValueError("slow_seconds must not be negative")
        plan = None if fault is None else _FaultPlan(fault, retry_after, slow_seconds)
        with self._lock:
            self._standing_fault = plan

    def _before_grant(self, request: Request) -> Reply | None:
        with self._lock:
            plan = self._queued_faults.popleft() if self._queued_faults else self._standing_fault
        return None if plan is None else self._faulted_reply(plan)

    def _faulted_reply(self, plan: _FaultPlan) -> Reply | None:
        """The reply a fault produces, or ``None`` to answer normally (SLOW, after waiting)."""
        delay = 1.0 if plan.retry_after is None else plan.retry_after
        retry_after = ("Retry-After", str(_number(delay)))
        match plan.fault:
            case Fault.SERVER_ERROR:
                return Reply.json(500, {"error": "server_error"})
            case Fault.UNAVAILABLE:
                return Reply.json(503, {"error": "temporarily_unavailable"}, retry_after)
            case Fault.RATE_LIMITED:
                return Reply.json(429, {"error": "rate_limited"}, retry_after)
            case Fault.SLOW:
                # Wait on `stopping`, not time.sleep, so stop() is not held up by the sleeper.
                return RESET if self.stopping.wait(plan.slow_seconds) else None
            case Fault.RESET:
                return RESET
            case Fault.HTML:
                html = b"<html><body><h1>Service Unavailable</h1></body></html>"
                return Reply(200, html, content_type="text/html; charset=utf-8")
            case Fault.NO_ACCESS_TOKEN:
                payload = {"token_type": "Bearer", "expires_in": _number(self.lifetime)}
                return Reply.json(200, payload)
            case Fault.NEGATIVE_EXPIRES_IN:
                now = self._clock()
                # Signed like a real token (exp consistent with expires_in) but never
                # remembered, so the protected API refuses it.
                token = self._sign_jwt("unknown", (), None, now, now - 60)
                payload = {"access_token": token, "token_type": "Bearer", "expires_in": -60}
                return Reply.json(200, payload)
            case Fault.NOT_JSON:
                return Reply(200, b"not json{")
            case Fault.INVALID_CLIENT:
                return Reply.error(401, "invalid_client", "Client authentication failed")
            case _:
                assert_never(plan.fault)


@dataclass(frozen=True)
class SigningKey:
    """A key pair that signs JWTs with a chosen ``alg`` and ``kid`` (``cryptography``)."""

    alg: Literal["RS256", "PS256", "ES256"]
    private_key: Any = field(repr=False)
    kid: str

    @classmethod
    def generate(
        cls, alg: Literal["RS256", "PS256", "ES256"] = "RS256", kid: str | None = None
    ) -> SigningKey:
        from cryptography.hazmat.primitives.asymmetric import ec, rsa

        if alg == "ES256":
            key: Any = ec.generate_private_key(ec.SECP256R1())
        else:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return cls(alg, key, kid or uuid.uuid4().hex[:12])

    @property
    def public_pem(self) -> str:
        from cryptography.hazmat.primitives import serialization

        public = self.private_key.public_key()
        pem: bytes = public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return pem.decode()

    def jwk(self) -> dict[str, Any]:
        """The public key as a JWK, with its ``kid``, ``alg`` and ``use``."""
        algorithm = jwt.get_algorithm_by_name(self.alg)
        public = json.loads(algorithm.to_jwk(self.private_key.public_key()))
        return {**public, "kid": self.kid, "alg": self.alg, "use": "sig"}

    def jwks(self, *others: SigningKey) -> dict[str, Any]:
        return {"keys": [key.jwk() for key in (self, *others)]}

    def certificate_pem(self, common_name: str = "client") -> str:
        """A self-signed certificate for this key (what Entra registers)."""
        from cryptography.hazmat.primitives import serialization

        from testdoubles.tls import self_signed_certificate

        certificate = self_signed_certificate(self.private_key, common_name)
        return certificate.public_bytes(serialization.Encoding.PEM).decode()

    def sign(self, claims: Mapping[str, Any], **headers: Any) -> str:
        """A JWT of ``claims`` with this key's ``alg`` and ``kid`` (``kid=None`` drops it;
        other headers are added, e.g. ``**{"x5t#S256": ...}``)."""
        header = {"kid": self.kid, **headers}
        header = {name: value for name, value in header.items() if value is not None}
        return jwt.encode(dict(claims), self.private_key, algorithm=self.alg, headers=header)


def x5t_s256(certificate_pem: str | bytes) -> str:
    """The ``x5t#S256`` header for a certificate: base64url SHA-256 of its DER (RFC 7515)."""
    import ssl

    text = certificate_pem.decode() if isinstance(certificate_pem, bytes) else certificate_pem
    digest = hashlib.sha256(ssl.PEM_cert_to_DER_cert(text)).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
