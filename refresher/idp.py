"""Asking the identity provider for a token, and judging its answer.

`build_request` turns a job and its credentials into the exact HTTP request the provider
wants; `IdPClient.fetch` sends it once (no automatic retries: on an invalidate-on-reissue IdP
every request kills the previous token, so retrying is the scheduler's decision) and
`parse_token_response` classifies whatever came back. Messages carry the status and the
OAuth2 `error` / `error_description`, never a secret.
"""

from __future__ import annotations

import base64
import email.utils
import json
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote_plus, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter

from refresher import __version__
from refresher.config import TokenJobConfig
from refresher.credentials import Credentials
from refresher.errors import Reason, RefreshError
from refresher.tokens import Token, compute_expiry

Clock = Callable[[], float]

# A token response is a few KiB; anything far larger is not one and is not read into memory.
MAX_RESPONSE_BYTES = 1024 * 1024
_DESCRIPTION_LIMIT = 200


@dataclass(frozen=True)
class TokenRequest:
    url: str
    query: dict[str, str]
    form: dict[str, str] = field(repr=False)  # may hold the client secret
    headers: dict[str, str] = field(repr=False)  # may hold the Basic credentials
    connect_timeout: float
    read_timeout: float
    verify: bool | str


def basic_authorization(client_id: str, client_secret: str, *, form_encode: bool) -> str:
    """The Basic header value. RFC 6749 2.3.1 form-urlencodes id and secret before base64."""
    if form_encode:
        client_id, client_secret = quote_plus(client_id), quote_plus(client_secret)
    raw = f"{client_id}:{client_secret}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


def build_request(job: TokenJobConfig, credentials: Credentials) -> TokenRequest:
    grant: dict[str, str] = {"grant_type": "client_credentials"}
    if job.scopes:
        grant["scope"] = " ".join(job.scopes)
    if job.audience:
        grant["audience"] = job.audience
    query = dict(job.query_params)
    form = dict(job.form_params)
    (query if job.scope_in == "query" else form).update(grant)

    headers = {
        "Accept": "application/json",
        "Accept-Encoding": "gzip, deflate",
        # A cached token answer would be another client's or a revoked one.
        "Cache-Control": "no-cache",
        "Content-Type": "application/x-www-form-urlencoded",
        "User-Agent": f"refresher/{__version__}",
        **job.headers,
    }
    if job.auth == "body":
        form["client_id"] = credentials.client_id
        form["client_secret"] = credentials.client_secret
    else:
        headers["Authorization"] = basic_authorization(
            credentials.client_id, credentials.client_secret, form_encode=job.auth == "basic"
        )
    return TokenRequest(
        url=job.resolved_token_url(credentials),
        query=query,
        form=form,
        headers=headers,
        connect_timeout=job.connect_timeout,
        read_timeout=job.read_timeout,
        verify=str(job.ca_bundle) if job.ca_bundle else True,
    )


def new_session(pool_size: int = 10) -> requests.Session:
    """A session whose adapters never retry: one attempt is one request to the IdP."""
    session = requests.Session()
    for prefix in ("https://", "http://"):
        session.mount(prefix, HTTPAdapter(max_retries=0, pool_maxsize=pool_size))
    return session


# ----------------------------------------------------------------------- answer judgement


