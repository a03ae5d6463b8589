"""The config: presets, `${ENV}`, and every problem reported with its path, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from refresher.cli import main
from refresher.config import load_config, load_config_text, parse_duration, validate
from refresher.credentials import read_credentials
from refresher.endpoints import token_url
from refresher.errors import ConfigError

EXAMPLES = Path(__file__).parent.parent / "examples"

BROKEN = """
tokens:
  - name: good
    token_url: https://idp.example.com/token
    client_id: a
    client_secret: {env: HOME}
    sinks: [{type: file, path: /tmp/refresher-good}]
  - name: "bad name!"
    provider: lucidworks
    token_url: http://idp.example.com/token
    client_id: a
    client_secret: literally-my-secret
    scopes: [machinelearning.predict, machinelearning.model]
    margin: soon
    sinks:
      - {type: file, path: /tmp/x, format: yaml}
      - {type: ftp, path: /tmp/y}
      - {type: file, path: /tmp/z, mode: 640}
  - name: dup
    token_url: https://idp.example.com/token
    client_id: a
    client_secret: {env: HOME}
    colour: blue
    sinks: [{type: file, path: /tmp/refresher-good}]
  - name: good
    token_url: https://idp.example.com/token
    client_id: a
    client_secret: {env: REFRESHER_TEST_SURELY_UNSET}
    sinks: []
metrics: {port: 99999}
"""


def test_every_problem_is_reported_with_its_path() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config_text(BROKEN, environ={"HOME": "/root"})
    problems = "\n".join(caught.value.problems)
    expected = [
        "tokens[1].name: String should match pattern",
        "tokens[1].client_secret: a client secret is read from `{file: PATH}` or `{env: NAME}`",
        "tokens[1].margin: expected seconds or a duration like 30s",
        "tokens[1].sinks[0].format: Input should be 'raw', 'json', 'env' or 'header'",
        "tokens[1].sinks[1]: Input tag 'ftp' found using 'type' does not match any of the",
        "tokens[1].sinks[2].mode: expected an octal mode; quote it",
        "tokens[2].colour: unknown key",
        "tokens[3].sinks: List should have at least 1 item",
        "metrics.port: Input should be less than or equal to 65535",
    ]
    for fragment in expected:
        assert fragment in problems, f"missing: {fragment}\n--- got:\n{problems}"
    assert len(caught.value.problems) == len(expected)


def test_rules_across_fields_and_jobs(tmp_path: Path) -> None:
    secret = tmp_path / "s"
    secret.write_text("x")
    base = {
        "token_url": "https://idp.example.com/token",
        "client_id": "a",
        "client_secret": {"file": str(secret)},
    }
    data = {
        "tokens": [
            {
                "name": "one",
                **base,
                "scopes": "x y",
                "sinks": [{"type": "file", "path": str(tmp_path / "a")}],
            },
            # Same URL, client and scope set (order differs): they would revoke each other.
            {
                "name": "two",
                **base,
                "scopes": ["y", "x"],
                "sinks": [{"type": "file", "path": str(tmp_path / "b")}],
            },
            {
                "name": "one",
                **base,
                "token_url": "http://10.0.0.1/token",
                "scopes": ["z"],
                "sinks": [{"type": "file", "path": str(tmp_path / "a")}],
            },
            {
                "name": "four",
                "provider": "lucidworks",
                **base,
                "client_secret": {"file": str(tmp_path / "nope")},
                "sinks": [{"type": "file", "path": str(tmp_path / "c")}],
            },
        ]
    }
    with pytest.raises(ConfigError) as caught:
        validate(data)
    problems = caught.value.problems
    assert any(
        p.startswith("tokens[1]: requests the same token as tokens[0]") and "revoke" in p
        for p in problems
    )
    assert any(
        p.startswith("tokens[2].name: 'one' is already the name of tokens[0]") for p in problems
    )
    assert any(
        p.startswith("tokens[2].sinks[0].path:") and "already written by tokens[0].sinks[0]" in p
        for p in problems
    )
    assert any(p.startswith("tokens[2].token_url: plain http://") for p in problems)
    assert any(p.startswith("tokens[3].client_secret: cannot read") for p in problems)
    assert any(
        p.startswith("tokens[3].scopes: the lucidworks provider needs at least one scope")
        for p in problems
    )
    assert len(problems) == 6, problems


def test_cli_exits_2_and_lists_every_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BROKEN)
    assert main(["check", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert "9 problem(s)" in err
    assert "tokens[1].sinks[2].mode" in err


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("tokens: [", "config: expected the node content, but found '<stream end>' at line 1"),
        ("- just a list", "(top level): expected a mapping"),
        ("tokens: []", "tokens: expected a list of at least one token job"),
        (
            "tokens:\n  - name: x\n    token_url: ${NOPE_NOT_SET}\n",
            "tokens[0].token_url: environment variable NOPE_NOT_SET is not set",
        ),
    ],
)
def test_structural_errors(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config_text(text, environ={})
    assert any(fragment in p for p in caught.value.problems), caught.value.problems


def test_env_expansion_defaults_and_escapes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECRET_VAR", "s")  # read by the credential check, not expanded
    config = load_config_text(
        """
