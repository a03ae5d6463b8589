"""A loopback OAuth2 client-credentials token server that behaves like each seed provider.

``refresher demo`` runs it in-process, so short-lived JWTs can be issued and renewed
without any outside service; it behaves as each provider's public page says (see
docs/providers.md, which also lists where it differs), which is also what the test suite
needs of it. The test suite's fault-injecting token server (``testdoubles/idp.py`` in the
repository, not shipped) extends :class:`LocalIdP` through one hook,
:meth:`LocalIdP._before_grant`.

How a provider behaves is *data*: a frozen :class:`ProviderShape` in :data:`SHAPES`.
The server reads the shape; there is no subclass per provider.

The server only ever binds to a loopback address (see :mod:`refresher.loopback`): it hands
out real bearer tokens for well-known demo credentials, so it must never be reachable from
the network. It never writes to stderr, and neither tokens nor client secrets appear in
anything it logs or answers (except the token in the token response itself).

The protected API
-----------------

:data:`PROTECTED_PATH` and every path under it stand in for the API the tokens are for, and
for the upstream of the refresher's header-injecting proxy (whose tests need bodies, large,
slow and broken answers, and connection reuse):

* any of ``GET HEAD POST PUT PATCH DELETE`` (else 405); request bodies come with a
  ``Content-Length`` or ``Transfer-Encoding: chunked`` and are read as they arrive, hashed
  piece by piece and never held whole, up to 512 MiB (413 beyond, and the connection closes);
* auth as each shape says: 403 without the right ``x-api-key`` when the shape wants one,
  401 with ``WWW-Authenticate: Bearer error="invalid_token"`` unless the bearer token is one
  of ours and live. The body is always read first, so a refusal never resets the client;
* a success is JSON ``{"ok": true, "method", "path", "body_bytes", "body_sha256"}`` (``path``
  as sent, percent-encoding and all; HEAD gets the headers only);
* ``GET`` (or ``HEAD``) ``/api/protected/bytes/<N>`` answers N bytes of the pattern
  (``bytes(range(256))`` repeated; see :func:`pattern_bytes` and :func:`pattern_sha256`),
  streamed 64 KiB at a time, so N may be many GiB (up to 16 GiB);
* query parameters, on any protected path: ``delay=<s>`` waits before answering at all
  (the token is judged after the wait, so one revoked or expired meanwhile gets a 401);
  ``reset=1`` resets the connection instead of answering (after reading the body). And for
  a successful answer's body (the JSON as much as the bytes): ``chunked=1`` sends it with
  ``Transfer-Encoding: chunked`` instead of a ``Content-Length`` (to HTTP/1.1 clients);
  ``delay_body=<s>`` sends the head and the first 64 KiB, then waits before the rest (a
  body of 64 KiB or less: the head, then the wait); ``reset_after=<n>`` sends the head and
  the body's first n bytes (framed as chunks, with ``chunked=1``, but never the last
  chunk), waits up to 2 s for the client to have them all, then resets. A bad value is a
  400; other parameters are ignored (they are the API's own, as far as a proxy can tell);
* HTTP/1.1 with keep-alive (a pooling client reuses its connections): a connection idle,
  or stalled mid-request, for :attr:`LocalIdP.connection_timeout` seconds is closed, and
  :meth:`~LocalIdP.stop` ends every open one at once;
* :attr:`LocalIdP.protected_requests` records what arrived (the last 1000 requests, as
  :class:`ProtectedRequest`: method, path, query, headers in order, the body's length and
  SHA-256, the status answered and which connection it came on), for tests of what a proxy
  forwards and whether it reuses its connections.

The token endpoint answers as it always has: HTTP/1.0, one request per connection, bodies
read whole (a token request is small) and capped at 64 KiB; with ``token_keep_alive`` it
speaks HTTP/1.1 and keeps the connection, as a pooling client wants.

Client authentication
---------------------

A shape lists the methods its token endpoint accepts (``auth_methods``, RFC 7591 names);
the seed providers accept their one secret style only. One method per request (two: 400
``invalid_request``). A wrong or missing secret gets 401 ``invalid_client`` with the same
vague description as always; an assertion or certificate that does not do gets a specific,
fixed one ("client assertion expired", "jti already used", ...). The verification itself
(RFC 7523 assertions, federated service-account tokens, RFC 8705 client certificates) is in
:mod:`refresher.localidp_clients`. What a client's own assertion may be is the shape's too:
its algorithms (``assertion_algs``, listed by discovery), whether it must name a registered
certificate by thumbprint (``requires_thumbprint``: Entra), whether ``aud`` may be a list of
one (``audience_list``: not Keycloak; a list of several never), its longest lifetime
(``max_assertion_lifetime``: Auth0 5 minutes) and the clock skew allowed (``clock_skew``).
Its ``aud`` names the token endpoint's own URL or the issuer, never the mTLS alias.
:attr:`LocalIdP.authentications` records every judgement (never a secret).

With ``tls`` (:class:`IdPTls`) the server speaks HTTPS only, asking for a client
certificate when it trusts a client CA or self-signed client certificates.

Discovery
---------

``GET`` the issuer's ``/.well-known/openid-configuration`` (OpenID Connect Discovery) or
``/.well-known/oauth-authorization-server`` + the issuer's path (RFC 8414) answers the same
document (:meth:`LocalIdP.discovery_document`): ``issuer``, ``token_endpoint``,
``token_endpoint_auth_methods_supported``, ``grant_types_supported``, the signing algorithms
of the assertion methods, ``mtls_endpoint_aliases``; no ``jwks_uri`` (tokens are HS256).
``discovery=`` serves one, both or neither (404), :attr:`LocalIdP.discovery_overrides`
changes the document.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import secrets
import socket
import ssl
import struct
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from email.message import Message
from typing import Any, Literal, cast
from urllib.parse import parse_qsl, urlsplit

import jwt

from refresher.localidp_clients import (
    AUTH_METHODS,
    CLOCK_SKEW,
    KEY_ALGORITHMS,
    MAX_ASSERTION_LIFETIME,
    SECRET_ALGORITHMS,
    SUPPORTED_ALGORITHMS,
    Authentication,
    AuthPolicy,
    ClientAuthenticator,
    ClientKeys,
    ClientRequest,
    ClientVerifier,
    Federation,
    IdPTls,
    PeerCertificate,
    TlsClients,
    peer_certificate,
)
from refresher.localidp_clients import same_secret as _same
from refresher.loopback import LoopbackServer, QuietHandler, owner_of
from refresher.presets import ProviderName

__all__ = [
    "AUTH_METHODS",
    "ENTRA_TEST_TENANT",
    "PATTERN_PATH",
    "PROTECTED_PATH",
    "RESET",
    "SHAPES",
    "Authentication",
    "ClientKeys",
    "Federation",
    "IdPTls",
    "IssuedToken",
    "LocalIdP",
    "ProtectedRequest",
    "ProviderShape",
    "Reply",
    "Request",
    "TokenStatus",
    "pattern_bytes",
    "pattern_sha256",
]

PROTECTED_PATH = "/api/protected"
"""Path of the stand-in API that accepts the issued tokens (and every path under it)."""

PATTERN_PATH = PROTECTED_PATH + "/bytes"
"""``GET PATTERN_PATH/<N>`` answers the first N bytes of the pattern (:func:`pattern_bytes`)."""

_FORM = "application/x-www-form-urlencoded"
_MAX_BODY = 64 * 1024  # a token request is a few hundred bytes; refuse anything absurd
_MAX_FIELDS = 32

_CHUNK = 64 * 1024  # the unit the protected API reads and writes bodies in
_MAX_STREAMED_BODY = 512 * 1024 * 1024  # generous for a proxy's uploads, finite for a test's
_MAX_PATTERN = 16 * 1024**3  # streamed, so only time bounds it; 16 GiB is past any test
_MAX_WAIT = 3600.0  # seconds a delay may ask for: a typo should not park a thread for a day
_RESET_DRAIN = 2.0  # seconds reset_after waits for its bytes to reach the client
_MAX_CHUNK_LINE = 1024  # a chunk-size line (hex size and extensions) longer than this is bogus
_MAX_TRAILERS = 64
_PROTECTED_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
_PATTERN_METHODS = ("GET", "HEAD")
_DIGITS = re.compile(r"[0-9]{1,20}")  # a size, a length, a count: no sign, no spaces
# Header values a failing assert should not print: a record's repr masks them.
_SECRET_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "x-api-key", "x-refresher-authorization", "cookie"}
)

_PATTERN_PIECE = bytes(range(256)) * (_CHUNK // 256)
"""One 64 KiB piece of the pattern. _CHUNK is a multiple of 256, so every piece of a body
starts at the pattern's start and all full pieces are this same object: nothing is built."""