def _scrub(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def _printable(value: Any, secrets: Iterable[str]) -> str | None:
    if not isinstance(value, str):
        return None
    # Scrub first: cutting or cleaning first could leave a secret that straddles the limit,
    # or holds a non-printable character, unmatched and half shown.
    scrubbed = _scrub(value, secrets)
    return "".join(ch if ch.isprintable() else " " for ch in scrubbed)[:_DESCRIPTION_LIMIT]


def parse_retry_after(value: str | None, now: float) -> float | None:
    """`Retry-After` as seconds from now: delta-seconds or an HTTP date (RFC 9110 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)  # RFC says whole seconds; some servers send "1.5"
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - now, 0.0)


def _oauth_error(body: bytes, secrets: Iterable[str]) -> str:
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return ""
    if not isinstance(payload, dict):
        return ""
    code = _printable(payload.get("error"), secrets)
    description = _printable(payload.get("error_description"), secrets)
    return ": ".join(part for part in (code, description) if part)


def _expires_in(value: Any) -> float | None:
    if value is None:
        return None
    # Some IdPs (Azure AD v1) send it as a string of digits.
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise RefreshError(Reason.INVALID_RESPONSE, "`expires_in` is not a number") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RefreshError(Reason.INVALID_RESPONSE, "`expires_in` is not a number")
    try:
        value = float(value)
    except OverflowError:  # a JSON integer of hundreds of digits
        value = math.inf
    if not math.isfinite(value):
        raise RefreshError(Reason.INVALID_RESPONSE, "`expires_in` is not a finite number")
    if value <= 0:
        raise RefreshError(Reason.INVALID_RESPONSE, f"`expires_in` is {value:g}, not positive")
    return float(value)


def parse_token_response(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    received_at: float,
    job: TokenJobConfig,
    extras: Mapping[str, str],
    secrets: Iterable[str] = (),
) -> Token:
    """Turn an HTTP answer into a Token or a classified RefreshError."""
    secrets = tuple(secrets)
    if 300 <= status < 400:
        # Following a redirect could carry the credentials to another host.
        raise RefreshError(
            Reason.INVALID_RESPONSE, f"HTTP {status} redirect refused", status=status
        )
    if status >= 400:
        detail = _oauth_error(body, secrets)
        suffix = f" ({detail})" if detail else ""
        retry_after = (
            parse_retry_after(headers.get("Retry-After"), received_at)
            if status in (429, 503)
            else None
        )
        if status in (400, 401) and detail.startswith("invalid_client"):
            reason = Reason.INVALID_CLIENT
        elif status >= 500:
            reason = Reason.HTTP_5XX
        else:
            reason = Reason.HTTP_4XX
        raise RefreshError(reason, f"HTTP {status}{suffix}", status=status, retry_after=retry_after)
    if status != 200:
        raise RefreshError(Reason.INVALID_RESPONSE, f"unexpected HTTP {status}", status=status)

    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        kind = headers.get("Content-Type", "unknown content type").split(";")[0]
        raise RefreshError(
            Reason.INVALID_RESPONSE, f"the answer is not JSON ({kind})", status=status
        ) from None
    if not isinstance(payload, dict):
        raise RefreshError(Reason.INVALID_RESPONSE, "the answer is not a JSON object")
    access_token = payload.get("access_token")
    if not isinstance(access_token, str) or not access_token.strip():
        raise RefreshError(Reason.INVALID_RESPONSE, "the answer has no `access_token`")
    token_type = payload.get("token_type", "Bearer")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        shown = _printable(token_type, (*secrets, access_token)) or "non-text"
        raise RefreshError(Reason.INVALID_RESPONSE, f"token_type {shown!r} is not Bearer")
    scope = payload.get("scope")
    if not isinstance(scope, str):
        scope = " ".join(job.scopes) or None
    issued_at, expires_at = compute_expiry(
        access_token,
        _expires_in(payload.get("expires_in")),
        received_at,
        job.lifetime,
        job=job.name,
    )
    return Token(
        access_token=access_token,
        issued_at=issued_at,
        expires_at=expires_at,
        token_type="Bearer",
        scope=scope,
        extras=dict(extras),
    )


# ----------------------------------------------------------------------------- the client


def _read_capped(response: requests.Response, deadline: float, host: str) -> bytes:
    """The (decoded) body, at most `MAX_RESPONSE_BYTES` of it, all of it by `deadline`.

    Never more than the cap (+ one 64 KiB read) is held in memory. The read timeout bounds
    each wait for data, not the whole body: an IdP that trickles one byte per second would
    hold the refresh (and a worker thread) for days. `read1` returns after at most one read
    from the socket, so the deadline (`time.monotonic`) is checked between arrivals. An old
    urllib3 without `read1` falls back to `read`, which waits for whole 64 KiB blocks: the
    deadline is then only checked between those.
    """
    raw = response.raw
    read = getattr(raw, "read1", None) or raw.read
    chunks: list[bytes] = []
    size = 0
    while chunk := read(64 * 1024, decode_content=True):
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise RefreshError(
                Reason.INVALID_RESPONSE,
                f"the answer is larger than {MAX_RESPONSE_BYTES // 1024} KiB",
                status=response.status_code,
            )
        chunks.append(chunk)
        if time.monotonic() > deadline:
            raise RefreshError(
                Reason.TIMEOUT,
                f"read timeout talking to {host}: the answer was still arriving after "
                "connect_timeout + read_timeout",
                status=response.status_code,
            )
    return b"".join(chunks)


def _encoded_forms(secret: str) -> list[str]:
    """The secret as it is and form-encoded (as it travels), for scrubbing echoes of it."""
    return [secret, quote_plus(secret)] if secret else []


class IdPClient:
    """Sends token requests over one shared `requests.Session` (connection pooling)."""

    def __init__(self, session: requests.Session, clock: Clock = time.time) -> None:
        self.session = session
        self.clock = clock
        self._environment: dict[tuple[str, bool | str], dict[str, Any]] = {}

    def _environment_settings(self, url: str, verify: bool | str) -> dict[str, Any]:
        """Proxies and CA bundle from the environment (`HTTPS_PROXY`, `NO_PROXY`,
        `REQUESTS_CA_BUNDLE`), as `requests` would apply them, worked out once per URL:
        `requests` re-reads the whole environment on every request, a tenth of a millisecond,
        and a daemon's environment does not change under it."""
        key = (url, verify)
        settings = self._environment.get(key)
        if settings is None:
            merged = self.session.merge_environment_settings(url, {}, None, verify, None)
            settings = {"proxies": merged["proxies"], "verify": merged["verify"]}
            self._environment[key] = settings
        return settings

    def fetch(self, job: TokenJobConfig, credentials: Credentials) -> Token:
        request = build_request(job, credentials)
        # What an IdP might echo back in an error: the secret, form-encoded or not, and the
        # Basic credentials it was sent in.
        authorization = request.headers.get("Authorization", "").removeprefix("Basic ")
        secrets = [*_encoded_forms(credentials.client_secret), *_encoded_forms(authorization)]
        for value in credentials.extras.values():
            secrets += _encoded_forms(value)
        host = urlsplit(request.url).netloc
        deadline = time.monotonic() + request.connect_timeout + request.read_timeout
        try:
            # Prepared alone, not by the session: the session would merge its cookie jar,
            # default headers and .netrc credentials into every request, which costs as much
            # as the rest of the refresh's own work. A token request needs none of them: its
            # headers are all set in `build_request`.
            prepared = requests.Request(
                "POST",
                request.url,
                params=request.query,
                data=request.form,
                headers=request.headers,
            ).prepare()
            with self.session.send(
                prepared,
                timeout=(request.connect_timeout, request.read_timeout),
                allow_redirects=False,
                stream=True,  # read by `_read_capped`, never whole into memory
                **self._environment_settings(request.url, request.verify),
            ) as response:
                body = _read_capped(response, deadline, host)
                status, headers = response.status_code, response.headers
        except (requests.Timeout, urllib3.exceptions.ReadTimeoutError) as err:
            phase = "connect" if isinstance(err, requests.ConnectTimeout) else "read"
            raise RefreshError(Reason.TIMEOUT, f"{phase} timeout talking to {host}") from None
        except (requests.exceptions.SSLError, urllib3.exceptions.SSLError):
            raise RefreshError(
                Reason.NETWORK, f"TLS verification with {host} failed (set ca_bundle?)"
            ) from None
        except (requests.RequestException, urllib3.exceptions.HTTPError) as err:
            # The exception text can quote the URL; the class name says enough. (The body is
            # read from urllib3 directly, so its exceptions arrive unwrapped.)
            raise RefreshError(Reason.NETWORK, f"{type(err).__name__} talking to {host}") from None
        return parse_token_response(
            status,
            headers,
            body,
            received_at=self.clock(),
            job=job,
            extras=credentials.extras,
            secrets=secrets,
        )
