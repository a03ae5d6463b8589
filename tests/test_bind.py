"""The metrics port's address: validated by `check`, bind failures reported as one line with
exit code 2, IPv6 served."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from refresher.cli import main
from refresher.config import validate
from refresher.errors import ConfigError
from tests.conftest import job_for
from tests.runproc import ROOT, Refresher, get, write_config


def _job(idp: Any, secret_file: Path, tmp_path: Path) -> dict[str, Any]:
    return job_for(idp, secret_file, tmp_path / "token")


@pytest.mark.parametrize("bind", ["metrics.example.com", "127.0.0.256", "::g", "", "*"])
def test_check_rejects_a_bind_host_that_is_not_an_address(
    bind: str,
    make_idp: Callable[..., Any],
    secret_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    job = _job(make_idp("generic"), secret_file, tmp_path)
    with pytest.raises(ConfigError) as caught:
        validate({"tokens": [job], "metrics": {"bind": bind}})
    (problem,) = caught.value.problems
    assert problem.startswith("metrics.bind: must be an IP address")
    config = write_config(tmp_path / "c.yaml", job, metrics={"bind": bind})
    assert main(["check", "-c", str(config)]) == 2
    assert "metrics.bind" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("bind", "kept"),
    [("0.0.0.0", "0.0.0.0"), ("::", "::"), ("::1", "::1"), ("localhost", "127.0.0.1"),
     ("0:0::1", "::1")],
)  # fmt: skip
def test_check_accepts_ip_addresses_of_both_families(
    bind: str, kept: str, make_idp: Callable[..., Any], secret_file: Path, tmp_path: Path
) -> None:
    job = _job(make_idp("generic"), secret_file, tmp_path)
    assert validate({"tokens": [job], "metrics": {"bind": bind}}).settings.metrics.bind == kept


def test_run_reports_a_port_in_use_as_one_line_and_exit_code_2(
    make_idp: Callable[..., Any], secret_file: Path, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(
            tmp_path / "c.yaml",
            _job(make_idp("generic"), secret_file, tmp_path),
            metrics={"bind": "127.0.0.1", "port": port},
        )
        result = subprocess.run(
            [sys.executable, "-m", "refresher", "run", "-c", str(config)],
            capture_output=True,
            text=True,
            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
            timeout=60,
        )
    assert result.returncode == 2, result.stderr
    assert f"refresher: cannot listen on 127.0.0.1:{port}: address already in use" in (
        result.stderr.splitlines()
    )
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "token").exists()  # nothing was refreshed


def _ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


def _dual_stack() -> bool:
    try:
        return Path("/proc/sys/net/ipv6/bindv6only").read_text().strip() == "0"
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6(), reason="no IPv6 loopback here")
@pytest.mark.parametrize("bind", ["::1", "::"])
def test_run_serves_on_ipv6(
    bind: str, make_idp: Callable[..., Any], secret_file: Path, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path / "c.yaml",
        _job(make_idp("generic"), secret_file, tmp_path),
        metrics={"bind": bind, "port": 0},
    )
    proc = Refresher(config)
    try:
        port = proc.wait_port()
        assert get("::1", port, "/healthz")[0] == 200
        if bind == "::" and _dual_stack():  # the OS's default for `::`: IPv4 too
            assert get("127.0.0.1", port, "/healthz")[0] == 200
    finally:
        code = proc.stop()
    assert code == 0, proc.text()
