"""Finding a job's token endpoint from its issuer (OpenID Connect Discovery 1.0, RFC 8414).

A job with `issuer:` instead of `token_url:` has its IdP's metadata read from
`<issuer>/.well-known/openid-configuration`, or, when that is not found, RFC 8414's
`<origin>/.well-known/oauth-authorization-server<issuer path>`. The document must name the
same `issuer`, character for character (OIDC Discovery 4.3, RFC 8414 3.3: anything else could
be another IdP's), and a usable `token_endpoint`; when it lists the client authentication
methods (and signing algorithms) it takes, the job's must be among them.

`Discovery` keeps one document per issuer (and trust settings): read on first use, read again
after `forget` (a token request failed as a moved endpoint would, or the document did not take
the job's method) or once a day, never on every refresh; after a failed read the other jobs
of that issuer get its failure for `FAILURE_HOLD`. Fetching is the caller's
(`idp.IdPClient`): judging a document is pure data in, data out.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from refresher.clock import Clock
from refresher.errors import Reason, RefreshError
from refresher.presets import JWT_METHODS, registered_auth_method

if TYPE_CHECKING:
    from refresher.config import TokenJobConfig

log = logging.getLogger(__name__)

# A document older than this is read again before its next use (kept when that fails).
MAX_AGE = 24 * 3600.0
_SHOWN = 120  # characters of the IdP's own values quoted in a message


@dataclass(frozen=True)
class ProviderMetadata:
    """What a job needs from its IdP's discovery document."""

    issuer: str
    token_endpoint: str
    # `token_endpoint_auth_methods_supported`; None when the document does not say.
    auth_methods: tuple[str, ...] | None
    # `token_endpoint_auth_signing_alg_values_supported`; None when the document does not say.
    signing_algs: tuple[str, ...] | None
    # RFC 8705 5: `mtls_endpoint_aliases.token_endpoint`, for client certificate methods.
    mtls_token_endpoint: str | None
    fetched_at: float


def discovery_urls(issuer: str) -> tuple[str, str]:
    """Where the document may be: OpenID's (appended to the issuer), then RFC 8414's
    (inserted between the origin and the issuer's path)."""
    parts = urlsplit(issuer)
    path = parts.path.rstrip("/")
    openid = issuer.rstrip("/") + "/.well-known/openid-configuration"
    oauth = f"{parts.scheme}://{parts.netloc}/.well-known/oauth-authorization-server{path}"
    return openid, oauth


def _shown(value: object) -> str:
    """The IdP's own value (an issuer, a URL: public), cut short and printable."""
    if not isinstance(value, str):
        return "(not text)"
    text = "".join(ch if " " <= ch <= "~" else "?" for ch in value[:_SHOWN])
    return repr(text + ("..." if len(value) > _SHOWN else ""))


_NAME = re.compile(r"[\x21-\x7e]{1,64}")
_MAX_NAMES = 64
_URL = re.compile(r"[\x21-\x7e]{1,2048}")


def _names(document: dict[str, Any], key: str, source: str) -> tuple[str, ...] | None:
    """A list of method or algorithm names; they end up in messages, so only short
    printable ones, and not too many."""
    value = document.get(key)
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or len(value) > _MAX_NAMES
        or not all(isinstance(item, str) and _NAME.fullmatch(item) for item in value)
    ):
        raise RefreshError(Reason.DISCOVERY, f"{source}: `{key}` is not a list of names")
    return tuple(value)


def _endpoint_problem(
    url: object, issuer: str, url_problem: Callable[[str], str | None]
) -> str | None:
    if not isinstance(url, str) or not _URL.fullmatch(url):
        return "not a URL"
    problem = url_problem(url)
    if problem is None and urlsplit(issuer).scheme == "https" and urlsplit(url).scheme != "https":
        # The job trusted TLS to find its IdP; the secret goes nowhere in clear text.
        return "plain http:// from an https:// issuer"
    return problem


