"""Secrets never leak (rule 6 of docs/design.md): known secret values driven through every
path we have, then searched for in every log line (every logger, DEBUG, JSON and text), every
exception, the CLI's output and the metrics."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar
from urllib.parse import parse_qsl

import pytest
from prometheus_client import generate_latest

from refresher.cli import main
from refresher.config import load_config_text
from refresher.daemon import build_runners
from refresher.errors import ConfigError, RefreshError
from refresher.localidp import Reply, Request
from refresher.metrics import Metrics
from testdoubles.idp import Fault, LocalIdP
from testdoubles.keys import ServiceAccountIssuer
from tests.conftest import (
    CLIENT_ID,
    CLIENT_SECRET,
    LogCapture,
    config_of,
    job_for,
    running,
    wait_for,
)
from tests.test_cli import write_config
from tests.test_enterprise_idps import JWT_SECRET

API_KEY = "lucidtech-API-KEY-9d8c7b"
WRONG_SECRET = "wrong-secret-Q1W2E3R4"


def test_no_secret_or_token_appears_anywhere(
    make_idp: Callable[..., LocalIdP],
    secret_file: Path,
    tmp_path: Path,
    all_logs: LogCapture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    exceptions: list[str] = []
    metrics = Metrics()

    # 1. Real runners through success, every IdP fault, and a sink failure, one attempt each.
    idp = make_idp("lucidworks", lifetime=60)
    (runner,) = build_runners(config_of(job_for(idp, secret_file, tmp_path / "token")))
    runner.step()
    for fault in Fault:
        if fault is not Fault.SLOW:
            idp.fail_next(fault, retry_after=0.1)
            runner.refresh_now()
            exceptions.append(str(runner.last_error))
    blocked = tmp_path / "blocked"
    blocked.write_text("x")
    sink_job = job_for(
        idp, secret_file, blocked / "token", name="blocked", scopes=["machinelearning.model"]
    )
    (blocked_runner,) = build_runners(config_of(sink_job))
    metrics.bind_jobs(lambda: [runner.snapshot(), blocked_runner.snapshot()])
    blocked_runner.step()
    exceptions.append(str(blocked_runner.last_error))
    # ...and the daemon, for its own log lines.
    with running(config_of(job_for(make_idp("generic"), secret_file, tmp_path / "t2"))):
        wait_for(lambda: (tmp_path / "t2").exists())
    assert idp.token_requests == len(Fault) + 1

    # 2. Lucidtech with its api_key written beside the token; a wrong secret.
    lucidtech = make_idp("lucidtech", lifetime=60, api_key=API_KEY)
    cfg = tmp_path / "credentials.cfg"
    cfg.write_text(
        f"api_key = {API_KEY}\nclient_id = {CLIENT_ID}\nclient_secret = {CLIENT_SECRET}\n"
        f"auth_endpoint = {lucidtech.base_url}\n"
    )
    wrong = tmp_path / "wrong"
    wrong.write_text(WRONG_SECRET)
    config_path = write_config(
        tmp_path / "c.yaml",
        {
            "name": "lt",
            "provider": "lucidtech",
            "credentials_file": str(cfg),
            "sinks": [{"type": "file", "path": str(tmp_path / "lt.env"), "format": "env"}],
        },
        job_for(make_idp("usage-engine"), wrong, tmp_path / "ue"),
    )
    for argv in (["once"], ["status"], ["check", "--fetch"], ["once"]):
        main([*argv, "-c", str(config_path), "--log-level", "debug"])
    assert API_KEY in (tmp_path / "lt.env").read_text()  # it did reach the sink

    # 3. A secret written literally into a config is refused without being quoted.
    with pytest.raises(ConfigError) as caught:
        load_config_text(
            "tokens: [{name: x, token_url: 'https://i.test/t', client_id: a,"
            f" client_secret: '{CLIENT_SECRET}', sinks: [{{type: file, path: /tmp/x}}]}}]"
        )
    exceptions.append(str(caught.value))

    # 4. Error objects themselves.
    exceptions.append(repr(RefreshError.__new__(RefreshError)))

    haystacks = {
        **_haystacks(all_logs, capsys, exceptions),
        "metrics": generate_latest(metrics.registry).decode(),
    }
    secrets = {
        "client secret": CLIENT_SECRET,
        "wrong secret": WRONG_SECRET,
        "api key": API_KEY,
        **{f"token {i}": t.access_token for i, t in enumerate(idp.issued + lucidtech.issued)},
    }
    assert len(secrets) > 5
    assert "refresh failed" in haystacks["logs"] and "token refreshed" in haystacks["logs"]
    assert_absent(secrets, haystacks)


def _haystacks(
    logs: LogCapture, capsys: pytest.CaptureFixture[str], exceptions: list[str]
) -> dict[str, str]:
    """Everything a secret could have reached: log lines, the CLI's output, exceptions."""
    captured = capsys.readouterr()
    return {
        "logs": logs.text,
        "stdout": captured.out,
        "stderr": captured.err,
        "exceptions": "\n".join(exceptions),
    }


