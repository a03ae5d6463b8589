"""Asking the identity provider for a token, and judging its answer.

`build_request` turns a job and its credentials into the exact HTTP request the provider
wants; `IdPClient.fetch` sends it once (no automatic retries: on an invalidate-on-reissue IdP
every request kills the previous token, so retrying is the scheduler's decision) and
`parse_token_response` classifies whatever came back. Messages carry the status, the OAuth2
`error` code and an excerpt of `error_description` only when it cannot quote a credential
(`secret_echoes`): never a secret, however the server encodes it.
"""

from __future__ import annotations

import base64
import email.utils
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, quote_plus, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter

from refresher import __version__
from refresher.clientauth import ClientAuthentication, KeyMaterial, authenticate
from refresher.clientauth import basic_authorization as basic_authorization
from refresher.clock import Clock
from refresher.config import TokenJobConfig, url_problem
from refresher.credentials import Credentials, read_credentials
from refresher.discovery import Discovery, ProviderMetadata, metadata_problem
from refresher.endpoints import endpoint_key, token_url
from refresher.errors import Reason, RefreshError
from refresher.presets import registered_auth_method
from refresher.ratelimit import RateLimits
from refresher.tokens import Token, compute_expiry, plain_text, token_problem

log = logging.getLogger(__name__)

# A token response is a few KiB; anything far larger is not one and is not read into memory.
MAX_RESPONSE_BYTES = 1024 * 1024
_DESCRIPTION_LIMIT = 200


@dataclass(frozen=True)
class TokenRequest:
    url: str
    # Lists of pairs: a parameter may repeat (RFC 8707's `resource`).
    query: list[tuple[str, str]]
    form: list[tuple[str, str]] = field(repr=False)  # may hold the secret or an assertion
    headers: dict[str, str] = field(repr=False)  # may hold the Basic credentials
    connect_timeout: float
    read_timeout: float
    verify: bool | str
    # The client certificate (files) for the TLS handshake, RFC 8705.
    cert: tuple[str, str] | None = None


def build_request(job: TokenJobConfig, auth: ClientAuthentication, url: str) -> TokenRequest:
    grant: list[tuple[str, str]] = [("grant_type", "client_credentials")]
    if job.scopes:
        grant.append(("scope", " ".join(job.scopes)))
    if job.audience:
        grant.append(("audience", job.audience))
    grant += [("resource", resource) for resource in job.resource]
    query = list(job.query_params.items())
    form = list(job.form_params.items())
    (query if job.scope_in == "query" else form).extend(grant)
    form.extend(auth.form)

    headers = {
        "Accept": "application/json",
        "Accept-Encoding": "gzip, deflate",
        # A cached token answer would be another client's or a revoked one.
        "Cache-Control": "no-cache",
        "Content-Type": "application/x-www-form-urlencoded",
        "User-Agent": f"refresher/{__version__}",
        **job.headers,
        **auth.headers,
    }
    return TokenRequest(
        url=url,
        query=query,
        form=form,
        headers=headers,
        connect_timeout=job.connect_timeout,
        read_timeout=job.read_timeout,
        verify=str(job.ca_bundle) if job.ca_bundle else True,
        cert=auth.client_cert,
    )


def new_session(pool_size: int = 10) -> requests.Session:
    """A session whose adapters never retry: one attempt is one request to the IdP."""
    session = requests.Session()
    for prefix in ("https://", "http://"):
        session.mount(prefix, HTTPAdapter(max_retries=0, pool_maxsize=pool_size))
    return session


# ----------------------------------------------------------------------- answer judgement


# The IdP's free text (`error_description`, a token_type, a Content-Type) is shown only when no
# stretch of SECRET_WINDOW characters of any secret, in any encoding a server might echo it
# in, appears in it, compared without regard to case. Replacing what matches cannot work: an
# echo may be encoded (URL, base64 at any byte offset), re-cased or cut short by a character,
# and each of those defeats a search for the secret as sent.
SECRET_WINDOW = 8
# Longer text is not searched (nor shown): a short excerpt is all a log line needs.
_FREE_TEXT_LIMIT = 512
_ERROR_CODE = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]{1,64}")  # RFC 6749 5.2, short