def parse_metadata(
    body: bytes,
    *,
    issuer: str,
    source: str,
    fetched_at: float,
    url_problem: Callable[[str], str | None],
) -> ProviderMetadata:
    """The document at `source`, judged for `issuer`. Raises RefreshError(DISCOVERY).
    `url_problem` is the config's rule for a URL a secret is sent to (https, or loopback)."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise RefreshError(Reason.DISCOVERY, f"{source} is not JSON") from None
    if not isinstance(document, dict):
        raise RefreshError(Reason.DISCOVERY, f"{source} is not a JSON object")
    named = document.get("issuer")
    if named != issuer:
        raise RefreshError(
            Reason.DISCOVERY,
            f"{source} names the issuer {_shown(named)}, not {issuer!r}: the issuer must match "
            "exactly (mind a trailing slash, and Entra's tenant GUID)",
        )
    endpoint = document.get("token_endpoint")
    if endpoint is None:
        raise RefreshError(Reason.DISCOVERY, f"{source} names no `token_endpoint`")
    problem = _endpoint_problem(endpoint, issuer, url_problem)
    if problem is not None:
        raise RefreshError(
            Reason.DISCOVERY, f"{source}: the token_endpoint {_shown(endpoint)}: {problem}"
        )
    assert isinstance(endpoint, str)
    aliases = document.get("mtls_endpoint_aliases")
    mtls_endpoint = aliases.get("token_endpoint") if isinstance(aliases, dict) else None
    if mtls_endpoint is not None:
        problem = _endpoint_problem(mtls_endpoint, issuer, url_problem)
        if problem is not None:
            raise RefreshError(
                Reason.DISCOVERY,
                f"{source}: mtls_endpoint_aliases.token_endpoint {_shown(mtls_endpoint)}: "
                f"{problem}",
            )
    return ProviderMetadata(
        issuer=issuer,
        token_endpoint=endpoint,
        auth_methods=_names(document, "token_endpoint_auth_methods_supported", source),
        signing_algs=_names(document, "token_endpoint_auth_signing_alg_values_supported", source),
        mtls_token_endpoint=mtls_endpoint,
        fetched_at=fetched_at,
    )


def metadata_problem(
    job: TokenJobConfig, metadata: ProviderMetadata, alg: str | None = None
) -> str | None:
    """Why this IdP will not take this job's client authentication (None when it may).
    `alg`: what the job's assertions are signed with (the key decides when `alg` is unset)."""
    method = registered_auth_method(job.auth)
    listed = metadata.auth_methods
    if listed is not None and method not in listed:
        spelled = job.auth if job.auth == method else f"{job.auth} (that is {method})"
        return (
            f"auth: {spelled} is not among the methods {metadata.issuer} takes "
            f"(token_endpoint_auth_methods_supported: {', '.join(listed) or 'none'})"
        )
    algs = metadata.signing_algs
    alg = alg or job.alg or ("HS256" if job.auth == "client_secret_jwt" else None)
    if job.auth in JWT_METHODS and algs is not None and alg and alg not in algs:
        return (
            f"alg: {alg} is not among the assertion algorithms {metadata.issuer} takes "
            f"(token_endpoint_auth_signing_alg_values_supported: {', '.join(algs)})"
        )
    return None


Fetch = Callable[[str, "TokenJobConfig"], tuple[int, bytes]]
"""GET a URL for a job: (status, body); raises RefreshError for a network failure."""


# After a failed read, the jobs of that issuer get its failure for this long instead of each
# reading again (several jobs waiting on one hanging IdP would otherwise take turns at it).
FAILURE_HOLD = 10.0


@dataclass
class _Entry:
    """What is known of one issuer's document (for one set of trust settings)."""

    metadata: ProviderMetadata | None = None
    # Read again before the next use: a token request failed as a moved endpoint would.
    stale: bool = False
    failure: RefreshError | None = None
    failed_at: float = 0.0


