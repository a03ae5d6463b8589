"""The token as the refresher knows it, and how its expiry is determined (rule 3 of docs/design.md).

`expires_at` is the earlier of the JWT `exp` claim and receipt time + `expires_in`. The JWT
is decoded without verifying its signature: the refresher is not the token's audience, it
only needs to know when the token dies.

A claimed lifetime beyond `MAX_LIFETIME_SECONDS` (a year) is not believed: see
`compute_expiry`.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import jwt

from refresher.errors import Reason, RefreshError

log = logging.getLogger(__name__)

# Beyond this difference between the IdP's `iat` and our receipt time we say so in the log.
SKEW_WARNING_SECONDS = 30.0

# No client-credentials access token plausibly lives longer than this. A longer claim is an
# IdP bug (`exp` in milliseconds, a "never" placeholder) or garbage, and obeying it would
# mean never refreshing: the token would be served until whatever really ends it.
MAX_LIFETIME_SECONDS = 366 * 86400.0

# No access token is longer than this: beyond what HTTP servers accept in a header line.
MAX_TOKEN_CHARS = 16 * 1024
_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")


def token_problem(access_token: str) -> str | None:
    """Why no sink can hold `access_token` safely (None when it can), for a token from the
    IdP and for one read back from a sink alike.

    RFC 6749 (A.12) lets an access token be any printable ASCII (`1*VSCHAR`); RFC 6750's
    `b64token` is narrower (letters, digits, `-._~+/`, trailing `=`), but real IdPs issue
    tokens outside it (Facebook's `app|token`, tokens with `%` or `:`) that work in the
    headers consumers build. So printable ASCII is accepted, except the space: the `header`
    format could not say where the token ends, and `raw` is read back stripped. Refused is
    what does harm: control characters (CR/LF would add lines to the `header` and `env`
    formats and to line-based parsers of them), anything beyond ASCII (U+2028 is a line
    break to some parsers, a lone surrogate cannot be written at all), and more than
    MAX_TOKEN_CHARS. The text names the offending character's code point, never the token."""
    if len(access_token) > MAX_TOKEN_CHARS:
        return f"is {len(access_token)} characters long, more than {MAX_TOKEN_CHARS // 1024} KiB"
    if not _TOKEN_CHARS.fullmatch(access_token):
        bad = next((ch for ch in access_token if not "!" <= ch <= "~"), " ")
        return (
            f"holds U+{ord(bad):04X}, which no token has (only printable ASCII without "
            "spaces is accepted)"
        )
    return None


# A scope or a credential extra (Lucidtech's `api_key`) is written beside the token: into env
# lines, JSON, Secret keys and annotations.
MAX_TEXT_CHARS = 4096
_TEXT_CHARS = re.compile(r"[\x20-\x7e]*")


def plain_text(value: object) -> str | None:
    """`value` when it can be written beside a token safely (printable ASCII, spaces allowed,
    at most MAX_TEXT_CHARS: no line breaks for env files and parsers), else None."""
    if isinstance(value, str) and len(value) <= MAX_TEXT_CHARS and _TEXT_CHARS.fullmatch(value):
        return value
    return None


def fingerprint(secret: str) -> str:
    """A short, stable, non-reversible name for a secret value, safe for logs and annotations."""
    return hashlib.sha256(secret.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class Token:
    """An access token with the times that matter. Never printed: `repr` hides the secrets."""

    access_token: str = field(repr=False)
    issued_at: float  # by our clock: when we received it (or the best we know for a stored one)
    expires_at: float  # by our clock
    token_type: str = "Bearer"
    scope: str | None = None
    # Values written beside the token (Lucidtech's `api_key`); secret as well.
    extras: Mapping[str, str] = field(default_factory=dict, repr=False)
    # The job's probe rejected this token as soon as it was issued: the probe does not fit
    # the API, so its verdicts on this token are not acted on (rule 11 of docs/design.md).
    # Kept beside the token by the sinks, so a restarted process knows it too.
    unprobeable: bool = False

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.access_token)

    @property
    def lifetime(self) -> float:
        return self.expires_at - self.issued_at

    def is_valid(self, now: float) -> bool:
        return now < self.expires_at


def jwt_claims(access_token: str) -> Mapping[str, Any] | None:
    """The claims of a JWT, or None when the token is opaque (or not a well-formed JWT)."""
    if access_token.count(".") != 2:
        return None
    if len(access_token) > _CACHED_TOKEN_CHARS:  # no real token; not worth memory
        return _decode(access_token)
    return _decode_cached(access_token)


# A refresh decodes its new token twice (its expiry, then whether the file sink needs a
# metadata file beside it), and decoding is a tenth of a refresh's own CPU, so the last few
# decodes are remembered. Those tokens are held in memory by their jobs anyway.
_CACHED_TOKEN_CHARS = 16 * 1024


def _decode(access_token: str) -> Mapping[str, Any] | None:
    try:
        claims = jwt.decode(access_token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    # Read-only: a cached mapping is shared by every caller.
    return MappingProxyType(claims) if isinstance(claims, dict) else None


_decode_cached = functools.lru_cache(maxsize=64)(_decode)


def _numeric_claim(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    # bool is an int subclass; `"exp": true` is nonsense, not the second 1 of 1970.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # JSON integers have no size limit: `"exp": 1000...0` (400 digits)
        return None
    return number if math.isfinite(number) else None


def compute_expiry(
    access_token: str,
    expires_in: float | None,
    received_at: float,
    fallback_lifetime: float | None,
    *,
    job: str = "",
) -> tuple[float, float]:
    """Return `(issued_at, expires_at)` on our clock for a freshly received token.

    The JWT's `exp` is on the IdP's clock. When the token also carries `iat`, its lifetime
    `exp - iat` is independent of clock skew, so receipt + that lifetime is a safe bound even
    when our clock is behind the IdP's; we take the earliest of all the bounds we have.

    A lifetime longer than `MAX_LIFETIME_SECONDS` (from `exp` or `expires_in`) is rejected as
    `invalid_response`, unless the job sets `lifetime`: then receipt + `lifetime` is used,
    the operator's word standing in for the IdP's implausible one. Clamping silently to a
    year instead would still mean "practically never refresh" for a token that may well die
    within the hour (an `exp` in milliseconds); failing makes the fault visible at once.
    """
    bounds: list[float] = []
    if expires_in is not None:
        bounds.append(received_at + expires_in)
    claims = jwt_claims(access_token)
    if claims is not None:
        exp = _numeric_claim(claims, "exp")
        iat = _numeric_claim(claims, "iat")
        if exp is not None:
            bounds.append(exp)
            if iat is not None and exp > iat:
                bounds.append(received_at + (exp - iat))
        if iat is not None and abs(received_at - iat) > SKEW_WARNING_SECONDS:
            log.warning(
                "clock skew between the IdP and this host",
                extra={"token": job, "skew_seconds": round(received_at - iat, 1)},
            )
    if not bounds:
        if fallback_lifetime is None:
            raise RefreshError(
                Reason.INVALID_RESPONSE,
                "the token has no `exp` claim and the response no `expires_in`; "
                "set `lifetime` on the job to refresh such tokens",
            )
        bounds.append(received_at + fallback_lifetime)
    expires_at = min(bounds)
    if expires_at <= received_at:
        raise RefreshError(
            Reason.INVALID_RESPONSE,
            f"the IdP issued a token that is already expired ({expires_at - received_at:.0f} s)",
        )
    if expires_at - received_at > MAX_LIFETIME_SECONDS:
        if fallback_lifetime is None:
            raise RefreshError(
                Reason.INVALID_RESPONSE,
                f"the token claims to live {(expires_at - received_at) / 86400:.3g} days, "
                f"more than {MAX_LIFETIME_SECONDS / 86400:.0f}; set `lifetime` on the job "
                "to refresh it on that schedule instead",
            )
        expires_at = min(expires_at, received_at + fallback_lifetime)
    return received_at, expires_at


def stored_times(access_token: str, now: float) -> tuple[float, float] | None:
    """`(issued_at, expires_at)` of a token read back from a sink with no metadata, from its JWT.

    Without a usable `iat` the token is taken as issued now, which can only make the next
    refresh later than ideal, never make the refresher keep an expired token. An `exp` more
    than `MAX_LIFETIME_SECONDS` away is not believed here either: the expiry is unknown, so
    the token is refreshed rather than kept for years.
    """
    claims = jwt_claims(access_token)
    if claims is None:
        return None
    exp = _numeric_claim(claims, "exp")
    if exp is None:
        return None
    if exp - now > MAX_LIFETIME_SECONDS:
        return None
    iat = _numeric_claim(claims, "iat")
    issued_at = iat if iat is not None and iat <= now else now
    return (min(issued_at, exp), exp)