tokens:
  - name: ${NAME:-fallback}
    token_url: https://${HOST}/t?a=$$x
    client_id: ${ID}
    client_secret: {env: SECRET_VAR}
    sinks: [{type: file, path: /tmp/refresher-env-test}]
""",
        environ={"HOST": "idp.example.com", "ID": "me"},
    )
    job = config.jobs[0]
    assert job.name == "fallback"
    assert job.token_url == "https://idp.example.com/t?a=$x"
    assert job.client_id is not None and job.client_id.value == "me"


def test_presets_fill_the_endpoint_shape_and_the_job_wins() -> None:
    job = validate(
        {
            "tokens": [
                {
                    "name": "lw",
                    "provider": "lucidworks",
                    "token_url": "https://idp.example.com/t",
                    "client_id": "a",
                    "client_secret": {"env": "HOME"},
                    "scopes": ["machinelearning.predict"],
                    "headers": {"X-Extra": "1"},
                    "sinks": [{"type": "file", "path": "/tmp/x"}],
                }
            ]
        }
    ).jobs[0]
    assert (job.scope_in, job.auth, job.margin, job.revokes_on_reissue) == (
        "query",
        "basic",
        300,
        True,
    )
    # Accept and Cache-Control are sent on every request (refresher.idp), so presets need not.
    assert job.headers == {"X-Extra": "1"}
    job2 = validate(
        {
            "tokens": [
                {
                    "name": "lw",
                    "provider": "lucidworks",
                    "token_url": "https://idp.example.com/t",
                    "margin": "10m",
                    "client_id": "a",
                    "client_secret": {"env": "HOME"},
                    "scopes": ["machinelearning.predict"],
                    "sinks": [{"type": "file", "path": "/tmp/x"}],
                }
            ]
        }
    ).jobs[0]
    assert job2.margin == 600


def test_lucidtech_credentials_file_supplies_everything(tmp_path: Path) -> None:
    cfg = tmp_path / "credentials.cfg"
    cfg.write_text(
        "api_key = the-api-key\nclient_id = lt-client\nclient_secret = lt-secret\n"
        "auth_endpoint = https://auth.lucidtech.example\napi_endpoint = https://api.lucidtech.example\n"
    )
    job = validate(
        {
            "tokens": [
                {
                    "name": "lt",
                    "provider": "lucidtech",
                    "credentials_file": str(cfg),
                    "sinks": [{"type": "file", "path": "/tmp/x"}],
                }
            ]
        }
    ).jobs[0]
    credentials = read_credentials(job)
    assert credentials.client_id == "lt-client" and credentials.extras == {"api_key": "the-api-key"}
    assert token_url(job, credentials) == "https://auth.lucidtech.example/oauth2/token"
    assert "lt-secret" not in repr(credentials) and "the-api-key" not in repr(credentials)


def test_lucidtech_credentials_file_problems(tmp_path: Path) -> None:
    cfg = tmp_path / "credentials.cfg"
    cfg.write_text("client_id = x\n")
    with pytest.raises(ConfigError) as caught:
        validate(
            {
                "tokens": [
                    {
                        "name": "lt",
                        "provider": "lucidtech",
                        "credentials_file": str(cfg),
                        "sinks": [{"type": "file", "path": "/tmp/x"}],
                    }
                ]
            }
        )
    assert caught.value.problems == [f"tokens[0].credentials_file: {cfg} lacks client_secret"]


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), (90, 90), ("5m", 300), ("1h30m", 5400), ("250ms", 0.25)]
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_every_example_is_valid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from testdoubles.keys import KeyPair, ServiceAccountIssuer

    cfg = tmp_path / "credentials.cfg"
    cfg.write_text(
        "api_key = k\nclient_id = c\nclient_secret = s\nauth_endpoint = https://auth.example\n"
    )
    secret = tmp_path / "secret"
    secret.write_text("s")
    for name in ("LUCIDWORKS", "FUSION", "USAGE_ENGINE", "ENTRA", "OKTA", "KEYCLOAK", "AUTH0"):
        monkeypatch.setenv(f"{name}_CLIENT_SECRET", "s")
    # client_secret_jwt signs with the secret: at least 32 bytes.
    monkeypatch.setenv("OKTA_JWT_CLIENT_SECRET", "an-hs256-client-secret-of-40-bytes-long!")
    monkeypatch.setenv("LUCIDTECH_CREDENTIALS", str(cfg))
    monkeypatch.setenv("EXAMPLE_SECRET_FILE", str(secret))
    (tmp_path / "lucidworks-client-secret").write_text("s")
    monkeypatch.setenv("SECRETS_DIR", str(tmp_path))
    # The enterprise IdP examples: keys, certificates and projected service-account tokens are
    # read and checked with the config, so they must exist (cert-manager's tls.key / tls.crt).
    KeyPair.create(tmp_path / "client-key", "tls")
    KeyPair.create(tmp_path / "client-cert", "tls")
    monkeypatch.setenv("KEYS_DIR", str(tmp_path / "client-key"))
    monkeypatch.setenv("CLIENT_CERT_DIR", str(tmp_path / "client-cert"))
    cluster = ServiceAccountIssuer()
    azure_token = tmp_path / "azure-identity-token"
    cluster.project(azure_token, audience="api://AzureADTokenExchange", issued_at=time.time())
    realm_token = tmp_path / "federated-token"
    realm = "https://keycloak.example.com/realms/apps"
    cluster.project(realm_token, audience=realm, issued_at=time.time())
    # What the Azure Workload Identity webhook injects.
    monkeypatch.setenv("AZURE_CLIENT_ID", "33333333-3333-3333-3333-333333333333")
    monkeypatch.setenv("AZURE_TENANT_ID", "3f1c9b2e-7d4a-4e8f-9a61-0c5d2b7e8f14")
    monkeypatch.setenv("AZURE_FEDERATED_TOKEN_FILE", str(azure_token))
    monkeypatch.setenv("AZURE_AUTHORITY_HOST", "https://login.microsoftonline.com/")
    monkeypatch.setenv("FEDERATED_TOKEN_FILE", str(realm_token))
    examples = sorted(EXAMPLES.glob("*.yaml"))
    assert len(examples) >= 10
    for path in examples:
        assert load_config(path).jobs, path


def test_a_nul_in_a_sink_path_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        validate(
            {
                "tokens": [
                    {
                        "name": "x",
                        "token_url": "https://i.test/t",
                        "client_id": "a",
                        "client_secret": {"env": "HOME"},
                        "sinks": [{"type": "file", "path": "/tmp/a\x00b"}],
                    }
                ]
            }
        )
    assert caught.value.problems == [
        "tokens[0].sinks[0].path: a path cannot contain a NUL character"
    ]


def test_rejected_statuses_are_error_statuses(tmp_path: Path) -> None:
    job = {
        "name": "x",
        "token_url": "https://i.test/t",
        "client_id": "a",
        "client_secret": {"env": "HOME"},
        "sinks": [{"type": "file", "path": str(tmp_path / "t")}],
    }
    assert validate({"tokens": [job]}).jobs[0].rejected_statuses == [401]
    for statuses, where in (([200, 401], "rejected_statuses[0]"), ([], "rejected_statuses")):
        with pytest.raises(ConfigError) as caught:
            validate({"tokens": [{**job, "rejected_statuses": statuses}]})
        assert caught.value.problems[0].startswith(f"tokens[0].{where}: "), caught.value.problems
    assert validate({"tokens": [{**job, "rejected_statuses": [401, 403]}]}).jobs[
        0
    ].rejected_statuses == [401, 403]
