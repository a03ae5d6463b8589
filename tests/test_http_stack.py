"""The HTTP stack itself (`refresher/http.py`), in-process over real sockets: deadlines on
every connection, the connection cap, errors in handlers."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable, Iterator

import pytest
import requests
from aiohttp import web

from refresher.http import HttpServer, Limits
from tests.conftest import LogCapture, wait_for
from tests.runproc import closed_by_peer, get


@pytest.fixture
def stack() -> Iterator[Callable[..., int]]:
    """Start an `HttpServer` with one listener for an app; the port. Stopped after the test."""
    servers: list[HttpServer] = []

    def start(app: web.Application, limits: Limits) -> int:
        server = HttpServer()
        listener = server.add_listener("127.0.0.1", 0, app, limits)
        servers.append(server.start())
        return listener.port

    yield start
    for server in servers:
        server.stop()


def _app() -> web.Application:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(60)
        return web.Response(text="late\n")

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("a bug in a handler")

    app = web.Application()
    app.router.add_get("/ok", ok)
    app.router.add_get("/slow", slow)
    app.router.add_get("/broken", broken)
    return app


def test_every_connection_is_under_a_deadline(stack: Callable[..., int]) -> None:
    port = stack(_app(), Limits(header_timeout=0.5, idle_timeout=0.5, request_timeout=0.5))

    def connect() -> socket.socket:
        return socket.create_connection(("127.0.0.1", port), timeout=5)

    # Silent from the start: cut at the header deadline.
    with connect() as silent:
        assert closed_by_peer(silent, within=10)

    # Trickling a head byte by byte: the deadline is for the whole head, not per byte.
    with connect() as trickle:
        trickle.settimeout(0.1)
        closed = False
        deadline = time.monotonic() + 10
        for byte in b"GET /ok HTTP/1.1\r\nX-Padding: " + b"a" * 1000:
            if time.monotonic() > deadline:
                break
            try:
                trickle.send(bytes([byte]))
                if trickle.recv(1) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except OSError:
                closed = True
                break
        assert closed

    # A kept-alive connection that goes idle after its answer: cut at the idle deadline.
    with connect() as kept:
        kept.sendall(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
        kept.settimeout(5)
        assert kept.recv(4096).startswith(b"HTTP/1.1 200")
        assert closed_by_peer(kept, within=10)

    # A request whose answer never comes: cut at the request deadline, no answer.
    with connect() as waiting:
        waiting.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        waiting.settimeout(10)
        with contextlib.suppress(ConnectionResetError):
            assert waiting.recv(4096) == b""

    # Prompt clients are served as ever, one request after another on one connection.
    with requests.Session() as session:
        for _ in range(3):
            assert session.get(f"http://127.0.0.1:{port}/ok", timeout=5).text == "ok\n"


def test_connections_past_the_cap_are_closed_at_once(stack: Callable[..., int]) -> None:
    cap = 5
    port = stack(_app(), Limits(max_connections=cap, header_timeout=60, idle_timeout=60))
    held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(cap)]
    try:
        time.sleep(0.2)  # let the loop admit them
        extra = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(cap)]
        for sock in extra:
            assert closed_by_peer(sock, within=5)
            sock.close()
        for sock in held:  # the admitted ones are still open, and served
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)
        held[0].setblocking(True)
        held[0].sendall(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
        held[0].settimeout(5)
        assert held[0].recv(4096).startswith(b"HTTP/1.1 200")
        # A place freed is a place for a new client.
        held.pop().close()
        wait_for(lambda: _get_ok(port), timeout=10, interval=0.1)
    finally:
        for sock in held:
            sock.close()


def _get_ok(port: int) -> bool:
    try:
        return get("127.0.0.1", port, "/ok", timeout=2)[0] == 200
    except OSError:
        return False


def test_a_handler_error_is_a_500_and_one_log_line(
    stack: Callable[..., int], all_logs: LogCapture, capfd: pytest.CaptureFixture[str]
) -> None:
    port = stack(_app(), Limits())
    status, headers, body = get("127.0.0.1", port, "/broken")
    assert (status, body, headers["Server"]) == (500, "internal error\n", "refresher")
    assert get("127.0.0.1", port, "/ok")[0] == 200  # the server is none the worse
    lines = [line for line in all_logs.lines if "http handler failed" in line]
    assert lines and all("Traceback" not in line and "stack" not in line for line in lines)
    assert any('"error": "RuntimeError"' in line for line in lines)
    assert "Traceback" not in all_logs.text
    assert capfd.readouterr().err == ""
