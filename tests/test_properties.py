"""Property tests over everything that parses outside input: the IdP's answers, the config
file and credential files. Whatever comes in, the result is a live, bounded token, a valid
config, or a clean error: a classified `RefreshError` or a `ConfigError` whose every problem
starts with the path it is about. No other exception, and never a secret in a message.

Hypothesis runs derandomized (tests/conftest.py): the same examples on every run.
"""

from __future__ import annotations

import base64
import email.utils
import json
import math
import os
import tempfile
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, get_args
from urllib.parse import urlsplit

import jwt
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refresher.config import (
    AuthMethod,
    Config,
    FileSinkConfig,
    KubernetesSettings,
    KubernetesSinkConfig,
    LeaderElectionConfig,
    MetricsServerConfig,
    Settings,
    TokenJobConfig,
    load_config_text,
    validate,
)
from refresher.credentials import CredentialRef, read_lucidtech_cfg
from refresher.errors import ConfigError, Reason, RefreshError
from refresher.idp import parse_retry_after, parse_token_response
from refresher.presets import PROVIDERS
from refresher.tokens import MAX_LIFETIME_SECONDS, compute_expiry
from tests.conftest import CLIENT_SECRET

NOW = 1_800_000_000.0
FEW = settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
SOME = settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])


def _job(**overrides: Any) -> TokenJobConfig:
    return TokenJobConfig.model_validate(
        {
            "name": "prop",
            "token_url": "https://idp.test/token",
            "client_id": "c",
            "client_secret": {"env": "PATH"},
            "scopes": ["read"],
            "sinks": [{"type": "file", "path": "/tmp/prop-token"}],
            **overrides,
        }
    )


JOBS = [_job(), _job(lifetime=600)]

# ------------------------------------------------------------------------ JSON and JWTs

big_ints = st.integers(min_value=10**300, max_value=10**420) | st.integers(max_value=-(10**300))
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | big_ints
    | st.floats()  # NaN and ±Infinity included: Python's json writes and reads them
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=8,
)
# Times that matter: around NOW, a century away, in milliseconds, in the past.
times = st.one_of(
    st.integers(int(NOW) - 10**6, int(NOW) + 10**6),
    st.floats(NOW - 10**6, NOW + 10**6),
    st.integers(int(NOW) + 10**8, int(NOW) + 10**10),
    st.integers(int(NOW * 1000) - 10**6, int(NOW * 1000) + 10**9),
    st.integers(-(2**40), 2**40),
)
claim_values = times | json_scalars


def _segment(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


STANDARD_HEADER = {"alg": "HS256", "typ": "JWT"}


@st.composite
def jwts(draw: st.DrawFn) -> str:
    """Well-formed and malformed JWTs with random claims (signatures are never checked)."""
    header = draw(
        st.just(STANDARD_HEADER)
        | st.dictionaries(st.sampled_from(["alg", "typ", "kid", "crit", "b64"]), json_values)
    )
    claims = draw(
        st.dictionaries(
            st.sampled_from(["exp", "iat", "nbf", "sub", "aud", "iss", "jti"])
            | st.text(max_size=4),
            claim_values,
            max_size=5,
        )
    )
    payload = draw(
        st.just(json.dumps(claims).encode())
        | json_values.map(lambda v: json.dumps(v).encode())
        | st.binary(max_size=12)
        | st.integers(1, 3000).map(lambda n: b"[" * n)
    )
    parts = [_segment(json.dumps(header).encode()), _segment(payload), _segment(b"sig")]
    return ".".join(draw(st.just(parts) | st.permutations(parts)))


access_tokens = jwts() | st.text(max_size=20) | json_values
expires_ins = st.one_of(
    st.none(),
    times,
    st.floats(),
    st.integers(-5, 10**5),
    big_ints,
    st.from_regex(r"\A\s*[-+]?\d{1,12}(\.\d*)?([eE][-+]?\d{1,3})?\s*\Z"),
    st.sampled_from(["soon", "", "NaN", "inf", "-inf", "1_000", "0x10", "3600"]),
    json_values,
)
token_types = st.sampled_from(["Bearer", "bearer", "BEARER", "mac", "DPoP", ""]) | json_values
secretish_text = st.text(max_size=30) | st.builds(
    lambda a, b: a + CLIENT_SECRET + b, st.text(max_size=200), st.text(max_size=5)
)


@st.composite
def token_payloads(draw: st.DrawFn) -> dict[str, Any]:
    payload = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "access_token": access_tokens,
                "expires_in": expires_ins,
                "token_type": token_types,
                "scope": st.text(max_size=20) | json_values,
                "error": st.sampled_from(["invalid_client", "invalid_request"]) | json_values,
                "error_description": secretish_text | json_values,
            },
        )
    )
    payload.update(draw(st.dictionaries(st.text(max_size=8), json_values, max_size=2)))
    return payload


