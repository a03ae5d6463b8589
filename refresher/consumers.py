"""Who may read a token from the API listener: authenticating and authorizing consumers.

A caller presents `Authorization: Bearer <credential>`. The credential is one of:

- a job's **bearer key** (`consumers.bearer_key_file`), for consumers outside Kubernetes:
  compared in constant time, the file re-read when it changes (a rotated key needs no
  restart). A key opens the job whose file it is, and only that one;
- a **projected service-account token** issued for a job's `audience`, checked with a
  `TokenReview` (`authentication.k8s.io/v1`) that names every configured audience, so the
  pod's default API token (whose audience is the API server) is refused. The review's user
  `system:serviceaccount:NS:NAME` is allowed by `service_accounts` or `namespaces`. Reviews
  are cached (positive ones for `REVIEW_TTL`, refusals for less) and the calls to the API
  server are rate limited, so a flood of made-up tokens costs the API server little.

On a loopback listener a job without `consumers` serves anonymous callers (the pod's own
containers). `Gate.check` answers the HTTP status: 401 for no or a bad credential, whatever
the job's name; 404 alike for an unknown job and one the caller may not read, so names do
not leak; 503 when the API server cannot say. Never is a credential logged or kept: the
cache is keyed by a hash.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from refresher.config import ConsumersConfig, TokenJobConfig
from refresher.credentials import CredentialRef
from refresher.errors import RefreshError
from refresher.ratelimit import TokenBucket

log = logging.getLogger(__name__)

REVIEW_TTL = 30.0  # an authenticated review is reused this long
REFUSED_TTL = 5.0  # a refused one this long
MAX_CACHED_REVIEWS = 4096
REVIEW_RATE, REVIEW_BURST = 20.0, 40  # TokenReviews per second sent to the API server
REVIEW_WORKERS = 4  # TokenReviews in flight at once
MAX_PENDING_REVIEWS = 16  # running or queued; more callers are told to come back (503)
MAX_CREDENTIAL_CHARS = 16 * 1024


@dataclass(frozen=True)
class Subject:
    """Who a caller is, for the audit log: never the credential."""

    name: str  # `system:serviceaccount:NS:NAME`, `bearer-key`, `anonymous (loopback)`
    audiences: frozenset[str] = frozenset()
    key_jobs: frozenset[str] = frozenset()  # the jobs whose bearer key it presented


@dataclass(frozen=True)
class Decision:
    status: int  # 200: go on; 401, 404 or 503
    subject: Subject | None
    reason: str | None  # one of REASONS when refused


ANONYMOUS = Subject("anonymous (loopback)")


class BearerKey:
    """One job's shared key, read from its file and re-read when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._seen: tuple[int, int, int] | None = None
        self._key: bytes | None = None

    def matches(self, presented: str) -> bool:
        key = self._current()
        # Digests of equal length, compared in constant time: neither the key's bytes nor
        # its length show in how long a wrong guess takes.
        given = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        return key is not None and hmac.compare_digest(given, hashlib.sha256(key).digest())

    def _current(self) -> bytes | None:
        try:
            info = os.stat(self.path)
        except OSError:
            return None
        seen = (info.st_mtime_ns, info.st_size, info.st_ino)
        with self._lock:
            if seen != self._seen:
                self._seen = seen  # judged once per change of the file, however it turns out
                self._key = None
                try:
                    key = CredentialRef(file=self.path).read().strip()
                except RefreshError as err:
                    log.warning("cannot read a consumer key", extra={"error": err.message})
                    return None
                if not key:
                    log.warning("a consumer key file is empty", extra={"path": str(self.path)})
                    return None
                self._key = key.encode()
            return self._key


