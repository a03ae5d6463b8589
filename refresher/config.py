"""The configuration file: YAML, `${ENV}` expansion, provider presets, validation.

Validation happens in full before anything runs (design rule 7): shapes and types by pydantic,
then the rules that span fields or jobs, and every problem is reported with its path
(`tokens[1].sinks[0].path: ...`). `load_config` raises `ConfigError` holding all of them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from refresher.credentials import CredentialRef, Credentials, lucidtech_credentials
from refresher.errors import ConfigError, RefreshError
from refresher.presets import PRESETS, apply_preset
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

    def ref(self) -> CredentialRef:
        return CredentialRef(value=self.value, env=self.env, file=self.file)


def _literal_to_source(value: Any) -> Any:
    return {"value": value} if isinstance(value, str) else value


# ---------------------------------------------------------------------------------- sinks


class FileSinkConfig(_Strict):
    type: Literal["file"]
    path: Annotated[Path, BeforeValidator(_no_nul)]
    # raw: the token alone; json: token with type, expiry, scope; env: KEY=value lines;
    # header: `Authorization: Bearer <token>`.
    format: Literal["raw", "json", "env", "header"] = "raw"
    mode: FileMode = 0o600


# Kubernetes object names (DNS subdomain) and Secret data keys.
_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
SecretKey = Annotated[str, Field(pattern=r"^[-._a-zA-Z0-9]+$", max_length=253)]


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
    # Values from the credentials written beside the token (Lucidtech's `api_key`).
    write_credential_extras: bool = True
    # Static keys written with every refresh.
    extra_keys: dict[SecretKey, str] = Field(default_factory=dict)
    secret_type: str = "Opaque"
    # Create the Secret when it is missing (needs the `create` RBAC verb).
    create: bool = False


SinkConfig = Annotated[FileSinkConfig | KubernetesSinkConfig, Field(discriminator="type")]

# Loc parts pydantic inserts for a discriminated union's tag; not part of the user's path.
_UNION_TAGS = {"file", "kubernetes"}


# ----------------------------------------------------------------------------------- jobs


class TokenJobConfig(_Strict):
    """One configured token: where to ask, when to refresh, where to write."""

    name: str = Field(pattern=_NAME)
    provider: Literal["generic", "lucidworks", "fusion", "lucidtech", "usage-engine"] = "generic"
    token_url: str | None = None
    client_id: Annotated[CredentialSource | None, BeforeValidator(_literal_to_source)] = None
    client_secret: CredentialSource | None = None
    credentials_file: Path | None = None  # Lucidtech credentials.cfg
    scopes: list[str] = Field(default_factory=list)
    # Where grant_type, scope and audience travel: the query string or the form body.
    scope_in: Literal["query", "body"] = "body"
    auth: Literal["basic", "basic_raw", "body"] = "basic"
    audience: str | None = None
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
    sinks: list[SinkConfig] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _fill_preset(cls, data: Any) -> Any:
        return apply_preset(data) if isinstance(data, dict) else data

    @field_validator("scopes", mode="before")
    @classmethod
    def _split_scopes(cls, value: Any) -> Any:
        return value.split() if isinstance(value, str) else value

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

    def credentials(self) -> Credentials:
        """Read the credentials now (raises RefreshError when a source is unreadable)."""
        if self.credentials_file is not None:
            token_path = PRESETS[self.provider].token_path or "/oauth2/token"
            from_file = lucidtech_credentials(self.credentials_file, token_path)
            return Credentials(
                client_id=self.client_id.ref().read() if self.client_id else from_file.client_id,
                client_secret=(
                    self.client_secret.ref().read()
                    if self.client_secret
                    else from_file.client_secret
                ),
                extras=from_file.extras,
                token_url=from_file.token_url,
            )
        assert self.client_id is not None and self.client_secret is not None
        return Credentials(
            client_id=self.client_id.ref().read(), client_secret=self.client_secret.ref().read()
        )

    def resolved_token_url(self, credentials: Credentials) -> str:
        url = self.token_url or credentials.token_url
        assert url is not None  # validation guarantees one of them
        return url


# ------------------------------------------------------------------------------- settings


class MetricsServerConfig(_Strict):
    enabled: bool = True
    bind: str = "0.0.0.0"
    port: int = Field(default=9464, ge=0, le=65535)


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

    @property
    def uses_kubernetes(self) -> bool:
        """Whether the (slow to import) Kubernetes client is needed at all."""
        return self.settings.leader_election.enabled or any(
            isinstance(sink, KubernetesSinkConfig) for job in self.jobs for sink in job.sinks
        )


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


def _url_problem(url: str, allow_insecure_http: bool) -> str | None:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError:
        return "not a valid URL"
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return "expected an https:// URL"
    if parts.scheme == "http" and not (allow_insecure_http or _is_loopback(parts.hostname)):
        return (
            "plain http:// would send the client secret unencrypted; use https:// "
            "(or set allow_insecure_http: true)"
        )
    if parts.username or parts.password:
        return "credentials do not belong in the URL; use client_id and client_secret"
    return None


def _job_problems(job: TokenJobConfig, path: str) -> tuple[list[str], str | None, str | None]:
    """Rules across one job's fields. Returns problems, the token URL and the client id."""
    problems: list[str] = []
    preset = PRESETS[job.provider]
    file_credentials: Credentials | None = None
    if job.credentials_file is not None:
        try:
            file_credentials = job.credentials()
        except RefreshError as err:
            problems.append(f"{path}.credentials_file: {err.message}")
    else:
        for field_name in ("client_id", "client_secret"):
            if getattr(job, field_name) is None:
                problems.append(f"{path}.{field_name}: required (or give credentials_file)")
    for field_name in ("client_id", "client_secret"):
        source: CredentialSource | None = getattr(job, field_name)
        if source is not None and source.value is None:
            try:
                source.ref().read()
            except RefreshError as err:
                problems.append(f"{path}.{field_name}: {err.message}")

    token_url = job.token_url or (file_credentials.token_url if file_credentials else None)
    if token_url is None:
        if job.credentials_file is None or file_credentials is not None:
            problems.append(f"{path}.token_url: required")
    else:
        problem = _url_problem(token_url, job.allow_insecure_http)
        if problem:
            where = "token_url" if job.token_url else "credentials_file (auth_endpoint)"
            problems.append(f"{path}.{where}: {problem}")

    if preset.requires_scope and not job.scopes:
        problems.append(f"{path}.scopes: the {job.provider} provider needs at least one scope")
    if preset.max_scopes is not None and len(job.scopes) > preset.max_scopes:
        problems.append(
            f"{path}.scopes: {job.provider} issues one token per scope; configure one job per scope"
        )
    if preset.requires_audience and not job.audience:
        problems.append(f"{path}.audience: the {job.provider} provider needs the API address")
    if job.margin is not None and job.lifetime is not None and job.margin >= job.lifetime:
        problems.append(f"{path}.margin: must be shorter than lifetime ({job.lifetime:g} s)")
    if job.ca_bundle is not None and not job.ca_bundle.is_file():
        problems.append(f"{path}.ca_bundle: no such file {job.ca_bundle}")

    client_id: str | None = None
    if file_credentials is not None:
        client_id = file_credentials.client_id
    elif job.client_id is not None:
        with contextlib.suppress(RefreshError):  # an unreadable source is reported above
            client_id = job.client_id.ref().read()
    return problems, token_url, client_id