plausible_payloads = st.fixed_dictionaries(
    {
        "access_token": jwts() | st.text(min_size=1, max_size=20),
        "expires_in": st.integers(1, 10**5) | expires_ins,
    },
    optional={"token_type": token_types, "scope": st.text(max_size=20) | json_values},
)
bodies = st.one_of(
    token_payloads().map(lambda p: json.dumps(p).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=64),
    st.text(max_size=64).map(str.encode),
)
http_dates = st.builds(
    lambda seconds, usegmt: email.utils.formatdate(seconds, usegmt=usegmt),
    st.floats(-(10**10), 2.5 * 10**11),
    st.booleans(),
)
header_values = st.text(max_size=40) | http_dates | st.floats().map(str) | st.integers().map(str)
headers = st.dictionaries(
    st.sampled_from(["Retry-After", "Content-Type", "Location", "WWW-Authenticate"]),
    header_values,
)
statuses = st.sampled_from([200, 200, 200, 200, 301, 307, 400, 401, 429, 500, 503]) | st.integers(
    -5, 1200
)
received_ats = st.sampled_from([NOW]) | st.floats(0, 4 * 10**9)


def _finite(value: Any) -> float | None:
    """A JSON number as a finite float, or None (booleans are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _valid_expires_in(value: Any) -> float | None:
    """What a correct reading of `expires_in` gives, or None when it is not a usable number."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value) if isinstance(value, int | float | str) else math.nan
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) and number > 0 else None


# Half the answers are a 200 with something like a token answer, so that acceptance (and
# the bounds on what is accepted) is explored as much as refusal.
answers = st.tuples(st.just(200), plausible_payloads.map(lambda p: json.dumps(p).encode())) | (
    st.tuples(statuses, bodies)
)


@SOME
@given(
    answer=answers,
    headers=headers,
    received_at=received_ats,
    job=st.sampled_from(JOBS),
)
def test_any_answer_is_a_live_bounded_token_or_a_classified_error(
    answer: tuple[int, bytes], headers: dict[str, str], received_at: float, job: TokenJobConfig
) -> None:
    status, body = answer
    try:
        token = parse_token_response(
            status,
            headers,
            body,
            received_at=received_at,
            job=job,
            extras={},
            secrets=(CLIENT_SECRET,),
        )
    except RefreshError as error:
        assert CLIENT_SECRET not in str(error) and CLIENT_SECRET[:16] not in str(error)
        if 300 <= status < 400 or status < 200 or 200 < status < 300:
            assert error.reason is Reason.INVALID_RESPONSE
        elif status >= 500:
            assert error.reason is Reason.HTTP_5XX
        elif status >= 400:
            assert error.reason in (Reason.HTTP_4XX, Reason.INVALID_CLIENT)
        else:
            assert error.reason is Reason.INVALID_RESPONSE
        if error.retry_after is not None:
            assert math.isfinite(error.retry_after) and error.retry_after >= 0
        return

    assert status == 200
    payload = json.loads(body)
    assert token.access_token == payload["access_token"] and token.access_token.strip()
    # What every sink format can hold and give back: printable ASCII, no space, <= 16 KiB.
    assert len(token.access_token) <= 16 * 1024
    assert all("!" <= ch <= "~" for ch in token.access_token), "an unwritable token accepted"
    assert token.token_type == "Bearer"
    assert token.issued_at == received_at
    assert token.expires_at > received_at, "a token dead on arrival was accepted"
    assert token.expires_at <= received_at + max(MAX_LIFETIME_SECONDS, job.lifetime or 0)
    expires_in = _valid_expires_in(payload.get("expires_in"))
    if expires_in is not None:
        assert token.expires_at <= received_at + expires_in
    elif "expires_in" in payload and payload["expires_in"] is not None:
        raise AssertionError(f"accepted expires_in {payload['expires_in']!r}")
    assert "access_token" not in repr(token) and CLIENT_SECRET not in repr(token)


