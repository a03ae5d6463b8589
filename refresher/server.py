"""The metrics port's endpoints: `/metrics`, `/healthz` (alive), `/readyz` (every job holds a
token). Served by the HTTP stack in `http.py`, which bounds connections and time.

`/healthz` answers on the event loop itself (it only reads a few numbers), so nothing queued
behind a slow scrape delays it; `/metrics` and `/readyz` walk every job under their locks and
run in the stack's small executor.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from refresher.http import HttpServer

Check = Callable[[], tuple[bool, str]]

_TEXT = "text/plain"


def endpoints(
    server: HttpServer, registry: CollectorRegistry, healthy: Check, ready: Check
) -> web.Application:
    """The application of the metrics port."""

    async def metrics(request: web.Request) -> web.Response:
        body = await server.run_blocking(lambda: generate_latest(registry))
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(request: web.Request) -> web.Response:
        return _answer(*healthy())

    async def readyz(request: web.Request) -> web.Response:
        return _answer(*await server.run_blocking(ready))

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


def _answer(ok: bool, detail: str) -> web.Response:
    return web.Response(status=200 if ok else 503, text=detail + "\n", content_type=_TEXT)