def _copy(error: RefreshError) -> RefreshError:
    """A fresh exception for each caller: one raised object shared by threads would collect
    every thread's traceback."""
    return RefreshError(
        error.reason, error.message, status=error.status, retry_after=error.retry_after
    )


class Discovery:
    """One discovery document per issuer (and CA bundle and plain-http allowance: jobs that
    trust differently do not share what one of them read), read when first needed, when a
    day old, and after `forget`; one reader at a time per document."""

    def __init__(
        self, fetch: Fetch, clock: Clock, url_problem: Callable[[str, TokenJobConfig], str | None]
    ) -> None:
        self._fetch = fetch
        self._clock = clock
        self._url_problem = url_problem
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str | None, bool], _Entry] = {}
        self._readers: dict[tuple[str, str | None, bool], threading.Lock] = {}

    @staticmethod
    def _key(job: TokenJobConfig) -> tuple[str, str | None, bool]:
        assert job.issuer_url is not None
        bundle = str(job.ca_bundle) if job.ca_bundle is not None else None
        return job.issuer_url, bundle, job.allow_insecure_http

    def _entry(self, job: TokenJobConfig) -> tuple[_Entry, threading.Lock]:
        key = self._key(job)
        with self._lock:
            return self._entries.setdefault(key, _Entry()), self._readers.setdefault(
                key, threading.Lock()
            )

    def forget(self, job: TokenJobConfig) -> None:
        """Read the document again before its next use (kept, until then, as a fallback)."""
        entry, _ = self._entry(job)
        entry.stale = True

    def metadata(self, job: TokenJobConfig) -> ProviderMetadata:
        """The job's IdP metadata. Raises RefreshError when it cannot be had."""
        entry, reader = self._entry(job)
        with reader:
            now = self._clock()
            known = entry.metadata
            if known is not None and not entry.stale and now - known.fetched_at < MAX_AGE:
                return known
            if entry.failure is not None and now - entry.failed_at < FAILURE_HOLD:
                if known is not None:
                    return known
                raise _copy(entry.failure)
            try:
                metadata = self._read(job)
            except RefreshError as err:
                entry.failure, entry.failed_at = err, now
                if known is not None:
                    return known  # an older document beats none while the IdP is away
                raise
            entry.metadata, entry.stale, entry.failure = metadata, False, None
        if known is None or known.token_endpoint != metadata.token_endpoint:
            log.info(
                "token endpoint discovered",
                extra={
                    "token": job.name,
                    "issuer": metadata.issuer,
                    "url": metadata.token_endpoint,
                },
            )
        return metadata

    def _get(self, url: str, job: TokenJobConfig) -> tuple[int, bytes]:
        try:
            return self._fetch(url, job)
        except RefreshError as err:
            reason = Reason.DISCOVERY if err.reason is Reason.INVALID_RESPONSE else err.reason
            raise RefreshError(reason, f"discovery: {err.message}", status=err.status) from None

    def _read(self, job: TokenJobConfig) -> ProviderMetadata:
        issuer = job.issuer_url
        assert issuer is not None
        openid, oauth = discovery_urls(issuer)
        status, body = self._get(openid, job)
        source = openid
        if status == 404:
            status, body = self._get(oauth, job)
            source = oauth
            if status == 404:
                raise RefreshError(
                    Reason.DISCOVERY,
                    f"no discovery document for {issuer}: {openid} and {oauth} are both "
                    "404 (is the issuer right?)",
                    status=status,
                )
        if status != 200:
            # A server error, a refusal or a rate limit: the IdP's state, retried like any
            # other; a redirect or another answer: the issuer is not what the job says.
            if status >= 500:
                reason = Reason.HTTP_5XX
            elif status >= 400:
                reason = Reason.HTTP_4XX
            else:
                reason = Reason.DISCOVERY
            raise RefreshError(reason, f"discovery: {source} answered HTTP {status}", status=status)
        return parse_metadata(
            body,
            issuer=issuer,
            source=source,
            fetched_at=self._clock(),
            url_problem=lambda url: self._url_problem(url, job),
        )
