"""The header-injecting proxy: a job's consumers call its API through the refresher.

A job with `proxy:` gets a listener of its own. A consumer points its base URL at it; each
request goes to the job's one configured `upstream` with `Authorization: Bearer <current
token>` (and the configured headers, such as Lucidtech's `x-api-key`), and the answer comes
back streamed. Rule 13 of docs/design.md:

- **only the upstream**: the request target must be origin-form (`/path?query`); absolute
  URLs, `CONNECT` and `*` are refused with 400 before anything is sent; the path is
  normalised and may not climb above the upstream's base path (`..` or `%2e%2e` past it, or
  a segment hiding a `/` or `\\` as `%2F`, is refused); `Host` is always the upstream's.
  Nothing a consumer sends can steer a request to another host;
- **the consumer's credential stays here**: consumers authenticate as for the token API
  (the job's `consumers`, consumers.py) with `X-Refresher-Authorization: Bearer ...`, which
  is never forwarded; the consumer's own `Authorization` is replaced. Hop-by-hop headers
  (and those `Connection` names) go both ways; `X-Forwarded-*` only with `forwarded_headers`;
- **replay once**: when the upstream answers one of the job's `rejected_statuses` to a
  token that is no longer the current one (a refresh landed while the request was in
  flight), the request is sent again with the current token. When it was the current one,
  the rejection is reported to the job, where it counts as a probe's verdict (refresh.py;
  a follower forwards it to the leader), and the proxy waits up to `replay_wait` for a newer
  token, then replays once or passes the upstream's answer through. Never a second replay,
  never a replay of a streamed body. Each is counted and logged (`refresher_proxy_replays`);
- **streamed both ways**: request bodies up to `max_replay_body` are buffered so they can
  be replayed, as long as all bodies buffered at once fit in `replay_buffer`; larger ones
  (and those that do not fit) are streamed. Answers are streamed with the HTTP stack's
  back-pressure, so memory stays bounded whatever the size. Upstream connections are pooled;
- **errors are the proxy's own**: an upstream that cannot be reached, resets or times out
  gives a 502 or 504 with JSON `{"error", "reason"}` (`refresher_proxy_upstream_errors`);
  an answer cut mid-stream cuts the consumer's connection (never a short answer that looks
  whole). No answer, error body or log line carries the token.

Every replica serves its proxies from the token board (board.py), which a follower's Secret
watch keeps current (watch.py), so a Service can front all replicas.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import unquote

import aiohttp
import certifi
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from refresher.board import TokenBoard
from refresher.config import ProxyConfig, TokenJobConfig
from refresher.consumers import Decision, Gate
from refresher.http import HttpServer, Limits, json_answer
from refresher.metrics import ProxyStats
from refresher.refresh import ReportAnswer, ReportTicket
from refresher.tokens import Token

log = logging.getLogger(__name__)

CONSUMER_CREDENTIAL = "X-Refresher-Authorization"
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Never forwarded: set by the proxy (Host, Authorization), the consumer's credential for this
# hop, handled by the HTTP client (Expect), claims about the client or the original URL that
# upstreams build URLs, allow-lists or routes from (the proxy adds its own only when
# `forwarded_headers` says so), and every `X-Forwarded-*` (by prefix, below).
_NOT_FORWARDED = HOP_BY_HOP | {
    "host",
    "authorization",
    "x-refresher-authorization",
    "expect",
    "forwarded",
    "x-real-ip",
    "x-client-ip",
    "true-client-ip",
    "x-original-url",
    "x-rewrite-url",
}
_NOT_FORWARDED_PREFIX = "x-forwarded-"
# Methods never forwarded: TRACE echoes the request, injected token included, back to the
# consumer; CONNECT opens a tunnel to anywhere.
_REFUSED_METHODS = frozenset({"CONNECT", "TRACE", "TRACK"})
# Written by the HTTP stack for the consumer's connection, not copied from the upstream.
_NOT_RETURNED = HOP_BY_HOP | {"content-length"}
CHUNK_BYTES = 64 * 1024
# A rejection's body is kept so it can be passed through when no replay happens; a longer
# one is streamed, and its request not replayed.
MAX_REJECTION_BODY = 64 * 1024
# How long a report may take to be answered (a follower's write to the Secret included).
REPORT_WAIT = 15.0
# How long a follower waits for its watch to bring a token the leader may have fetched
# already, before it reports a rejection to the leader.
FOLLOWER_GRACE = 0.25

# Reports a rejection the proxy saw: the job's name and the token's fingerprint.
Report = Callable[[str, str], ReportTicket | None]


@dataclass
class ProxyContext:
    """What one job's proxy needs from the daemon."""

    job: TokenJobConfig
    server: HttpServer
    gate: Gate
    board: TokenBoard
    report: Report
    stats: ProxyStats
    auth_failure: Callable[[str], None] = lambda reason: None
    leading: Callable[[], bool] = lambda: True  # False on a follower (watch-fed board)
    clock: Callable[[], float] = time.time