class TokenReviews:
    """Service-account tokens checked by the API server, with a small bounded cache."""

    def __init__(
        self,
        authentication: Callable[[], Any],
        request_timeout: float,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._api = authentication  # returns a kubernetes AuthenticationV1Api
        self._timeout = request_timeout
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._cache: OrderedDict[bytes, tuple[float, Subject | None]] = OrderedDict()
        self._bucket = TokenBucket(REVIEW_RATE, REVIEW_BURST, monotonic=monotonic)

    def review(self, token: str, audiences: frozenset[str]) -> Subject | None:
        """The service account behind `token` with the audiences it is valid for, or None
        when the API server refuses it. Raises ReviewUnavailable when it cannot be asked."""
        key = hashlib.sha256("\n".join([token, *sorted(audiences)]).encode()).digest()
        now = self._monotonic()
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None and cached[0] > now:
                self._cache.move_to_end(key)
                return cached[1]
        if self._bucket.try_take() > 0:
            raise ReviewUnavailable("rate_limited")
        subject = self._ask(token, audiences)
        with self._lock:
            ttl = REVIEW_TTL if subject is not None else REFUSED_TTL
            claims = _claims(token)
            expires = claims.get("exp") if claims else None
            if isinstance(expires, int | float):  # never accepted past the token's own expiry
                ttl = min(ttl, max(expires - time.time(), 0.0))
            self._cache[key] = (now + ttl, subject)
            self._cache.move_to_end(key)
            while len(self._cache) > MAX_CACHED_REVIEWS:
                self._cache.popitem(last=False)
        return subject

    def _ask(self, token: str, audiences: frozenset[str]) -> Subject | None:
        from kubernetes.client import V1TokenReview, V1TokenReviewSpec
        from kubernetes.client.exceptions import ApiException

        body = V1TokenReview(spec=V1TokenReviewSpec(token=token, audiences=sorted(audiences)))
        try:
            result = self._api().create_token_review(body, _request_timeout=self._timeout)
        except ApiException as err:
            log.warning("TokenReview refused by the API server", extra={"status": err.status})
            raise ReviewUnavailable("review_error") from None
        except Exception as err:  # unreachable, timeout: the class name is enough
            log.warning("TokenReview failed", extra={"error": type(err).__name__})
            raise ReviewUnavailable("review_error") from None
        status = result.status
        if status is None or not status.authenticated or status.user is None:
            return None
        granted = frozenset(status.audiences or ()) & audiences
        return Subject(str(status.user.username), granted) if granted else None


class ReviewUnavailable(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _worth_reviewing(credential: str, audiences: frozenset[str]) -> bool:
    """Whether `credential` looks like a projected token for one of `audiences` that has not
    expired (read without verifying: the TokenReview does that). Anything else (a wrong
    bearer key, a made-up string, the pod's default API token) is refused without asking
    the API server, and never sent there."""
    claims = _claims(credential)
    if claims is None:
        return False
    audience = claims.get("aud")
    given = {audience} if isinstance(audience, str) else set(audience or ())
    expires = claims.get("exp")
    alive = isinstance(expires, int | float) and expires > time.time()
    return alive and bool(given & audiences)


def _claims(credential: str) -> dict[str, Any] | None:
    try:
        claims = jwt.decode(credential, options={"verify_signature": False})
    except (jwt.PyJWTError, ValueError, TypeError):
        return None
    return claims if isinstance(claims, dict) else None


def _bearer(authorization: str | None) -> str | None:
    if authorization is None:
        return None
    scheme, _, credential = authorization.strip().partition(" ")
    credential = credential.strip()
    if scheme.lower() != "bearer" or not credential or len(credential) > MAX_CREDENTIAL_CHARS:
        return ""  # present but malformed: a bad credential
    return credential


def _allowed(subject: Subject, consumers: ConsumersConfig) -> bool:
    """Whether a reviewed service account may read a job guarded by `consumers`."""
    if consumers.audience is None or consumers.audience not in subject.audiences:
        return False
    parts = subject.name.split(":")
    if len(parts) != 4 or parts[:2] != ["system", "serviceaccount"]:
        return False
    namespace, name = parts[2], parts[3]
    return f"{namespace}/{name}" in consumers.service_accounts or (
        namespace in consumers.namespaces
    )


class Gate:
    """The API listener's doorkeeper: `check(job_name, authorization)` is a Decision."""

    def __init__(
        self,
        jobs: Mapping[str, TokenJobConfig],
        *,
        loopback: bool,
        reviews: TokenReviews | None,
    ) -> None:
        self.jobs = jobs
        self.loopback = loopback
        self.reviews = reviews
        self._keys = {
            name: BearerKey(job.consumers.bearer_key_file)
            for name, job in jobs.items()
            if job.consumers is not None and job.consumers.bearer_key_file is not None
        }
        # Some job serves anonymous callers (on loopback): an unknown name is then just that.
        self._anonymous = loopback and any(job.consumers is None for job in jobs.values())
        self._audiences = frozenset(
            job.consumers.audience
            for job in jobs.values()
            if job.consumers is not None and job.consumers.audience is not None
        )
        self._pool = ThreadPoolExecutor(REVIEW_WORKERS, thread_name_prefix="refresher-review")
        self._reviewing = 0  # reviews running or queued; touched on the HTTP loop only

    async def check(self, name: str, authorization: str | None) -> Decision:
        """May the caller read job `name`? On the HTTP loop: keys and the look at a token
        are cheap; a TokenReview runs in the gate's own small pool, and when that is full
        the caller is told to come back (503), so made-up tokens cannot hold up `/metrics`
        or `/readyz`, which share the HTTP stack's executor."""
        job = self.jobs.get(name)
        credential = _bearer(authorization)
        if credential is None:
            if job is not None and job.consumers is None and self.loopback:
                return Decision(200, ANONYMOUS, None)
            if job is None and self._anonymous:
                return Decision(404, ANONYMOUS, None)  # the pod's own containers: no secret
            return Decision(401, None, "missing")
        subject = self._keyed(credential)
        if subject is None:
            worth = self.reviews is not None and _worth_reviewing(credential, self._audiences)
            if not worth:
                return Decision(401, None, "invalid")
            if self._reviewing >= MAX_PENDING_REVIEWS:
                return Decision(503, None, "rate_limited")
            assert self.reviews is not None
            reviews, audiences = self.reviews, self._audiences
            self._reviewing += 1
            try:
                subject = await asyncio.get_running_loop().run_in_executor(
                    self._pool, reviews.review, credential, audiences
                )
            except ReviewUnavailable as err:
                return Decision(503, None, err.reason)
            finally:
                self._reviewing -= 1
        if subject is None:
            return Decision(401, None, "invalid")
        if job is None or not self._authorized(subject, job):
            return Decision(404, subject, "not_allowed")
        return Decision(200, subject, None)

    async def admit(
        self, name: str, credentials: list[str], record: Callable[[str], None]
    ) -> Decision:
        """`check` for the values of the caller's credential header (more than one is
        refused: which would count?), every refusal counted (`record`, by reason) and logged
        (never the credential)."""
        if len(credentials) > 1:
            decision = Decision(401, None, "invalid")
        else:
            decision = await self.check(name, credentials[0] if credentials else None)
        if decision.reason is not None:
            record(decision.reason)
            log.warning(
                "consumer refused",
                extra={
                    "token": name if name in self.jobs else None,
                    "status": decision.status,
                    "reason": decision.reason,
                    "subject": decision.subject.name if decision.subject else None,
                },
            )
        return decision

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _keyed(self, credential: str) -> Subject | None:
        # Every key is compared (several jobs may share one), so the time taken does not
        # say which one matched.
        jobs = frozenset(name for name, key in self._keys.items() if key.matches(credential))
        return Subject("bearer-key", key_jobs=jobs) if jobs else None

    @staticmethod
    def _authorized(subject: Subject, job: TokenJobConfig) -> bool:
        if subject.key_jobs:
            return job.name in subject.key_jobs
        consumers = job.consumers
        return consumers is not None and _allowed(subject, consumers)
