"""The configuration file: YAML, `${ENV}` expansion, provider presets, validation.

Validation happens in full before anything runs (rule 7 of docs/design.md): shapes and types
by pydantic, then the rules that span fields or jobs, and every problem is reported with its
path (`tokens[1].sinks[0].path: ...`). `load_config` raises `ConfigError` holding all of them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from refresher.clientauth import check_key_material, hmac_secret_problem
from refresher.credentials import Credentials, check_credentials
from refresher.endpoints import endpoint_key
from refresher.endpoints import token_url as resolve_token_url
from refresher.errors import ConfigError, RefreshError
from refresher.presets import (
    JWT_METHODS,
    KEY_ALGORITHMS,
    PRESETS,
    SECRET_METHODS,
    TLS_METHODS,
    ProviderName,
    RegisteredAuthMethod,
    apply_preset,
    registered_auth_method,
)
from refresher.schedule import SchedulePolicy

# ---------------------------------------------------------------------------- value types

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any) -> Any:
    """Seconds as a number, or a string like `90s`, `5m`, `1h30m`, `250ms`."""
    if isinstance(value, str):
        text = value.strip().replace(" ", "")
        try:
            return float(text)  # `margin: ${MARGIN}` arrives as a string of digits
        except ValueError:
            pass
        parts = _DURATION_PART.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise ValueError("expected seconds or a duration like 30s, 5m, 1h30m")
        return sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    return value


Duration = Annotated[float, BeforeValidator(parse_duration), Field(ge=0, allow_inf_nan=False)]
PositiveDuration = Annotated[
    float, BeforeValidator(parse_duration), Field(gt=0, allow_inf_nan=False)
]


def _parse_mode(value: Any) -> Any:
    # YAML 1.1 reads `0640` as octal (416) but `640` as decimal: accept quoted octal strings
    # and ints that are valid permission bits, and reject the rest with a hint.
    if isinstance(value, str):
        try:
            return int(value, 8)
        except ValueError:
            raise ValueError("expected an octal mode like '0600' or '0640'") from None
    if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value <= 0o777:
        raise ValueError("expected an octal mode; quote it, like '0640'")
    return value


FileMode = Annotated[int, BeforeValidator(_parse_mode)]


def _no_nul(value: Any) -> Any:
    if isinstance(value, str) and "\x00" in value:
        raise ValueError("a path cannot contain a NUL character")
    return value


_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CredentialSource(_Strict):
    value: str | None = None
    env: str | None = None
    file: Path | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> CredentialSource:
        if sum(x is not None for x in (self.value, self.env, self.file)) != 1:
            raise ValueError("give exactly one of `value`, `env` or `file`")
        return self


def _literal_to_source(value: Any) -> Any:
    return {"value": value} if isinstance(value, str) else value


class FileSource(_Strict):
    """Key material, read from its file (and read again whenever the file changes)."""

    file: Annotated[Path, BeforeValidator(_no_nul)]


# ---------------------------------------------------------------------------------- sinks


class FileSinkConfig(_Strict):
    type: Literal["file"]
    path: Annotated[Path, BeforeValidator(_no_nul)]
    # raw: the token alone; json: token with type, expiry, scope; env: KEY=value lines;
    # header: `Authorization: Bearer <token>`.
    format: Literal["raw", "json", "env", "header"] = "raw"
    mode: FileMode = 0o600

    @property
    def absolute_path(self) -> Path:
        return Path(os.path.abspath(self.path))

    @property
    def metadata_file(self) -> Path:
        """`.<name>.refresher.json` beside the token file: where the `raw` and `header`
        formats, which do not carry the expiry, keep it for restarts, and where any format
        notes a token the probe rejected at issue (`Token.unprobeable`)."""
        path = self.absolute_path
        return path.with_name(f".{path.name}.refresher.json")


# Kubernetes object names (DNS subdomain) and Secret data keys.
_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
SecretKey = Annotated[str, Field(pattern=r"^[-._a-zA-Z0-9]+$", max_length=253)]


# Label selectors as the API server parses them: keys with an optional DNS-subdomain prefix,
# `=`, `==`, `!=`, `in`, `notin`, `key`, `!key`, and `>`/`<` with an integer; ASCII spaces.
_LABEL_NAME = r"[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_DNS_PART = r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?"
_LABEL_KEY = rf"(?:{_DNS_PART}(?:\.{_DNS_PART})*/)?{_LABEL_NAME}"
_LABEL_VALUE = rf"(?:{_LABEL_NAME})?"
_SPACE = r"[ \t\r\n]*"
_REQUIREMENT = re.compile(
    rf"{_SPACE}(?:!{_SPACE}{_LABEL_KEY}"
    rf"|{_LABEL_KEY}{_SPACE}(?:(?:==|=|!=){_SPACE}{_LABEL_VALUE}"
    rf"|(?:>|<){_SPACE}-?[0-9]+"
    rf"|[ \t\r\n](?:in|notin){_SPACE}\({_SPACE}{_LABEL_VALUE}"
    rf"(?:{_SPACE},{_SPACE}{_LABEL_VALUE})*{_SPACE}\))?){_SPACE}",
    re.ASCII,
)


def _label_selector(value: str) -> str:
    """A Kubernetes label selector (`app=web,tier in (a,b),!canary`); not an empty one."""
    if not value.strip():
        raise ValueError("an empty selector would nudge every pod in the namespace")
    # Commas inside `in (...)` do not split requirements.
    parts = re.split(r",(?![^()]*\))", value)
    bad = [part for part in parts if _REQUIREMENT.fullmatch(part) is None]
    if bad:
        raise ValueError(f"not a label selector requirement: {bad[0].strip()!r}")
    return value


class NudgeConfig(_Strict):
    """Consumer pods told of each new token, so the kubelet syncs the mounted Secret at once
    instead of on its next periodic sync (nudge.py)."""

    # The consumers' pods, in the Secret's namespace: `app=consumer,tier=web`.
    selector: Annotated[str, AfterValidator(_label_selector), Field(max_length=1024)]
    # Pods patched at once, and each API call's timeout.
    max_concurrent: int = Field(default=4, ge=1, le=64)
    timeout: PositiveDuration = 5.0
    # At most this many pods are nudged per write (a selector that matches a whole
    # namespace is a mistake, not a plan).
    max_pods: int = Field(default=500, ge=1, le=10_000)


class KubernetesSinkConfig(_Strict):
    """A Secret the token is written into (one API write per refresh)."""

    type: Literal["kubernetes"]
    name: str = Field(pattern=_DNS_SUBDOMAIN, max_length=253)
    namespace: str | None = Field(default=None, pattern=_DNS_LABEL, max_length=63)
    token_key: SecretKey = "token"
    # Optional extra keys the refresher owns: `Bearer <token>`, ISO expiry, granted scope.
    authorization_key: SecretKey | None = None
    expires_at_key: SecretKey | None = None
    scope_key: SecretKey | None = None
    # The token's fingerprint (first 8 hex of its SHA-256), for consumers that report it.
    fingerprint_key: SecretKey | None = None
    # Values from the credentials written beside the token (Lucidtech's `api_key`).
    write_credential_extras: bool = True
    # Static keys written with every refresh.
    extra_keys: dict[SecretKey, str] = Field(default_factory=dict)
    secret_type: str = "Opaque"
    # Create the Secret when it is missing (needs the `create` RBAC verb).
    create: bool = False
    # After each write, annotate the consumers' pods that mount it (needs `list` and `patch`
    # on pods in the Secret's namespace).
    nudge: NudgeConfig | None = None


SinkConfig = Annotated[FileSinkConfig | KubernetesSinkConfig, Field(discriminator="type")]


# ------------------------------------------------------------------------------ listeners


def parse_listen(value: str) -> tuple[str, int]:
    """`HOST:PORT` or `[V6]:PORT` as (address, port); `localhost` is 127.0.0.1. Raises
    ValueError with the reason."""
    host, colon, port_text = value.rpartition(":")
    if not colon or not port_text.isdigit():
        raise ValueError(f"expected HOST:PORT or [IPv6]:PORT, not {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"an IPv6 address goes in brackets, like [::1]:9465, not {value!r}")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        address = str(ipaddress.ip_address(host))
    except ValueError:
        raise ValueError(f"the host must be an IP address, not {host!r}") from None
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port {port} is out of range")
    return address, port


class TlsListenerConfig(_Strict):
    """A listener's certificate and key (PEM files, re-read when they change)."""

    cert_file: Path
    key_file: Path