@FEW
@given(
    exp=claim_values,
    iat=claim_values | st.none(),
    expires_in=st.none() | st.floats(1e-3, 1e12),
    received_at=received_ats,
    fallback=st.none() | st.floats(1, 1e9),
)
def test_expiry_is_never_later_than_any_bound(
    exp: Any, iat: Any, expires_in: float | None, received_at: float, fallback: float | None
) -> None:
    claims = {"exp": exp} if iat is None else {"exp": exp, "iat": iat}
    access_token = ".".join(
        _segment(json.dumps(part).encode()) for part in (STANDARD_HEADER, claims, "sig")
    )
    try:
        issued_at, expires_at = compute_expiry(access_token, expires_in, received_at, fallback)
    except RefreshError as error:
        assert error.reason is Reason.INVALID_RESPONSE
        return
    assert issued_at == received_at < expires_at
    assert expires_at <= received_at + max(MAX_LIFETIME_SECONDS, fallback or 0)
    if expires_in is not None:
        assert expires_at <= received_at + expires_in
    exp_seconds = _finite(exp)
    if exp_seconds is not None:
        assert expires_at <= exp_seconds


@SOME
@given(value=header_values | st.none(), now=received_ats)
def test_retry_after_is_none_or_a_finite_wait(value: str | None, now: float) -> None:
    seconds = parse_retry_after(value, now)
    assert seconds is None or (math.isfinite(seconds) and seconds >= 0)


# ------------------------------------------------------------------------------- config

# The ways that once crashed the config loader are tested one by one at the end
# of this file; the random input below avoids just those constructs (scalar tags such as
# `!!int`, anchors and aliases, nesting a thousand deep, integers of 4300+ digits), so that
# anything else these tests find is new. Once config.py is fixed, add them back.
SOURCE = "config"


def _roots(data: Any) -> set[str]:
    roots = {"(top level)", "tokens", SOURCE}
    if isinstance(data, dict):
        for key in data:
            roots.add(str(key))
            if isinstance(key, int):
                roots.add(f"[{int(key)}]")
    return roots


def assert_clean_outcome(load: Any, data: Any) -> Config | None:
    """`load()` gives a Config, or a ConfigError whose every problem names its place."""
    try:
        config = load()
    except ConfigError as error:
        assert error.problems, "a ConfigError without a problem"
        roots = _roots(data)
        for problem in error.problems:
            assert ": " in problem, problem
            assert any(
                problem.startswith(root) and problem[len(root) : len(root) + 1] in (":", ".", "[")
                for root in roots
            ), f"{problem!r} does not start with a path"
        assert CLIENT_SECRET not in str(error)
        return None
    assert isinstance(config, Config)
    return config


def assert_valid_config_is_sane(config: Config) -> None:
    names = [job.name for job in config.jobs]
    assert len(names) == len(set(names))
    for job in config.jobs:
        assert job.client_secret is None or job.client_secret.value is None
        if job.token_url:
            parts = urlsplit(job.token_url)
            assert (
                parts.scheme == "https"
                or job.allow_insecure_http
                or parts.hostname
                in (
                    "localhost",
                    "127.0.0.1",
                    "::1",
                )
                or (parts.hostname or "").startswith("127.")
            )


