"""A loopback HTTP(S) server whose answers are scripted as raw bytes, for hostile-IdP tests.

`tests/test_idp_client.py`'s `_Scripted` answers with a status, headers and a body; the tests here
also need what no well-behaved server does: a body that trickles in a few bytes at a time,
chunked transfer encoding without end, a gzip bomb, and TLS with a certificate from a CA
that nobody trusts. A `ScriptedServer` reads each request (recording it), then hands the
connection to a script: a function that writes whatever it likes to the socket.

A `ScriptedServer` is a `refresher.loopback.LoopbackServer`: it binds to 127.0.0.1 only, and
`stop()` ends the scripts that are still writing (they wait on `stopping` instead of sleeping,
and their connections are shut down), so no test leaves a thread behind for long.
"""

from __future__ import annotations

import socket
import socketserver
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import cast

from refresher.loopback import LoopbackServer, owner_of

__all__ = [
    "Connection",
    "Recorded",
    "Script",
    "ScriptedServer",
    "fixed",
    "response_head",
    "serving",
]

_MAX_REQUEST = 64 * 1024


@dataclass(frozen=True)
class Recorded:
    """One request as the server read it off the socket."""

    request_line: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Connection:
    """What a script gets: the socket to write to, and an event set when the server stops."""

    sock: socket.socket
    stopping: threading.Event

    def send(self, data: bytes) -> bool:
        """Write; False when the client has gone away (which ends most scripts)."""
        try:
            self.sock.sendall(data)
        except OSError:
            return False
        return True

    def pause(self, seconds: float) -> bool:
        """Wait, unless the server is stopping; False means stop writing."""
        return not self.stopping.wait(seconds)


Script = Callable[[Connection], None]


def response_head(status: int, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status} Scripted", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def fixed(status: int, headers: dict[str, str], body: bytes) -> Script:
    """A complete answer with a Content-Length."""

    def script(connection: Connection) -> None:
        head = response_head(status, {**headers, "Content-Length": str(len(body))})
        connection.send(head + body)

    return script


class _Handler(socketserver.BaseRequestHandler):
    @property
    def owner(self) -> ScriptedServer:
        return cast(ScriptedServer, owner_of(self))

    def handle(self) -> None:
        self.request.settimeout(5.0)
        try:
            if isinstance(self.request, ssl.SSLSocket):
                self.request.do_handshake()  # a client that distrusts us stops here
            recorded = _read_request(self.request)
        except (OSError, ValueError):
            return
        script = self.owner._record(recorded)
        script(Connection(self.request, self.owner.stopping))
        with suppress(OSError):
            self.request.shutdown(socket.SHUT_WR)


def _read_request(sock: socket.socket) -> Recorded:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk or len(data) > _MAX_REQUEST:
            raise ValueError("incomplete request head")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    request_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = min(int(headers.get("content-length", "0")), _MAX_REQUEST)
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            break
        body += chunk
    return Recorded(request_line, headers, body)


class ScriptedServer(LoopbackServer):
    """`with ScriptedServer(script) as server:` serves `server.url()` until the block ends."""

    def __init__(self, script: Script, *, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(_Handler, name="scripted")
        self._script = script
        self._tls = tls
        self._lock = threading.Lock()
        self._recorded: list[Recorded] = []

    def _wrap(self, sock: socket.socket) -> socket.socket:
        if self._tls is None:
            return sock
        # The handshake happens in the handler's thread (on first read), not in accept().
        return self._tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)

    def _record(self, recorded: Recorded) -> Script:
        """Remember a request; the script to answer it with."""
        with self._lock:
            self._recorded.append(recorded)
            return self._script

    def url(self, path: str = "/token", host: str = "127.0.0.1") -> str:
        scheme = "https" if self._tls is not None else "http"
        return f"{scheme}://{host}:{self.port}{path}"

    def set_script(self, script: Script) -> None:
        with self._lock:
            self._script = script

    @property
    def requests(self) -> list[Recorded]:
        with self._lock:
            return list(self._recorded)


@contextmanager
def serving(script: Script, *, tls: ssl.SSLContext | None = None) -> Iterator[ScriptedServer]:
    with ScriptedServer(script, tls=tls) as server:
        yield server
