"""The HTTP stack: one asyncio event loop in one thread, hosting every listener of the process.

A listener is a socket and an aiohttp `web.Application`: the metrics port today (`server.py`),
the token API and the per-job proxies later, all on this one loop. Idle and slow clients cost
a socket and a few KB, not a thread, and what aiohttp does not bound by itself is bounded here:

- **connections**: at most `Limits.max_connections` open per listener (never more than a
  quarter of the process's file descriptor limit); one past the cap is closed the moment it is
  accepted, before a byte is read, so a flood of idle connections cannot take the descriptors
  the refreshes need (`cannot read ...: Too many open files`);
- **time**: every connection is always under exactly one deadline: `header_timeout` from
  connect until its first request head is complete, `request_timeout` from then until the
  answer is written, `idle_timeout` after that until the next request head is complete. At the
  deadline the connection is cut (no answer: a client that is that slow is not reading one);
- **size**: request line, header fields and header count are capped small (these endpoints
  take no body and a few headers);
- **blocking work** (a scrape walks every job under their locks) runs in a small executor of
  its own via `run_blocking`, never on the loop, so a slow `/metrics` cannot hold up
  `/healthz`; at most `BLOCKING_WORKERS` such calls run or queue at once.

Nothing here writes to stderr: no access log, aiohttp's protocol messages (a client that sent
garbage or went away) only at `--log-level debug` and always on one line, and an error in a
handler is one `http handler failed` line with a 500. The `Server` header is `refresher`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import math
import os
import resource
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web, web_response
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger("refresher.http")
# aiohttp's per-connection messages; `logs.configure` lets them through only when debugging.
PROTOCOL_LOG = logging.getLogger("refresher.http.protocol")

SERVER_NAME = "refresher"
BLOCKING_WORKERS = 2
SHED_LOG_INTERVAL = 60.0  # at most one "shedding" warning per listener per minute

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _OneLine(logging.Filter):
    """aiohttp logs client trouble with a traceback; keep the exception's type only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            record.error = type(record.exc_info[1]).__name__
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        return True


PROTOCOL_LOG.addFilter(_OneLine())
# aiohttp puts `Python/3.x aiohttp/3.y` into every answer it makes itself (a 400 for a
# malformed request never reaches a handler or a middleware), so its default goes too.
setattr(web_response, "SERVER_SOFTWARE", SERVER_NAME)  # noqa: B010 - not re-exported

_aiohttp_handle_error = RequestHandler.handle_error


def _handle_error_quietly(
    self: RequestHandler,
    request: Any,
    status: int = 500,
    exc: BaseException | None = None,
    message: str | None = None,
) -> web.StreamResponse:
    """aiohttp's own answer to a request it could not parse quotes what it could not parse
    (`Got more than 4096 bytes when reading: b'Bearer ...'`): a credential sent in an
    oversized header would come back in the body. Answer with the status phrase alone."""
    if status != 500:
        phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else ""
        message = f"{status} {phrase}".strip() + "\n"
    return _aiohttp_handle_error(self, request, status, exc, message)


RequestHandler.handle_error = _handle_error_quietly  # type: ignore[method-assign]


@dataclass(frozen=True)
class Limits:
    """What one listener allows a client. The defaults suit the metrics port: scrapers and
    probes send one small GET, and reconnecting costs them nothing."""

    max_connections: int = 64
    """Open connections at once; one more is closed as soon as it is accepted."""
    max_per_peer: int | None = None
    """Open connections at once from one address (None: no cap of its own): one caller
    holding idle connections cannot take every slot from the others."""
    header_timeout: float = 5.0
    """From connect until the first request head is complete."""
    idle_timeout: float = 15.0
    """After an answer, until the next request head is complete."""
    request_timeout: float = 30.0
    """From a complete request head until the answer is written."""
    max_line_size: int = 4096
    max_field_size: int = 4096
    max_headers: int = 32
    backlog: int = 64


def json_answer(
    status: int, payload: dict[str, Any], *, retry_after: float | None = None
) -> web.Response:
    """An answer of the refresher's own listeners: JSON, never cached, with `Retry-After` in
    whole seconds (at least 1) when given."""
    headers = {"Cache-Control": "no-store"}
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return web.json_response(payload, status=status, headers=headers)


class ListenError(OSError):
    """A listener could not bind; the message says where and why, in one line."""


# How often a TLS listener looks at its certificate and key files for a rotation.
TLS_CHECK_SECONDS = 10.0


