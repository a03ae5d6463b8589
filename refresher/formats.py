"""The file formats a token is written in, and read back from: pure text, no I/O.

`raw`: the token alone. `header`: `Authorization: Bearer <token>`. `json` and `env` carry the
token with its type, times and scope, under the keys of one table (`KEYS`), so writing and
reading can never disagree about a name.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from refresher.clock import format_utc
from refresher.tokens import Token, plain_text

Format = Literal["raw", "json", "env", "header"]


@dataclass(frozen=True)
class Key:
    """One value's name in the `json` format and in the `env` format."""

    json: str
    env: str


ACCESS_TOKEN = Key("access_token", "ACCESS_TOKEN")
TOKEN_TYPE = Key("token_type", "TOKEN_TYPE")
EXPIRES_AT = Key("expires_at_epoch", "TOKEN_EXPIRES_AT")
ISSUED_AT = Key("issued_at_epoch", "TOKEN_ISSUED_AT")
SCOPE = Key("scope", "TOKEN_SCOPE")
# The contract consumers rely on to report a rejected token: `tokens.fingerprint`, the first
# 8 hex digits of the SHA-256 of the token. Written for them, never read back (the refresher
# compares whole tokens).
FINGERPRINT = Key("fingerprint", "TOKEN_FINGERPRINT")
KEYS = (ACCESS_TOKEN, TOKEN_TYPE, EXPIRES_AT, ISSUED_AT, SCOPE, FINGERPRINT)
# The `json` format also states the expiry for people, as ISO 8601 UTC.
EXPIRES_AT_TEXT = "expires_at"

HEADER_PREFIX = "Authorization: Bearer "

# Values written beside the token (Lucidtech's `api_key`) become keys of their own: a JSON key
# as it is, an env variable in upper case. Only plain names, never one of ours, and only
# printable values: an extra read back from an edited file must not override the token or add
# lines to an env file.
_EXTRA_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
_RESERVED = {key.json for key in KEYS} | {key.env.lower() for key in KEYS} | {EXPIRES_AT_TEXT}


def clean_extras(extras: Mapping[str, Any]) -> dict[str, str]:
    """The extras that can be written and read back safely, in every format."""
    return {
        key: value
        for key, value in extras.items()
        if isinstance(key, str)
        and _EXTRA_NAME.fullmatch(key)
        and key not in _RESERVED
        and plain_text(value) is not None
    }


@dataclass(frozen=True)
class StoredToken:
    """What a file says about its token. `times` is `(issued_at, expires_at)` when the format
    carries them; `raw` and `header` do not (the sink's metadata file or the JWT may)."""

    access_token: str = field(repr=False)
    times: tuple[float, float] | None
    scope: str | None = None
    extras: Mapping[str, str] = field(default_factory=dict, repr=False)


def token_document(token: Token) -> dict[str, Any]:
    """The `json` format's object: every key of `KEYS`, the readable expiry, the extras."""
    return {
        ACCESS_TOKEN.json: token.access_token,
        TOKEN_TYPE.json: token.token_type,
        EXPIRES_AT_TEXT: format_utc(token.expires_at, "seconds"),
        EXPIRES_AT.json: round(token.expires_at, 3),
        ISSUED_AT.json: round(token.issued_at, 3),
        SCOPE.json: token.scope,
        FINGERPRINT.json: token.fingerprint,
        **clean_extras(token.extras),
    }


def _env_line(key: str, value: str) -> str:
    return f"{key}={shlex.quote(value)}\n"


def render(token: Token, fmt: Format) -> bytes:
    """The file content for `token` in format `fmt`."""
    if fmt == "raw":
        return token.access_token.encode()
    if fmt == "header":
        return f"{HEADER_PREFIX}{token.access_token}".encode()
    if fmt == "json":
        return (json.dumps(token_document(token), indent=2) + "\n").encode()
    values = {
        ACCESS_TOKEN.env: token.access_token,
        TOKEN_TYPE.env: token.token_type,
        EXPIRES_AT.env: f"{token.expires_at:.3f}",
        ISSUED_AT.env: f"{token.issued_at:.3f}",
        FINGERPRINT.env: token.fingerprint,
    }
    if token.scope:
        values[SCOPE.env] = token.scope
    values.update((key.upper(), value) for key, value in clean_extras(token.extras).items())
    return "".join(_env_line(key, value) for key, value in values.items()).encode()


def number(value: Any) -> float | None:
    """A number written by us (or edited by someone), or None."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        result = float(value)
    except (ValueError, OverflowError):
        return None
    return result if math.isfinite(result) else None


def _times(issued_at: Any, expires_at: Any) -> tuple[float, float] | None:
    issued, expires = number(issued_at), number(expires_at)
    return (issued, expires) if issued is not None and expires is not None else None


def parse(content: str, fmt: Format) -> StoredToken | None:
    """What a file in format `fmt` holds; None when it holds no token we can read."""
    if fmt == "raw":
        return StoredToken(content.strip(), None)
    if fmt == "header":
        if not content.startswith(HEADER_PREFIX):
            return None
        return StoredToken(content.removeprefix(HEADER_PREFIX).strip(), None)
    if fmt == "json":
        return _parse_json(content)
    return _parse_env(content)


def _parse_json(content: str) -> StoredToken | None:
    try:
        document = json.loads(content)
    except (ValueError, RecursionError):
        return None
    if not isinstance(document, dict) or not isinstance(document.get(ACCESS_TOKEN.json), str):
        return None
    scope = document.get(SCOPE.json)
    return StoredToken(
        document[ACCESS_TOKEN.json],
        _times(document.get(ISSUED_AT.json), document.get(EXPIRES_AT.json)),
        plain_text(scope),
        clean_extras(document),
    )


def _parse_env(content: str) -> StoredToken | None:
    values: dict[str, str] = {}
    for line in content.splitlines():
        key, sep, raw_value = line.partition("=")
        if not sep:
            continue
        try:
            parts = shlex.split(raw_value)
        except ValueError:
            return None
        values[key] = parts[0] if parts else ""
    return StoredToken(
        values.get(ACCESS_TOKEN.env, ""),
        _times(values.get(ISSUED_AT.env), values.get(EXPIRES_AT.env)),
        plain_text(values.get(SCOPE.env)),
        clean_extras({key.lower(): value for key, value in values.items() if key.isupper()}),
    )