yaml_fragments = st.sampled_from(
    [
        "tokens", "tokens:", ":", " ", "\n", "\n  ", "\n    ", "- ", "[", "]", "{", "}", ", ",
        "name: x", "name", "sinks", "sinks: [{type: file, path: /tmp/p}]", "type: file",
        "type: kubernetes", "path: /tmp/p", "'", '"', "${X}", "${HOME}", "${X:-1}", "$$", "$",
        "!!binary", "!!str", "!!python/object:os.system", "!!map", "!!seq", "!!set", "~",
        "null", "true", "0600", "0o777", "1h", "-1", "1e400", "0x1F", ".inf", ".nan",
        "2001-01-01", "https://i.test/t",
        "http://idp.example.com/t", "client_secret: {env: PATH}", "client_secret: s3cret",
        "client_id: a", "token_url: ", "metrics:", "port: 99999", "margin: 5m", "lifetime: 0",
        "provider: lucidworks", "scopes: [a, b]", "? ", "---", "...", "#", "|", ">", "\t", "%",
        "@", "`", "\x00", "\ufeff", "é", "\\",
    ]
)  # fmt: skip
yaml_texts = st.lists(yaml_fragments, max_size=40).map("".join) | st.text(max_size=80)


@SOME
@given(text=yaml_texts)
def test_any_config_text_is_a_config_or_path_named_problems(text: str) -> None:
    try:
        data = yaml.safe_load(text)
    except Exception:  # only for the paths a problem may start with
        data = None
    config = assert_clean_outcome(lambda: load_config_text(text, environ={}), data)
    if config is not None:
        assert_valid_config_is_sane(config)


def _keys(*models: Any) -> list[str]:
    return sorted({key for model in models for key in model.model_fields})


class _KeyFiles:
    """Real key material for the key-file config keys: an RSA key, its certificate, an EC key
    and a JWT, in a folder of their own (configs name them; nothing writes there)."""

    def __init__(self) -> None:
        folder = Path(tempfile.mkdtemp(prefix="prop-keys-"))
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        ec_key = ec.generate_private_key(ec.SECP256R1())
        self.key = str(folder / "rsa.pem")
        self.ec_key = str(folder / "ec.pem")
        self.cert = str(folder / "cert.pem")
        self.token = str(folder / "token")
        pem = serialization.Encoding.PEM
        for path, key in ((self.key, rsa_key), (self.ec_key, ec_key)):
            Path(path).write_bytes(
                key.private_bytes(
                    pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
            )
        name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "prop")])
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(rsa_key.public_key())
            .serial_number(1)
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=30))
            .sign(rsa_key, hashes.SHA256())
        )
        Path(self.cert).write_bytes(cert.public_bytes(pem))
        claims = {"iss": "https://k8s.test", "sub": "system:serviceaccount:a:b", "exp": 4e9}
        Path(self.token).write_text(jwt.encode(claims, rsa_key, algorithm="RS256"))


KEYS = _KeyFiles()
key_files = st.sampled_from(
    [
        {"file": KEYS.key},
        {"file": KEYS.ec_key},
        {"file": KEYS.cert},
        {"file": "/nonexistent/key.pem"},
        {"file": "/dev/null"},
        {"env": "PATH"},
        {},
    ]
)

junk_keys = st.text(max_size=8) | st.sampled_from(["", "tokenz", "client_secrt", "nmae", "None"])
junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=5,
)
durations = st.sampled_from(["30s", "5m", "1h30m", "250ms", "0", "-1", "1e400", "5 m", "5x"]) | (
    st.floats(-10, 1e6) | st.integers(-10, 10**6)
)
paths = st.sampled_from(["/tmp/prop-a", "/tmp/prop-b", "relative/t", "", "/tmp/\x00", "/"])
sources = st.sampled_from(
    [
        {"env": "PATH"},
        {"env": "PROP_TEST_UNSET"},
        {"file": "/nonexistent/secret"},
        {"file": "/dev/null"},
        {"value": "literal"},
        {"env": "PATH", "file": "/x"},
        {},
    ]
)
urls = st.sampled_from(
    [
        "https://idp.example.com/token",
        "http://idp.example.com/token",
        "http://127.0.0.1:8080/token",
        "http://localhost/t",
        "https://u:p@idp.example.com/t",
        "ftp://idp.example.com/t",
        "https://",
        "not a url",
        "https://idp.example.com:99999/t",
    ]
)