class TlsFiles:
    """A listener's certificate and key (PEM), re-read when either file changes: cert-manager
    or a mounted Secret rotates them in place, and new connections get the new pair. A pair
    that cannot be loaded is refused (at start, a `ListenError`; later, a log line while the
    old pair stays in use)."""

    def __init__(self, cert_file: Path, key_file: Path) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.context = _server_context()
        self._seen: tuple[tuple[int, int], tuple[int, int]] | None = None
        try:
            self.reload()
        except (OSError, ssl.SSLError) as err:
            raise ListenError(
                errno.EINVAL, f"cannot load the TLS certificate {cert_file}: {_tls_why(err)}"
            ) from None

    def _stamp(self) -> tuple[tuple[int, int], tuple[int, int]]:
        cert, key = os.stat(self.cert_file), os.stat(self.key_file)
        return (cert.st_mtime_ns, cert.st_ino), (key.st_mtime_ns, key.st_ino)

    def reload(self) -> bool:
        """Load the pair if either file changed; whether it did. Raises on a bad pair."""
        stamp = self._stamp()
        if stamp == self._seen:
            return False
        # A fresh context, swapped in whole once the pair loaded: a bad pair (a new
        # certificate whose key is not written yet) never touches the one in use.
        context = _server_context()
        context.load_cert_chain(self.cert_file, self.key_file)
        self.context = context
        self._seen = stamp
        return True

    def check(self) -> None:
        try:
            if self.reload():
                log.info("TLS certificate reloaded", extra={"path": str(self.cert_file)})
        except (OSError, ssl.SSLError) as err:
            log.warning(
                "cannot reload the TLS certificate; the previous one stays in use",
                extra={"path": str(self.cert_file), "error": _tls_why(err)},
            )


def _server_context() -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _tls_why(err: OSError | ssl.SSLError) -> str:
    reason = getattr(err, "reason", None)
    return str(reason).lower().replace("_", " ") if reason else _why(err)


def _bind(host: str, port: int, backlog: int) -> socket.socket:
    where = _where(host, port)
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        raise ListenError(errno.EINVAL, f"cannot listen on {where}: not an IP address") from None
    try:
        address = socket.getaddrinfo(
            host, port, family, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST | socket.AI_PASSIVE
        )[0][4]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as err:
        raise ListenError(err.errno, f"cannot listen on {where}: {_why(err)}") from None
    try:
        # As asyncio does. An IPv6 socket keeps the OS's dual-stack default: `::` takes IPv4
        # too where net.ipv6.bindv6only is 0 (Linux's default); asyncio would turn that off.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as err:
        sock.close()
        raise ListenError(err.errno, f"cannot listen on {where}: {_why(err)}") from None
    return sock


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _why(err: OSError) -> str:
    text = os.strerror(err.errno) if err.errno else str(err)
    return text[:1].lower() + text[1:]


