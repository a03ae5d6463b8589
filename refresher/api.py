"""The API listener: consumer-facing routes, on a port of its own (`api.listen`).

**`GET /v1/tokens/{name}`**: the job's current token as JSON, with the `json` sink's keys
(`access_token`, `token_type`, `expires_at`, `expires_at_epoch`, `issued_at_epoch`, `scope`,
`api_key` when the credentials have one) and `fingerprint`; `Cache-Control: no-store` and
`ETag: "<fingerprint>"`. With `If-None-Match` naming the current fingerprint (quoted, `W/`
and comma lists accepted): `304` at once, or with `?timeout=N` (0 < N <= 60, else `400`) a
long poll answered `200` as soon as a newer token exists, `304` when the time is up. `503`
with a JSON reason while this replica holds no valid token (or loses it while a request
waits). Stopping answers every waiting request at once.

**`POST /v1/tokens/{name}/rejected`** with `{"fingerprint": "<8 hex>"}`: a consumer says the
API answered 401 to that token (rule 11 of docs/design.md). `202 {"outcome", "refreshing",
"fingerprint"}` once the job's probe has judged it (`ignored` when the job has no probe and
does not trust reports); `409 {"fingerprint": <current>}` when that is not the current token;
`202 {"outcome": "forwarded"}` from a follower, which hands the report to the leader through
an annotation on the job's Secret (the leader watches it too, and probes); `400` a bad body,
`415` not JSON (which also keeps a web page in a browser from posting here
without a CORS preflight), `429` with `Retry-After` when reports come too fast, `503` with
`Retry-After` on a follower, while the job holds no token yet, or when the probe did not
finish in time.

Both routes first ask the `Gate` (consumers.py) who the caller is: `401` without a good
credential whatever the name, the same `404` for an unknown job and one the caller may not
read. Every served token is one audit log line (subject, job, fingerprint; never the token).
The listener runs on the HTTP stack (`http.py`), which bounds connections, time and header
sizes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from refresher.board import Entry, TokenBoard
from refresher.clock import Clock
from refresher.consumers import Decision, Gate
from refresher.formats import token_document
from refresher.http import HttpServer, json_answer
from refresher.metrics import ApiStats
from refresher.refresh import ReportAnswer, ReportTicket

log = logging.getLogger(__name__)

# A report's body is one short JSON object.
MAX_BODY_BYTES = 1024
# How long a report waits for the probe: within the listener's request timeout (REQUEST_TIMEOUT),
# and longer than a probe's default timeouts (5 s + 10 s) plus a step already running.
REPORT_WAIT = 25.0
# The longest long poll a consumer may ask for.
MAX_POLL_SECONDS = 60.0
REQUEST_TIMEOUT = MAX_POLL_SECONDS + 5.0
_FINGERPRINT = re.compile(r"[0-9a-f]{8}")
_ETAG = re.compile(r'\s*(?:W/)?"([^"]*)"\s*')

# Reports a job: its ticket, or None when no job has that name.
Report = Callable[[str, str], ReportTicket | None]
# Whether this replica acts on reports now, and why not.
Accepting = Callable[[], tuple[bool, str]]


@dataclass
class ApiContext:
    """What the API listener's handlers need from the daemon."""

    server: HttpServer
    gate: Gate
    board: TokenBoard
    report: Report
    accepting: Accepting
    stats: ApiStats
    clock: Clock = time.time


