"""Provider presets: each provider's endpoint shape as data, not code.

A preset supplies defaults for a token job's fields (anything the job sets itself wins) and a
few rules the config checks. What each provider demands, and where it says so, is in
docs/providers.md; `ProviderName` is the one list of supported providers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

ProviderName = Literal[
    "generic",
    "lucidworks",
    "fusion",
    "lucidtech",
    "usage-engine",
    "entra",
    "okta",
    "keycloak",
    "auth0",
]
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
    # The issuer built from `tenant_id` (Entra ID), when the job gives no `issuer`.
    issuer_template: str | None = None
    # The job names its IdP by `issuer` (or `token_url`): there is no one public endpoint.
    requires_issuer: bool = False
    # A trailing slash the IdP's issuer has (Auth0), added when the job leaves it off: the
    # discovery document's `issuer` must match it character for character.
    issuer_trailing_slash: bool = False
    # (regex, what it should look like): a hint for an issuer of the wrong shape.
    issuer_shape: tuple[str, str] | None = None
    # Every scope must end so (Entra's client credentials take `<resource>/.default` only).
    scope_suffix: str | None = None
    # The `auth` methods the IdP takes (registered names, and `federated_jwt`); None: any.
    auth_methods: frozenset[str] | None = None
    # What a private_key_jwt assertion may be signed with; None: any the refresher signs.
    assertion_algs: tuple[str, ...] | None = None
    # private_key_jwt needs `certificate`: the IdP finds the key by its thumbprint (Entra).
    requires_certificate: bool = False
    # The IdP refuses RFC 8707 `resource` (Entra v2.0 names the resource in the scope).
    takes_resource: bool = True
    # The longest assertion lifetime the IdP accepts, when shorter than the refresher's cap.
    max_assertion_lifetime: float | None = None


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
    # Microsoft Entra ID (v2.0 endpoint): the tenant's issuer, found by discovery; the client
    # secret in the body as Microsoft documents it; scopes are `<resource>/.default`.
    # Certificate credentials are RSA keys found by their `x5t#S256`; MSAL sends `nbf`.
    "entra": Preset(
        {"scope_in": "body", "auth": "client_secret_post", "assertion": {"not_before": True}},
        requires_scope=True,
        max_scopes=1,
        issuer_template="https://login.microsoftonline.com/{tenant_id}/v2.0",
        scope_suffix="/.default",
        auth_methods=frozenset(
            {"client_secret_basic", "client_secret_post", "private_key_jwt", "federated_jwt"}
        ),
        assertion_algs=("RS256", "PS256"),
        requires_certificate=True,
        takes_resource=False,
    ),
    # Okta: an org or custom authorization server's issuer (`https://ORG.okta.com` or
    # `https://ORG.okta.com/oauth2/default`), by discovery.
    "okta": Preset(
        {"scope_in": "body", "auth": "client_secret_basic"},
        requires_issuer=True,
        auth_methods=frozenset(
            {"client_secret_basic", "client_secret_post", "client_secret_jwt", "private_key_jwt"}
        ),
    ),
    # Keycloak: the realm's URL is the issuer.
    "keycloak": Preset(
        {"scope_in": "body", "auth": "client_secret_basic"},
        requires_issuer=True,
        issuer_shape=(r"/realms/[^/]+$", "the realm's URL, https://HOST/realms/REALM"),
        auth_methods=frozenset(
            {
                "client_secret_basic",
                "client_secret_post",
                "client_secret_jwt",
                "private_key_jwt",
                "tls_client_auth",
                "federated_jwt",
            }
        ),
    ),
    # Auth0: the tenant (or custom domain) with its trailing slash is the issuer; a token is
    # for one API, named by `audience`; an assertion's `aud` is the tenant, not the endpoint.
    "auth0": Preset(
        {"scope_in": "body", "auth": "client_secret_post", "assertion": {"audience": "issuer"}},
        requires_audience=True,
        requires_issuer=True,
        issuer_trailing_slash=True,
        auth_methods=frozenset(
            {
                "client_secret_basic",
                "client_secret_post",
                "private_key_jwt",
                "tls_client_auth",
                "self_signed_tls_client_auth",
            }
        ),
        assertion_algs=("RS256", "PS256"),
        max_assertion_lifetime=300.0,
    ),
}

# Token endpoint client authentication methods by their registered names (RFC 7591 2,
# RFC 8705 2): what discovery documents list and what the local token server accepts.
RegisteredAuthMethod = Literal[
    "client_secret_basic",
    "client_secret_post",
    "client_secret_jwt",
    "private_key_jwt",
    "tls_client_auth",
    "self_signed_tls_client_auth",
]
REGISTERED_AUTH_METHODS: tuple[RegisteredAuthMethod, ...] = get_args(RegisteredAuthMethod)
TLS_METHODS = frozenset({"tls_client_auth", "self_signed_tls_client_auth"})
# The methods that sign an assertion themselves (a federated one arrives signed by another).
JWT_METHODS = frozenset({"client_secret_jwt", "private_key_jwt"})
# The `auth` spellings that send or sign with the client secret.
SECRET_METHODS = frozenset(
    {"client_secret_basic", "client_secret_post", "client_secret_jwt", "basic", "basic_raw", "body"}
)
# Assertions signed with a private key; HS256 (the client secret) is client_secret_jwt's.
KEY_ALGORITHMS = ("RS256", "PS256", "ES256")

# The registered names of today's older spellings of `auth`.
AUTH_ALIASES = {
    "basic": "client_secret_basic",  # id and secret form-urlencoded first (RFC 6749 2.3.1)
    "basic_raw": "client_secret_basic",  # as they are: what many servers actually decode
    "body": "client_secret_post",
}


def registered_auth_method(auth: str) -> str:
    """The name an IdP's discovery document lists this method under. A federated assertion
    travels exactly like a private key JWT (RFC 7523), so it is listed as one."""
    if auth == "federated_jwt":
        return "private_key_jwt"
    return AUTH_ALIASES.get(auth, auth)


def apply_preset(job: dict[str, Any]) -> dict[str, Any]:
    """Return the job with its provider's defaults filled in (the job's own values win;
    nested mappings such as `assertion` are merged key by key)."""
    name = job.get("provider", "generic")
    preset = PRESETS.get(name) if name in PROVIDERS else None
    if preset is None:
        return job  # the unknown provider is reported by validation
    merged = {**preset.defaults, **job}
    for key, default in preset.defaults.items():
        if isinstance(default, dict) and isinstance(job.get(key), dict):
            merged[key] = {**default, **job[key]}
    return merged