class _ListenerConfig(_Strict):
    """What every consumer-facing listener has: an address, its caps, optional TLS."""

    listen: str
    max_connections: int = Field(default=512, ge=1, le=100_000)
    max_connections_per_address: int = Field(default=32, ge=1, le=100_000)
    tls: TlsListenerConfig | None = None

    @field_validator("listen", mode="before")
    @classmethod
    def _normalized(cls, value: Any) -> Any:
        if (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, str) and value.isdigit()
        ):
            value = f"127.0.0.1:{value}"  # a port alone: loopback
        if not isinstance(value, str):
            return value
        host, port = parse_listen(value)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def address(self) -> tuple[str, int]:
        return parse_listen(self.listen)

    @property
    def loopback(self) -> bool:
        """Bound to loopback: callers are the pod's own containers (`0.0.0.0` and `::` are
        every address, not loopback)."""
        return ipaddress.ip_address(self.address[0]).is_loopback


# ---------------------------------------------------------------------------------- probe

_HEADER_NAME = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}$"  # an RFC 9110 token
HeaderName = Annotated[str, Field(pattern=_HEADER_NAME)]
# Header values are sent to the API as they are: printable ASCII, no line breaks.
HeaderValue = Annotated[str, Field(pattern=r"^[\x20-\x7e]{0,4096}$")]


class ProbeConfig(_Strict):
    """A request to the real API that tells whether the token is accepted (probe.py)."""

    url: str
    method: Literal["GET", "HEAD", "POST"] = "GET"
    headers: dict[HeaderName, HeaderValue] = Field(default_factory=dict)
    # Header name -> the credentials extra sent in it (Lucidtech: `{x-api-key: api_key}`).
    credential_headers: dict[HeaderName, str] = Field(default_factory=dict)
    # At least a second: each probe is a request to the API, made on a refresh thread.
    interval: Annotated[PositiveDuration, Field(ge=1.0)] | None = None
    connect_timeout: PositiveDuration = 5.0
    read_timeout: PositiveDuration = 10.0
    ca_bundle: Path | None = None
    allow_insecure_http: bool = False

    @field_validator("headers", "credential_headers")
    @classmethod
    def _not_authorization(cls, value: dict[str, str]) -> dict[str, str]:
        if any(name.lower() == "authorization" for name in value):
            raise ValueError("`Authorization` carries the token; it is set by the probe")
        return value


# ---------------------------------------------------------------------------------- proxy

_SIZE = re.compile(r"(\d+)\s*(B|KiB|MiB|GiB|kB|MB|GB)?")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
_SIZE_UNITS |= {"kB": 10**3, "MB": 10**6, "GB": 10**9}


def parse_size(value: Any) -> Any:
    """Bytes as a number, or a string like `512KiB`, `1MiB`, `2MB`."""
    if isinstance(value, str):
        match = _SIZE.fullmatch(value.strip())
        if match is None:
            raise ValueError("expected bytes or a size like 64KiB, 1MiB")
        return int(match.group(1)) * _SIZE_UNITS[match.group(2)]
    return value


ByteSize = Annotated[int, BeforeValidator(parse_size), Field(ge=0)]

# Headers the proxy sets itself, or that belong to one hop: never configured to be injected.
RESERVED_HEADERS = frozenset(
    {
        "authorization",
        "x-refresher-authorization",
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
        "expect",
    }
)


class ProxyTimeouts(_Strict):
    # To get a connection to the upstream: a new one, or a free one from the pool.
    connect: PositiveDuration = 5.0
    # The upstream's silence: before its answer's head, and between chunks of its body.
    read: PositiveDuration = 60.0
    # One whole exchange through the proxy, a streamed answer included.
    request: PositiveDuration = 300.0