def assert_absent(secrets: dict[str, str], haystacks: dict[str, str]) -> None:
    for where, text in haystacks.items():
        for what, secret in secrets.items():
            assert secret not in text, f"{what} leaked into {where}"
            # Parts of the secret as well, e.g. the form-encoded or a truncated form.
            assert secret[:16] not in text, f"start of {what} leaked into {where}"


class _AssertionRecorder(LocalIdP):
    """Keeps every client assertion sent, so the test can look for each one."""

    sent: ClassVar[list[str]] = []

    def _before_grant(self, request: Request) -> Reply | None:
        form = dict(parse_qsl(request.body.decode("ascii", "replace")))
        if "client_assertion" in form:
            self.sent.append(form["client_assertion"])
        return super()._before_grant(request)


def test_no_key_assertion_or_federated_token_appears_anywhere(
    tmp_path: Path,
    all_logs: LogCapture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import trustme

    from tests.test_enterprise_idps import Builder

    started: list[LocalIdP] = []
    builder = Builder(tmp_path, started, trustme.CA(), ServiceAccountIssuer())
    builder.server = _AssertionRecorder
    _AssertionRecorder.sent.clear()
    exceptions: list[str] = []
    try:
        setups = [
            builder.private_key("okta"),
            builder.secret("okta", "client_secret_jwt"),
            builder.federated("keycloak"),
            builder.tls_client("keycloak"),
        ]
        for index, setup in enumerate(setups):
            job = {
                **setup.job,
                "name": f"job-{index}",
                "sinks": [{"type": "file", "path": str(tmp_path / f"t{index}")}],
            }
            config = write_config(tmp_path / f"c{index}.yaml", job)
            for argv in (["once"], ["status"], ["check", "--fetch"]):
                main([*argv, "-c", str(config), "--log-level", "debug"])
            # Then every failure: the IdP forgets the key, the material goes bad on disk.
            (runner,) = build_runners(config_of(job))
            runner.step()
            if setup.rotate is not None:
                setup.rotate()
            setup.idp.set_client_keys(CLIENT_ID, None)
            setup.idp.set_fault(Fault.INVALID_CLIENT)
            runner.refresh_now()
            exceptions.append(str(runner.last_error))
            setup.idp.set_fault(None)
            runner.refresh_now()
            exceptions.append(repr(runner.last_error))
    finally:
        for server in started:
            server.stop()

    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    key_texts = {
        f"key {path.name}": path.read_text()
        for path in files
        if "PRIVATE KEY" in path.read_text(errors="replace")
    }
    tokens = {
        f"federated {path.name}": path.read_text()
        for path in files
        if path.name == "token" and path.parent.name == "projected"
    }
    assertions = {f"assertion {i}": a for i, a in enumerate(_AssertionRecorder.sent)}
    assert key_texts and tokens and len(assertions) >= 6
    secrets: dict[str, str] = {"jwt secret": JWT_SECRET, **tokens, **assertions}
    for name, pem in key_texts.items():
        body = "".join(line for line in pem.splitlines() if "-----" not in line)
        secrets[name] = body[16:80]  # any stretch of the key's base64
    haystacks = _haystacks(all_logs, capsys, exceptions)
    logged = haystacks["logs"] + haystacks["stderr"]  # `main` sends its log lines to stderr
    assert "refresh failed" in logged and "token refreshed" in logged
    assert sum("invalid_client" in text for text in exceptions) >= len(setups)
    assert_absent(secrets, haystacks)


def test_an_exception_message_never_reaches_a_log_line() -> None:
    # A library's error can quote what it was given (a header, a body, a secret): the log
    # keeps the exception's type and where it was raised, never its message.
    import logging

    from refresher.logs import JsonFormatter, TextFormatter

    try:
        try:
            raise KeyError(f"cause quoting {CLIENT_SECRET}")
        except KeyError as cause:
            raise ValueError(f"bad value {CLIENT_SECRET}") from cause
    except ValueError:
        record = logging.getLogger("refresher.test").makeRecord(
            "refresher.test", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    for formatter in (JsonFormatter(), TextFormatter()):
        line = formatter.format(record)
        assert CLIENT_SECRET not in line
        assert "ValueError" in line and "KeyError" in line
        assert "test_an_exception_message_never_reaches_a_log_line" in line  # the place
