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
"""

from __future__ import annotations

import base64
import dataclasses
import json
import secrets
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.message import Message
from typing import Any, Literal, cast
from urllib.parse import parse_qsl, unquote_plus, urlsplit

import jwt

from refresher.loopback import LoopbackServer, QuietHandler, owner_of
from refresher.presets import ProviderName

__all__ = [
    "PROTECTED_PATH",
    "RESET",
    "SHAPES",
    "IssuedToken",
    "LocalIdP",
    "ProviderShape",
    "Reply",
    "Request",
    "TokenStatus",
]

PROTECTED_PATH = "/api/protected"
"""Path of the stand-in API that accepts the issued tokens."""

_FORM = "application/x-www-form-urlencoded"
_MAX_BODY = 64 * 1024  # a token request is a few hundred bytes; refuse anything absurd
_MAX_FIELDS = 32


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
    ``body``: ``client_id`` and ``client_secret`` as form fields."""
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


def _invalid_client(*, basic: bool = False) -> _Rejected:
    """401 invalid_client; a Basic challenge when the client was to use Basic (RFC 6749 5.2)."""
    challenge = (("WWW-Authenticate", 'Basic realm="localidp"'),) if basic else ()
    return _error(401, "invalid_client", "Client authentication failed", *challenge)


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


def _parse_form(text: str) -> dict[str, str]:
    """Parse form-urlencoded text; a repeated parameter is an error (RFC 6749 section 3.1)."""
    try:
        pairs = parse_qsl(text, keep_blank_values=True, errors="strict", max_num_fields=_MAX_FIELDS)
    except ValueError:  # bad percent-encoding, non-UTF-8, too many fields
        raise _error(400, "invalid_request", "Malformed form encoding") from None
    params: dict[str, str] = {}
    for key, value in pairs:
        if key in params:
            raise _error(400, "invalid_request", "A parameter was sent more than once")
        params[key] = value
    return params


def _basic_credentials(header: str | None, *, urlencoded: bool) -> tuple[str, str] | None:
    """Decode ``Authorization: Basic ...``; ``None`` for anything malformed.

    With ``urlencoded`` both halves are form-urldecoded after base64, as RFC 6749
    section 2.3.1 requires, so a secret with ``:`` ``+`` ``%`` or a space only matches
    when the client encoded it.
    """
    if header is None:
        return None
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        client_id, colon, secret = decoded.partition(":")
        if urlencoded:
            client_id = unquote_plus(client_id, errors="strict")
            secret = unquote_plus(secret, errors="strict")
    except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
        return None
    return (client_id, secret) if colon else None


def _bearer_token(header: str | None) -> str | None:
    scheme, _, token = (header or "").strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _same(given: str | None, expected: str) -> bool:
    """Constant-time comparison, so the demo server does not teach timing leaks."""
    return given is not None and secrets.compare_digest(given.encode(), expected.encode())


class LocalIdP(LoopbackServer):
    """A token endpoint plus a protected API on 127.0.0.1, shaped like one provider.

    Use as a context manager, or call :meth:`start` and :meth:`stop` (see
    :class:`~refresher.loopback.LoopbackServer`). All methods and properties are
    thread-safe; the counters and :attr:`issued` are snapshots.
    """

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
    ) -> None:
        if isinstance(shape, str):
            if shape not in SHAPES:
                raise ValueError(f"unknown provider shape {shape!r}; known: {sorted(SHAPES)}")
            shape = SHAPES[shape]
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

    # ---------------------------------------------------------------- addresses

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>``; with port 0, known once started. Kept after stop()."""
        return f"http://{self.host}:{self.port}"

    @property
    def token_url(self) -> str:
        return self.base_url + self.shape.token_path

    @property
    def protected_url(self) -> str:
        return self.base_url + PROTECTED_PATH

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
        try:
            if request.path == self.shape.token_path:
                return self._token_endpoint(request)
            if request.path == PROTECTED_PATH:
                return self._protected_endpoint(request)
            raise _error(404, "not_found", "No such endpoint")
        except _Rejected as rejected:
            return rejected.reply

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
        params = _parse_form(request.query) if shape.params_in == "query" else form

        client_id = self._authenticate(request.headers, form)

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

    def _authenticate(self, headers: Message, form: Mapping[str, str]) -> str:
        """Return the client id, or reject with 401 invalid_client.

        Only the shape's own style counts: credentials sent another way are missing.
        """
        style = self.shape.client_auth
        if style == "body":
            given = (form.get("client_id"), form.get("client_secret"))
        else:
            pair = _basic_credentials(headers.get("Authorization"), urlencoded=style == "basic")
            given = pair or (None, None)
        client_id, secret = given
        expected = self._clients.get(client_id) if client_id is not None else None
        if client_id is None or expected is None or not _same(secret, expected):
            raise _invalid_client(basic=style != "body")
        return client_id

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
            "iss": self.base_url,
            "sub": client_id,
            "scope": " ".join(scopes),
            "iat": int(issued_at),
            "exp": int(expires_at),
            "jti": secrets.token_urlsafe(16),
        }
        if audience is not None:
            claims["aud"] = audience
        return jwt.encode(claims, self._signing_key, algorithm="HS256")

    def _protected_endpoint(self, request: Request) -> Reply:
        """A stand-in API: 200 for a live token of ours, 401 otherwise (403: bad api key)."""
        if request.method != "GET":
            raise _error(405, "invalid_request", "Use GET", ("Allow", "GET"))
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
        return _json(200, {"ok": True})


class _Handler(QuietHandler):
    """HTTP plumbing only: read the request, hand it to the LocalIdP, write the reply.

    HTTP/1.0 (the default): one request per connection, so no thread lingers on an idle
    keep-alive connection.
    """

    server_version = "localidp"
    timeout = 10  # a client that stalls mid-request cannot pin a thread for ever

    @property
    def idp(self) -> LocalIdP:
        return cast(LocalIdP, owner_of(self))

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_HEAD = do_GET

    def _dispatch(self) -> None:
        try:
            request = self._read_request()
        except _Rejected as rejected:
            self.close_connection = True
            self._send(rejected.reply)
            return
        self._send(self.idp._route(request))

    def _read_request(self) -> Request:
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
        url = urlsplit(self.path)
        return Request(self.command, url.path, url.query, self.headers, body)

    def _send(self, reply: Reply) -> None:
        if reply.reset:
            self._reset_connection()
            return
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        for name, value in reply.headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body)

    def _reset_connection(self) -> None:
        """Close with SO_LINGER 0: the kernel sends RST and the client gets no response."""
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.rfile.close()  # drop the makefile() reference, or close() would be deferred
        self.connection.close()