class ProxyConfig(_ListenerConfig):
    """A per-job listener that forwards to one upstream with the current token (proxy.py)."""

    # `HOST:PORT` (a port alone is on loopback), one listener per job.
    listen: str
    # One origin and an optional base path: `https://api.example.com/v1`.
    upstream: str
    # Added to every request (replacing the consumer's header of that name).
    headers: dict[HeaderName, HeaderValue] = Field(default_factory=dict)
    # Header name -> the credentials extra sent in it (Lucidtech: `{x-api-key: api_key}`).
    credential_headers: dict[HeaderName, str] = Field(default_factory=dict)
    # Request bodies up to this size are kept so they can be sent again; larger ones are
    # streamed and never replayed.
    max_replay_body: Annotated[ByteSize, Field(le=64 << 20)] = 1 << 20
    # All request bodies this proxy holds for replay at once; a body that does not fit is
    # streamed (and not replayed), so many large uploads cannot exhaust memory.
    replay_buffer: Annotated[ByteSize, Field(le=1 << 30)] = 64 << 20
    # After a rejection of the current token, how long to wait for a new one to replay with.
    replay_wait: Annotated[Duration, Field(le=30.0)] = 2.0
    timeouts: ProxyTimeouts = Field(default_factory=ProxyTimeouts)
    # Connections to the upstream kept at once (pooled and kept alive).
    upstream_connections: int = Field(default=100, ge=1, le=10_000)
    # The CA bundle for the upstream's certificate (not the IdP's).
    ca_bundle: Path | None = None
    allow_insecure_http: bool = False
    # X-Forwarded-For/-Proto/-Host: off, since they would hand pod addresses to the API.
    forwarded_headers: bool = False
    max_connections_per_address: int = Field(default=64, ge=1, le=100_000)

    @field_validator("headers", "credential_headers")
    @classmethod
    def _not_reserved(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if name.lower() in RESERVED_HEADERS:
                raise ValueError(f"`{name}` is set by the proxy itself, not configured")
        return value

    @property
    def upstream_base(self) -> tuple[str, str]:
        """(origin, base path without a trailing slash)."""
        parts = urlsplit(self.upstream)
        return f"{parts.scheme}://{parts.netloc}", parts.path.rstrip("/")


# Loc parts pydantic inserts for a discriminated union's tag; not part of the user's path.
_UNION_TAGS = {"file", "kubernetes"}


# ----------------------------------------------------------------------------------- jobs


_SERVICE_ACCOUNT = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?/[a-z0-9]([-.a-z0-9]*[a-z0-9])?$"


class ConsumersConfig(_Strict):
    """Who may read a token from the API listener: Kubernetes service accounts (by name or
    by namespace), proved by a projected token for `audience`; or holders of a shared key."""

    service_accounts: list[Annotated[str, Field(pattern=_SERVICE_ACCOUNT, max_length=317)]] = Field(
        default_factory=list
    )
    namespaces: list[Annotated[str, Field(pattern=_DNS_LABEL, max_length=63)]] = Field(
        default_factory=list
    )
    # The audience consumers' projected service-account tokens are issued for; a token for
    # another audience (the pod's default API token) is refused.
    audience: Annotated[str, Field(min_length=1, max_length=253)] | None = None
    bearer_key_file: Path | None = None

    @model_validator(mode="after")
    def _complete(self) -> ConsumersConfig:
        kubernetes = bool(self.service_accounts or self.namespaces)
        if kubernetes and self.audience is None:
            raise ValueError("`audience` is required with `service_accounts` or `namespaces`")
        if self.audience is not None and not kubernetes:
            raise ValueError("`audience` needs `service_accounts` or `namespaces` to allow")
        if not kubernetes and self.bearer_key_file is None:
            raise ValueError(
                "allow someone: `service_accounts`, `namespaces` or a `bearer_key_file`"
            )
        return self

    @property
    def kubernetes(self) -> bool:
        return bool(self.service_accounts or self.namespaces)


# `auth`: how the client proves who it is. The registered names (RFC 7591, RFC 8705), plus
# `federated_jwt` (a token from a file as the client assertion) and the older spellings
# `basic`, `basic_raw` and `body` (presets.AUTH_ALIASES).
AuthMethod = Literal[RegisteredAuthMethod, "federated_jwt", "basic", "basic_raw", "body"]

# Longest an assertion may live: it is a bearer credential until it expires, so a short
# window bounds what a copy of it is worth (the IdP's replay check only covers its `jti`).
MAX_ASSERTION_LIFETIME = 600.0


class AssertionConfig(_Strict):
    """The client assertion of `client_secret_jwt` and `private_key_jwt` (RFC 7523)."""

    # `aud`: `token_endpoint` (the resolved token URL), `issuer` (the job's issuer), or a
    # literal URI.
    audience: Annotated[str, Field(min_length=1, max_length=2048)] = "token_endpoint"
    # `exp - iat`; a fresh assertion is signed for every token request.
    lifetime: Annotated[PositiveDuration, Field(ge=10.0, le=MAX_ASSERTION_LIFETIME)] = 300.0
    # Also send `nbf` (= `iat`); some IdPs want it.
    not_before: bool = False
    # Also send the SHA-1 thumbprint header `x5t` beside `x5t#S256` (older Entra guidance).
    legacy_x5t: bool = False


# Parameters every token request sets from the job's own keys (RFC 6749 4.4.2, 2.3.1; RFC
# 7523 2.2; RFC 8707 2): a form or query parameter of one of these names would be a second.
RESERVED_PARAMS = frozenset(
    {
        "grant_type",
        "scope",
        "audience",
        "resource",
        "client_id",
        "client_secret",
        "client_assertion",
        "client_assertion_type",
    }
)

_TENANT_ID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")


class TokenJobConfig(_Strict):
    """One configured token: where to ask, when to refresh, where to write."""

    name: str = Field(pattern=_NAME)
    provider: ProviderName = "generic"
    token_url: str | None = None
    # Instead of `token_url`: the IdP's issuer, whose discovery document (discovery.py) names
    # the token endpoint and the client authentication methods it takes.
    issuer: str | None = None
    # Entra ID's Directory (tenant) ID, which gives the issuer.
    tenant_id: str | None = None
    client_id: Annotated[CredentialSource | None, BeforeValidator(_literal_to_source)] = None
    client_secret: CredentialSource | None = None
    credentials_file: Path | None = None  # Lucidtech credentials.cfg
    scopes: list[str] = Field(default_factory=list)
    # Where grant_type, scope and audience travel: the query string or the form body.
    scope_in: Literal["query", "body"] = "body"
    auth: AuthMethod = "basic"
    # private_key_jwt: the signing key (RSA or EC PEM), its certificate (for the `x5t#S256`
    # header), the `kid` header and the algorithm (default RS256 for RSA, ES256 for EC).
    private_key: FileSource | None = None
    certificate: FileSource | None = None
    key_id: Annotated[str, Field(pattern=r"^[\x21-\x7e]{1,256}$")] | None = None
    alg: Literal["RS256", "PS256", "ES256", "HS256"] | None = None
    assertion: AssertionConfig = Field(default_factory=AssertionConfig)
    # federated_jwt: the assertion is this file's token (a projected service-account token).
    assertion_file: Annotated[Path, BeforeValidator(_no_nul)] | None = None
    # tls_client_auth and self_signed_tls_client_auth: the client certificate and its key.
    client_certificate: FileSource | None = None
    client_key: FileSource | None = None
    audience: str | None = None
    # RFC 8707 resource indicators, each sent as a `resource` parameter.
    resource: list[Annotated[str, Field(min_length=1, max_length=2048)]] = Field(
        default_factory=list
    )
    # Extra parameters and headers; never one the refresher sets itself (RESERVED_PARAMS).
    form_params: dict[str, str] = Field(default_factory=dict)
    query_params: dict[str, str] = Field(default_factory=dict)
    headers: dict[str, str] = Field(default_factory=dict)
    margin: Duration | None = None
    lifetime: PositiveDuration | None = None  # for opaque tokens without expires_in
    min_refresh_interval: Duration = 30.0
    connect_timeout: PositiveDuration = 5.0
    read_timeout: PositiveDuration = 15.0
    ca_bundle: Path | None = None
    allow_insecure_http: bool = False
    revokes_on_reissue: bool = False
    # Self-healing (probe.py, rule 11 of docs/design.md): the API answers that mean "this
    # token is dead"; a 5xx, a timeout, a 403 or a 404 never does unless listed.
    rejected_statuses: list[Annotated[int, Field(ge=400, le=599)]] = Field(
        default_factory=lambda: [401], min_length=1
    )
    probe: ProbeConfig | None = None
    # Without a probe, a consumer's rejection report refreshes only when this is true.
    trust_rejection_reports: bool = False
    # Who may read this token from the API listener (api.py, consumers.py).
    consumers: ConsumersConfig | None = None
    # A header-injecting proxy in front of the API (proxy.py).
    proxy: ProxyConfig | None = None
    sinks: list[SinkConfig] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _fill_preset(cls, data: Any) -> Any:
        return apply_preset(data) if isinstance(data, dict) else data

    @field_validator("scopes", mode="before")
    @classmethod
    def _split_scopes(cls, value: Any) -> Any:
        return value.split() if isinstance(value, str) else value

    @field_validator("form_params", "query_params")
    @classmethod
    def _not_reserved_params(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if name in RESERVED_PARAMS:
                raise ValueError(
                    f"`{name}` is set by the refresher (from the job's own keys: scopes, "
                    "audience, resource, client_id, auth); a second one would be sent beside it"
                )
        return value

    @field_validator("headers")
    @classmethod
    def _not_authorization_header(cls, value: dict[str, str]) -> dict[str, str]:
        if any(name.lower() == "authorization" for name in value):
            raise ValueError("`Authorization` carries the client authentication; set `auth`")
        return value

    @field_validator("resource", mode="before")
    @classmethod
    def _one_resource(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("client_secret", mode="before")
    @classmethod
    def _no_literal_secret(cls, value: Any) -> Any:
        if isinstance(value, str) or (isinstance(value, dict) and "value" in value):
            raise ValueError(
                "a client secret is read from `{file: PATH}` or `{env: NAME}`, "
                "never written into the config"
            )
        return value

    def schedule_policy(self) -> SchedulePolicy:
        return SchedulePolicy(margin=self.margin, min_interval=self.min_refresh_interval)

    @property
    def issuer_url(self) -> str | None:
        """The issuer discovery starts from: `issuer`, or the preset's from `tenant_id`,
        with the trailing slash the provider's issuer has."""
        preset = PRESETS[self.provider]
        issuer = self.issuer
        if issuer is None and self.tenant_id is not None and preset.issuer_template:
            # Entra's own documents spell the tenant in lower case; the issuer must match.
            issuer = preset.issuer_template.format(tenant_id=self.tenant_id.lower())
        if issuer is not None and preset.issuer_trailing_slash and not issuer.endswith("/"):
            issuer += "/"
        return issuer

    @property
    def uses_client_secret(self) -> bool:
        return self.auth in SECRET_METHODS


# ------------------------------------------------------------------------------- settings


class MetricsServerConfig(_Strict):
    enabled: bool = True
    bind: str = "0.0.0.0"  # an IPv4 or IPv6 address (`::` for every address); or localhost
    port: int = Field(default=9464, ge=0, le=65535)
    # Open connections at once; one more is closed as soon as it is accepted.
    max_connections: int = Field(default=64, ge=1, le=100_000)
    # /healthz fails once the scheduler's heartbeat (every sixth of this) is older than this.
    heartbeat_timeout: PositiveDuration = Field(default=30.0, ge=1.0)

    @field_validator("bind")
    @classmethod
    def _ip_address(cls, value: str) -> str:
        if value == "localhost":
            return "127.0.0.1"
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            raise ValueError(
                f"must be an IP address such as 0.0.0.0, 127.0.0.1 or ::, not {value!r}"
            ) from None


class ApiServerConfig(_ListenerConfig):
    """The consumer-facing listener (api.py): the token API and rejection reports. Long
    polls hold a connection each: room for many consumers, few per address."""

    enabled: bool = False
    listen: str = "127.0.0.1:9465"
    # A follower whose Secret watch has been broken this long answers 503 for that job
    # rather than serve a token that may have been replaced.
    max_staleness: PositiveDuration = 30.0


class KubernetesSettings(_Strict):
    # None: in-cluster config inside a pod, else $KUBECONFIG or ~/.kube/config.
    kubeconfig: Path | None = None
    context: str | None = None
    request_timeout: PositiveDuration = 10.0


class LeaderElectionConfig(_Strict):
    """client-go's defaults: a leader that cannot renew for `renew_deadline` stops at once,
    `lease_duration - renew_deadline` before anyone else may take over."""

    enabled: bool = False
    name: str = Field(default="refresher", pattern=_DNS_SUBDOMAIN, max_length=253)
    namespace: str | None = Field(default=None, pattern=_DNS_LABEL, max_length=63)
    identity: str | None = None  # default: $POD_NAME, else hostname_pid
    lease_duration: PositiveDuration = 15.0
    renew_deadline: PositiveDuration = 10.0
    retry_period: PositiveDuration = 2.0

    @model_validator(mode="after")
    def _ordered(self) -> LeaderElectionConfig:
        if not self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError("needs retry_period < renew_deadline < lease_duration")
        return self


class Settings(_Strict):
    """Everything in the file besides `tokens`."""

    metrics: MetricsServerConfig = Field(default_factory=MetricsServerConfig)
    api: ApiServerConfig = Field(default_factory=ApiServerConfig)
    kubernetes: KubernetesSettings = Field(default_factory=KubernetesSettings)
    leader_election: LeaderElectionConfig = Field(default_factory=LeaderElectionConfig)
    # Refreshes running at once; a slow IdP ties up at most this many threads.
    max_concurrent_refreshes: int = Field(default=8, ge=1, le=256)
    # `refresher once` pushes its metrics here (a CronJob has no endpoint to scrape).
    pushgateway: str | None = None
    # Requests per second to any one token URL (a token bucket with this burst), so a start-up
    # wave of thousands of jobs cannot trip the provider's rate limits.
    idp_rate_limit: float = Field(default=20.0, gt=0, allow_inf_nan=False)
    idp_rate_burst: int = Field(default=20, ge=1)


@dataclass(frozen=True)
class Config:
    settings: Settings
    jobs: tuple[TokenJobConfig, ...]


# ----------------------------------------------------------------------------- validation


def _format_loc(prefix: str, loc: tuple[str | int, ...]) -> str:
    path = prefix
    previous: str | int | None = None
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif isinstance(previous, int) and part in _UNION_TAGS:
            pass
        else:
            path += f".{part}" if path else str(part)
        previous = part
    return path or "(top level)"


def _pydantic_problems(err: ValidationError, prefix: str) -> list[str]:
    problems = []
    for item in err.errors(include_url=False, include_input=False):
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        problems.append(f"{_format_loc(prefix, tuple(item['loc']))}: {message}")
    return problems


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_problem(
    url: str, allow_insecure_http: bool, *, carries: str = "the client secret"
) -> str | None:
    """Why a URL must not be used (None when it may): the one rule for `token_url`, for a
    `credentials_file`'s `auth_endpoint`, for the IdP client on every attempt, and for a
    probe's `url` (which `carries` the token)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError:
        return "not a valid URL"
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return "expected an https:// URL"
    if parts.scheme == "http" and not (allow_insecure_http or _is_loopback(parts.hostname)):
        return (
            f"plain http:// would send {carries} unencrypted; use https:// "
            "(or set allow_insecure_http: true)"
        )
    if parts.username or parts.password:
        return "credentials do not belong in the URL; use client_id and client_secret"
    return None


def _job_problems(job: TokenJobConfig, path: str) -> tuple[list[str], str | None, str | None]:
    """Rules across one job's fields. Returns problems, the job's endpoint (its token URL, or
    its issuer: what the one-writer rule compares) and the client id."""
    problems: list[str] = []
    preset = PRESETS[job.provider]
    credential_problems, credentials = check_credentials(job, path)
    problems += credential_problems
    endpoint_problems, endpoint = _endpoint_problems(job, path, credentials)
    problems += endpoint_problems
    problems += _auth_problems(job, path)
    if job.auth == "client_secret_jwt" and credentials is not None:
        problem = hmac_secret_problem(credentials.client_secret)
        if problem is not None:
            problems.append(f"{path}.client_secret: {problem}")
    problems += check_key_material(job, path)

    if preset.requires_scope and not job.scopes:
        problems.append(f"{path}.scopes: the {job.provider} provider needs at least one scope")
    if preset.max_scopes is not None and len(job.scopes) > preset.max_scopes:
        problems.append(
            f"{path}.scopes: {job.provider} issues one token per scope; configure one job per scope"
        )
    suffix = preset.scope_suffix
    for scope in job.scopes:
        if suffix is not None and not scope.endswith(suffix):
            problems.append(
                f"{path}.scopes: {scope!r} does not end in {suffix}: with client credentials, "
                f"{job.provider} takes `<resource>{suffix}` (like "
                f"https://graph.microsoft.com{suffix}); the permissions granted are those of the "
                "app registration, not named in the request"
            )
    for index, resource in enumerate(job.resource):
        if not _absolute_uri(resource):
            problems.append(
                f"{path}.resource[{index}]: an absolute URI without a fragment (RFC 8707 2), "
                "like https://api.example.com"
            )
    if preset.requires_audience and not job.audience:
        problems.append(f"{path}.audience: the {job.provider} provider needs the API address")
    if job.margin is not None and job.lifetime is not None and job.margin >= job.lifetime:
        problems.append(f"{path}.margin: must be shorter than lifetime ({job.lifetime:g} s)")
    if job.ca_bundle is not None and not job.ca_bundle.is_file():
        problems.append(f"{path}.ca_bundle: no such file {job.ca_bundle}")
    problems += _probe_problems(job, f"{path}.probe")

    client_id = credentials.client_id if credentials is not None else None
    return problems, endpoint, client_id


def _endpoint_problems(
    job: TokenJobConfig, path: str, credentials: Credentials | None
) -> tuple[list[str], str | None]:
    """Where the job asks: a token URL, a credentials file's endpoint, or an issuer (or
    Entra's tenant). Returns problems and the endpoint (`issuer <url>` for an issuer)."""
    preset = PRESETS[job.provider]
    problems: list[str] = []
    if job.tenant_id is not None:
        if preset.issuer_template is None:
            problems.append(f"{path}.tenant_id: only the entra provider takes a tenant_id")
        elif not _TENANT_ID.fullmatch(job.tenant_id):
            problems.append(
                f"{path}.tenant_id: the Directory (tenant) ID, a GUID: Entra's discovery "
                "document names the issuer by it, so a domain name would not match"
            )
        if job.issuer is not None:
            problems.append(f"{path}.tenant_id: give tenant_id or issuer, not both")
    issuer = job.issuer_url
    if issuer is not None and job.token_url:
        problems.append(f"{path}.issuer: give token_url or issuer (discovery), not both")
    if issuer is not None and not job.token_url:
        problem = url_problem(issuer, job.allow_insecure_http)
        if problem is None and ("?" in issuer or "#" in issuer):
            problem = "an issuer has no query string or fragment (RFC 8414 2)"
        shape = preset.issuer_shape
        if problem is None and shape is not None and not re.search(shape[0], urlsplit(issuer).path):
            problem = f"a {job.provider} issuer is {shape[1]}"
        if problem is not None:
            where = "issuer" if job.issuer is not None else "tenant_id"
            problems.append(f"{path}.{where}: {problem}")
        return problems, f"issuer {endpoint_key(issuer)}"

    token_url: str | None = None
    if credentials is not None:
        with contextlib.suppress(RefreshError):
            token_url = resolve_token_url(job, credentials)
    elif job.token_url:
        token_url = job.token_url
    if token_url is None:
        if preset.issuer_template is not None:
            problems.append(f"{path}.tenant_id: required (or issuer, or token_url)")
        elif preset.requires_issuer:
            problems.append(
                f"{path}.issuer: required: the {job.provider} provider is found by its issuer's "
                "discovery document (or give token_url)"
            )
        elif credentials is not None or job.credentials_file is None:
            problems.append(f"{path}.token_url: required (or issuer, for discovery)")
    else:
        problem = url_problem(token_url, job.allow_insecure_http)
        if problem:
            where = "token_url" if job.token_url else "credentials_file (auth_endpoint)"
            problems.append(f"{path}.{where}: {problem}")
    return problems, token_url and endpoint_key(token_url)


def _absolute_uri(value: str) -> bool:
    """An absolute URI without a fragment (`https://api.example.com`, `urn:x:y`)."""
    try:
        parts = urlsplit(value)
    except ValueError:  # `https://[::1`
        return False
    return bool(parts.scheme and (parts.netloc or parts.path)) and "#" not in value


def _preset_auth_problems(job: TokenJobConfig, path: str) -> list[str]:
    preset = PRESETS[job.provider]
    problems: list[str] = []
    method = job.auth if job.auth == "federated_jwt" else registered_auth_method(job.auth)
    if preset.auth_methods is not None and method not in preset.auth_methods:
        problems.append(
            f"{path}.auth: {job.provider} does not take {job.auth} (it takes "
            f"{', '.join(sorted(preset.auth_methods))})"
        )
    if job.auth == "private_key_jwt":
        algs = preset.assertion_algs
        if algs is not None and job.alg is not None and job.alg not in algs:
            problems.append(f"{path}.alg: {job.provider} takes {', '.join(algs)}")
        if preset.requires_certificate and job.certificate is None:
            problems.append(
                f"{path}.certificate: required: {job.provider} finds the key by its "
                "certificate's thumbprint (the x5t#S256 header)"
            )
    limit = preset.max_assertion_lifetime
    if limit is not None and job.auth in JWT_METHODS and job.assertion.lifetime > limit:
        problems.append(
            f"{path}.assertion.lifetime: {job.provider} takes assertions of at most {limit:g} s"
        )
    if job.resource and not preset.takes_resource:
        problems.append(
            f"{path}.resource: {job.provider} refuses the resource parameter; name the "
            "resource in the scope (`<resource>/.default`)"
        )
    return problems


# Which fields belong to which `auth` methods.
_METHOD_FIELDS: dict[str, frozenset[str]] = {
    "private_key": frozenset({"private_key_jwt"}),
    "certificate": frozenset({"private_key_jwt"}),
    "key_id": JWT_METHODS,
    "alg": JWT_METHODS,
    "assertion_file": frozenset({"federated_jwt"}),
    "client_certificate": TLS_METHODS,
    "client_key": TLS_METHODS,
}
_REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "private_key_jwt": ("private_key",),
    "federated_jwt": ("assertion_file",),
    "tls_client_auth": ("client_certificate", "client_key"),
    "self_signed_tls_client_auth": ("client_certificate", "client_key"),
}


def _auth_problems(job: TokenJobConfig, path: str) -> list[str]:
    """The fields of the job's `auth` method: each it needs, none of another's; and what
    the provider takes."""
    method = job.auth
    problems = _preset_auth_problems(job, path)
    for name, methods in _METHOD_FIELDS.items():
        if getattr(job, name) is not None and method not in methods:
            problems.append(
                f"{path}.{name}: not used by auth: {method} (only by {', '.join(sorted(methods))})"
            )
    for name in _REQUIRED_FIELDS.get(method, ()):
        if getattr(job, name) is None:
            problems.append(f"{path}.{name}: required by auth: {method}")
    if not job.uses_client_secret:
        if job.client_secret is not None:
            problems.append(
                f"{path}.client_secret: not used by auth: {method}; remove it (a secret "
                "nothing needs is one more to leak)"
            )
        if job.credentials_file is not None:
            problems.append(
                f"{path}.credentials_file: holds a client secret, which auth: {method} does "
                "not use; give client_id instead"
            )
    if method == "private_key_jwt" and job.alg == "HS256":
        problems.append(
            f"{path}.alg: HS256 signs with the client secret: that is auth: client_secret_jwt "
            f"(a private key signs with {', '.join(KEY_ALGORITHMS)})"
        )
    if method == "client_secret_jwt" and job.alg not in (None, "HS256"):
        problems.append(f"{path}.alg: client_secret_jwt signs with HS256 (the client secret)")
    if job.assertion.legacy_x5t and job.certificate is None:
        problems.append(f"{path}.assertion.legacy_x5t: needs the certificate (`certificate`)")
    audience = job.assertion.audience
    if method in JWT_METHODS:
        if audience == "issuer" and job.issuer_url is None:
            problems.append(
                f"{path}.assertion.audience: `issuer` needs the job's issuer (`issuer:`)"
            )
        elif audience not in ("token_endpoint", "issuer") and not _absolute_uri(audience):
            problems.append(
                f"{path}.assertion.audience: token_endpoint, issuer, or an absolute URI"
            )
    return problems


def _probe_problems(job: TokenJobConfig, path: str) -> list[str]:
    probe = job.probe
    if probe is None:
        return []
    problems: list[str] = []
    problem = url_problem(probe.url, probe.allow_insecure_http, carries="the token")
    if problem:
        problems.append(f"{path}.url: {problem}")
    return problems + _api_call_problems(job, probe.ca_bundle, probe.credential_headers, path)


def _api_call_problems(
    job: TokenJobConfig, ca_bundle: Path | None, credential_headers: dict[str, str], path: str
) -> list[str]:
    """What a probe and a proxy share, calling the API with the token: their own CA bundle
    must exist, and credential headers need the credentials file their extras come from."""
    problems = []
    if ca_bundle is not None and not ca_bundle.is_file():
        problems.append(f"{path}.ca_bundle: no such file {ca_bundle}")
    if credential_headers and job.credentials_file is None:
        problems.append(
            f"{path}.credential_headers: the credentials' extras come from a "
            "`credentials_file`, which this job does not have"
        )
    return problems


def _cross_job_problems(
    jobs: list[tuple[int, TokenJobConfig, str | None, str | None]],
) -> list[str]:
    problems: list[str] = []
    names: dict[str, int] = {}
    writers: dict[tuple[str, str, frozenset[str], str | None, frozenset[str]], int] = {}
    sink_paths: dict[str, str] = {}
    for index, job, endpoint, client_id in jobs:
        path = f"tokens[{index}]"
        if job.name in names:
            problems.append(
                f"{path}.name: {job.name!r} is already the name of tokens[{names[job.name]}]"
            )
        names.setdefault(job.name, index)
        if endpoint is not None and client_id is not None:
            key = (
                endpoint,
                client_id,
                frozenset(job.scopes),
                job.audience,
                frozenset(job.resource),
            )
            if key in writers:
                problems.append(
                    f"{path}: requests the same token as tokens[{writers[key]}] (same token "
                    "endpoint, client_id, scopes, audience and resource); on an IdP that revokes "
                    "the previous token on reissue each would kill the other's token. Use one "
                    "job with several sinks."
                )
            writers.setdefault(key, index)
        for sink_index, sink in enumerate(job.sinks):
            if isinstance(sink, FileSinkConfig):
                continue  # `_sink_file_problems`
            sink_path = f"{path}.sinks[{sink_index}]"
            target = f"secret {sink.namespace or '(pod namespace)'}/{sink.name}"
            if target in sink_paths:
                problems.append(
                    f"{sink_path}.name: {target} is already written by {sink_paths[target]}"
                )
            sink_paths.setdefault(target, sink_path)
    return problems


def _listener_problems(
    jobs: list[tuple[int, TokenJobConfig, str | None, str | None]], settings: Settings
) -> list[str]:
    """Rules between the consumer-facing listeners (the API, each job's proxy) and the jobs
    they serve."""
    api = settings.api
    problems: list[str] = []
    # Every listener's port, for collisions: (host, port) -> where it is configured.
    bound: dict[tuple[str, int], str] = {}
    if settings.metrics.enabled:
        bound[(settings.metrics.bind, settings.metrics.port)] = "metrics.port"
    listeners: list[tuple[str, _ListenerConfig]] = [("api", api)] if api.enabled else []
    for index, job, _, _ in jobs:
        path = f"tokens[{index}]"
        served: list[tuple[str, _ListenerConfig]] = [("api", api)] if api.enabled else []
        if job.proxy is not None:
            served.append((f"{path}.proxy", job.proxy))
            listeners.append((f"{path}.proxy", job.proxy))
            problems += _proxy_problems(job, f"{path}.proxy")
        if not served:
            continue
        if job.consumers is None:
            for where, listener in served:
                if not listener.loopback:
                    problems.append(
                        f"{path}.consumers: required: {where}.listen ({listener.listen}) is "
                        "not a loopback address, so callers must be authenticated; say who "
                        "may use this token"
                    )
        keys = job.consumers.bearer_key_file if job.consumers else None
        if keys is not None and not keys.is_file():
            problems.append(f"{path}.consumers.bearer_key_file: no such file {keys}")
        if settings.leader_election.enabled and not any(
            isinstance(sink, KubernetesSinkConfig) for sink in job.sinks
        ):
            problems.append(
                f"{path}.sinks: with leader election and the API or a proxy on, a job needs a "
                "Secret sink (`type: kubernetes`): followers serve the token they watch there"
            )
    for where, listener in listeners:
        host, port = listener.address
        if port != 0:
            clash = next(
                (
                    other
                    for (other_host, other_port), other in bound.items()
                    if other_port == port and _overlap(host, other_host)
                ),
                None,
            )
            if clash is not None:
                problems.append(f"{where}.listen: port {port} is already {clash}")
            bound.setdefault((host, port), f"{where}.listen")
        if listener.tls is not None:
            for name in ("cert_file", "key_file"):
                file: Path = getattr(listener.tls, name)
                if not file.is_file():
                    problems.append(f"{where}.tls.{name}: no such file {file}")
    return problems


def _overlap(host: str, other: str) -> bool:
    """Whether two bind addresses take the same port: the same, or either every address."""
    return (
        host == other
        or ipaddress.ip_address(host).is_unspecified
        or (ipaddress.ip_address(other).is_unspecified)
    )


def _proxy_problems(job: TokenJobConfig, path: str) -> list[str]:
    proxy = job.proxy
    assert proxy is not None
    problems: list[str] = []
    problem = url_problem(proxy.upstream, proxy.allow_insecure_http, carries="the token")
    parts = urlsplit(proxy.upstream)
    if problem is None and (parts.query or parts.fragment or "?" in proxy.upstream):
        problem = "one origin and base path, without a query string or fragment"
    if problem is None and any(part in (".", "..") for part in parts.path.split("/")):
        problem = "the base path cannot hold `.` or `..` segments"
    if problem:
        problems.append(f"{path}.upstream: {problem}")
    if proxy.replay_buffer < proxy.max_replay_body:
        problems.append(
            f"{path}.replay_buffer: smaller than max_replay_body ({proxy.max_replay_body} "
            "bytes): no body could be replayed"
        )
    listen_host, port = proxy.address
    target = "127.0.0.1" if parts.hostname == "localhost" else parts.hostname or ""
    with contextlib.suppress(ValueError):  # a host name: not this listener
        if problem is None and port != 0 and parts.port == port and _overlap(listen_host, target):
            problems.append(f"{path}.upstream: this proxy's own listen address: a loop")
    return problems + _api_call_problems(job, proxy.ca_bundle, proxy.credential_headers, path)


def _resolved(path: Path) -> str | None:
    """`path` as the filesystem sees it: absolute, symlinks followed, `//` and `..` gone."""
    try:
        return os.path.realpath(path)
    except (OSError, ValueError):  # a lone surrogate, a loop: reported where it is read
        return None


def _read_files(
    jobs: list[tuple[int, TokenJobConfig, str | None, str | None]],
    settings: Settings,
    config_path: Path | None,
) -> dict[str, str]:
    """Every file the refresher reads, resolved, each with what it is (for messages)."""
    files: dict[str, str] = {}

    def add(path: Path | None, what: str) -> None:
        resolved = _resolved(path) if path is not None else None
        if resolved is not None:
            files.setdefault(resolved, what)

    add(config_path, "the config file")
    add(settings.kubernetes.kubeconfig, "the kubeconfig (kubernetes.kubeconfig)")
    for index, job, _, _ in jobs:
        for name in ("client_id", "client_secret"):
            source: CredentialSource | None = getattr(job, name)
            if source is not None:
                add(source.file, f"the file of tokens[{index}].{name}")
        add(job.credentials_file, f"tokens[{index}].credentials_file")
        add(job.assertion_file, f"tokens[{index}].assertion_file")
        for name in ("private_key", "certificate", "client_certificate", "client_key"):
            key_file: FileSource | None = getattr(job, name)
            if key_file is not None:
                add(key_file.file, f"the file of tokens[{index}].{name}")
        add(job.ca_bundle, f"tokens[{index}].ca_bundle")
        if job.probe is not None:
            add(job.probe.ca_bundle, f"tokens[{index}].probe.ca_bundle")
        if job.consumers is not None:
            add(job.consumers.bearer_key_file, f"tokens[{index}].consumers.bearer_key_file")
        if job.proxy is not None:
            add(job.proxy.ca_bundle, f"tokens[{index}].proxy.ca_bundle")
            if job.proxy.tls is not None:
                add(job.proxy.tls.cert_file, f"tokens[{index}].proxy.tls.cert_file")
                add(job.proxy.tls.key_file, f"tokens[{index}].proxy.tls.key_file")
    if settings.api.tls is not None:
        add(settings.api.tls.cert_file, "api.tls.cert_file")
        add(settings.api.tls.key_file, "api.tls.key_file")
    return files


def _sink_file_problems(
    jobs: list[tuple[int, TokenJobConfig, str | None, str | None]], read: dict[str, str]
) -> list[str]:
    """Each file a file sink writes (the token file and its metadata file) is compared
    resolved, so a symlinked folder, `//tmp/x` or a relative path cannot disguise it: it must
    be written by that sink alone, and be none of the files the refresher reads (`read`:
    credentials, CA bundles, the config itself), which the first refresh would overwrite."""
    problems: list[str] = []
    written: dict[str, str] = {}
    for index, job, _, _ in jobs:
        for sink_index, sink in enumerate(job.sinks):
            if not isinstance(sink, FileSinkConfig):
                continue
            where = f"tokens[{index}].sinks[{sink_index}]"
            files = [
                (sink.path, "", where),
                (sink.metadata_file, "its metadata file ", f"{where} (metadata)"),
            ]
            problem = None
            for file, label, writer in files:
                resolved = _resolved(file)
                if resolved is None:
                    continue
                shown = resolved if str(file) == resolved else f"{file} (that is {resolved})"
                if problem is not None:
                    pass  # one problem per sink: its metadata file collides along with it
                elif resolved in read:
                    problem = f"{label}{shown} is {read[resolved]}; a refresh would overwrite it"
                elif resolved in written:
                    problem = f"{label}{shown} is already written by {written[resolved]}"
                written.setdefault(resolved, writer)
            if problem is not None:
                problems.append(f"{where}.path: {problem}")
    return problems


def validate(data: Any, *, config_path: Path | None = None) -> Config:
    """Validate parsed YAML into a Config, or raise ConfigError listing every problem.
    `config_path`: the file it came from, which no sink may overwrite."""
    if not isinstance(data, dict):
        raise ConfigError(["(top level): expected a mapping with a `tokens` list"])
    problems: list[str] = []
    jobs: list[tuple[int, TokenJobConfig, str | None, str | None]] = []
    raw_jobs = data.get("tokens")
    if not isinstance(raw_jobs, list) or not raw_jobs:
        problems.append("tokens: expected a list of at least one token job")
        raw_jobs = []
    for index, raw in enumerate(raw_jobs):
        path = f"tokens[{index}]"
        try:
            job = TokenJobConfig.model_validate(raw)
        except ValidationError as err:
            problems += _pydantic_problems(err, path)
            continue
        job_problems, endpoint, client_id = _job_problems(job, path)
        problems += job_problems
        jobs.append((index, job, endpoint, client_id))
    problems += _cross_job_problems(jobs)

    settings = Settings()
    try:
        settings = Settings.model_validate({k: v for k, v in data.items() if k != "tokens"})
    except ValidationError as err:
        problems += _pydantic_problems(err, "")
    problems += _sink_file_problems(jobs, _read_files(jobs, settings, config_path))
    problems += _listener_problems(jobs, settings)
    if problems:
        raise ConfigError(problems)
    return Config(settings=settings, jobs=tuple(job for _, job, _, _ in jobs))


# ------------------------------------------------------------------------ loading from YAML

_ENV_REF = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _walk(
    value: Any, path: str, seen: set[int] | None = None
) -> Iterator[tuple[str, Any, Any, Any]]:
    """Yield (path, container, key, value) for every string in a parsed YAML document.

    YAML aliases make containers shared, or even cyclic (`a: &x [*x]`): each container is
    visited once, so an alias bomb costs its size, not its expansion."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return
    seen.add(id(value))
    items = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, list)
        else ()
    )
    for key, item in items:
        item_path = (
            f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else str(key))
        )
        if isinstance(item, str):
            yield item_path, value, key, item
        else:
            yield from _walk(item, item_path, seen)


# Expanding `${NAME}` and YAML aliases may add at most this many characters to a config
# (beyond its own size, so a large plain config of thousands of jobs still loads). Each alias
# use counts: one 100 KB variable behind 1,000 aliases is 100 MB, which no config needs and
# which would take gigabytes once validated into objects.
MAX_EXPANSION = 1024 * 1024


def _expanded_size(
    value: Any, length_of: Callable[[str], int], memo: dict[int, int], active: set[int]
) -> int:
    """Characters in `value` with every alias use and `${...}` expanded, computed without
    expanding anything: each shared container is measured once (`memo`) and counted per use."""
    if isinstance(value, str):
        return length_of(value)
    if not isinstance(value, dict | list):
        return 1  # a number, a boolean, null, a date: small whatever it is
    if id(value) in memo:
        return memo[id(value)]
    if id(value) in active:
        raise RecursionError  # an alias that refers to itself; reported by the caller
    active.add(id(value))
    if isinstance(value, dict):
        total = sum(
            (len(key) if isinstance(key, str) else 1)
            + _expanded_size(item, length_of, memo, active)
            for key, item in value.items()
        )
    else:
        total = sum(_expanded_size(item, length_of, memo, active) for item in value)
    active.discard(id(value))
    memo[id(value)] = total
    return total


def expand_env(
    data: Any, environ: Mapping[str, str] | None = None, *, limit: int = MAX_EXPANSION
) -> tuple[Any, list[str]]:
    """Replace `${NAME}` and `${NAME:-default}` in string values; `$$` is a literal `$`.

    A default cannot hold another reference (`${A:-${B}}`): that is reported, not half
    expanded. When the expanded document would hold more than `limit` characters (each
    alias use counted), nothing is expanded: ConfigError, with that one problem. A string
    used through many aliases is expanded once, and the result shared like the original."""
    env = os.environ if environ is None else environ

    def length_of(text: str) -> int:
        size, last = 0, 0
        for match in _ENV_REF.finditer(text):
            size += match.start() - last
            last = match.end()
            name, default = match.group(1), match.group(2)
            if match.group(0) == "$$":
                size += 1
            elif name in env:
                size += len(env[name])
            elif default is not None:
                size += len(default)
        return size + len(text) - last

    lengths: dict[str, int] = {}

    def cached_length(text: str) -> int:
        if text not in lengths:
            lengths[text] = length_of(text)
        return lengths[text]

    size = _expanded_size(data, cached_length, {}, set())
    if size > limit:
        raise ConfigError(
            [
                f"(top level): with its ${{...}} and YAML aliases expanded (each alias use "
                f"counted), the config would hold more than {limit:,} characters; is a large "
                "value repeated through aliases, or a large environment variable used?"
            ]
        )

    problems: list[str] = []
    expanded: dict[str, tuple[str, list[str]]] = {}  # text -> (result, problems without path)
    for path, container, key, text in list(_walk(data, "")):
        if text not in expanded:
            found: list[str] = []

            def substitute(match: re.Match[str], found: list[str] = found) -> str:
                if match.group(0) == "$$":
                    return "$"
                name, default = match.group(1), match.group(2)
                if default is not None and "${" in default:
                    found.append(
                        f"`${{{name}:-...}}` holds another `${{...}}` in its default; nesting "
                        "is not supported: write the default out, or set the variable"
                    )
                    return ""
                if name in env:
                    return env[name]
                if default is not None:
                    return default
                found.append(f"environment variable {name} is not set")
                return ""

            expanded[text] = (_ENV_REF.sub(substitute, text), found)
        result, found = expanded[text]
        problems += [f"{path}: {problem}" for problem in found]
        container[key] = result
    return data, problems


def load_config(path: Path, environ: dict[str, str] | None = None) -> Config:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError([f"{path}: cannot read: {err.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    return load_config_text(text, environ, source=str(path), config_path=path)


def load_config_text(
    text: str,
    environ: dict[str, str] | None = None,
    source: str = "config",
    *,
    config_path: Path | None = None,
) -> Config:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ConfigError([f"{source}: {problem}{where}"]) from None
    except (RecursionError, ValueError, IndexError, KeyError, AttributeError, TypeError) as err:
        # PyYAML's constructors raise these for nesting too deep, `!!int` without a value,
        # impossible timestamps, integers of thousands of digits. Their text may quote input.
        raise ConfigError([f"{source}: not readable as YAML ({type(err).__name__})"]) from None
    problems: list[str] = []
    try:
        data, problems = expand_env(data, environ, limit=len(text) + MAX_EXPANSION)
        config = validate(data, config_path=config_path)
    except ConfigError as err:
        raise ConfigError(problems + err.problems) from None
    except RecursionError:
        raise ConfigError([f"{source}: nested too deeply (or an alias refers to itself)"]) from None
    if problems:
        raise ConfigError(problems)
    return config