class UpstreamError(Exception):
    """No answer from the upstream: `reason` is one of metrics.UPSTREAM_ERRORS."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def upstream_target(base_path: str, raw_target: str) -> str | None:
    """The origin-form target to send upstream for a consumer's `raw_target` (as it came,
    percent-encoding kept), below `base_path`; None when it must be refused: not
    origin-form, a character outside printable ASCII or a `#`, percent-encoding that is not
    UTF-8, or a segment that is a dot segment or hides a separator (`/`, `\\`, NUL) however
    often an upstream decodes it (`%2e%2e`, `%252e%252e`) or whatever parameters follow it
    (`..;x`, which Java servers treat as `..`); `..` above the base path is refused too."""
    if not raw_target.startswith("/") or "#" in raw_target:
        return None
    if any(not "!" <= char <= "~" for char in raw_target):
        return None
    path, question, query = raw_target.partition("?")
    kept: list[str] = []
    for segment in path.split("/")[1:]:
        kind = _segment_kind(segment)
        if kind == "refused":
            return None
        if kind == "..":
            if not kept:
                return None
            kept.pop()
        elif kind != ".":
            kept.append(segment)
    return f"{base_path}/{'/'.join(kept)}" + (f"?{query}" if question else "")


def _segment_kind(segment: str) -> str:
    """`.` or `..` (a dot segment, plain or percent-encoded once: resolved here), `plain`, or
    `refused`: a separator or a control character at any stage of decoding, a dot segment
    with parameters (`..;x`), a dot segment that shows only after a second decoding, or bytes
    that are not UTF-8 (`%c0%ae`)."""
    stage = segment
    for decodings in range(4):  # an upstream behind another may decode again
        if "/" in stage or "\\" in stage or any(char < " " or char == "\x7f" for char in stage):
            return "refused"  # a hidden separator, or a control character (CR, LF, NUL)
        name = stage.split(";", 1)[0]
        if name in (".", ".."):
            return name if stage == name and decodings <= 1 else "refused"
        try:
            decoded = unquote(stage, errors="strict")
        except UnicodeDecodeError:
            return "refused"
        if decoded == stage:
            return "plain"
        stage = decoded
    return "refused"  # still encoded after four decodings: nobody needs that


def _connection_named(headers: CIMultiDictProxy[str]) -> set[str]:
    """The headers a `Connection` header declares hop-by-hop."""
    return {
        name.strip().lower()
        for value in headers.getall("Connection", [])
        for name in value.split(",")
    }


def request_headers(
    incoming: CIMultiDictProxy[str],
    config: ProxyConfig,
    token: Token,
    *,
    upstream_host: str,
    peer: str | None,
    scheme: str,
) -> CIMultiDict[str]:
    """The headers sent upstream for a consumer's request, with `token`."""
    dropped = _NOT_FORWARDED | _connection_named(incoming)
    dropped |= {name.lower() for name in (*config.headers, *config.credential_headers)}
    headers: CIMultiDict[str] = CIMultiDict(
        (name, value)
        for name, value in incoming.items()
        if name.lower() not in dropped and not name.lower().startswith(_NOT_FORWARDED_PREFIX)
    )
    headers["Host"] = upstream_host
    headers["Authorization"] = f"Bearer {token.access_token}"
    headers.update(config.headers)
    for name, extra in config.credential_headers.items():
        headers[name] = token.extras[extra]  # checked before sending: `_missing_extra`
    if config.forwarded_headers:
        if peer is not None:
            headers["X-Forwarded-For"] = peer
        headers["X-Forwarded-Proto"] = scheme
        if (host := incoming.get("Host")) is not None:
            headers["X-Forwarded-Host"] = host
    return headers


