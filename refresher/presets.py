"""Provider presets: each seed provider's endpoint shape as data, not code.

A preset supplies defaults for a token job's fields (anything the job sets itself wins) and a
few rules the config checks. What each provider demands, and where it says so, is in
docs/providers.md; `ProviderName` is the one list of supported providers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

ProviderName = Literal["generic", "lucidworks", "fusion", "lucidtech", "usage-engine"]
PROVIDERS: tuple[ProviderName, ...] = get_args(ProviderName)

_LUCIDWORKS: dict[str, Any] = {
    "scope_in": "query",
    "auth": "basic",
    "margin": 300,
    "revokes_on_reissue": True,
}


@dataclass(frozen=True)
class Preset:
    defaults: dict[str, Any] = field(default_factory=dict)
    requires_scope: bool = False
    requires_audience: bool = False
    max_scopes: int | None = None  # None: any number of scopes may share one token
    # Where the token endpoint lives below a credentials file's `auth_endpoint` (Lucidtech).
    token_path: str | None = None


PRESETS: dict[ProviderName, Preset] = {
    # RFC 6749 defaults: parameters in the form body, HTTP Basic client authentication.
    "generic": Preset({"scope_in": "body", "auth": "basic"}),
    # Lucidworks AI: scope and grant_type in the query string, Basic auth. A new token for a
    # scope deletes the previous one at once, so refresh once per lifetime, 5 minutes before
    # expiry as Lucidworks advises. `machinelearning.predict` and `.model` need separate tokens.
    "lucidworks": Preset(_LUCIDWORKS, requires_scope=True, max_scopes=1),
    # Lucidworks Fusion / Springboard: the same identity service and endpoint shape, but one
    # request may combine `connectedsearch.query` and `datasource.push` into one token.
    "fusion": Preset(_LUCIDWORKS, requires_scope=True),
    # Lucidtech: POST <auth_endpoint>/oauth2/token?grant_type=client_credentials, Basic auth;
    # credentials (and the api_key sent beside the token) usually come from credentials.cfg.
    "lucidtech": Preset({"scope_in": "query", "auth": "basic"}, token_path="/oauth2/token"),
    # Usage Engine: client credentials plus an `audience` (the API address), in the form body.
    "usage-engine": Preset({"scope_in": "body", "auth": "body"}, requires_audience=True),
}


def apply_preset(job: dict[str, Any]) -> dict[str, Any]:
    """Return the job with its provider's defaults filled in (the job's own values win)."""
    name = job.get("provider", "generic")
    preset = PRESETS.get(name) if name in PROVIDERS else None
    if preset is None:
        return job  # the unknown provider is reported by validation
    merged = {**preset.defaults, **job}
    return merged