def secret_echoes(secret: str) -> list[str]:
    """The secret as a server might echo it: as sent, URL-encoded both ways, and base64
    (standard and URL-safe) as it would read starting at each of the three byte offsets a
    secret can have inside a longer encoded value (the Basic credentials). Lower case."""
    if not secret:
        return []
    raw = secret.encode("utf-8", "surrogatepass")
    forms = [secret, quote(secret, safe=""), quote(secret), quote_plus(secret)]
    for offset, garbled in ((0, 0), (1, 2), (2, 3)):
        # The first `garbled` characters also carry bits of the bytes before the secret.
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            forms.append(encode(b"\0" * offset + raw).decode("ascii")[garbled:])
    return [form.lower() for form in forms if form]


def _windows(secrets: Iterable[str]) -> set[str]:
    windows: set[str] = set()
    for secret in secrets:
        for form in secret_echoes(secret):
            if len(form) <= SECRET_WINDOW:
                windows.add(form)
            else:
                windows.update(
                    form[i : i + SECRET_WINDOW] for i in range(len(form) - SECRET_WINDOW + 1)
                )
    return windows


def _may_quote_a_secret(text: str, secrets: Iterable[str]) -> bool:
    folded = text.lower()
    return any(window in folded for window in _windows(secrets))


def _printable(value: Any, secrets: Iterable[str], limit: int = _DESCRIPTION_LIMIT) -> str | None:
    """The IdP's free text as a short, printable-ASCII excerpt; None when it is no text; a
    note saying it was withheld when it is too long to search or may quote a secret."""
    if not isinstance(value, str):
        return None
    if len(value) > _FREE_TEXT_LIMIT:
        return f"({len(value)} characters withheld: too long)"
    if _may_quote_a_secret(value, secrets):
        return f"({len(value)} characters withheld: they may quote a credential)"
    shown = "".join(ch if " " <= ch <= "~" else " " for ch in value)
    return shown[:limit] + ("..." if len(shown) > limit else "")


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