def response_headers(upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The upstream answer's headers that go back to the consumer."""
    dropped = _NOT_RETURNED | _connection_named(upstream)
    return CIMultiDict(
        (name, value) for name, value in upstream.items() if name.lower() not in dropped
    )


def limits(config: ProxyConfig) -> Limits:
    """The proxy listener's bounds: the request deadline covers a whole exchange (a streamed
    answer and a replay's wait included); consumers' heads may be larger than the API's."""
    return Limits(
        max_connections=config.max_connections,
        max_per_peer=None if config.loopback else config.max_connections_per_address,
        request_timeout=config.timeouts.request + config.replay_wait,
        max_line_size=8190,
        max_field_size=8190,
        max_headers=100,
    )


def _reason(err: BaseException) -> str:
    """Why the upstream gave no answer, as a metric label."""
    if isinstance(err, aiohttp.ConnectionTimeoutError):
        return "connect_timeout"
    if isinstance(err, TimeoutError):  # aiohttp's socket read timeout is one too
        return "timeout"
    if isinstance(err, aiohttp.ClientSSLError | ssl.SSLError):
        return "tls"
    if isinstance(err, aiohttp.ClientConnectorError):
        return "connect"
    if isinstance(err, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError | OSError):
        return "reset"
    if isinstance(err, aiohttp.ClientPayloadError):
        return "reset"
    return "protocol"


@dataclass
class _Exchange:
    """One consumer request on its way through the proxy."""

    request: web.Request
    started: float  # perf_counter when the handler began
    url: URL | None = None
    body: bytes | None = None  # buffered: may be sent again
    streamed: AsyncIterator[bytes] | None = None  # larger than max_replay_body: sent once
    upstream: float = 0.0  # seconds spent waiting for the upstream's answer heads
    head_sent: float | None = None  # perf_counter when the answer's head went back
    reserved: int = 0  # bytes of the proxy's replay buffer this exchange holds


class Proxy:
    """One job's proxy; `app()` is its listener's application."""

    def __init__(self, context: ProxyContext) -> None:
        assert context.job.proxy is not None
        self.context = context
        self.name = context.job.name
        self.config: ProxyConfig = context.job.proxy
        self.rejected = frozenset(context.job.rejected_statuses)
        self.origin, self.base_path = self.config.upstream_base
        upstream = URL(self.origin)
        self.upstream_host = upstream.raw_authority
        self.session: aiohttp.ClientSession | None = None
        self._buffered = 0  # request bodies held for replay now, in bytes (on the loop only)
        # The report of the token rejected last (by fingerprint, and whether this replica
        # led then): its other rejections join it.
        self._last_report: tuple[tuple[str, bool], asyncio.Task[ReportAnswer | None]] | None
        self._last_report = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_replay_body + 1)
        # Every path (a newline too): `upstream_target` judges it, with a JSON answer.
        app.router.add_route("*", r"/{tail:[\s\S]*}", self.handle)
        app.middlewares.append(self._origin_form_only)
        app.on_startup.append(self._open)
        app.on_cleanup.append(self._close)
        return app

    # ------------------------------------------------------------------------- lifecycle

    async def _open(self, _: web.Application) -> None:
        cafile = str(self.config.ca_bundle) if self.config.ca_bundle else certifi.where()
        timeouts = self.config.timeouts
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=self.config.upstream_connections,
                ssl=ssl.create_default_context(cafile=cafile),
            ),
            timeout=aiohttp.ClientTimeout(
                total=None, connect=timeouts.connect, sock_read=timeouts.read
            ),
            auto_decompress=False,  # the consumer gets the upstream's bytes as they are
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            cookie_jar=aiohttp.DummyCookieJar(),  # one jar for every consumer would mix them
            trust_env=False,  # never another proxy named by the environment
        )

    async def _close(self, _: web.Application) -> None:
        if self.session is not None:
            await self.session.close()

    # ---------------------------------------------------------------------- the handler

    @web.middleware
    async def _origin_form_only(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        """Before the router has a say: a target that is not `/path` names another host
        (absolute form), a tunnel (`CONNECT host:port`) or the server itself (`*`)."""
        if not request.raw_path.startswith("/"):
            response = _json(400, "only origin-form requests (/path) are proxied")
            self.context.stats.record_request(self.name, 400, 0.0, 0.0)
            return response
        if request.method in _REFUSED_METHODS:
            response = _json(405, f"{request.method} is not proxied")
            self.context.stats.record_request(self.name, 405, 0.0, 0.0)
            return response
        return await handler(request)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        exchange = _Exchange(request, time.perf_counter())
        try:
            response = await self._handle(exchange)
        finally:
            self._buffered -= exchange.reserved
        added = (exchange.head_sent or time.perf_counter()) - exchange.started - exchange.upstream
        self.context.stats.record_request(self.name, response.status, exchange.upstream, added)
        return response

    async def _handle(self, exchange: _Exchange) -> web.StreamResponse:
        request = exchange.request
        target = upstream_target(self.base_path, request.raw_path)
        if target is None:
            return _json(400, "this path cannot be sent to the upstream")
        credentials = request.headers.getall(CONSUMER_CREDENTIAL, [])
        decision = await self.context.gate.admit(self.name, credentials, self.context.auth_failure)
        if decision.status != 200:
            return self._refused(decision)
        entry = self.context.board.current(self.name)
        assert entry is not None
        why = entry.unservable(self.context.clock())
        token = entry.token
        if why is not None or token is None:
            return _json(503, why or "no token yet", retry_after=1)
        missing = self._missing_extra(token)
        if missing is not None:
            return _json(503, missing, retry_after=5)
        exchange.url = URL(self.origin + target, encoded=True)
        try:
            exchange.body, exchange.streamed = await self._body(exchange)
        except web.RequestPayloadError:
            return _json(400, "the request body could not be read")
        try:
            return await self._forward(exchange, token)
        except UpstreamError as err:
            return self._upstream_failed(exchange, err.reason)

    async def _forward(self, exchange: _Exchange, token: Token) -> web.StreamResponse:
        answer = await self._send(exchange, token)
        if answer.status not in self.rejected:
            return await self._relay(exchange, answer)
        kept, whole = await self._rejection_body(answer)
        if not whole or exchange.streamed is not None:
            self._replayed(exchange, "not_replayable")
            if self._is_current(token):
                self._reported(token)  # not replayed, but the job still hears of it
            return await self._relay(exchange, answer, kept, whole=whole)
        newer = await self._newer_token(token)
        if newer is None:
            self._replayed(exchange, "no_new_token")
            return await self._relay(exchange, answer, kept, whole=True)
        try:
            replayed = await self._send(exchange, newer)
        except UpstreamError:
            self._replayed(exchange, "failed")
            raise
        self._replayed(exchange, "rejected" if replayed.status in self.rejected else "accepted")
        return await self._relay(exchange, replayed)

    # ------------------------------------------------------------------------ upstream

    async def _send(self, exchange: _Exchange, token: Token) -> aiohttp.ClientResponse:
        assert self.session is not None
        request = exchange.request
        peer = request.remote
        headers = request_headers(
            request.headers,
            self.config,
            token,
            upstream_host=self.upstream_host,
            peer=peer,
            scheme=request.scheme,
        )
        data = exchange.streamed if exchange.streamed is not None else exchange.body
        assert exchange.url is not None
        begun = time.perf_counter()
        try:
            return await self.session.request(
                request.method,
                exchange.url,
                headers=headers,
                data=data,
                allow_redirects=False,
                compress=None,
            )
        except (aiohttp.ClientError, TimeoutError, OSError) as err:
            raise UpstreamError(_reason(err)) from None
        finally:
            exchange.upstream += time.perf_counter() - begun

    async def _rejection_body(self, answer: aiohttp.ClientResponse) -> tuple[bytes, bool]:
        """A rejection's body, read so it can be passed on after a wait: (what was read,
        whether that is all of it). A long one is read only up to MAX_REJECTION_BODY; the
        rest is streamed after it."""
        if answer.content_length is not None and answer.content_length > MAX_REJECTION_BODY:
            return b"", False
        kept = bytearray()
        try:
            while chunk := await answer.content.read(CHUNK_BYTES):
                kept += chunk
                if len(kept) > MAX_REJECTION_BODY:
                    return bytes(kept), False
        except (aiohttp.ClientError, TimeoutError, OSError) as err:
            answer.close()
            raise UpstreamError(_reason(err)) from None
        answer.release()
        return bytes(kept), True

    async def _relay(
        self,
        exchange: _Exchange,
        answer: aiohttp.ClientResponse,
        kept: bytes = b"",
        *,
        whole: bool = False,
    ) -> web.StreamResponse:
        """The upstream's answer back to the consumer: what of its body was read already
        (`kept`; all of it when `whole`), then the rest as it arrives."""
        request = exchange.request
        if answer.status < 200:  # 101 to an upgrade it was never asked for, a stray 1xx
            answer.close()
            raise UpstreamError("protocol")
        response = web.StreamResponse(
            status=answer.status, reason=answer.reason, headers=response_headers(answer.headers)
        )
        if whole and request.method != "HEAD":
            response.content_length = len(kept)
        elif answer.content_length is not None:
            response.content_length = answer.content_length
        try:
            await response.prepare(request)
            exchange.head_sent = time.perf_counter()
            if kept:
                await response.write(kept)
            if not whole:
                while True:
                    try:
                        chunk = await answer.content.read(CHUNK_BYTES)
                    except (aiohttp.ClientError, TimeoutError, OSError) as err:
                        self._cut(exchange, _reason(err))
                        return response
                    if not chunk:
                        break
                    await response.write(chunk)
            await response.write_eof()
        except ConnectionError:
            pass  # the consumer went away; its connection is closed already
        except BaseException:
            # Its head is out: no other answer can follow on this connection.
            if request.transport is not None:
                request.transport.abort()
            raise
        finally:
            if answer.content.at_eof():
                answer.release()  # the connection goes back to the pool
            else:
                answer.close()
        return response

    def _cut(self, exchange: _Exchange, reason: str) -> None:
        """The upstream broke off its answer after its head went back: the consumer's
        connection is cut, so the short answer cannot pass for a whole one."""
        self.context.stats.record_upstream_error(self.name, reason)
        self._log_upstream("proxy: upstream answer cut off", exchange, reason)
        transport = exchange.request.transport
        if transport is not None:
            transport.abort()

    def _upstream_failed(self, exchange: _Exchange, reason: str) -> web.StreamResponse:
        self.context.stats.record_upstream_error(self.name, reason)
        self._log_upstream("proxy: no answer from the upstream", exchange, reason)
        if "timeout" in reason:
            return _json(504, "the upstream did not answer in time", reason=reason)
        return _json(502, "the upstream gave no answer", reason=reason)

    def _log_upstream(self, message: str, exchange: _Exchange, reason: str) -> None:
        request = exchange.request
        log.warning(
            message,
            extra={
                "token": self.name,
                "reason": reason,
                "method": request.method,
                "path": request.path,
            },
        )

    # ------------------------------------------------------------------------- replays

    async def _newer_token(self, sent: Token) -> Token | None:
        """A token to replay with after `sent` was rejected: the current one if a refresh
        replaced `sent` meanwhile; else, once the rejection is reported, the one that comes
        within `replay_wait` (None when none does, or the job says none will)."""
        board, name = self.context.board, self.name
        entry = board.current(name)
        assert entry is not None
        if entry.token is not None and entry.token.access_token != sent.access_token:
            return (
                self._usable(entry.token)
                if entry.unservable(self.context.clock()) is None
                else None
            )
        wait = self.config.replay_wait
        if wait <= 0:
            return None
        deadline = time.monotonic() + wait
        newer = asyncio.ensure_future(board.newer(name, entry, wait))
        try:
            if not self.context.leading():
                # A follower's board trails the leader's refresh by its watch's few
                # milliseconds; its report would be a write to the Secret, so first wait
                # a moment for the token the leader may have fetched already.
                await asyncio.wait({newer}, timeout=min(FOLLOWER_GRACE, wait))
            if not newer.done():
                report = self._reported(sent)
                left = max(0.0, deadline - time.monotonic())
                done, _ = await asyncio.wait(
                    {newer, report}, timeout=left, return_when=asyncio.FIRST_COMPLETED
                )
                if newer not in done and report in done:
                    answer = report.result()
                    if answer is not None and _none_coming(answer):
                        return None
                    await asyncio.wait({newer}, timeout=max(0.0, deadline - time.monotonic()))
            if not newer.done():
                return None
            found = newer.result()
        finally:
            newer.cancel()
        if found is None or found.token is None or found.token.access_token == sent.access_token:
            return None
        return self._usable(found.token) if found.unservable(self.context.clock()) is None else None

    def _usable(self, token: Token) -> Token | None:
        return (
            token
            if token.is_valid(self.context.clock()) and self._missing_extra(token) is None
            else None
        )

    def _is_current(self, token: Token) -> bool:
        entry = self.context.board.current(self.name)
        current = entry.token if entry is not None else None
        return current is not None and current.access_token == token.access_token

    def _reported(self, token: Token) -> asyncio.Task[ReportAnswer | None]:
        """The report of `token`'s rejection: one at a time per token, kept while its answer
        stands (a refresh is planned, or none will be) and this replica's role is the same;
        reported again otherwise."""
        key = (token.fingerprint, self.context.leading())
        if self._last_report is not None and self._last_report[0] == key:
            task = self._last_report[1]
            if not task.done() or _stands(task.result()):
                return task
        task = asyncio.ensure_future(self._send_report(token.fingerprint))
        self._last_report = (key, task)
        return task

    async def _send_report(self, fingerprint: str) -> ReportAnswer | None:
        """The job's answer to a rejection report (None: no answer in time, or it failed)."""
        context = self.context
        try:
            # Off the loop: a follower forwards it with a write to the Secret.
            ticket = await context.server.run_blocking(
                lambda: context.report(self.name, fingerprint)
            )
            if ticket is None:
                return None
            future = asyncio.wrap_future(ticket.answer)
            return await asyncio.wait_for(asyncio.shield(future), REPORT_WAIT)
        except TimeoutError:
            return None
        except Exception as err:  # the next rejection reports again
            log.error(
                "proxy: cannot report a rejection",
                extra={"token": self.name, "error": type(err).__name__},
            )
            return None

    def _replayed(self, exchange: _Exchange, outcome: str) -> None:
        self.context.stats.record_replay(self.name, outcome)
        request = exchange.request
        log.log(
            logging.INFO if outcome == "accepted" else logging.WARNING,
            "proxy: rejected request replayed"
            if outcome in ("accepted", "rejected", "failed")
            else "proxy: rejected request not replayed",
            extra={
                "token": self.name,
                "method": request.method,
                "path": request.path,
                "outcome": outcome,
            },
        )

    # ------------------------------------------------------------------------- consumer

    async def _body(self, exchange: _Exchange) -> tuple[bytes | None, AsyncIterator[bytes] | None]:
        """The request body: buffered when it is at most `max_replay_body` and fits in what
        is left of `replay_buffer` (replayable), else streamed on; (None, None) without one.
        The bytes buffered are the exchange's until it ends (`handle` gives them back)."""
        request = exchange.request
        if not request.body_exists:
            return None, None
        limit = self.config.max_replay_body
        length = request.content_length
        if length is not None and (length > limit or not self._reserve(exchange, length)):
            return None, _rest(request, b"")
        # Chunks as they arrive, joined once: no copy per chunk.
        chunks: list[bytes] = []
        size = 0
        while chunk := await request.content.readany():
            chunks.append(chunk)
            size += len(chunk)
            if size > limit or (length is None and not self._reserve(exchange, len(chunk))):
                return None, _rest(request, b"".join(chunks))
        return b"".join(chunks), None

    def _reserve(self, exchange: _Exchange, size: int) -> bool:
        """Take `size` bytes of the replay buffer for `exchange`, if they are left."""
        if self._buffered + size > self.config.replay_buffer:
            return False
        self._buffered += size
        exchange.reserved += size
        return True

    def _missing_extra(self, token: Token) -> str | None:
        for extra in self.config.credential_headers.values():
            if extra not in token.extras:
                log.error(
                    "proxy: the credentials have no %r to send", extra, extra={"token": self.name}
                )
                return f"the credentials have no {extra!r} to send"
        return None

    def _refused(self, decision: Decision) -> web.StreamResponse:
        """A consumer refused by the gate, on a connection closed after the answer."""
        if decision.status == 401:
            response = _json(401, f"a valid bearer credential is required in {CONSUMER_CREDENTIAL}")
            response.headers["WWW-Authenticate"] = 'Bearer realm="refresher"'
        elif decision.status == 503:
            response = _json(503, "cannot check the credential now", retry_after=1)
        else:
            response = _json(403, "this consumer may not use this token")
        response.force_close()
        return response


def _json(
    status: int, error: str, *, reason: str | None = None, retry_after: float | None = None
) -> web.Response:
    """An answer of the proxy's own (not the upstream's): JSON, never cached, never saying
    more than what went wrong."""
    payload = {"error": error} if reason is None else {"error": error, "reason": reason}
    return json_answer(status, payload, retry_after=retry_after)


# Answers to a report after which no new token is on its way (unless `refreshing`): the
# probe found the token alive or could not tell, the job is contested or ignores reports,
# or it will not judge another report of this token yet.
NONE_COMING = frozenset({"rejected", "accepted", "ignored", "error", "limited"})


def _none_coming(answer: ReportAnswer) -> bool:
    """Whether the job's answer to a report means no new token is on its way."""
    return not answer.refreshing and answer.outcome in NONE_COMING


def _stands(answer: ReportAnswer | None) -> bool:
    """Whether a report's answer holds for later rejections of the same token: a refresh is
    planned, or the job said none will come."""
    return answer is not None and answer.outcome == "rejected"


async def _rest(request: web.Request, first: bytes) -> AsyncIterator[bytes]:
    """A streamed request body: what was read already, then the rest as it comes."""
    if first:
        yield first
    while chunk := await request.content.read(CHUNK_BYTES):
        yield chunk