FILE_SINK = {
    "type": st.just("file") | junk,
    "path": paths | junk,
    "format": st.sampled_from(["raw", "json", "env", "header", "yaml"]) | junk,
    "mode": st.sampled_from(["0600", "0640", 0o644, 420, "999", 1000, "rw"]) | junk,
}
KUBE_SINK = {
    "type": st.just("kubernetes") | junk,
    "name": st.sampled_from(["tok", "Bad_Name", "a" * 300]) | junk,
    "namespace": st.sampled_from(["default", "NS"]) | junk,
    "token_key": st.sampled_from(["token", "bad key"]) | junk,
    "extra_keys": st.dictionaries(st.sampled_from(["k", "bad key"]), st.text(max_size=5) | junk),
    "create": st.booleans() | junk,
}
for _key in _keys(KubernetesSinkConfig):
    KUBE_SINK.setdefault(_key, junk)
sinks = st.one_of(
    st.fixed_dictionaries(
        {"type": FILE_SINK.pop("type"), "path": FILE_SINK.pop("path")}, optional=FILE_SINK
    ),
    st.fixed_dictionaries({"type": KUBE_SINK.pop("type")}, optional=KUBE_SINK),
    st.dictionaries(st.sampled_from(_keys(FileSinkConfig, KubernetesSinkConfig)) | junk_keys, junk),
    junk,
)
JOB_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "name": st.sampled_from(["a", "b", "ok-name_1.2", "-bad", "x" * 70]) | junk,
    "provider": st.sampled_from(PROVIDERS) | junk,
    "token_url": urls | junk,
    "client_id": st.text(max_size=6) | sources | junk,
    "client_secret": sources | st.text(max_size=6) | junk,
    "credentials_file": st.sampled_from(["/nonexistent.cfg", "/dev/null"]) | junk,
    "scopes": st.lists(st.sampled_from(["read", "machinelearning.predict", ""]), max_size=3)
    | st.text(max_size=8)
    | junk,
    "scope_in": st.sampled_from(["query", "body", "header"]) | junk,
    "auth": st.sampled_from([*get_args(AuthMethod), "digest", "none"]) | junk,
    # Issue 17's keys: discovery, Entra's tenant, resource indicators, key material.
    "issuer": urls
    | st.sampled_from(["https://idp.test/realms/r", "https://t.auth0.test", "https://i.test/?q"])
    | junk,
    "tenant_id": st.sampled_from(["72f988bf-86f1-41af-91ab-2d7cd011db47", "contoso.com", ""])
    | junk,
    "resource": st.lists(
        st.sampled_from(["https://api.test", "urn:x:y", "relative", "https://a.test/#f", ""]),
        max_size=3,
    )
    | st.text(max_size=6)
    | junk,
    "private_key": key_files | junk,
    "certificate": key_files | junk,
    "client_certificate": key_files | junk,
    "client_key": key_files | junk,
    "assertion_file": st.sampled_from([KEYS.token, KEYS.key, "/nonexistent/t", "/dev/null"]) | junk,
    "key_id": st.sampled_from(["k1", "", "with space", "x" * 300]) | junk,
    "alg": st.sampled_from(["RS256", "PS256", "ES256", "HS256", "none", "RS512"]) | junk,
    "assertion": st.fixed_dictionaries(
        {},
        optional={
            "audience": st.sampled_from(["token_endpoint", "issuer", "https://a.test", "x", ""]),
            "lifetime": durations,
            "not_before": st.booleans() | junk,
            "legacy_x5t": st.booleans() | junk,
        },
    )
    | junk,
    "audience": st.text(max_size=8) | junk,
    "margin": durations | junk,
    "lifetime": durations | junk,
    "min_refresh_interval": durations,
    "connect_timeout": durations,
    "read_timeout": durations,
    "ca_bundle": st.sampled_from(["/nonexistent.pem", "/dev/null"]) | junk,
    "allow_insecure_http": st.booleans() | junk,
    "sinks": st.lists(sinks, max_size=3) | junk,
}
for _key in _keys(TokenJobConfig):
    JOB_VALUES.setdefault(_key, junk)