def _descriptor_budget(listeners: int) -> int:
    """Connections one of `listeners` listeners may hold: its share of a quarter of the
    descriptor limit, so the refreshes (secret files, sinks, IdP and API connections) always
    have the rest."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(8, soft // 4 // max(listeners, 1))


class _Connection(asyncio.Protocol):
    """One accepted connection: counted against its listener's cap, always under one deadline,
    and otherwise aiohttp's own `RequestHandler`, to which every event is passed on."""

    __slots__ = ("_closed", "_inner", "_listener", "_timer", "_transport", "_upgrade")

    def __init__(self, listener: Listener, inner: RequestHandler) -> None:
        self._listener = listener
        self._inner = inner
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._upgrade: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        if not self._listener._admit(transport, self):
            transport.abort()  # before anything is read; the descriptor is freed at once
            return
        self._transport = transport
        # The header deadline covers a TLS handshake too: a client that never finishes one
        # holds a counted connection for that long, like one that never sends a request.
        self._deadline(self._listener.limits.header_timeout)
        tls = self._listener.tls
        if tls is None:
            self._inner.connection_made(transport)
        else:
            self._upgrade = self._listener._loop().create_task(self._start_tls(transport, tls))

    async def _start_tls(self, raw: asyncio.Transport, tls: TlsFiles) -> None:
        """TLS on an accepted, counted connection, with the certificate loaded now (so a
        rotation applies to the next connection), then aiohttp's handler on top."""
        loop = self._listener._loop()
        try:
            secure = await loop.start_tls(
                raw,
                self,
                tls.context,
                server_side=True,
                ssl_handshake_timeout=self._listener.limits.header_timeout,
            )
        except asyncio.CancelledError:  # the listener is stopping
            self._gone()
            raise
        except Exception:  # a failed or cut handshake: the connection is gone
            self._gone()
            return
        if secure is None or self._closed:
            if secure is not None:
                secure.abort()
            self._gone()
            return
        assert isinstance(secure, asyncio.Transport)
        self._listener._rekey(raw, secure)
        self._transport = secure
        self._inner.connection_made(secure)

    def _gone(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transport is not None:
            self._listener._release(self._transport)
            self._transport = None

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> None:
        self._inner.eof_received()  # None: the transport closes (aiohttp's own behaviour)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._transport is None:
            return  # shed (aiohttp never saw it), or a TLS handshake that failed
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._listener._release(self._transport)
        self._inner.connection_lost(exc)

    # The middleware moves the deadline along as requests come and go.
    def request_started(self) -> None:
        self._deadline(self._listener.limits.request_timeout)

    def request_done(self) -> None:
        self._deadline(self._listener.limits.idle_timeout)

    def _deadline(self, seconds: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._closed:
            return
        self._timer = self._listener._loop().call_later(seconds, self._expire)

    def _expire(self) -> None:
        self._timer = None
        if self._transport is not None and not self._transport.is_closing():
            self._listener.timed_out += 1
            self._transport.abort()


class Listener:
    """One bound socket serving one application. `port` is the bound port (useful with 0)."""

    def __init__(
        self,
        server: HttpServer,
        host: str,
        port: int,
        app: web.Application,
        limits: Limits,
        tls: TlsFiles | None = None,
    ) -> None:
        self.server = server
        self.tls = tls
        self.host = host
        self.limits = limits
        self.max_connections = limits.max_connections
        self.app = app
        self._socket: socket.socket | None = _bind(host, port, limits.backlog)
        self.port: int = self._socket.getsockname()[1]
        self._open: dict[asyncio.Transport, _Connection] = {}
        self._per_peer: dict[str, int] = {}  # open connections by peer address
        self.shed = 0  # connections closed at once because the cap was reached
        self.timed_out = 0  # connections cut at a deadline
        self._last_shed_log = -SHED_LOG_INTERVAL
        self._runner: web.AppRunner | None = None
        self._aserver: asyncio.AbstractServer | None = None
        # Outermost, so its deadlines and error handling cover the app's own middlewares.
        app.middlewares.insert(0, self._middleware)

    @property
    def connections(self) -> int:
        return len(self._open)

    def _loop(self) -> asyncio.AbstractEventLoop:
        assert self.server.loop is not None
        return self.server.loop

    # ------------------------------------------------------------------- on the loop only

    async def _start(self) -> None:
        limits = self.limits
        self._runner = web.AppRunner(
            self.app,
            handle_signals=False,
            access_log=None,
            logger=PROTOCOL_LOG,
            handler_cancellation=True,  # a client gone away ends its handler quietly
            keepalive_timeout=limits.idle_timeout,
            max_line_size=limits.max_line_size,
            max_field_size=limits.max_field_size,
            max_headers=limits.max_headers,
            lingering_time=1.0,
            shutdown_timeout=2.0,
        )
        await self._runner.setup()
        inner = self._runner.server
        assert inner is not None and self._socket is not None
        self._aserver = await self._loop().create_server(
            lambda: _Connection(self, inner()),
            sock=self._socket,
            backlog=limits.backlog,
        )
        if self.tls is not None:
            self._loop().call_later(TLS_CHECK_SECONDS, self._check_tls)
        self._socket = None  # the asyncio server owns and closes it now

    def _check_tls(self) -> None:
        if self._aserver is None or self.tls is None:
            return  # stopped
        self.tls.check()
        self._loop().call_later(TLS_CHECK_SECONDS, self._check_tls)

    async def _stop(self) -> None:
        if self._aserver is not None:
            self._aserver.close()
        if self._runner is not None:
            await self._runner.cleanup()
        for transport in list(self._open):
            transport.abort()
        self.close_socket()

    def _admit(self, transport: asyncio.Transport, connection: _Connection) -> bool:
        peer = _peer(transport)
        per_peer = self.limits.max_per_peer
        crowded = per_peer is not None and self._per_peer.get(peer, 0) >= per_peer
        if crowded or len(self._open) >= self.max_connections:
            self.shed += 1
            now = time.monotonic()
            if now - self._last_shed_log >= SHED_LOG_INTERVAL:
                self._last_shed_log = now
                log.warning(
                    "http connection cap reached; closing new connections",
                    extra={"port": self.port, "cap": self.max_connections, "shed": self.shed},
                )
            return False
        self._open[transport] = connection
        self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
        return True

    def _rekey(self, raw: asyncio.Transport, secure: asyncio.Transport) -> None:
        """A connection's TLS transport replaces its TCP one (same peer, same count)."""
        connection = self._open.pop(raw, None)
        if connection is not None:
            self._open[secure] = connection

    def _release(self, transport: asyncio.Transport) -> None:
        if self._open.pop(transport, None) is not None:
            peer = _peer(transport)
            left = self._per_peer.get(peer, 1) - 1
            if left > 0:
                self._per_peer[peer] = left
            else:
                self._per_peer.pop(peer, None)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        connection = self._open.get(request.transport)  # type: ignore[arg-type]
        if connection is not None:
            connection.request_started()
        try:
            try:
                response = await handler(request)
            except web.HTTPException as exc:  # the router's 404 and 405, a handler's redirect
                response = web.Response(
                    status=exc.status, text=f"{exc.reason.lower()}\n", headers=_kept(exc)
                )
            except Exception as err:
                log.error(
                    "http handler failed",
                    extra={"path": request.path, "error": type(err).__name__},
                )
                response = web.Response(status=500, text="internal error\n")
            if not response.prepared:  # a streamed answer (proxy.py) is written already
                response.headers["Server"] = SERVER_NAME
                # Written here, inside the request deadline, rather than after the middleware.
                await response.prepare(request)
                await response.write_eof()
            return response
        finally:
            if connection is not None:
                connection.request_done()

    def close_socket(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else "?"


def _kept(exc: web.HTTPException) -> dict[str, str]:
    """An HTTP exception's own headers (`Allow`, `Location`), but not those of its body."""
    body = {"content-type", "content-length"}
    return {name: value for name, value in exc.headers.items() if name.lower() not in body}


class HttpServer:
    """The event loop thread and its listeners.

    `add_listener` binds at once (so a port in use is a `ListenError` before anything else
    starts, and port 0 has its number), before or after `start()`; `start()` serves every
    listener; `stop()` closes them all and ends the thread.
    """

    def __init__(self, name: str = "refresher-http") -> None:
        self.name = name
        self.loop: asyncio.AbstractEventLoop | None = None
        self.listeners: list[Listener] = []
        self._executor = ThreadPoolExecutor(BLOCKING_WORKERS, thread_name_prefix=f"{name}-work")
        self._slots: asyncio.Semaphore | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()

    def add_listener(
        self,
        host: str,
        port: int,
        app: web.Application,
        limits: Limits | None = None,
        tls: TlsFiles | None = None,
    ) -> Listener:
        listener = Listener(self, host, port, app, limits or Limits(), tls)
        self.listeners.append(listener)
        budget = _descriptor_budget(len(self.listeners))
        for each in self.listeners:
            if each.limits.max_connections > budget:
                each.max_connections = budget
        if budget < listener.limits.max_connections:
            log.warning(
                "http connection cap lowered to fit the file descriptor limit",
                extra={"port": listener.port, "cap": budget},
            )
        if self.loop is not None:
            self._call(listener._start())
        return listener

    def start(self) -> HttpServer:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        self._started.wait()
        for listener in self.listeners:
            self._call(listener._start())
        return self

    def stop(self, timeout: float = 5.0) -> None:
        loop, thread = self.loop, self._thread
        if loop is None or thread is None:
            for listener in self.listeners:
                listener.close_socket()
            self._executor.shutdown(wait=False, cancel_futures=True)
            return
        try:
            self._call(self._stop_all(), timeout)
        except Exception as err:  # stopping must not fail the daemon's own stop
            log.warning("http stop incomplete", extra={"error": type(err).__name__})
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.loop = None

    async def run_blocking(self, function: Callable[[], T]) -> T:
        """Run `function` in the executor; at most `BLOCKING_WORKERS` run or wait at once,
        counted until the call really ends (a thread cannot be interrupted, so an abandoned
        call still holds its place)."""
        assert self._slots is not None and self.loop is not None
        loop = self.loop
        await self._slots.acquire()
        try:
            future: Future[T] = self._executor.submit(function)
        except BaseException:
            self._slots.release()
            raise

        def release(_: Future[T]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: stopping
                loop.call_soon_threadsafe(self._release_slot)

        future.add_done_callback(release)
        return await asyncio.wrap_future(future)

    # ------------------------------------------------------------------------- internals

    def _release_slot(self) -> None:
        if self._slots is not None:
            self._slots.release()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        loop.set_default_executor(self._executor)
        loop.set_exception_handler(_loop_error)
        asyncio.set_event_loop(loop)
        self.loop = loop
        self._slots = asyncio.Semaphore(BLOCKING_WORKERS)
        self._started.set()
        try:
            loop.run_forever()
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    def _call(self, coroutine: Awaitable[Any], timeout: float = 10.0) -> Any:
        assert self.loop is not None
        future = asyncio.run_coroutine_threadsafe(_as_coroutine(coroutine), self.loop)
        return future.result(timeout)

    async def _stop_all(self) -> None:
        for listener in self.listeners:
            await listener._stop()


async def _as_coroutine(awaitable: Awaitable[T]) -> T:
    return await awaitable


def _loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """asyncio's complaints (`socket.accept() out of system resource`, a transport error) as
    one log line, never a traceback."""
    error = context.get("exception")
    extra: dict[str, Any] = {"error": type(error).__name__} if error is not None else {}
    if isinstance(error, OSError) and error.errno in (errno.EMFILE, errno.ENFILE):
        extra["error"] = "too many open files"
    log.warning("http: %s", context.get("message", "event loop error"), extra=extra)