def _oauth_error(body: bytes, secrets: Iterable[str]) -> tuple[str | None, str]:
    """The OAuth2 error code (None unless it is one, RFC 6749 5.2) and the text to show."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return None, ""
    if not isinstance(payload, dict):
        return None, ""
    code: str | None = payload.get("error")
    if "error" not in payload:
        code, shown = None, ""
    elif not isinstance(code, str) or not _ERROR_CODE.fullmatch(code):
        code, shown = None, "(not an OAuth2 error code)"
    elif _may_quote_a_secret(code, secrets):
        code, shown = None, "(error code withheld: it may quote a credential)"
    else:
        shown = code
    description = _printable(payload.get("error_description"), secrets)
    return code, ": ".join(part for part in (shown, description) if part)


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


def check_access_token(access_token: str) -> None:
    """Refuse (`invalid_response`) a token no sink can hold safely (`tokens.token_problem`)."""
    problem = token_problem(access_token)
    if problem is not None:
        raise RefreshError(Reason.INVALID_RESPONSE, f"the `access_token` {problem}")


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
        code, detail = _oauth_error(body, secrets)
        suffix = f" ({detail})" if detail else ""
        retry_after = (
            parse_retry_after(headers.get("Retry-After"), received_at)
            if status in (429, 503)
            else None
        )
        if status in (400, 401) and code == "invalid_client":
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
        kind = _printable(kind, secrets, limit=64) or "unknown content type"
        raise RefreshError(
            Reason.INVALID_RESPONSE, f"the answer is not JSON ({kind})", status=status
        ) from None
    if not isinstance(payload, dict):
        raise RefreshError(Reason.INVALID_RESPONSE, "the answer is not a JSON object")
    access_token = payload.get("access_token")
    if not isinstance(access_token, str) or not access_token.strip():
        raise RefreshError(Reason.INVALID_RESPONSE, "the answer has no `access_token`")
    check_access_token(access_token)
    token_type = payload.get("token_type", "Bearer")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        shown = _printable(token_type, (*secrets, access_token)) or "non-text"
        raise RefreshError(Reason.INVALID_RESPONSE, f"token_type {shown!r} is not Bearer")
    scope = payload.get("scope")
    # Written beside the token (env lines, annotations): the requested scopes stand in for a
    # granted scope that is no plain text.
    if plain_text(scope) is None:
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


class SendSettings:
    """Proxies and CA bundle from the environment (`HTTPS_PROXY`, `NO_PROXY`,
    `REQUESTS_CA_BUNDLE`), as `requests` would apply them, worked out once per URL:
    `requests` re-reads the whole environment on every request, a tenth of a millisecond,
    and a daemon's environment does not change under it. Used for token requests and probes,
    both of which carry a secret."""

    def __init__(self, session: requests.Session) -> None:
        self.session = session
        self._cache: dict[tuple[str, bool | str], dict[str, Any]] = {}

    def for_url(self, url: str, verify: bool | str) -> dict[str, Any]:
        key = (url, verify)
        settings = self._cache.get(key)
        if settings is None:
            merged = self.session.merge_environment_settings(url, {}, None, verify, None)
            proxies = merged["proxies"]
            if urlsplit(url).scheme.lower() != "https":
                # A plain-http request carries its secret (client credentials, a token) in
                # clear text: it goes straight to the host the config names (loopback, or
                # one the operator allowed with `allow_insecure_http`), never through a proxy
                # from the environment (`HTTP_PROXY`, `ALL_PROXY`) that would read it. An
                # empty mapping, not None: `Session.send` would look the proxies up again.
                proxies = {}
            settings = {"proxies": proxies, "verify": merged["verify"]}
            self._cache[key] = settings
        return settings


# Added to an `invalid_client` answer: where to look, per method (never a value).
_INVALID_CLIENT_HINTS = {
    "private_key_jwt": "does the IdP have this key (its kid or certificate) for the client, "
    "and are assertion.audience and this machine's clock right?",
    "client_secret_jwt": "are the client secret, assertion.audience and this machine's clock "
    "right?",
    "federated_jwt": "does the client's federated credential at the IdP name the issuer, "
    "subject and audience of the token in assertion_file?",
    "tls_client_auth": "does the IdP have this certificate's subject for the client?",
    "self_signed_tls_client_auth": "does the IdP have this certificate for the client?",
}


def _invalid_client_hint(job: TokenJobConfig, metadata: ProviderMetadata | None) -> str | None:
    """Where to look after an `invalid_client` answer (never a value)."""
    hint = _INVALID_CLIENT_HINTS.get(job.auth)
    unlisted = metadata is not None and metadata.auth_methods is None
    if unlisted and registered_auth_method(job.auth) != "client_secret_basic":
        # RFC 8414 2: a document without the list means client_secret_basic only.
        hint = (hint + " " if hint else "") + (
            "(the IdP's discovery document lists no authentication methods, which "
            "RFC 8414 reads as client_secret_basic only)"
        )
    return hint


class IdPClient:
    """Sends token requests over one shared `requests.Session` (connection pooling), each
    after its turn in the rate limit of its token endpoint (when `rate_limits` is given).

    A job with a client certificate gets a session of its own per certificate and key
    files, closed when their content changes: a pooled connection would go on presenting
    the certificate it was opened with, long after cert-manager replaced it."""

    def __init__(
        self,
        session: requests.Session,
        clock: Clock = time.time,
        rate_limits: RateLimits | None = None,
    ) -> None:
        self.session = session
        self.clock = clock
        self.rate_limits = rate_limits
        self.keys = KeyMaterial()
        self.discovery = Discovery(
            self._get_document, clock, lambda url, job: url_problem(url, job.allow_insecure_http)
        )
        self._environment = SendSettings(session)
        self._tls_lock = threading.Lock()
        # (certificate file, key file) -> (digest of their content, the session using them)
        self._tls_sessions: dict[tuple[str, str], tuple[str, requests.Session]] = {}

    def fetch(
        self, job: TokenJobConfig, *, still_wanted: Callable[[], bool] = lambda: True
    ) -> Token | None:
        """Read the job's credentials, wait for the endpoint's turn, ask for a token. None when
        `still_wanted()` says no once the turn came (this replica stopped leading meanwhile).
        Raises RefreshError for every classified failure."""
        credentials = read_credentials(job)
        metadata = self.metadata(job)
        url = token_url(job, credentials, metadata)
        if self.rate_limits is not None:
            self.rate_limits.for_url(endpoint_key(url)).acquire()
        if not still_wanted():
            return None
        return self.send(job, credentials, url, metadata)

    def metadata(self, job: TokenJobConfig) -> ProviderMetadata | None:
        """The IdP metadata of a job with an issuer (None for one with a token URL), checked
        to take the job's client authentication as far as its config says (the algorithm a
        key decides is checked once the assertion is signed, in `send`). Raises
        RefreshError."""
        if job.token_url or job.issuer_url is None:
            return None
        metadata = self.discovery.metadata(job)
        self._refuse_unless_taken(job, metadata, None)
        return metadata

    def _refuse_unless_taken(
        self, job: TokenJobConfig, metadata: ProviderMetadata, alg: str | None
    ) -> None:
        problem = metadata_problem(job, metadata, alg)
        if problem is not None:
            # Read again at the next attempt: the IdP's administrator may fix it meanwhile.
            self.discovery.forget(job)
            raise RefreshError(Reason.DISCOVERY, problem)

    def close(self) -> None:
        with self._tls_lock:
            sessions = [session for _, session in self._tls_sessions.values()]
            self._tls_sessions.clear()
        for session in sessions:
            session.close()

    def _session_for(self, job: TokenJobConfig, auth: ClientAuthentication) -> requests.Session:
        if auth.client_cert is None:
            return self.session
        with self._tls_lock:
            known = self._tls_sessions.get(auth.client_cert)
            if known is not None and known[0] == auth.client_cert_digest:
                return known[1]
            session = new_session(pool_size=2)
            self._tls_sessions[auth.client_cert] = (auth.client_cert_digest or "", session)
        if known is not None:
            known[1].close()
            log.info(
                "client certificate changed; its pooled connections closed",
                extra={"token": job.name, "path": auth.client_cert[0]},
            )
        return session

    def send(
        self,
        job: TokenJobConfig,
        credentials: Credentials,
        url: str,
        metadata: ProviderMetadata | None = None,
    ) -> Token:
        """One token request, now, with these credentials."""
        if urlsplit(url).scheme != "https":
            # Validated with the config, but a credentials file's `auth_endpoint` is read
            # again on every attempt: clear text goes to loopback (or where allowed) only.
            problem = url_problem(url, job.allow_insecure_http)
            if problem is not None:
                where = urlsplit(url).hostname or "the token URL"
                raise RefreshError(Reason.CREDENTIALS, f"token URL at {where}: {problem}")
        auth = authenticate(
            job,
            credentials,
            token_endpoint=url,
            issuer=job.issuer_url,
            now=self.clock(),
            keys=self.keys,
        )
        if metadata is not None and job.auth == "private_key_jwt" and job.alg is None:
            self._refuse_unless_taken(job, metadata, auth.alg)  # the key chose the algorithm
        request = build_request(job, auth, url)
        # What an IdP might echo back in an error, in any encoding (`secret_echoes`): the
        # secret, the Basic credentials or assertion it was sent in, the credentials' extras.
        secrets = [*auth.secrets, *credentials.extras.values()]
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
            status, headers, body = self._exchange(
                self._session_for(job, auth),
                prepared,
                (request.connect_timeout, request.read_timeout),
                request.verify,
                request.cert,
            )
            token = parse_token_response(
                status,
                headers,
                body,
                received_at=self.clock(),
                job=job,
                extras=credentials.extras,
                secrets=secrets,
            )
        except RefreshError as err:
            moved = err.reason in (Reason.NETWORK, Reason.TIMEOUT) or err.status == 404
            if metadata is not None and moved:
                # The endpoint may have moved: read the discovery document again next time.
                self.discovery.forget(job)
            hint = (
                _invalid_client_hint(job, metadata) if err.reason is Reason.INVALID_CLIENT else None
            )
            if hint is not None:
                raise RefreshError(
                    err.reason,
                    f"{err.message}; {hint}",
                    status=err.status,
                    retry_after=err.retry_after,
                ) from None
            raise
        return token

    def _get_document(self, url: str, job: TokenJobConfig) -> tuple[int, bytes]:
        """GET a discovery document (public: no credentials) for `job`."""
        prepared = requests.Request(
            "GET",
            url,
            headers={
                "Accept": "application/json",
                "Accept-Encoding": "gzip, deflate",
                "User-Agent": f"refresher/{__version__}",
            },
        ).prepare()
        verify = str(job.ca_bundle) if job.ca_bundle else True
        timeouts = (job.connect_timeout, job.read_timeout)
        status, _, body = self._exchange(self.session, prepared, timeouts, verify, None)
        return status, body

    def _exchange(
        self,
        session: requests.Session,
        prepared: requests.PreparedRequest,
        timeouts: tuple[float, float],
        verify: bool | str,
        cert: tuple[str, str] | None,
    ) -> tuple[int, Mapping[str, str], bytes]:
        """Send one request; its status, headers and capped body. Raises RefreshError
        (NETWORK, TIMEOUT) with a message that names the host, never the URL."""
        url = prepared.url or ""
        host = urlsplit(url).netloc
        deadline = time.monotonic() + sum(timeouts)
        with_cert = " (with a client certificate: did the server refuse it?)" if cert else ""
        try:
            with session.send(
                prepared,
                timeout=timeouts,
                allow_redirects=False,
                stream=True,  # read by `_read_capped`, never whole into memory
                cert=cert,
                **self._environment.for_url(url, verify),
            ) as response:
                body = _read_capped(response, deadline, host)
                return response.status_code, response.headers, body
        except (requests.Timeout, urllib3.exceptions.ReadTimeoutError) as err:
            phase = "connect" if isinstance(err, requests.ConnectTimeout) else "read"
            raise RefreshError(Reason.TIMEOUT, f"{phase} timeout talking to {host}") from None
        except (requests.exceptions.SSLError, urllib3.exceptions.SSLError) as err:
            if "CERTIFICATE_VERIFY_FAILED" in str(err) or not cert:
                message = f"TLS verification with {host} failed (set ca_bundle?)"
            else:
                message = f"the TLS handshake with {host} failed{with_cert}"
            raise RefreshError(Reason.NETWORK, message) from None
        except (requests.RequestException, urllib3.exceptions.HTTPError) as err:
            # The exception text can quote the URL; the class name says enough. (The body is
            # read from urllib3 directly, so its exceptions arrive unwrapped.)
            raise RefreshError(
                Reason.NETWORK, f"{type(err).__name__} talking to {host}{with_cert}"
            ) from None
        except OSError as err:
            # `requests` opens the client certificate's files itself, by path: one that went
            # away since it was read and checked.
            if cert is None:
                raise
            raise RefreshError(
                Reason.CREDENTIALS, f"cannot read the client certificate: {err.strerror}"
            ) from None