# Jobs that are valid on their own (they may still clash with each other)...
valid_jobs = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["a", "b", "c"]),
        "token_url": st.sampled_from(
            ["https://idp.example.com/token", "http://127.0.0.1:8080/token", "https://b.test/t"]
        ),
        "client_id": st.sampled_from(["c", "d"]),
        "client_secret": st.sampled_from([{"env": "PATH"}, {"file": "/dev/null"}]),
        "sinks": st.lists(
            st.fixed_dictionaries(
                {"type": st.just("file"), "path": st.sampled_from(["/tmp/p-a", "/tmp/p-b"])},
                optional={"format": st.sampled_from(["raw", "json", "env", "header"])},
            )
            | st.fixed_dictionaries(
                {"type": st.just("kubernetes"), "name": st.sampled_from(["s-a", "s-b"])},
                optional={"namespace": st.just("ns"), "create": st.booleans()},
            ),
            min_size=1,
            max_size=2,
        ),
    },
    optional={
        "provider": st.sampled_from(["generic", "usage-engine"]),
        "scopes": st.lists(st.sampled_from(["read", "write"]), max_size=2),
        "audience": st.just("https://api.test"),
        "margin": st.sampled_from(["30s", "5m", 60]),
        "lifetime": st.sampled_from(["1h", "10m", 3600]),
        "allow_insecure_http": st.booleans(),
        "headers": st.dictionaries(st.sampled_from(["X-A", "X-B"]), st.text(max_size=4)),
    },
)
# ...jobs valid on their own that authenticate without a secret...
_VALID_SINK = st.just([{"type": "file", "path": "/tmp/p-k"}])
valid_secretless_jobs = st.one_of(
    st.fixed_dictionaries(
        {
            "name": st.sampled_from(["k", "l"]),
            "token_url": st.just("https://idp.example.com/token"),
            "client_id": st.just("c"),
            "auth": st.just("private_key_jwt"),
            "private_key": st.sampled_from([{"file": KEYS.key}, {"file": KEYS.ec_key}]),
            "sinks": _VALID_SINK,
        },
        optional={
            "key_id": st.just("k1"),
            "assertion": st.fixed_dictionaries(
                {}, optional={"lifetime": st.sampled_from(["1m", 300]), "not_before": st.booleans()}
            ),
            "resource": st.lists(st.just("https://api.test"), max_size=1),
        },
    ),
    st.fixed_dictionaries(
        {
            "name": st.sampled_from(["k", "l"]),
            "provider": st.sampled_from(["okta", "keycloak"]),
            "issuer": st.just("https://idp.test/realms/r"),
            "client_id": st.just("c"),
            "auth": st.just("federated_jwt"),
            "assertion_file": st.just(KEYS.token),
            "sinks": _VALID_SINK,
        }
    ),
)
valid_jobs = valid_jobs | valid_secretless_jobs
# ...and jobs that mostly have the required keys, so validation gets past them to the rest.
_REQUIRED = {
    "name": st.sampled_from(["a", "b"]) | JOB_VALUES.pop("name"),
    "token_url": JOB_VALUES.pop("token_url"),
    "client_id": st.just("c") | JOB_VALUES.pop("client_id"),
    "client_secret": JOB_VALUES.pop("client_secret"),
    "sinks": st.lists(sinks, min_size=1, max_size=2) | JOB_VALUES.pop("sinks"),
}
jobs = st.one_of(
    valid_jobs,
    st.fixed_dictionaries(_REQUIRED, optional=JOB_VALUES),
    st.dictionaries(st.sampled_from(_keys(TokenJobConfig)) | junk_keys, junk, max_size=4),
    junk,
)
SETTINGS_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "metrics": st.dictionaries(
        st.sampled_from(_keys(MetricsServerConfig)) | junk_keys,
        st.integers(-1, 70000) | st.booleans() | junk,
    )
    | junk,
    "kubernetes": st.dictionaries(st.sampled_from(_keys(KubernetesSettings)) | junk_keys, junk)
    | junk,
    "leader_election": st.dictionaries(
        st.sampled_from(_keys(LeaderElectionConfig)) | junk_keys, durations | junk
    )
    | junk,
}
for _key in _keys(Settings):
    SETTINGS_VALUES.setdefault(_key, junk)
