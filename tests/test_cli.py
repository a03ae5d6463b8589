"""The command line: once, status, check, run (SIGTERM), demo."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from refresher.cli import main, run_once, status_rows
from refresher.metrics import Metrics
from testdoubles.idp import Fault, LocalIdP
from tests.conftest import config_of, job_for, wait_for

ROOT = Path(__file__).parent.parent


def write_config(path: Path, *jobs: dict[str, Any], **settings: Any) -> Path:
    settings.setdefault("metrics", {"enabled": False})
    path.write_text(yaml.safe_dump({"tokens": list(jobs), **settings}))
    return path


def test_once_refreshes_what_is_due_and_reuses_the_rest(
    make_idp: Callable[..., LocalIdP], secret_file: Path, tmp_path: Path
) -> None:
    idp = make_idp("lucidworks", lifetime=3600)
    config = write_config(tmp_path / "c.yaml", job_for(idp, secret_file, tmp_path / "token"))
    assert main(["once", "-c", str(config)]) == 0
    assert idp.token_status((tmp_path / "token").read_text()) == "valid"
    assert main(["once", "-c", str(config)]) == 0
    assert idp.token_requests == 1  # the second pass found a valid token: nothing was due


def test_once_exits_1_when_a_job_holds_no_valid_token(
    make_idp: Callable[..., LocalIdP], secret_file: Path, tmp_path: Path
) -> None:
    idp = make_idp("generic")
    idp.set_fault(Fault.SERVER_ERROR)
    config = write_config(tmp_path / "c.yaml", job_for(idp, secret_file, tmp_path / "token"))
    assert main(["once", "-c", str(config)]) == 1
    assert not (tmp_path / "token").exists()


@pytest.mark.parametrize("sink_format", ["json", "raw"])
def test_status_calls_a_token_due_exactly_when_the_daemon_does(
    make_idp: Callable[..., LocalIdP], secret_file: Path, tmp_path: Path, sink_format: str
) -> None:
    # The refresh point's jitter is drawn from the job and the token, so `status`, `once` and
    # the daemon agree on it; with a random draw (or none) they disagreed by up to 10 % of the
    # lifetime.
    idp = make_idp("generic", lifetime=3600)
    job = job_for(idp, secret_file, tmp_path / "token")
    job["sinks"][0]["format"] = sink_format
    config = config_of(job)
    daemon_runner = run_once(config, Metrics())[0]
    refresh_point = daemon_runner.refresh_point
    assert refresh_point is not None and daemon_runner.token is not None
    # The un-jittered point (what `status` used) lies later than the daemon's.
    assert refresh_point < daemon_runner.token.expires_at - 1200

    def state(at: float) -> str:
        rows, _ = status_rows(config, at)
        return rows[1][-1]

    assert state(refresh_point - 0.05) == "valid"
    assert state(refresh_point + 0.05) == "due"
    # A restarted process plans the same point from what it reads back.
    restarted = run_once(config, Metrics())[0]
    assert restarted.refresh_point == pytest.approx(refresh_point, abs=0.01)
    assert idp.token_requests == 1


def test_status_shows_each_sink_without_the_token(
    make_idp: Callable[..., LocalIdP],
    secret_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    idp = make_idp("fusion", lifetime=3600)
    job = job_for(
        idp,
        secret_file,
        tmp_path / "a.json",
        sinks=[
            {"type": "file", "path": str(tmp_path / "a.json"), "format": "json"},
            {"type": "file", "path": str(tmp_path / "b"), "format": "raw"},
        ],
    )
    config = write_config(tmp_path / "c.yaml", job)
    assert main(["status", "-c", str(config)]) == 1  # nothing written yet
    assert "missing" in capsys.readouterr().out
    assert main(["once", "-c", str(config)]) == 0
    capsys.readouterr()
    assert main(["status", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    token = idp.issued[-1]
    lines = [line for line in out.splitlines() if line.startswith("fusion-job")]
    assert len(lines) == 2 and all("valid" in line for line in lines)
    from refresher.tokens import fingerprint

    assert fingerprint(token.access_token) in out
    assert token.access_token not in out


def test_check_fetch_skips_revoking_idps_unless_asked(
    make_idp: Callable[..., LocalIdP],
    secret_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    revoking, plain = make_idp("lucidworks"), make_idp("usage-engine")
    config = write_config(
        tmp_path / "c.yaml",
        job_for(revoking, secret_file, tmp_path / "a"),
        job_for(plain, secret_file, tmp_path / "b"),
    )
    assert main(["check", "-c", str(config), "--fetch"]) == 0
    out = capsys.readouterr().out
    assert "config OK: 2 token job(s)" in out
    assert "lucidworks-job: skipped" in out and "usage-engine-job: ok" in out
    assert revoking.token_requests == 0 and plain.token_requests == 1
    assert not (tmp_path / "b").exists()  # check never writes
    assert main(["check", "-c", str(config), "--fetch", "--include-revoking"]) == 0
    assert revoking.token_requests == 1


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    return env


def test_run_stops_cleanly_on_sigterm(
    make_idp: Callable[..., LocalIdP], secret_file: Path, tmp_path: Path
) -> None:
    idp = make_idp("lucidtech", lifetime=60)
    token_file = tmp_path / "token"
    config = write_config(tmp_path / "c.yaml", job_for(idp, secret_file, token_file))
    process = subprocess.Popen(
        [sys.executable, "-m", "refresher", "run", "-c", str(config), "--log-format", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
        text=True,
    )
    try:
        wait_for(lambda: token_file.exists(), timeout=20)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=15)
    finally:
        process.kill()
    assert process.returncode == 0, err
    lines = [json.loads(line) for line in err.splitlines()]
    refreshed = [line for line in lines if line["message"] == "token refreshed"]
    assert (
        refreshed
        and refreshed[0]["token"] == "lucidtech-job"
        and len(refreshed[0]["fingerprint"]) == 8
    )
    assert {"duration_ms", "expires_at", "next_refresh_at", "outcome"} <= set(refreshed[0])
    assert lines[-1]["message"] == "stopped"


def test_demo_refreshes_with_no_expired_read(tmp_path: Path) -> None:
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "refresher",
            "demo",
            "--duration",
            "7",
            "--lifetime",
            "3",
            "--port",
            "0",
            "--dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    refreshes = [line for line in result.stdout.splitlines() if "] success" in line]
    assert len(refreshes) >= 3, result.stdout
    assert "0 rejected otherwise" in result.stdout
    # The consumer that calls through the proxy is never rejected, not even in the window.
    proxied = re.search(r"proxy consumer calls: (\d+) ok, (\d+) rejected", result.stdout)
    assert proxied is not None and int(proxied.group(1)) > 0 and proxied.group(2) == "0"
    assert time.monotonic() - started < 30
    assert (tmp_path / "token").exists()


def test_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "refresher", "--version"], capture_output=True, text=True, env=_env()
    )
    assert result.stdout.startswith("refresher ")


def test_demo_on_a_taken_port_serves_on_a_free_one_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        demo = ["demo", "--duration", "1", "--lifetime", "3", "--dir", str(tmp_path)]
        code = main([*demo, "--port", str(port)])
    out, err = capsys.readouterr()
    assert code == 0
    assert f"port {port} is busy" in out
    assert "Traceback" not in out + err
