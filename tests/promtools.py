"""Real Prometheus parts for the tests: find the binaries, run Prometheus and the Pushgateway
on loopback with temporary storage, scrape and query them.

The binaries come from Debian's `prometheus` and `prometheus-pushgateway` packages
(`bash .ci/install-prometheus`). A missing binary skips the test on a developer's machine
and fails it in CI (`CI` set), where the install script has run: a test that CI silently
skips would be a test that cannot fail.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

ROOT = Path(__file__).parent.parent
# One source: the Helm chart ships this file as its PrometheusRule (Helm reads only files
# inside the chart).
RULES = ROOT / "helm" / "refresher" / "files" / "refresher-rules.yaml"
RULE_TESTS = RULES.with_name("refresher-rules.test.yaml")
INSTALL_HINT = (
    "install it with `bash .ci/install-prometheus` (as root or with sudo; Debian packages)"
)


def require_binary(name: str) -> str:
    """The path of `name` (`prometheus`, `promtool`, `prometheus-pushgateway`).

    Missing: fails under CI (which installs them), skips elsewhere with how to install.
    """
    for path in (shutil.which(name), f"/usr/bin/{name}"):
        if path is not None and os.access(path, os.X_OK):
            return path
    message = f"{name} is not installed; {INSTALL_HINT}"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set, so its absence is a failure)")
    pytest.skip(message)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def session() -> requests.Session:
    """A session that never sends loopback traffic through a proxy from the environment."""
    s = requests.Session()
    s.trust_env = False
    return s


def poll(
    condition: Callable[[], Any],
    *,
    timeout: float,
    interval: float = 0.1,
    what: str = "condition",
) -> Any:
    """Call `condition` until it returns something truthy (returned); fail after `timeout` s.

    Connection errors count as "not yet", so it also waits for a server to come up.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = condition()
        except requests.RequestException as err:
            result, last_error = None, err
        if result:
            return result
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error})" if last_error else ""
            raise AssertionError(f"{what} not met within {timeout} s{detail}")
        time.sleep(interval)


@dataclass
class Process:
    """A server process we started; its output goes to a log file so it can never block."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    base_url: str

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Poll `/-/ready` (both servers have it); fail with the log if it exits first."""
        http = session()

        def ready() -> bool:
            if self.popen.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited with {self.popen.returncode}:\n{self.log_tail()}"
                )
            return http.get(f"{self.base_url}/-/ready", timeout=2).status_code == 200

        poll(ready, timeout=timeout, what=f"{self.name} ready at {self.base_url}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not gone within 10 s."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)


@contextmanager
def started(
    name: str, argv_for: Callable[[int], list[str]], workdir: Path, attempts: int = 3
) -> Iterator[Process]:
    """Run the server `argv_for(port)` on a free loopback port until the block ends,
    whatever happens. A port taken between `free_port()` and the bind is tried again."""
    process: Process | None = None
    try:
        for attempt in range(1, attempts + 1):
            port = free_port()
            log = workdir / f"{name}-{attempt}.log"
            with log.open("wb") as out:
                popen = subprocess.Popen(
                    argv_for(port),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=workdir,
                )
            process = Process(name, popen, log, f"http://127.0.0.1:{port}")
            try:
                process.wait_ready()
                break
            except AssertionError:
                process.stop()
                if attempt == attempts or "address already in use" not in process.log_tail():
                    raise
        assert process is not None
        yield process
    finally:
        if process is not None:
            process.stop()


@contextmanager
def prometheus(
    workdir: Path,
    targets: list[str],
    *,
    rule_files: Sequence[Path] = (),
    job: str = "refresher",
    interval: str = "1s",
) -> Iterator[Process]:
    """A real Prometheus on loopback scraping `targets` every `interval` as job `job`, with
    its storage under `workdir`, evaluating `rule_files` every `interval`."""
    binary = require_binary("prometheus")
    workdir.mkdir(parents=True, exist_ok=True)
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": [
            {
                "job_name": job,
                "scrape_interval": interval,
                "scrape_timeout": interval,
                "static_configs": [{"targets": targets}],
            }
        ],
    }
    config_file = workdir / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))

    def argv(port: int) -> list[str]:
        return [
            binary,
            f"--config.file={config_file}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ]

    with started("prometheus", argv, workdir) as process:
        yield process


@contextmanager
def pushgateway(workdir: Path) -> Iterator[Process]:
    """A real Pushgateway on loopback, persisting (if ever) under `workdir`."""
    binary = require_binary("prometheus-pushgateway")
    workdir.mkdir(parents=True, exist_ok=True)

    def argv(port: int) -> list[str]:
        return [
            binary,
            f"--web.listen-address=127.0.0.1:{port}",
            f"--persistence.file={workdir / 'pushgateway.data'}",
            "--log.level=warn",
        ]

    with started("pushgateway", argv, workdir) as process:
        yield process


class PromAPI:
    """The few calls of Prometheus's HTTP API the tests need."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.http = session()

    def _get(self, path: str, **params: Any) -> Any:
        response = self.http.get(f"{self.base_url}{path}", params=params, timeout=5)
        response.raise_for_status()
        body = response.json()
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query: the result list (vector or matrix)."""
        params: dict[str, Any] = {"query": promql}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return list(self._get("/api/v1/query", **params)["result"])

    def scalar(self, promql: str, at: float | None = None) -> float | None:
        """The value of an instant query returning at most one series, None when empty."""
        result = self.query(promql, at)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def samples(self, selector: str, since: float, until: float) -> list[tuple[float, float]]:
        """The raw scraped samples of the one series `selector` selects, in [since, until]."""
        window = max(int(until - since + 0.999), 1)
        result = self.query(f"{selector}[{window}s]", at=until)
        assert len(result) <= 1, result
        if not result:
            return []
        return [(float(t), float(v)) for t, v in result[0]["values"] if float(t) >= since]

    def query_range(
        self, promql: str, start: float, end: float, step: float = 1.0
    ) -> list[dict[str, Any]]:
        data = self._get(
            "/api/v1/query_range",
            query=promql,
            start=f"{start:.3f}",
            end=f"{end:.3f}",
            step=f"{step}",
        )
        return list(data["result"])

    def rules(self) -> list[dict[str, Any]]:
        return [rule for group in self._get("/api/v1/rules")["groups"] for rule in group["rules"]]

    def alerts(self) -> list[dict[str, Any]]:
        return list(self._get("/api/v1/alerts")["alerts"])


def scrape(url: str) -> list[Sample]:
    """Fetch a Prometheus text exposition and return every sample in it."""
    response = session().get(url, timeout=5)
    response.raise_for_status()
    return [
        sample
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    ]