def _cross_job_problems(
    jobs: list[tuple[int, TokenJobConfig, str | None, str | None]],
) -> list[str]:
    problems: list[str] = []
    names: dict[str, int] = {}
    writers: dict[tuple[str, str, frozenset[str]], int] = {}
    sink_paths: dict[str, str] = {}
    for index, job, token_url, client_id in jobs:
        path = f"tokens[{index}]"
        if job.name in names:
            problems.append(
                f"{path}.name: {job.name!r} is already the name of tokens[{names[job.name]}]"
            )
        names.setdefault(job.name, index)
        if token_url is not None and client_id is not None:
            key = (token_url, client_id, frozenset(job.scopes))
            if key in writers:
                problems.append(
                    f"{path}: requests the same token as tokens[{writers[key]}] (same token_url, "
                    "client_id and scopes); on an IdP that revokes the previous token on reissue "
                    "each would kill the other's token. Use one job with several sinks."
                )
            writers.setdefault(key, index)
        for sink_index, sink in enumerate(job.sinks):
            sink_path = f"{path}.sinks[{sink_index}]"
            if isinstance(sink, FileSinkConfig):
                target, field_name = str(Path(os.path.abspath(sink.path))), "path"
            else:
                target, field_name = (
                    f"secret {sink.namespace or '(pod namespace)'}/{sink.name}",
                    "name",
                )
            if target in sink_paths:
                problems.append(
                    f"{sink_path}.{field_name}: {target} is already written by {sink_paths[target]}"
                )
            sink_paths.setdefault(target, sink_path)
    return problems


def validate(data: Any) -> Config:
    """Validate parsed YAML into a Config, or raise ConfigError listing every problem."""
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
        job_problems, token_url, client_id = _job_problems(job, path)
        problems += job_problems
        jobs.append((index, job, token_url, client_id))
    problems += _cross_job_problems(jobs)

    settings = Settings()
    try:
        settings = Settings.model_validate({k: v for k, v in data.items() if k != "tokens"})
    except ValidationError as err:
        problems += _pydantic_problems(err, "")
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


def expand_env(data: Any, environ: dict[str, str] | None = None) -> tuple[Any, list[str]]:
    """Replace `${NAME}` and `${NAME:-default}` in string values; `$$` is a literal `$`."""
    env = os.environ if environ is None else environ
    problems: list[str] = []
    for path, container, key, text in list(_walk(data, "")):

        def substitute(match: re.Match[str], path: str = path) -> str:
            if match.group(0) == "$$":
                return "$"
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            problems.append(f"{path}: environment variable {name} is not set")
            return ""

        container[key] = _ENV_REF.sub(substitute, text)
    return data, problems


def load_config(path: Path, environ: dict[str, str] | None = None) -> Config:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError([f"{path}: cannot read: {err.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    return load_config_text(text, environ, source=str(path))


def load_config_text(
    text: str, environ: dict[str, str] | None = None, source: str = "config"
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
    try:
        data, problems = expand_env(data, environ)
        config = validate(data)
    except ConfigError as err:
        raise ConfigError(problems + err.problems) from None
    except RecursionError:
        raise ConfigError([f"{source}: nested too deeply (or an alias refers to itself)"]) from None
    if problems:
        raise ConfigError(problems)
    return config
