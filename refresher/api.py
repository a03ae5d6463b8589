"""The API listener: consumer-facing routes, on a port of its own (`api.listen`).

Today one route, `POST /v1/tokens/{name}/rejected` with `{"fingerprint": "<8 hex>"}`: a
consumer says the API answered 401 to the token with that fingerprint (rule 11 of
docs/design.md). Answers, all JSON:

- `202 {"outcome", "refreshing", "fingerprint"}` once the job's probe has judged the token
  (`outcome`: accepted, rejected or error; `ignored` when the job has no probe and does not
  trust reports; `refreshing`: a new token is on its way to the sinks);
- `409 {"fingerprint": <current>}`: that is not the current token; re-read the sink;
- `400` a body that is not `{"fingerprint": "<8 lowercase hex>"}`; `415` not JSON (which also
  keeps a web page in a browser from posting here without a CORS preflight); `404` no such
  job; `429` with `Retry-After` when reports for one job come too fast; `503` with
  `Retry-After` on a replica that does not refresh (a follower), while the job holds no token
  yet, or when the probe did not finish in time.

Reports for one token join one probe (`JobRunner.report`). The listener is served by the HTTP
stack (`http.py`), which bounds connections, time and header sizes; it accepts loopback binds
only (`config.ApiServerConfig`): it does not authenticate its callers, who are the pod's own
containers.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Callable
from typing import Any

from aiohttp import web

from refresher.refresh import ReportAnswer, ReportTicket

# A report's body is one short JSON object.
MAX_BODY_BYTES = 1024
# How long a report waits for the probe: within the listener's request timeout (REQUEST_TIMEOUT),
# and longer than a probe's default timeouts (5 s + 10 s) plus a step already running.
REPORT_WAIT = 25.0
REQUEST_TIMEOUT = REPORT_WAIT + 5.0
_FINGERPRINT = re.compile(r"[0-9a-f]{8}")

# Reports a job: its ticket, or None when no job has that name.
Report = Callable[[str, str], ReportTicket | None]
# Whether this replica acts on reports now, and why not.
Accepting = Callable[[], tuple[bool, str]]


def endpoints(report: Report, accepting: Accepting) -> web.Application:
    """The application of the API listener."""

    async def rejected(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if request.content_type != "application/json":
            return _json(415, {"error": "send the report as application/json"})
        fingerprint = _fingerprint(await request.read())
        if fingerprint is None:
            return _json(400, {"error": 'expected {"fingerprint": "<8 lowercase hex digits>"}'})
        ok, why = accepting()
        if not ok:
            return _json(503, {"error": why}, retry_after=5)
        ticket = report(name, fingerprint)
        if ticket is None:
            return _json(404, {"error": "no such token"})
        try:
            # Shielded: the answer is shared by every report of this token; one client
            # giving up must not cancel it for the others.
            answer = await asyncio.wait_for(
                asyncio.shield(asyncio.wrap_future(ticket.answer)), REPORT_WAIT
            )
        except TimeoutError:
            return _json(503, {"error": "the probe has not finished; report again"}, retry_after=1)
        return _answer(answer)

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.router.add_post("/v1/tokens/{name}/rejected", rejected)
    return app


def _fingerprint(body: bytes) -> str | None:
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(payload, dict):
        return None
    value = payload.get("fingerprint")
    return value if isinstance(value, str) and _FINGERPRINT.fullmatch(value) else None


def _answer(answer: ReportAnswer) -> web.Response:
    if answer.outcome == "stale":
        return _json(409, {"fingerprint": answer.fingerprint})
    if answer.outcome == "limited":
        wait = answer.retry_after or 1.0
        return _json(429, {"error": "too many reports for this token"}, retry_after=wait)
    if answer.outcome == "unavailable":
        error = "no token yet; one is being fetched: re-read the sink shortly"
        return _json(503, {"error": error}, retry_after=answer.retry_after or 1.0)
    return _json(
        202,
        {
            "outcome": answer.outcome,
            "refreshing": answer.refreshing,
            "fingerprint": answer.fingerprint,
        },
    )


def _json(
    status: int, payload: dict[str, Any], *, retry_after: float | None = None
) -> web.Response:
    headers = {"Cache-Control": "no-store"}
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return web.json_response(payload, status=status, headers=headers)
