"""Fixtures shared by the tests: local token servers, config builders, a running daemon."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import settings

from refresher.config import Config, validate
from refresher.daemon import Daemon
from refresher.metrics import Metrics
from testdoubles.idp import LocalIdP

# Property tests explore the same examples on every run: a failure is reproducible, and CI
# does not fail on a draw a developer never saw.
settings.register_profile("deterministic", derandomize=True, deadline=None)
settings.load_profile("deterministic")

CLIENT_ID = "refresher-test-client"
# Known values that must never appear in any log line, error or output (see test_no_leak).
CLIENT_SECRET = "s3cr:t/+%20 SUPERSECRET-7f3a"
AUDIENCE = "https://usage-engine.example.test/api"

SHAPE_SCOPES: dict[str, list[str]] = {
    "lucidworks": ["machinelearning.predict"],
    "fusion": ["connectedsearch.query", "datasource.push"],
    "lucidtech": [],
    "usage-engine": [],
    "generic": ["read"],
}


class FakeClock:
    """A wall clock that moves only when a test says so."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def http() -> Iterator[requests.Session]:
    """A plain session for tests that speak HTTP to a local server themselves."""
    with requests.Session() as session:
        session.trust_env = False  # never send 127.0.0.1 through a proxy from the environment
        yield session


@pytest.fixture(autouse=True)
def _isolated_logging() -> Iterator[None]:
    # `refresher.cli.main` configures the root logger with a handler on the (captured) stderr
    # of the test that ran it; without this, later tests would log into a closed stream.
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every test talks to loopback servers only; a proxy from the environment (honoured by
    # requests and by the kubernetes client, even for 127.0.0.1) must not get in between.
    for name in (
        "http_proxy",
        "HTTP_PROXY",
        "https_proxy",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "client-secret"
    path.write_text(CLIENT_SECRET + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def make_idp() -> Iterator[Callable[..., LocalIdP]]:
    """Start LocalIdPs that know the test client; all are stopped after the test."""
    started: list[LocalIdP] = []

    def make(shape: str = "generic", **kwargs: Any) -> LocalIdP:
        kwargs.setdefault("clients", {CLIENT_ID: CLIENT_SECRET})
        kwargs.setdefault("audience", AUDIENCE)
        idp = LocalIdP(shape, **kwargs).start()
        started.append(idp)
        return idp

    yield make
    for idp in started:
        idp.stop()


def job_for(idp: LocalIdP, secret_file: Path, sink_path: Path, **overrides: Any) -> dict[str, Any]:
    """A token job for `idp` as a user of that provider would write it, short-lived for tests."""
    provider = idp.shape.name
    job: dict[str, Any] = {
        "name": overrides.pop("name", f"{provider}-job"),
        "provider": provider,
        "token_url": idp.token_url,
        "client_id": CLIENT_ID,
        "client_secret": {"file": str(secret_file)},
        "scopes": SHAPE_SCOPES[provider],
        "min_refresh_interval": 0.2,
        "sinks": [{"type": "file", "path": str(sink_path)}],
    }
    if provider == "usage-engine":
        job["audience"] = AUDIENCE
    job.update(overrides)
    return job


def rogue_request(idp: LocalIdP, scopes: list[str] | None = None) -> None:
    """One token request with the test client's own credentials, as a developer with curl, a
    second deployment or a staging cluster sharing the client would make it: on a
    revoke-on-reissue IdP it kills the token a refresher holds."""
    from refresher.idp import basic_authorization

    answer = requests.post(
        idp.token_url,
        params={
            "grant_type": "client_credentials",
            "scope": " ".join(scopes or SHAPE_SCOPES[idp.shape.name]),
        },
        data={"client": "rogue"},
        headers={
            "Accept": "application/json",
            "Authorization": basic_authorization(CLIENT_ID, CLIENT_SECRET, form_encode=True),
        },
        timeout=5,
    )
    assert answer.status_code == 200, answer.status_code


def offline_job(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """A job that validates without any server: for config and probe tests."""
    secret = tmp_path / "offline-secret"
    secret.write_text(CLIENT_SECRET)
    secret.chmod(0o600)
    return {
        "name": "offline",
        "token_url": "https://idp.example.test/token",
        "client_id": "client",
        "client_secret": {"file": str(secret)},
        "sinks": [{"type": "file", "path": str(tmp_path / "token")}],
        **overrides,
    }


def config_of(*jobs: dict[str, Any], **settings: Any) -> Config:
    settings.setdefault("metrics", {"enabled": False})
    return validate({"tokens": list(jobs), **settings})


@contextmanager
def running(config: Config, **kwargs: Any) -> Iterator[Daemon]:
    daemon = Daemon(config, metrics=kwargs.pop("metrics", None) or Metrics(), **kwargs).start()
    try:
        yield daemon
    finally:
        daemon.stop()


def metric_value(daemon: Daemon, name: str, **labels: str) -> float:
    """The value of one sample of a daemon's metrics, as a scrape would see it (0 when
    absent)."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    text = generate_latest(daemon.metrics.registry).decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def wait_for(condition: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> None:
    """Poll until `condition()` holds; fail the test with a clear message otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


class LogCapture(logging.Handler):
    """Every formatted line from every logger, at every level, in both output formats."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []
        self._lock_ = threading.Lock()
        from refresher.logs import JsonFormatter, TextFormatter

        self._formatters = [JsonFormatter(), TextFormatter()]

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock_:
            for formatter in self._formatters:
                self.lines.append(formatter.format(record))

    @property
    def text(self) -> str:
        with self._lock_:
            return "\n".join(self.lines)


@pytest.fixture
def all_logs() -> Iterator[LogCapture]:
    capture = LogCapture()
    root = logging.getLogger()
    previous = root.level
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    yield capture
    root.removeHandler(capture)
    root.setLevel(previous)