def endpoints(context: ApiContext) -> web.Application:
    """The application of the API listener."""
    server, board, stats = context.server, context.board, context.stats

    async def admitted(request: web.Request) -> tuple[str, Decision]:
        name = request.match_info["name"]
        credentials = request.headers.getall("Authorization", [])
        return name, await context.gate.admit(name, credentials, stats.record_auth_failure)

    async def token(request: web.Request) -> web.Response:
        started = time.perf_counter()
        waited = 0.0
        name, decision = await admitted(request)
        if decision.status != 200:
            response = _refused(decision)
        else:
            timeout = _timeout(request.query.get("timeout"))
            entry = board.current(name)
            assert entry is not None  # the gate knows only configured jobs
            if timeout is None:
                response = json_answer(
                    400, {"error": f"timeout must be seconds, 0 < N <= {MAX_POLL_SECONDS:g}"}
                )
            elif _names(request.headers.get("If-None-Match"), entry):
                if timeout == 0.0 or entry.unservable(context.clock()) is not None:
                    response = _served(name, entry, context.clock(), decision, not_modified=True)
                else:
                    begun = time.perf_counter()
                    newer = await board.newer(name, entry, timeout)
                    waited = time.perf_counter() - begun
                    if board.closed:  # stopping: another replica answers from now on
                        response = json_answer(503, {"error": "stopping"}, retry_after=1)
                        response.force_close()
                    elif newer is not None:
                        response = _served(name, newer, context.clock(), decision)
                    else:
                        response = _served(
                            name, entry, context.clock(), decision, not_modified=True
                        )
            else:
                response = _served(name, entry, context.clock(), decision)
        stats.record_request(
            name if name in context.gate.jobs else None,
            response.status,
            time.perf_counter() - started - waited,
        )
        return response

    async def rejected(request: web.Request) -> web.Response:
        name, decision = await admitted(request)
        if decision.status != 200:
            return _refused(decision)
        if request.content_type != "application/json":
            return json_answer(415, {"error": "send the report as application/json"})
        fingerprint = _fingerprint(await request.read())
        if fingerprint is None:
            return json_answer(
                400, {"error": 'expected {"fingerprint": "<8 lowercase hex digits>"}'}
            )
        ok, why = context.accepting()
        if not ok:
            return json_answer(503, {"error": why}, retry_after=5)
        # Off the loop: a follower forwards the report with a write to the Secret.
        ticket = await server.run_blocking(lambda: context.report(name, fingerprint))
        if ticket is None:
            return json_answer(404, {"error": "no such token"})
        try:
            # Shielded: the answer is shared by every report of this token; one client
            # giving up must not cancel it for the others.
            answer = await asyncio.wait_for(
                asyncio.shield(asyncio.wrap_future(ticket.answer)), REPORT_WAIT
            )
        except TimeoutError:
            return json_answer(
                503, {"error": "the probe has not finished; report again"}, retry_after=1
            )
        return _answer(answer)

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.router.add_get("/v1/tokens/{name}", token)
    app.router.add_post("/v1/tokens/{name}/rejected", rejected)
    return app


def _timeout(value: str | None) -> float | None:
    """`?timeout=N` as seconds (0.0 when absent); None when it is not 0 < N <= 60."""
    if value is None:
        return 0.0
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if 0 < seconds <= MAX_POLL_SECONDS else None


def _names(if_none_match: str | None, entry: Entry) -> bool:
    """Whether `If-None-Match` names the entry's token (or is `*` while one is held)."""
    if if_none_match is None or entry.token is None:
        return False
    if if_none_match.strip() == "*":
        return True
    current = entry.token.fingerprint
    return any(
        (match := _ETAG.fullmatch(part)) is not None and match.group(1) == current
        for part in if_none_match.split(",")
    )


def _served(
    name: str, entry: Entry, now: float, decision: Decision, *, not_modified: bool = False
) -> web.Response:
    why = entry.unservable(now)
    if why is not None:
        return json_answer(503, {"error": why}, retry_after=1)
    token = entry.token
    assert token is not None
    headers = {"ETag": f'"{token.fingerprint}"', "Cache-Control": "no-store"}
    if not_modified:
        return web.Response(status=304, headers=headers)
    assert decision.subject is not None
    log.info(
        "token served",
        extra={"token": name, "subject": decision.subject.name, "fingerprint": token.fingerprint},
    )
    return web.json_response(token_document(token), headers=headers)


def _refused(decision: Decision) -> web.Response:
    """A refusal, on a connection closed after it: a caller without a good credential
    does not get to keep a slot of the listener for its keep-alive time."""
    if decision.status == 401:
        response = json_answer(401, {"error": "a valid bearer credential is required"})
        response.headers["WWW-Authenticate"] = 'Bearer realm="refresher"'
    elif decision.status == 503:
        response = json_answer(503, {"error": "cannot check the credential now"}, retry_after=1)
    else:
        response = json_answer(404, {"error": "no such token"})
    response.force_close()
    return response


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
        return json_answer(409, {"fingerprint": answer.fingerprint})
    if answer.outcome == "limited":
        wait = answer.retry_after or 1.0
        return json_answer(429, {"error": "too many reports for this token"}, retry_after=wait)
    if answer.outcome == "unavailable":
        error = "no token yet; one is being fetched: re-read the sink shortly"
        return json_answer(503, {"error": error}, retry_after=answer.retry_after or 1.0)
    return json_answer(
        202,
        {
            "outcome": answer.outcome,
            "refreshing": answer.refreshing,
            "fingerprint": answer.fingerprint,
        },
    )