valid_settings = {
    "metrics": st.fixed_dictionaries({}, optional={"enabled": st.booleans(), "port": st.just(0)}),
    "max_concurrent_refreshes": st.integers(1, 16),
}
configs = st.one_of(
    st.fixed_dictionaries(
        {"tokens": st.lists(valid_jobs, min_size=1, max_size=2, unique_by=lambda j: j["name"])},
        optional=valid_settings,
    ),
    st.fixed_dictionaries(
        {"tokens": st.lists(jobs, max_size=3) | junk},
        optional=SETTINGS_VALUES,
    ).flatmap(
        lambda base: st.dictionaries(junk_keys, junk, max_size=2).map(
            lambda extra: {**extra, **base}
        )
    ),
    junk,
)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROP_TEST_UNSET", raising=False)


@SOME
@given(data=configs)
def test_any_structured_config_is_a_config_or_path_named_problems(data: Any) -> None:
    config = assert_clean_outcome(lambda: validate(data), data)
    if config is not None:
        assert_valid_config_is_sane(config)


@FEW
@given(data=configs)
def test_any_structured_config_through_yaml_is_a_config_or_path_named_problems(
    data: Any,
) -> None:
    text = yaml.safe_dump(data)
    config = assert_clean_outcome(lambda: load_config_text(text, environ={}), yaml.safe_load(text))
    if config is not None:
        assert_valid_config_is_sane(config)


@FEW
@given(
    content=st.binary(max_size=200)
    | st.lists(
        st.sampled_from(
            ["client_id = c", "client_secret = " + CLIENT_SECRET, "api_key = k", "[lucidtech]",
             "auth_endpoint = https://x", "=", " = ", "%(x)s", "\n", "\r\n", "[", "key", ";"]
        ),
        max_size=8,
    ).map(lambda lines: "\n".join(lines).encode())
)  # fmt: skip
def test_any_credential_file_is_read_or_a_credentials_error(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "credentials"
        path.write_bytes(content)
        os.chmod(path, 0o600)
        for read in (lambda: CredentialRef(file=path).read(), lambda: read_lucidtech_cfg(path)):
            try:
                value: str | Mapping[str, str] = read()
            except RefreshError as error:
                assert error.reason is Reason.CREDENTIALS
                assert CLIENT_SECRET not in str(error)
            else:
                assert isinstance(value, str | dict)


# ------------------------------------------- once known crashes of config.py, fixed since


@pytest.mark.parametrize("text", ["[" * 2000, "a: " + "{a: " * 2000, "tokens: &a [*a]"])
def test_known_crash_deep_or_recursive_yaml(text: str) -> None:
    assert_clean_outcome(lambda: load_config_text(text, environ={}), None)


@pytest.mark.parametrize(
    "text",
    [
        "{tokens: [], max_concurrent_refreshes: " + "9" * 5000 + "}",  # int() digit limit
        "tokens: !!int",  # IndexError in PyYAML's constructor
        "tokens: !!float .",  # ValueError
        "tokens: !!bool",  # KeyError
        "tokens: !!timestamp",  # AttributeError
        "tokens: !!timestamp 2001-99-99",  # ValueError
    ],
)
def test_known_crash_yaml_constructors(text: str) -> None:
    assert_clean_outcome(lambda: load_config_text(text, environ={}), None)


def test_known_crash_unclosed_ipv6_token_url() -> None:
    data = {
        "tokens": [
            {
                "name": "x",
                "token_url": "http://[::1/token",
                "client_id": "c",
                "client_secret": {"env": "PATH"},
                "sinks": [{"type": "file", "path": "/tmp/x"}],
            }
        ]
    }
    assert_clean_outcome(lambda: validate(data), data)