def pattern_bytes(n: int) -> bytes:
    """The first ``n`` bytes of the pattern ``PATTERN_PATH/<n>`` answers: ``bytes(range(256))``
    repeated, so byte ``i`` is ``i % 256``. Builds them all; for large n use
    :func:`pattern_sha256`."""
    if n < 0:
        raise ValueError("n must not be negative")
    return (bytes(range(256)) * (n // 256 + 1))[:n]


def _pattern_pieces(n: int) -> Iterator[bytes]:
    """The first ``n`` pattern bytes in pieces of at most 64 KiB, never more in memory."""
    for _ in range(n // _CHUNK):
        yield _PATTERN_PIECE
    if n % _CHUNK:
        yield _PATTERN_PIECE[: n % _CHUNK]


def pattern_sha256(n: int) -> str:
    """The hex SHA-256 of :func:`pattern_bytes` ``(n)``, computed without holding them."""
    if n < 0:
        raise ValueError("n must not be negative")
    digest = hashlib.sha256()
    for piece in _pattern_pieces(n):
        digest.update(piece)
    return digest.hexdigest()


@dataclass(frozen=True)
class ProviderShape:
    """How one identity provider's token endpoint behaves, as plain data. The defaults are
    plain RFC 6749 section 4.4; a provider names only where it differs."""

    name: str
    token_path: str = "/oauth2/token"
    """Path of the token endpoint."""
    params_in: Literal["query", "body"] = "body"
    """Where ``grant_type``, ``scope`` and ``audience`` must be sent; elsewhere they are
    treated as missing (Lucidworks and Lucidtech put them in the query string)."""
    client_auth: Literal["basic", "basic_raw", "body"] = "basic"
    """``basic``: ``Authorization: Basic base64(urlencode(id) ":" urlencode(secret))`` as
    RFC 6749 section 2.3.1 says (form-urlencoding, ``quote_plus`` style);
    ``basic_raw``: ``base64(id ":" secret)`` with no urlencoding;
    ``body``: ``client_id`` and ``client_secret`` as form fields. For a shape that accepts
    both, the one its provider's own examples use."""
    requires_audience: bool = False
    """An ``audience`` parameter is required (Usage Engine)."""
    scope_required: bool = False
    """A request without a scope is rejected with ``invalid_scope`` (Lucidworks, Fusion)."""
    allowed_scopes: frozenset[str] | None = None
    """``None``: any scope is granted."""
    max_scopes_per_token: int | None = None
    """Lucidworks AI wants one token per scope (1); Fusion grants both scopes in one token."""
    revokes_on_reissue: bool = False
    """A new token for a (client, scope set) revokes that pair's previous live token at
    once: Lucidworks "deletes the existing token" and its users get 401 until they reload."""
    requires_json_accept: bool = False
    """Answer 406 when ``Accept`` does not allow ``application/json``."""
    requires_api_key: bool = False
    """The protected API also wants ``x-api-key`` (Lucidtech); 403 without the right one."""
    issuer_path: str = ""
    """The issuer is ``base_url + issuer_path`` (:attr:`LocalIdP.issuer`): what issued tokens
    carry in ``iss`` and where discovery documents are served."""
    auth_methods: tuple[str, ...] = ()
    """The client authentication methods the token endpoint accepts (RFC 7591 names, see
    :data:`AUTH_METHODS`) and discovery lists. Empty: only the one ``client_auth`` says
    (the seed providers'), so credentials sent any other way are missing."""
    assertion_audiences: Literal["token_endpoint", "issuer", "either"] = "either"
    """Which ``aud`` a ``private_key_jwt`` or ``client_secret_jwt`` assertion may carry:
    the token endpoint's URL (Entra, Okta), the issuer (Auth0), or either (Keycloak)."""
    scope_suffix: str | None = None
    """Every requested scope must end with it, else 400 invalid_scope (Entra's ``/.default``,
    AADSTS1002012)."""
    assertion_algs: tuple[str, ...] = (*KEY_ALGORITHMS, *SECRET_ALGORITHMS)
    """The algorithms a ``private_key_jwt`` (the RS, PS and ES ones) or ``client_secret_jwt``
    (the HS ones) assertion may be signed with, among
    :data:`~refresher.localidp_clients.SUPPORTED_ALGORITHMS`; discovery's
    ``token_endpoint_auth_signing_alg_values_supported`` lists those of the accepted methods."""
    requires_thumbprint: bool = False
    """A ``private_key_jwt`` assertion must name a registered certificate by ``x5t#S256`` or
    ``x5t`` (Entra registers certificate credentials, and wants their thumbprint)."""
    audience_list: bool = True
    """A client assertion's ``aud`` may be a list of one (never of more); Keycloak (26.2 and
    later) wants a single string."""
    max_assertion_lifetime: float = MAX_ASSERTION_LIFETIME
    """Seconds a client's own assertion may live, ``exp - iat`` (Auth0: 5 minutes);
    ``LocalIdP(max_assertion_lifetime=)`` overrides it."""
    clock_skew: float = CLOCK_SKEW
    """Seconds an assertion's ``iat`` or ``nbf`` may be ahead of the server's clock."""

    def __post_init__(self) -> None:
        if not self.auth_methods:  # frozen: set the derived default the only way there is
            object.__setattr__(self, "auth_methods", (_SECRET_METHODS[self.client_auth],))
        unknown = set(self.auth_methods) - set(AUTH_METHODS)
        if unknown:
            raise ValueError(f"unknown auth methods {sorted(unknown)}; known: {AUTH_METHODS}")
        unsupported = set(self.assertion_algs) - set(SUPPORTED_ALGORITHMS)
        if unsupported:
            raise ValueError(
                f"unsupported assertion algorithms {sorted(unsupported)}; "
                f"supported: {SUPPORTED_ALGORITHMS}"
            )
        if self.max_assertion_lifetime <= 0:
            raise ValueError("max_assertion_lifetime must be positive")
        if self.clock_skew < 0:
            raise ValueError("clock_skew must not be negative")

    @property
    def discovery_paths(self) -> dict[str, Literal["openid", "oauth"]]:
        """Where the discovery documents are: OpenID Connect Discovery appends its suffix to
        the issuer's path, RFC 8414 inserts its own before it (a final ``/`` dropped)."""
        path = self.issuer_path.rstrip("/")
        return {
            path + "/.well-known/openid-configuration": "openid",
            "/.well-known/oauth-authorization-server" + path: "oauth",
        }


# How each secret style is named among the auth methods (basic_raw is Basic all the same).
_SECRET_METHODS: dict[str, str] = {
    "basic": "client_secret_basic",
    "basic_raw": "client_secret_basic",
    "body": "client_secret_post",
}


ENTRA_TEST_TENANT = "3f1c9b2e-7d4a-4e8f-9a61-0c5d2b7e8f14"
"""The tenant id in the ``entra`` shape's paths (a made-up one)."""

_LUCIDWORKS_SHAPE = ProviderShape(
    name="lucidworks",
    token_path="/oauth2/ausao8uveaPmyhv0v357/v1/token",
    params_in="query",
    scope_required=True,
    allowed_scopes=frozenset({"machinelearning.predict", "machinelearning.model"}),
    max_scopes_per_token=1,
    revokes_on_reissue=True,
    requires_json_accept=True,
)

# What each provider demands, and where it says so: docs/providers.md.
SHAPES: dict[ProviderName, ProviderShape] = {
    # Lucidworks AI: scope in the query string, one token per scope, revoked on reissue.
    "lucidworks": _LUCIDWORKS_SHAPE,
    # Lucidworks Fusion / Springboard: same endpoint, two scopes in one token.
    "fusion": dataclasses.replace(
        _LUCIDWORKS_SHAPE,
        name="fusion",
        allowed_scopes=frozenset({"connectedsearch.query", "datasource.push"}),
        max_scopes_per_token=None,
    ),
    # Lucidtech: grant_type in the query string; API calls also need x-api-key.
    "lucidtech": ProviderShape(name="lucidtech", params_in="query", requires_api_key=True),
    # Usage Engine: form body with client credentials and a required audience.
    "usage-engine": ProviderShape(
        name="usage-engine", token_path="/oauth/token", client_auth="body", requires_audience=True
    ),
    # Plain RFC 6749 section 4.4.
    "generic": ProviderShape(name="generic"),
    # Microsoft Entra ID (v2.0 endpoint of one tenant): secret in the body, or a certificate
    # assertion (RSA: RS256 or PS256, with the certificate's thumbprint in the header) whose
    # aud is the token endpoint; scopes are `<resource>/.default`.
    "entra": ProviderShape(
        name="entra",
        issuer_path=f"/{ENTRA_TEST_TENANT}/v2.0",
        token_path=f"/{ENTRA_TEST_TENANT}/oauth2/v2.0/token",
        client_auth="body",
        auth_methods=("client_secret_post", "private_key_jwt", "client_secret_basic"),
        assertion_audiences="token_endpoint",
        assertion_algs=("RS256", "PS256"),
        requires_thumbprint=True,
        scope_required=True,
        scope_suffix="/.default",
    ),
    # Okta (a custom authorization server, "default"): assertions name the token endpoint,
    # signed with the RS or ES algorithms (no PS), or with HS ones for client_secret_jwt.
    "okta": ProviderShape(
        name="okta",
        issuer_path="/oauth2/default",
        token_path="/oauth2/default/v1/token",
        auth_methods=(
            "client_secret_basic",
            "client_secret_post",
            "client_secret_jwt",
            "private_key_jwt",
        ),
        assertion_audiences="token_endpoint",
        assertion_algs=(
            "RS256",
            "RS384",
            "RS512",
            "ES256",
            "ES384",
            "ES512",
            "HS256",
            "HS384",
            "HS512",
        ),
    ),
    # Keycloak (realm "demo"): assertions may name the issuer or the token endpoint, in a
    # single-string aud.
    "keycloak": ProviderShape(
        name="keycloak",
        issuer_path="/realms/demo",
        token_path="/realms/demo/protocol/openid-connect/token",
        auth_methods=(
            "private_key_jwt",
            "client_secret_basic",
            "client_secret_post",
            "tls_client_auth",
            "client_secret_jwt",
        ),
        audience_list=False,
    ),
    # Auth0: the issuer has a trailing slash, assertions name it (RS256, RS384 or PS256, and
    # live 5 minutes at most), an audience is required.
    "auth0": ProviderShape(
        name="auth0",
        issuer_path="/",
        token_path="/oauth/token",
        client_auth="body",
        requires_audience=True,
        auth_methods=(
            "client_secret_basic",
            "client_secret_post",
            "private_key_jwt",
            "tls_client_auth",
            "self_signed_tls_client_auth",
        ),
        assertion_audiences="issuer",
        assertion_algs=("RS256", "RS384", "PS256"),
        max_assertion_lifetime=300.0,
    ),
}


@dataclass(frozen=True)
class IssuedToken:
    """One token this server issued, as the server remembers it."""

    access_token: str = field(repr=False)  # kept out of repr so a failing assert never prints it
    client_id: str
    scopes: frozenset[str]
    issued_at: float
    expires_at: float
    """The expiry the server enforces: the JWT's integer ``exp`` (opaque: issued_at + lifetime)."""
    revoked_at: float | None = None
    """Set when a later token for the same client and scope set replaced this one."""


TokenStatus = Literal["valid", "expired", "revoked", "unknown"]


@dataclass(frozen=True)
class Request:
    """An HTTP request, already read off the socket, so the endpoints are plain functions."""

    method: str
    path: str
    query: str
    headers: Message
    body: bytes
    """The body, for the token endpoint; empty for the protected API, which streams it."""
    body_bytes: int | None = None
    """Protected API only: the length of the body, which was read and hashed, not kept."""
    body_sha256: str | None = None
    """Protected API only: the hex SHA-256 of the body."""
    client_cert: PeerCertificate | None = None
    """The client certificate the TLS connection presented (verified by the handshake)."""
    connection: int = 0
    """Which of the server's connections it came on (from 1)."""


@dataclass(frozen=True, repr=False)
class ProtectedRequest:
    """One request the protected API received, as :attr:`LocalIdP.protected_requests` keeps it."""

    method: str
    path: str
    """As sent: not percent-decoded or normalised."""
    query: str
    """As sent, without the ``?``."""
    headers: tuple[tuple[str, str], ...]
    """Every header, in the order received, with the name as spelled."""
    body_bytes: int
    body_sha256: str
    status: int
    """The status answered; 0 when the connection was reset instead."""
    connection: int
    """Which connection it came on (the server's n-th since it was built, from 1), so a test
    can tell a reused connection from a new one."""

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (any case), or ``None``."""
        values = self.header_values(name)
        return values[0] if values else None

    def header_values(self, name: str) -> tuple[str, ...]:
        """Every value of header ``name`` (any case), in the order received."""
        wanted = name.lower()
        return tuple(value for key, value in self.headers if key.lower() == wanted)

    def __repr__(self) -> str:
        # Tokens and keys stay out of a failing assert's output, as in IssuedToken.
        shown = tuple(
            (key, "<redacted>" if key.lower() in _SECRET_HEADERS else value)
            for key, value in self.headers
        )
        return (
            f"ProtectedRequest(method={self.method!r}, path={self.path!r}, "
            f"query={self.query!r}, headers={shown!r}, body_bytes={self.body_bytes}, "
            f"body_sha256={self.body_sha256!r}, status={self.status}, "
            f"connection={self.connection})"
        )


@dataclass(frozen=True)
class Reply:
    """What the server answers; :data:`RESET` answers nothing and resets the connection."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    reset: bool = False
    """Send nothing: reset the TCP connection instead."""

    @classmethod
    def json(cls, status: int, payload: Mapping[str, object], *headers: tuple[str, str]) -> Reply:
        body = json.dumps(payload, separators=(",", ":")).encode()
        return cls(status=status, body=body, headers=headers)

    @classmethod
    def error(cls, status: int, error: str, description: str, *headers: tuple[str, str]) -> Reply:
        """An RFC 6749 section 5.2 error. Descriptions are fixed text: nothing is echoed back."""
        return cls.json(status, {"error": error, "error_description": description}, *headers)


RESET = Reply(status=0, reset=True)
"""No response at all: the connection is closed with a TCP reset."""


@dataclass(frozen=True)
class _Answer:
    """A reply and how to deliver it: what the protected API's query parameters ask for."""

    reply: Reply
    pattern_size: int | None = None
    """The body is this many pattern bytes (streamed) instead of ``reply.body``."""
    chunked: bool = False
    body_delay: float = 0.0
    """Seconds to wait after the first piece of the body (after the head, if one piece)."""
    reset_after: int | None = None
    """Send this many body bytes, then reset the connection."""

    @property
    def length(self) -> int:
        """The body's length, as the head announces it."""
        return len(self.reply.body) if self.pattern_size is None else self.pattern_size

    @property
    def sent_length(self) -> int:
        """How much of the body is sent: all of it, or ``reset_after`` bytes."""
        return self.length if self.reset_after is None else min(self.length, self.reset_after)

    def pieces(self) -> Iterator[bytes]:
        """The body in pieces of at most 64 KiB, cut short at ``reset_after``."""
        if self.pattern_size is None:
            body = self.reply.body
            whole: Iterable[bytes] = (body[i : i + _CHUNK] for i in range(0, len(body), _CHUNK))
        else:
            whole = _pattern_pieces(self.pattern_size)
        left = self.sent_length
        for piece in whole:
            if left <= 0:
                return
            yield piece[:left]
            left -= len(piece)


@dataclass(frozen=True)
class _Options:
    """The protected API's own query parameters (see the module docstring)."""

    delay: float = 0.0
    delay_body: float = 0.0
    reset: bool = False
    reset_after: int | None = None
    chunked: bool = False


_FLAGS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


class _Rejected(Exception):
    """Raised by a validation step; carries the error reply to send."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.status)
        self.reply = reply


def _number(value: float) -> int | float:
    """``3600.0`` -> ``3600`` (what providers send), but keep ``1.5`` as it is."""
    return int(value) if float(value).is_integer() else value


def _json(status: int, payload: Mapping[str, object], *headers: tuple[str, str]) -> Reply:
    return Reply.json(status, payload, *headers)


def _error(status: int, error: str, description: str, *headers: tuple[str, str]) -> _Rejected:
    return _Rejected(Reply.error(status, error, description, *headers))


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def _accepts_json(accept: str | None) -> bool:
    """Whether an ``Accept`` header allows ``application/json``.

    No header means "anything" (RFC 9110 section 12.5.1). The most specific matching
    range decides, so ``*/*, application/json;q=0`` refuses JSON.
    """
    if accept is None or not accept.strip():
        return True
    specificity_of = {"application/json": 2, "application/*": 1, "*/*": 0}
    best: tuple[int, float] | None = None
    for item in accept.split(","):
        media, *params = (part.strip() for part in item.split(";"))
        specificity = specificity_of.get(media.lower())
        if specificity is None:
            continue
        quality = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if best is None or specificity > best[0]:
            best = (specificity, quality)
    return best is not None and best[1] > 0


@dataclass(frozen=True)
class _Form:
    """A token request's parameters: each once, but ``resource`` as often as it was sent."""

    fields: dict[str, str]
    """Every parameter but ``resource``."""
    resources: tuple[str, ...]
    names: tuple[str, ...]
    """Every parameter's name, in order, each once."""


# RFC 8707 section 2: one `resource` parameter per target, so it may repeat.
_REPEATABLE = "resource"


def _parse_form(text: str) -> _Form:
    """Parse form-urlencoded text; a repeated parameter is an error (RFC 6749 section 3.1),
    except ``resource``."""
    try:
        pairs = parse_qsl(text, keep_blank_values=True, errors="strict", max_num_fields=_MAX_FIELDS)
    except ValueError:  # bad percent-encoding, non-UTF-8, too many fields
        raise _error(400, "invalid_request", "Malformed form encoding") from None
    params: dict[str, str] = {}
    resources: list[str] = []
    for key, value in pairs:
        if key == _REPEATABLE:
            resources.append(value)
        elif key in params:
            raise _error(400, "invalid_request", "A parameter was sent more than once")
        else:
            params[key] = value
    names = tuple(dict.fromkeys(key for key, _ in pairs))
    return _Form(params, tuple(resources), names)


def _bearer_token(header: str | None) -> str | None:
    scheme, _, token = (header or "").strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _is_protected(path: str) -> bool:
    return path == PROTECTED_PATH or path.startswith(PROTECTED_PATH + "/")


def _pattern_size(path: str) -> int | None:
    """N for ``PATTERN_PATH/<N>``; ``None`` for any other protected path."""
    prefix = PATTERN_PATH + "/"
    if not path.startswith(prefix):
        return None
    text = path[len(prefix) :]
    if not _DIGITS.fullmatch(text) or int(text) > _MAX_PATTERN:
        raise _error(400, "invalid_request", f"N must be a whole number up to {_MAX_PATTERN}")
    return int(text)


def _seconds(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= _MAX_WAIT:  # also refuses nan
        raise _error(400, "invalid_request", f"{name} must be seconds from 0 to {_MAX_WAIT:g}")
    return value


def _flag(name: str, text: str) -> bool:
    value = _FLAGS.get(text.strip().lower())
    if value is None:
        raise _error(400, "invalid_request", f"{name} must be 1 or 0")
    return value


def _byte_count(name: str, text: str) -> int:
    if not _DIGITS.fullmatch(text):
        raise _error(400, "invalid_request", f"{name} must be a whole number of bytes")
    return int(text)


# The protected API's own query parameters and how each is read (fields of _Options).
_OPTION_PARSERS: dict[str, Callable[[str, str], object]] = {
    "delay": _seconds,
    "delay_body": _seconds,
    "reset": _flag,
    "reset_after": _byte_count,
    "chunked": _flag,
}


def _options(query: str) -> _Options:
    """Read the protected API's parameters from a query string; the rest is not ours to judge
    (a proxied API's own query may repeat keys, or be anything at all)."""
    given: dict[str, object] = {}
    for key, text in parse_qsl(query, keep_blank_values=True):
        parse = _OPTION_PARSERS.get(key)
        if parse is None:
            continue
        if key in given:
            raise _error(400, "invalid_request", f"{key} was sent more than once")
        given[key] = parse(key, text)
    return _Options(**cast(dict[str, Any], given))


def _chunk_frame(piece: bytes) -> bytes:
    """One chunk of a ``Transfer-Encoding: chunked`` body (RFC 9112 section 7.1)."""
    return b"%x\r\n%b\r\n" % (len(piece), piece)


def _unacknowledged(sock: socket.socket) -> int:
    """Bytes sent on ``sock`` that the peer has not acknowledged yet; 0 where the system
    cannot tell (TIOCOUTQ is Linux's)."""
    try:
        import fcntl
        import termios

        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except (ImportError, AttributeError, OSError):
        return 0
    return int(struct.unpack("i", raw)[0])


def _shape(
    shape: str | ProviderShape,
    *,
    auth_methods: Iterable[str] | None,
    assertion_audiences: Literal["token_endpoint", "issuer", "either"] | None,
    max_assertion_lifetime: float | None = None,
) -> ProviderShape:
    """The named shape (or the one given), with the constructor's overrides."""
    if isinstance(shape, str):
        if shape not in SHAPES:
            raise ValueError(f"unknown provider shape {shape!r}; known: {sorted(SHAPES)}")
        shape = SHAPES[shape]
    overrides: dict[str, Any] = {}
    if auth_methods is not None:
        overrides["auth_methods"] = tuple(auth_methods)
    if assertion_audiences is not None:
        overrides["assertion_audiences"] = assertion_audiences
    if max_assertion_lifetime is not None:
        overrides["max_assertion_lifetime"] = max_assertion_lifetime
    return dataclasses.replace(shape, **overrides) if overrides else shape


def _discovery_path(shape: ProviderShape, kind: Literal["openid", "oauth"]) -> str:
    return next(path for path, which in shape.discovery_paths.items() if which == kind)


class LocalIdP(LoopbackServer):
    """A token endpoint plus a protected API on 127.0.0.1, shaped like one provider.

    Use as a context manager, or call :meth:`start` and :meth:`stop` (see
    :class:`~refresher.loopback.LoopbackServer`). All methods and properties are
    thread-safe; the counters, :attr:`issued` and :attr:`protected_requests` are snapshots.
    ``record_limit`` is how many protected requests :attr:`protected_requests` (and
    authentications :attr:`authentications`) keeps.

    Client authentication: ``auth_methods`` and ``assertion_audiences`` override the shape's;
    ``client_keys`` maps a client id to the keys of its private_key_jwt assertions (PEM
    public key, PEM certificates, or a JWKS; :meth:`set_client_keys` changes them);
    client_secret_jwt uses ``clients``' secrets; ``federation`` trusts another issuer's
    tokens; assertions may live ``max_assertion_lifetime`` seconds (default: the shape's).
    ``tls`` serves HTTPS and
    takes client certificates (:meth:`set_tls_client`, :meth:`set_self_signed_client`).
    ``discovery`` and ``mtls_endpoint_alias`` shape the discovery documents.
    """

    connection_timeout: float = 10.0
    """Seconds a connection may sit idle between requests, or stall mid-request, before the
    server closes it, so no kept-alive client pins a thread for ever. Settable; affects
    connections accepted afterwards."""

    def __init__(
        self,
        shape: str | ProviderShape = "generic",
        *,
        lifetime: float = 3600.0,
        clients: Mapping[str, str] | None = None,
        audience: str = "https://api.example.test",
        api_key: str = "demo-api-key",
        token_format: Literal["jwt", "opaque"] = "jwt",
        send_expires_in: bool = True,
        clock: Callable[[], float] = time.time,
        host: str = "127.0.0.1",
        port: int = 0,
        record_limit: int = 1000,
        auth_methods: Iterable[str] | None = None,
        assertion_audiences: Literal["token_endpoint", "issuer", "either"] | None = None,
        client_keys: Mapping[str, ClientKeys] | None = None,
        federation: Federation | None = None,
        max_assertion_lifetime: float | None = None,
        tls: IdPTls | None = None,
        token_keep_alive: bool = False,
        discovery: Literal["both", "openid", "oauth", "none"] = "both",
        mtls_endpoint_alias: str | None = None,
    ) -> None:
        shape = _shape(
            shape,
            auth_methods=auth_methods,
            assertion_audiences=assertion_audiences,
            max_assertion_lifetime=max_assertion_lifetime,
        )
        super().__init__(_Handler, host=host, port=port, name=f"localidp-{shape.name}")
        self.shape = shape
        self.lifetime = lifetime
        """Seconds a token lives; affects tokens issued afterwards."""
        self._clients = dict({"demo-client": "demo-secret"} if clients is None else clients)
        self._audience = audience
        self._api_key = api_key
        self._token_format = token_format
        self._send_expires_in = send_expires_in
        self._clock = clock
        self._signing_key = secrets.token_bytes(32)  # HS256, fresh per server

        self._lock = threading.Lock()
        self._tokens: dict[str, IssuedToken] = {}  # insertion order = issue order
        # Requests seen: "token" (every request to the token path, faulted, rejected or not),
        # and the protected API's answers "ok", "unauthorized" (401) and "forbidden" (403).
        self._counts: Counter[str] = Counter()
        # The protected API's last requests (bounded: a long soak must not grow without end).
        self._protected_log: deque[ProtectedRequest] = deque(maxlen=record_limit)
        self._connections = 0  # accepted so far, to number them

        self._tls = None if tls is None else TlsClients(tls)
        verifier = ClientVerifier(client_keys=client_keys or {}, federation=federation)
        self._client_auth = ClientAuthenticator(
            clients=self._clients, verifier=verifier, tls=self._tls
        )
        self._authentications: deque[Authentication] = deque(maxlen=record_limit)
        self.token_keep_alive = token_keep_alive
        """The token endpoint speaks HTTP/1.1 and keeps connections open (else HTTP/1.0,
        one request per connection). Settable; affects requests read afterwards."""
        self._discovery = discovery
        self._mtls_endpoint_alias = mtls_endpoint_alias
        self._discovery_overrides: dict[str, object] = {}
        self._discovery_counts: Counter[str] = Counter()

    # ---------------------------------------------------------------- addresses

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>`` (``https`` with ``tls``); with port 0, known once
        started. Kept after stop()."""
        scheme = "http" if self._tls is None else "https"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def issuer(self) -> str:
        """``base_url`` plus the shape's issuer path: tokens' ``iss``, discovery's ``issuer``."""
        return self.base_url + self.shape.issuer_path

    @property
    def token_url(self) -> str:
        return self.base_url + self.shape.token_path

    @property
    def protected_url(self) -> str:
        return self.base_url + PROTECTED_PATH

    @property
    def openid_configuration_url(self) -> str:
        """Where OpenID Connect Discovery looks: the issuer's URL and
        ``/.well-known/openid-configuration``."""
        return self.base_url + _discovery_path(self.shape, "openid")

    @property
    def oauth_metadata_url(self) -> str:
        """Where RFC 8414 looks: ``/.well-known/oauth-authorization-server`` + the issuer's path."""
        return self.base_url + _discovery_path(self.shape, "oauth")

    @property
    def ca_bundle(self) -> str | None:
        """The PEM file a client should trust for this server (``tls.ca_bundle``)."""
        return None if self._tls is None else self._tls.tls.ca_bundle

    def _wrap(self, sock: socket.socket) -> socket.socket:
        if self._tls is None:
            return sock
        # The handshake happens in the handler's thread (_Handler.setup), not in accept().
        return self._tls.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)

    # ------------------------------------------------------ client registrations

    def set_client_keys(self, client_id: str, keys: ClientKeys | None) -> None:
        """Register (replace) the keys ``client_id``'s private_key_jwt assertions are checked
        against: a PEM public key, PEM certificate(s) or a JWKS; ``None`` removes them."""
        self._client_auth.verifier.set_client_keys(client_id, keys)

    def set_tls_client(self, client_id: str, subject_dn: str | None) -> None:
        """Register (replace) the subject DN of a tls_client_auth client; ``None`` removes it."""
        self._require_tls().set_tls_client(client_id, subject_dn)

    def set_self_signed_client(self, client_id: str, pem: str | bytes | None) -> None:
        """Register (replace) a client's self-signed certificate(s), PEM; ``None`` removes
        them. New handshakes trust exactly the registered set."""
        self._require_tls().set_self_signed_client(client_id, pem)

    def _require_tls(self) -> TlsClients:
        if self._tls is None:
            raise RuntimeError("this server does not serve TLS (no tls= was given)")
        return self._tls

    # ---------------------------------------------------------------- discovery

    @property
    def discovery_overrides(self) -> dict[str, object]:
        """Merged over the discovery document (a key mapped to ``None`` is removed), so a
        test can serve a wrong issuer or drop a field. Mutate it, or assign a new dict;
        each answer reads it whole in one step."""
        return self._discovery_overrides

    @discovery_overrides.setter
    def discovery_overrides(self, overrides: Mapping[str, object]) -> None:
        with self._lock:
            self._discovery_overrides = dict(overrides)

    def discovery_document(self) -> dict[str, object]:
        """The metadata both discovery paths serve (RFC 8414 section 2; no jwks_uri: tokens
        are HS256-signed with a key that is nobody else's business)."""
        methods = list(self.shape.auth_methods)
        document: dict[str, object] = {
            "issuer": self.issuer,
            "token_endpoint": self.token_url,
            "token_endpoint_auth_methods_supported": methods,
            "grant_types_supported": ["client_credentials"],
        }
        algorithms = self._auth_policy().signing_algs()
        if algorithms:
            document["token_endpoint_auth_signing_alg_values_supported"] = algorithms
        if self._mtls_endpoint_alias is not None:
            document["mtls_endpoint_aliases"] = {"token_endpoint": self._mtls_endpoint_alias}
        with self._lock:
            overrides = dict(self._discovery_overrides)
        for key, value in overrides.items():
            if value is None:
                document.pop(key, None)
            else:
                document[key] = value
        return document

    # ---------------------------------------------------------------- the hook

    def _before_grant(self, request: Request) -> Reply | None:
        """Intercept a token request: the one place a subclass changes what the endpoint says.

        Called for every POST to the token path, after it is counted in
        :attr:`token_requests` and before anything in it is validated. Return a
        :class:`Reply` to send instead (:data:`RESET` to answer nothing), or ``None`` to
        validate and grant as usual. It runs on the connection's thread and may block; a
        subclass that waits should wait on :attr:`stopping`, so that :meth:`stop` stays
        prompt. This server never intercepts: it returns ``None``.
        """
        return None

    # --------------------------------------------------------------- observation

    @property
    def token_requests(self) -> int:
        """Every request to the token path, intercepted, rejected or not."""
        with self._lock:
            return self._counts["token"]

    @property
    def discovery_requests(self) -> int:
        """Requests to either discovery path, served or not (404 when disabled)."""
        with self._lock:
            return sum(self._discovery_counts.values())

    @property
    def discovery_requests_by_path(self) -> dict[str, int]:
        with self._lock:
            return dict(self._discovery_counts)

    @property
    def authentications(self) -> list[Authentication]:
        """How each token request's client authentication was judged, oldest first: the last
        ``record_limit`` (a copy). Requests refused before it (bad Content-Type, malformed
        form, a fault) have none."""
        with self._lock:
            return list(self._authentications)

    @property
    def issued(self) -> list[IssuedToken]:
        """Every token issued so far, oldest first (a copy)."""
        with self._lock:
            return list(self._tokens.values())

    @property
    def protected_ok(self) -> int:
        with self._lock:
            return self._counts["ok"]

    @property
    def protected_unauthorized(self) -> int:
        with self._lock:
            return self._counts["unauthorized"]

    @property
    def protected_forbidden(self) -> int:
        """Protected calls refused with 403 for a missing or wrong ``x-api-key``."""
        with self._lock:
            return self._counts["forbidden"]

    @property
    def protected_requests(self) -> list[ProtectedRequest]:
        """The protected API's requests, oldest first: the last ``record_limit`` (a copy).

        A request is recorded once its body has been read and its answer decided (so before
        the client has the answer); one refused for its framing (400, 411, 413, 501) or cut
        off mid-body is not.
        """
        with self._lock:
            return list(self._protected_log)

    def token_status(self, access_token: str) -> TokenStatus:
        """How the protected API would judge this token right now, by the server's clock."""
        with self._lock:
            return self._status_locked(access_token, self._clock())

    def _status_locked(self, access_token: str, now: float) -> TokenStatus:
        token = self._tokens.get(access_token)
        if token is None:
            return "unknown"
        if token.revoked_at is not None:
            return "revoked"
        # RFC 7519 4.1.4: the token must be used *before* exp.
        return "expired" if now >= token.expires_at else "valid"

    # ----------------------------------------------------------------- endpoints

    def _route(self, request: Request) -> Reply:
        """Everything but the protected API (which the handler streams: see _answer_protected)."""
        try:
            if request.path == self.shape.token_path:
                return self._token_endpoint(request)
            kind = self.shape.discovery_paths.get(request.path)
            if kind is not None:
                return self._discovery_endpoint(request, kind)
            raise _error(404, "not_found", "No such endpoint")
        except _Rejected as rejected:
            return rejected.reply

    def _answer_protected(self, request: Request, connection: int) -> _Answer:
        """The protected API's answer to a request whose body was read; recorded."""
        try:
            answer = self._protected_endpoint(request)
        except _Rejected as rejected:
            answer = _Answer(rejected.reply)
        record = ProtectedRequest(
            method=request.method,
            path=request.path,
            query=request.query,
            headers=tuple((name, str(value)) for name, value in request.headers.items()),
            body_bytes=request.body_bytes or 0,
            body_sha256=request.body_sha256 or hashlib.sha256().hexdigest(),
            status=answer.reply.status,
            connection=connection,
        )
        with self._lock:
            self._protected_log.append(record)
        return answer

    def _connection_accepted(self) -> int:
        """Number a new connection (from 1)."""
        with self._lock:
            self._connections += 1
            return self._connections

    def _discovery_endpoint(self, request: Request, kind: Literal["openid", "oauth"]) -> Reply:
        with self._lock:
            self._discovery_counts[request.path] += 1
        if self._discovery not in (kind, "both"):
            raise _error(404, "not_found", "No such endpoint")
        if request.method not in ("GET", "HEAD"):
            raise _error(405, "invalid_request", "Use GET", ("Allow", "GET, HEAD"))
        return _json(200, self.discovery_document())

    def _token_endpoint(self, request: Request) -> Reply:
        with self._lock:
            self._counts["token"] += 1
        if request.method != "POST":
            raise _error(405, "invalid_request", "Use POST", ("Allow", "POST"))
        intercepted = self._before_grant(request)
        if intercepted is not None:
            return intercepted
        return self._grant(request)

    def _grant(self, request: Request) -> Reply:
        """Validate a client-credentials request as the shape says, then issue a token."""
        shape = self.shape
        if shape.requires_json_accept and not _accepts_json(request.headers.get("Accept")):
            raise _error(406, "invalid_request", "This endpoint only answers application/json")
        if _media_type(request.headers.get("Content-Type")) != _FORM:
            raise _error(400, "invalid_request", f"Content-Type must be {_FORM}")
        try:
            body_text = request.body.decode("ascii")
        except UnicodeDecodeError:
            raise _error(400, "invalid_request", "Malformed form encoding") from None
        form = _parse_form(body_text)
        params = (_parse_form(request.query) if shape.params_in == "query" else form).fields

        client_id = self._authenticate(request, form)

        grant_type = params.get("grant_type")
        if not grant_type:
            raise _error(400, "invalid_request", "grant_type is required")
        if grant_type != "client_credentials":
            raise _error(400, "unsupported_grant_type", "Only client_credentials is supported")

        audience = None
        if shape.requires_audience:
            audience = params.get("audience")
            if not audience:
                raise _error(400, "invalid_request", "audience is required")
            if not _same(audience, self._audience):
                raise _error(403, "access_denied", "Unknown audience")

        scopes = self._granted_scopes(params.get("scope"))
        token, lifetime = self._issue(client_id, scopes, audience)
        payload: dict[str, object] = {"access_token": token.access_token, "token_type": "Bearer"}
        if self._send_expires_in:
            payload["expires_in"] = _number(lifetime)
        payload["scope"] = " ".join(scopes)
        return _json(200, payload, ("Cache-Control", "no-store"), ("Pragma", "no-cache"))

    def _authenticate(self, request: Request, form: _Form) -> str:
        """Return the client id (recorded in :attr:`authentications`), or reject: 401
        invalid_client, 400 invalid_request for two methods at once."""
        facts = ClientRequest(
            authorization=request.headers.get("Authorization"),
            fields=form.fields,
            form_keys=form.names,
            resource=form.resources,
            cert=request.client_cert,
            connection=request.connection,
        )
        record, failure = self._client_auth.authenticate(self._auth_policy(), facts, self._clock())
        with self._lock:
            self._authentications.append(record)
        if failure is not None:
            challenge = (
                (("WWW-Authenticate", 'Basic realm="localidp"'),) if failure.challenge else ()
            )
            raise _error(failure.status, failure.error, failure.description, *challenge)
        assert record.client_id is not None  # an authenticated client has an id
        return record.client_id

    def _auth_policy(self) -> AuthPolicy:
        """What the shape accepts; the audiences need the port, so built per request.

        The token endpoint's audience is its own URL only: not the mTLS alias, which is
        for client certificates, not for assertions."""
        shape = self.shape
        endpoint = {self.token_url}
        audiences = {
            "token_endpoint": endpoint,
            "issuer": {self.issuer},
            "either": endpoint | {self.issuer},
        }[shape.assertion_audiences]
        return AuthPolicy(
            methods=shape.auth_methods,
            basic_urlencoded=shape.client_auth != "basic_raw",
            assertion_audiences=frozenset(audiences),
            assertion_algs=shape.assertion_algs,
            requires_thumbprint=shape.requires_thumbprint,
            audience_list=shape.audience_list,
            max_assertion_lifetime=shape.max_assertion_lifetime,
            clock_skew=shape.clock_skew,
        )

    def _granted_scopes(self, raw: str | None) -> tuple[str, ...]:
        """Requested scopes in request order, without duplicates, after the shape's rules."""
        requested = tuple(dict.fromkeys(s for s in (raw or "").split(" ") if s))
        shape = self.shape
        if shape.scope_required and not requested:
            raise _error(400, "invalid_scope", "scope must be provided")
        allowed = shape.allowed_scopes
        if allowed is not None and not allowed.issuperset(requested):
            raise _error(400, "invalid_scope", "A requested scope is not allowed")
        limit = shape.max_scopes_per_token
        if limit is not None and len(requested) > limit:
            raise _error(400, "invalid_scope", f"At most {limit} scope(s) per token")
        suffix = shape.scope_suffix
        if suffix is not None and not all(scope.endswith(suffix) for scope in requested):
            raise _error(400, "invalid_scope", f"A client credentials scope must end with {suffix}")
        return requested

    def _issue(
        self, client_id: str, scopes: tuple[str, ...], audience: str | None
    ) -> tuple[IssuedToken, float]:
        """Mint and remember a token; revoke its predecessor if the shape says so."""
        lifetime = self.lifetime
        with self._lock:
            now = self._clock()
            if self._token_format == "jwt":
                expires_at = float(int(now + lifetime))
                access_token = self._sign_jwt(client_id, scopes, audience, now, expires_at)
            else:
                expires_at = now + lifetime
                access_token = secrets.token_urlsafe(32)
            token = IssuedToken(access_token, client_id, frozenset(scopes), now, expires_at)
            if self.shape.revokes_on_reissue:
                for old in list(self._tokens.values()):
                    same_pair = (old.client_id, old.scopes) == (client_id, token.scopes)
                    if same_pair and self._status_locked(old.access_token, now) == "valid":
                        self._tokens[old.access_token] = dataclasses.replace(old, revoked_at=now)
            self._tokens[access_token] = token
        return token, lifetime

    def _sign_jwt(
        self,
        client_id: str,
        scopes: tuple[str, ...],
        audience: str | None,
        issued_at: float,
        expires_at: float,
    ) -> str:
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": client_id,
            "scope": " ".join(scopes),
            "iat": int(issued_at),
            "exp": int(expires_at),
            "jti": secrets.token_urlsafe(16),
        }
        if audience is not None:
            claims["aud"] = audience
        return jwt.encode(claims, self._signing_key, algorithm="HS256")

    def _protected_endpoint(self, request: Request) -> _Answer:
        """A stand-in API (see the module docstring): 200 for a live token of ours, 401
        otherwise (403: bad api key), after any delay the query asks for."""
        options = _options(request.query)
        # Wait on `stopping`, not time.sleep, so stop() is not held up by the sleeper.
        if options.delay and self.stopping.wait(options.delay):
            return _Answer(RESET)  # stop() came first: the client is gone
        if options.reset:
            return _Answer(RESET)
        size = _pattern_size(request.path)
        methods = _PROTECTED_METHODS if size is None else _PATTERN_METHODS
        if request.method not in methods:
            allowed = ", ".join(methods)
            raise _error(405, "invalid_request", f"Use one of {allowed}", ("Allow", allowed))
        self._authorize(request)
        if size is None:
            reply = _json(
                200,
                {
                    "ok": True,
                    "method": request.method,
                    "path": request.path,
                    "body_bytes": request.body_bytes or 0,
                    "body_sha256": request.body_sha256 or hashlib.sha256().hexdigest(),
                },
            )
        else:
            reply = Reply(200, content_type="application/octet-stream")
        return _Answer(
            reply,
            pattern_size=size,
            chunked=options.chunked,
            body_delay=options.delay_body,
            reset_after=options.reset_after,
        )

    def _authorize(self, request: Request) -> None:
        """Raise 403 without the shape's ``x-api-key``, 401 unless the token is ours and live."""
        if self.shape.requires_api_key and not _same(
            request.headers.get("x-api-key"), self._api_key
        ):
            with self._lock:
                self._counts["forbidden"] += 1
            raise _error(403, "forbidden", "Missing or invalid x-api-key")
        token = _bearer_token(request.headers.get("Authorization"))
        with self._lock:
            status = self._status_locked(token, self._clock()) if token else "unknown"
            if status == "valid":
                self._counts["ok"] += 1
            else:
                self._counts["unauthorized"] += 1
        if status != "valid":
            challenge = ("WWW-Authenticate", 'Bearer error="invalid_token"')
            raise _error(401, "invalid_token", f"The access token is {status}", challenge)


class _Handler(QuietHandler):
    """HTTP plumbing only: read the request, hand it to the LocalIdP, write the reply.

    The token endpoint (and anything that is not the protected API) speaks HTTP/1.0, one
    request per connection, as it always has. The protected API speaks HTTP/1.1 and keeps
    the connection open for the next request, as a pooling client expects; an idle
    connection is closed after ``connection_timeout`` and stop() ends every one at once.
    """

    server_version = "localidp"
    # What parse_request() sees: HTTP/1.0 there, so a request line it refuses and a request
    # to the token endpoint are answered as always; the protected API upgrades its answer.
    protocol_version = "HTTP/1.0"
    connection_number = 0
    """Which of the server's connections this is (from 1): see ProtectedRequest.connection."""
    client_cert: PeerCertificate | None = None
    """The client certificate this (TLS) connection presented."""

    @property
    def idp(self) -> LocalIdP:
        return cast(LocalIdP, owner_of(self))

    def setup(self) -> None:
        # A client that stalls mid-request (or mid-handshake), or idles on a kept-alive
        # connection, cannot pin a thread for ever: every read and write times out
        # (StreamRequestHandler.timeout, but the server's to set).
        self.request.settimeout(self.idp.connection_timeout)
        if isinstance(self.request, ssl.SSLSocket):
            # A refused handshake (no or an untrusted client certificate) raises an OSError
            # here, which ends the connection quietly (see loopback's handle_error).
            self.request.do_handshake()
        super().setup()
        self.client_cert = peer_certificate(self.connection)
        self.connection_number = self.idp._connection_accepted()

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_HEAD = do_GET

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        try:
            if _is_protected(url.path):
                self._serve_protected(url.path, url.query)
            else:
                self._serve_token(url.path, url.query)
        finally:
            self.protocol_version = _Handler.protocol_version  # the next request starts over

    # --------------------------------------------------------- the token endpoint

    def _serve_token(self, path: str, query: str) -> None:
        if self.idp.token_keep_alive:
            self.protocol_version = "HTTP/1.1"
            self.close_connection = not self._keeps_alive()
        else:
            self.close_connection = True  # one request per connection
        try:
            request = self._read_request(path, query)
        except _Rejected as rejected:
            self.close_connection = True  # what follows the head cannot be trusted
            self._send(rejected.reply)
            return
        self._send(self.idp._route(request))

    def _read_request(self, path: str, query: str) -> Request:
        """Read the body first, always: closing with unread data would reset the connection."""
        if self.headers.get("Transfer-Encoding") is not None:
            raise _error(411, "invalid_request", "Send a Content-Length, not chunked")
        length_header = self.headers.get("Content-Length")
        try:
            # No Content-Length: no body (curl --request POST without data sends none).
            length = int(length_header) if length_header is not None else 0
        except ValueError:
            raise _error(400, "invalid_request", "Invalid Content-Length") from None
        if length < 0:
            raise _error(400, "invalid_request", "Invalid Content-Length")
        if length > _MAX_BODY:
            raise _error(413, "invalid_request", "Request body too large")
        body = self.rfile.read(length) if length else b""
        if len(body) < length:
            raise _Rejected(RESET)  # the client gave up mid-body; nobody to answer
        return Request(
            self.command,
            path,
            query,
            self.headers,
            body,
            client_cert=self.client_cert,
            connection=self.connection_number,
        )

    # ---------------------------------------------------------- the protected API

    def _serve_protected(self, path: str, query: str) -> None:
        self.protocol_version = "HTTP/1.1"
        self.close_connection = not self._keeps_alive()
        try:
            body_bytes, body_sha256 = self._stream_body()
        except _Rejected as rejected:
            # The body's framing is broken or it is too large: what follows cannot be trusted
            # to be the next request, so this connection ends with this answer.
            self.close_connection = True
            self._send(rejected.reply)
            return
        request = Request(
            self.command,
            path,
            query,
            self.headers,
            b"",
            body_bytes,
            body_sha256,
            client_cert=self.client_cert,
            connection=self.connection_number,
        )
        self._deliver(self.idp._answer_protected(request, self.connection_number))

    @property
    def _http11(self) -> bool:
        return self.request_version >= "HTTP/1.1"

    def _keeps_alive(self) -> bool:
        """HTTP/1.1 keeps the connection unless the client says ``close``; 1.0 never does."""
        options = ",".join(self.headers.get_all("Connection") or [])
        return self._http11 and "close" not in {o.strip().lower() for o in options.split(",")}

    def _stream_body(self) -> tuple[int, str]:
        """Read the whole body, hashing piece by piece: (length, hex SHA-256)."""
        pieces = self._body_pieces()
        if self._http11 and (self.headers.get("Expect") or "").lower() == "100-continue":
            self.handle_expect_100()  # only once the framing is known to be acceptable
        digest = hashlib.sha256()
        length = 0
        for piece in pieces:
            digest.update(piece)
            length += len(piece)
        return length, digest.hexdigest()

    def _body_pieces(self) -> Iterator[bytes]:
        """Check the body's framing (before anything is read) and return a reader of it."""
        codings = ",".join(self.headers.get_all("Transfer-Encoding") or [])
        coding = [c.strip().lower() for c in codings.split(",") if c.strip()]
        lengths = self.headers.get_all("Content-Length") or []
        if coding and lengths:  # RFC 9112 section 6.1: a request smuggler's signature
            raise _error(400, "invalid_request", "Send Content-Length or chunked, not both")
        if coding:
            if coding != ["chunked"]:
                raise _error(501, "invalid_request", "Only the chunked transfer coding is known")
            return self._chunked_pieces()
        if len({value.strip() for value in lengths}) > 1:
            raise _error(400, "invalid_request", "Conflicting Content-Length headers")
        text = lengths[0].strip() if lengths else "0"
        if not _DIGITS.fullmatch(text):
            raise _error(400, "invalid_request", "Invalid Content-Length")
        if int(text) > _MAX_STREAMED_BODY:
            raise _error(413, "invalid_request", "Request body too large")
        return self._sized_pieces(int(text))

    def _sized_pieces(self, length: int) -> Iterator[bytes]:
        left = length
        while left:
            piece = self.rfile.read1(min(left, _CHUNK))
            if not piece:
                raise _Rejected(RESET)  # the client gave up mid-body; nobody to answer
            left -= len(piece)
            yield piece

    def _chunked_pieces(self) -> Iterator[bytes]:
        """Decode a chunked body (RFC 9112 section 7.1); trailers are read and dropped."""
        total = 0
        while size := self._chunk_size():
            total += size
            if total > _MAX_STREAMED_BODY:
                raise _error(413, "invalid_request", "Request body too large")
            yield from self._sized_pieces(size)
            if self._line(3) not in (b"\r\n", b"\n"):
                raise _error(400, "invalid_request", "A chunk is longer than its size")
        for _ in range(_MAX_TRAILERS + 1):
            if self._line(_MAX_CHUNK_LINE) in (b"\r\n", b"\n"):
                return
        raise _error(400, "invalid_request", "Too many trailer fields")

    def _chunk_size(self) -> int:
        line = self._line(_MAX_CHUNK_LINE)
        size = line.split(b";", 1)[0].strip()  # chunk extensions are allowed and ignored
        if not re.fullmatch(rb"[0-9a-fA-F]{1,15}", size) or not line.endswith(b"\n"):
            raise _error(400, "invalid_request", "Invalid chunk size")
        return int(size, 16)

    def _line(self, limit: int) -> bytes:
        line = self.rfile.readline(limit + 1)
        if not line:
            raise _Rejected(RESET)  # the client gave up mid-body; nobody to answer
        return line

    # --------------------------------------------------------------- answering

    def _send(self, reply: Reply) -> None:
        self._deliver(_Answer(reply))

    def _deliver(self, answer: _Answer) -> None:
        reply = answer.reply
        if reply.reset:
            self._reset_connection()
            return
        chunked = answer.chunked and self._http11  # an HTTP/1.0 client cannot take chunks
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(answer.length))
        for name, value in reply.headers:
            self.send_header(name, value)
        if self.close_connection and self.protocol_version >= "HTTP/1.1":
            self.send_header("Connection", "close")  # 1.1 keeps alive unless told
        self.end_headers()
        if self.command != "HEAD" and not self._write_body(answer, chunked):
            return
        if answer.reset_after is not None:
            self._await_delivery()
            self._reset_connection()

    def _write_body(self, answer: _Answer, chunked: bool) -> bool:
        """Write the body piece by piece; ``False`` when stop() came during a body_delay."""
        pause_at = 1 if answer.sent_length > _CHUNK else 0
        for index, piece in enumerate(answer.pieces()):
            # Wait on `stopping`, not time.sleep, so stop() is not held up by the sleeper.
            if (
                index == pause_at
                and answer.body_delay
                and self.idp.stopping.wait(answer.body_delay)
            ):
                self.close_connection = True  # stop() has cut the connection already
                return False
            self.wfile.write(_chunk_frame(piece) if chunked else piece)
        if chunked and answer.reset_after is None:
            self.wfile.write(b"0\r\n\r\n")
        return True

    def _await_delivery(self) -> None:
        """Wait until the client has every byte sent (up to 2 s): a reset throws away what
        is still in our send buffer, and reset_after promises the client those bytes."""
        deadline = time.monotonic() + _RESET_DRAIN
        while _unacknowledged(self.connection) and time.monotonic() < deadline:
            if self.idp.stopping.wait(0.005):
                return

    def _reset_connection(self) -> None:
        """Close with SO_LINGER 0: the kernel sends RST and the client gets no response."""
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.rfile.close()  # drop the makefile() reference, or close() would be deferred
        self.connection.close()
