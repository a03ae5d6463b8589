"""A server on the loopback interface that serves in a thread: the local token server's base.

`refresher demo`'s token server (:mod:`refresher.localidp`) and the test doubles (the
``testdoubles`` package in the repository, which never ships) share this scaffolding, so
they behave alike where it matters to the tests that use them:

* they bind to a loopback IPv4 address only (they hand out real bearer tokens or accept any
  request, so they must never be reachable from the network);
* they serve in a daemon thread, a thread per connection, and remember their port, so a
  server can be stopped and started again at the same address;
* :meth:`LoopbackServer.stop` is prompt and final for the requests in flight, as when a
  real server goes down: it stops accepting, shuts down every open connection (a kept-alive
  client sees the server go away; a stalled handler's reads and writes fail at once), then
  sets :attr:`~LoopbackServer.stopping` (handlers that wait should wait on it, not sleep),
  and never joins handler threads;
* a client that went away is not an error: no traceback reaches stderr;
* HTTP handlers (:class:`QuietHandler`) log nothing and send no Python version in ``Server``.

The product's own listeners (metrics, health) are not built on this: see refresher/server.py.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import socketserver
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import Any, Self

__all__ = ["HandlerFactory", "LoopbackServer", "QuietHandler", "is_loopback", "owner_of"]

HandlerFactory = Callable[[Any, Any, socketserver.BaseServer], socketserver.BaseRequestHandler]
"""Makes the handler of one connection: a handler class, or a ``functools.partial`` of one."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback IPv4 address (``127.0.0.0/8``); names do not count."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.version == 4 and address.is_loopback


def owner_of(handler: socketserver.BaseRequestHandler) -> Any:
    """The :class:`LoopbackServer` a connection's handler works for. (socketserver builds
    handlers itself, with no arguments of ours, so they find their owner through the
    listener that accepted the connection.)"""
    return getattr(handler.server, "owner", None)


class _Listener(socketserver.ThreadingTCPServer):
    """A thread per connection; the open connections are tracked so stop() can end them."""

    daemon_threads = True
    block_on_close = False  # else server_close() joins every handler thread
    allow_reuse_address = True  # start() again on the same port while old sockets linger

    def __init__(
        self,
        address: tuple[str, int],
        handler: HandlerFactory,
        wrap: Callable[[socket.socket], socket.socket],
        owner: LoopbackServer,
    ) -> None:
        self.owner = owner  # what handlers serve: see `owner_of`
        self._wrap = wrap
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        return self._wrap(sock), address

    def process_request(self, request: Any, client_address: Any) -> None:
        # In the accept loop: once shutdown() has returned, every accepted connection is here.
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        with self._open_lock:
            connections = list(self._open)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away (or that stop() cut off) is not worth a traceback."""
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


class LoopbackServer:
    """Start, stop and address a loopback server; subclasses say how a connection is handled.

    A subclass passes the handler class of its connections (handlers find the server with
    :func:`owner_of`) and may override :meth:`_wrap` (to add TLS, for instance). Use as a
    context manager, or call :meth:`start` and :meth:`stop`.
    """

    poll_interval = 0.02
    """Seconds between the accept loop's checks for shutdown: the most stop() waits for it."""

    def __init__(
        self,
        handler: HandlerFactory,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        name: str = "loopback",
    ) -> None:
        if not is_loopback(host):
            kind = type(self).__name__
            raise ValueError(f"{kind} binds to loopback IPv4 addresses only, not {host!r}")
        self._host = host
        self._port = port
        self._name = name
        self._handler = handler
        self._listener: _Listener | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # ------------------------------------------------------------ for subclasses

    def _wrap(self, sock: socket.socket) -> socket.socket:
        """The socket of an accepted connection, as the handler gets it (by default as is)."""
        return sock

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> Self:
        """Bind and serve in a daemon thread.

        After :meth:`stop`, ``start()`` binds the same port again, so a test can take a server
        down and bring it back at the same URL.
        """
        if self._listener is not None:
            raise RuntimeError(f"{type(self).__name__} is already running")
        self._stopping = (
            threading.Event()
        )  # a fresh one: a late handler of the last run stays woken
        listener = _Listener((self._host, self._port), self._handler, self._wrap, self)
        self._port = int(listener.server_address[1])
        self._listener = listener
        self._thread = threading.Thread(
            target=listener.serve_forever,
            kwargs={"poll_interval": self.poll_interval},
            name=f"{self._name}-{self._port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop promptly, even while handlers wait or stall. Safe to call twice."""
        listener, thread = self._listener, self._thread
        if listener is None:
            return
        listener.shutdown()  # the accept loop ends within poll_interval: no new connections
        listener.drop_connections()  # first, so a handler woken next has nobody to answer
        self._stopping.set()  # wakes handlers waiting on it
        listener.server_close()  # does not wait for handler threads (block_on_close)
        if thread is not None:
            thread.join(timeout=5)
        self._listener = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- state

    @property
    def running(self) -> bool:
        return self._listener is not None

    @property
    def stopping(self) -> threading.Event:
        """Set by :meth:`stop`: a handler that waits should ``stopping.wait(seconds)``."""
        return self._stopping

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """The bound port; with port 0, known once started. Kept after stop()."""
        if self._port == 0:
            raise RuntimeError(
                f"{type(self).__name__} has not been started; the port is not known yet"
            )
        return self._port


class QuietHandler(BaseHTTPRequestHandler):
    """An HTTP handler that logs nothing and names no Python version in ``Server``.

    HTTP/1.0 unless a subclass sets ``protocol_version``; Nagle off, because headers and body
    are separate writes and the second would wait ~40 ms for the client's delayed ACK.
    """

    server_version = "loopback"
    # The stdlib default (HTTP/0.9) answers an unparsable request line with a bare HTML
    # body and no status line; a client should always get a status code.
    default_request_version = "HTTP/1.0"
    disable_nagle_algorithm = True

    def version_string(self) -> str:
        return self.server_version  # not "BaseHTTP/0.6 Python/3.x"

    def log_message(self, format: str, *args: Any) -> None:
        """Silence: test output stays clean and no token ever reaches a log."""
