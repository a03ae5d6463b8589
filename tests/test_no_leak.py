"""Secrets never leak (rule 6 of docs/design.md): known secret values driven through every
path we have, then searched for in every log line (every logger, DEBUG, JSON and text), every
exception, the CLI's output and the metrics."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from refresher.cli import main
from refresher.config import load_config_text
from refresher.daemon import build_runners
from refresher.errors import ConfigError, RefreshError
from refresher.metrics import Metrics
from testdoubles.idp import Fault, LocalIdP
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

    captured = capsys.readouterr()
    haystacks = {
        "logs": all_logs.text,
        "stdout": captured.out,
        "stderr": captured.err,
        "exceptions": "\n".join(exceptions),
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
    for where, text in haystacks.items():
        for what, secret in secrets.items():
            assert secret not in text, f"{what} leaked into {where}"
            # Parts of the secret as well, e.g. the form-encoded or a truncated form.
            assert secret[:16] not in text, f"start of {what} leaked into {where}"


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
