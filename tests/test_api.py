"""The API listener (refresher/api.py) on a running daemon: rejection reports over real HTTP.

The daemon refreshes against the Lucidworks-shaped local token server (which revokes a token
when the same client asks again) and probes its protected API. What a consumer does on a 401
is what these tests do: re-read the sink, and report the fingerprint if it did not change.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests

from refresher.config import validate
from refresher.daemon import Daemon
from refresher.errors import ConfigError
from refresher.tokens import fingerprint
from testdoubles.idp import LocalIdP
from testdoubles.tls import Connection, fixed, serving
from tests.conftest import (
    CLIENT_SECRET,
    LogCapture,
    config_of,
    job_for,
    offline_job,
    rogue_request,
    running,
    wait_for,
)

API = {"enabled": True, "listen": "127.0.0.1:0"}


def _url(daemon: Daemon, name: str = "lucidworks-job") -> str:
    assert daemon.api is not None
    return f"http://127.0.0.1:{daemon.api.port}/v1/tokens/{name}/rejected"


def _report(daemon: Daemon, fp: str, name: str = "lucidworks-job") -> requests.Response:
    return requests.post(_url(daemon, name), json={"fingerprint": fp}, timeout=30)


def _valid(idp: LocalIdP, sink: Path) -> bool:
    return sink.exists() and idp.token_status(sink.read_text().strip()) == "valid"


@contextmanager
def _probing(idp: LocalIdP, secret_file: Path, tmp_path: Path) -> Iterator[tuple[Daemon, Path]]:
    """A daemon whose job probes `idp`'s protected API, settled (first token written and
    probed), with the API listener on; and its sink."""
    sink = tmp_path / "token"
    job = job_for(idp, secret_file, sink, probe={"url": idp.protected_url})
    with running(config_of(job, api=API)) as daemon:
        _settled(daemon, idp, sink)
        yield daemon, sink


def _settled(daemon: Daemon, idp: LocalIdP, sink: Path) -> None:
    """The first token is written and (with a probe) probed: the daemon is idle."""
    runner = daemon.runners[0]
    wait_for(lambda: _valid(idp, sink) and (runner.prober is None or runner.stats.probes != {}))


@pytest.fixture
def idp(make_idp: Any) -> LocalIdP:
    return make_idp("lucidworks", lifetime=600)  # no scheduled refresh during a test


def test_a_report_heals_a_revoked_token_at_once(
    idp: LocalIdP, secret_file: Path, tmp_path: Path, all_logs: LogCapture
) -> None:
    with _probing(idp, secret_file, tmp_path) as (daemon, sink):
        dead = sink.read_text().strip()
        rogue_request(idp)
        assert idp.token_status(dead) == "revoked"
        answer = _report(daemon, fingerprint(dead))
        assert answer.status_code == 202
        assert answer.headers["Content-Type"].startswith("application/json")
        assert answer.json() == {
            "outcome": "rejected",
            "refreshing": True,
            "fingerprint": fingerprint(dead),
        }
        wait_for(lambda: _valid(idp, sink))
        # The consumer re-read an old fingerprint: 409 names the current one.
        stale = _report(daemon, fingerprint(dead))
        assert stale.status_code == 409
        assert stale.json() == {"fingerprint": fingerprint(sink.read_text().strip())}
    for secret in (dead, sink.read_text().strip(), CLIENT_SECRET):
        assert secret not in all_logs.text


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (b"not json", "application/json", 400),
        (b"[]", "application/json", 400),
        (b"{}", "application/json", 400),
        (b'{"fingerprint": 12345678}', "application/json", 400),
        (b'{"fingerprint": "ABCDEF12"}', "application/json", 400),
        (b'{"fingerprint": "abcdef123"}', "application/json", 400),
        (b'{"fingerprint": "abcdef1\\n"}', "application/json", 400),
        (b"[" * 500 + b"]" * 500, "application/json", 400),
        (b'{"fingerprint": "abcdef12"}', "text/plain", 415),
        (b'{"fingerprint": "abcdef12"}', "application/x-www-form-urlencoded", 415),
        (b'{"fingerprint": "abcdef12", "pad": "' + b"x" * 4000 + b'"}', "application/json", 413),
    ],
)
def test_bad_reports_get_a_clear_answer_and_no_probe(
    body: bytes, content_type: str, status: int, idp: LocalIdP, secret_file: Path, tmp_path: Path
) -> None:
    with _probing(idp, secret_file, tmp_path) as (daemon, _sink):
        runner = daemon.runners[0]
        probes = dict(runner.stats.probes)
        answer = requests.post(
            _url(daemon), data=body, headers={"Content-Type": content_type}, timeout=10
        )
        assert answer.status_code == status, answer.text
        assert runner.stats.probes == probes
        assert idp.token_requests == 1


def test_unknown_names_methods_and_paths_are_refused(
    idp: LocalIdP, secret_file: Path, tmp_path: Path
) -> None:
    with _probing(idp, secret_file, tmp_path) as (daemon, _sink):
        assert _report(daemon, "abcdef12", name="nobody").status_code == 404
        assert requests.get(_url(daemon), timeout=5).status_code == 405
        assert daemon.api is not None
        base = f"http://127.0.0.1:{daemon.api.port}"
        assert requests.get(base + "/metrics", timeout=5).status_code == 404
        assert requests.post(base + "/v1/tokens/x", timeout=5).status_code == 405  # GET only
        assert requests.get(base + "/v1/tokens/x/y", timeout=5).status_code == 404


def test_a_flood_of_reports_joins_one_probe_and_is_then_rate_limited(
    idp: LocalIdP, secret_file: Path, tmp_path: Path
) -> None:
    probe_started = threading.Event()

    def slow_ok(connection: Connection) -> None:
        probe_started.set()
        connection.pause(1.0)  # long enough for every report below to arrive meanwhile
        connection.send(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    with serving(slow_ok) as api:
        sink = tmp_path / "token"
        job = job_for(idp, secret_file, sink, probe={"url": api.url("/probe")})
        with running(config_of(job, api=API)) as daemon:
            wait_for(lambda: _valid(idp, sink) and daemon.runners[0].stats.probes != {})
            current = fingerprint(sink.read_text().strip())
            probes_before = len(api.requests)
            with ThreadPoolExecutor(30) as pool:
                answers = list(pool.map(lambda _: _report(daemon, current), range(30)))
            assert {answer.status_code for answer in answers} == {202}
            assert {json.dumps(answer.json()) for answer in answers} == {
                json.dumps({"outcome": "accepted", "refreshing": False, "fingerprint": current})
            }
            # 30 reports, at most a couple of probes (a report arriving as the probe ends
            # needs a new one).
            assert len(api.requests) - probes_before <= 3
            # One after another (answered quickly now), each needs a probe of its own: the
            # job's limit answers 429.
            api.set_script(fixed(200, {}, b""))
            statuses = [_report(daemon, current).status_code for _ in range(8)]
            assert 429 in statuses
            limited = [_report(daemon, current) for _ in range(5)]
            retry_after = [a.headers["Retry-After"] for a in limited if a.status_code == 429]
            assert retry_after and all(int(value) >= 1 for value in retry_after)
            assert idp.token_requests == 1


def test_a_follower_sends_reports_to_the_leader(
    idp: LocalIdP, secret_file: Path, tmp_path: Path
) -> None:
    with _probing(idp, secret_file, tmp_path) as (daemon, sink):
        daemon._follow()  # what the elector calls when the Lease is lost
        answer = _report(daemon, fingerprint(sink.read_text().strip()))
        assert answer.status_code == 503
        assert "follows" in answer.json()["error"]
        assert answer.headers["Retry-After"] == "5"


def test_the_api_listen_address_is_parsed_and_anonymous_callers_only_on_loopback(
    tmp_path: Path,
) -> None:
    job = offline_job(tmp_path)
    # Not loopback (`0.0.0.0` and `::` are every address; an IPv4-mapped ::1 is not ::1):
    # callers must authenticate, so every job must say who may read it.
    for listen in ("0.0.0.0:9465", "[::]:9465", "10.0.0.5:9465", "[::ffff:127.0.0.1]:1"):
        with pytest.raises(ConfigError) as caught:
            validate({"tokens": [job], "api": {"enabled": True, "listen": listen}})
        (problem,) = caught.value.problems
        assert problem.startswith("tokens[0].consumers: required") and "loopback" in problem
    for listen, address in (
        ("127.0.0.1:9465", ("127.0.0.1", 9465)),
        ("[::1]:0", ("::1", 0)),
        ("localhost:80", ("127.0.0.1", 80)),
        ("127.1.2.3:9", ("127.1.2.3", 9)),
        ("9465", ("127.0.0.1", 9465)),  # a port alone is on loopback
        (9466, ("127.0.0.1", 9466)),
    ):
        config = validate({"tokens": [job], "api": {"enabled": True, "listen": listen}})
        assert config.settings.api.address == address
        assert config.settings.api.loopback
    for listen in (":9465", "127.0.0.1", "::1:9465", "host:1", "127.0.0.1:65536", "99999"):
        with pytest.raises(ConfigError) as caught:
            validate({"tokens": [job], "api": {"listen": listen}})
        assert caught.value.problems[0].startswith("api.listen: ")


def test_the_api_port_is_off_by_default_and_separate_from_metrics(
    idp: LocalIdP, secret_file: Path, tmp_path: Path
) -> None:
    sink = tmp_path / "token"
    job = job_for(idp, secret_file, sink)
    with running(config_of(job)) as daemon:
        assert daemon.api is None
    metrics = {"enabled": True, "bind": "127.0.0.1", "port": 0}
    with running(config_of(job, api=API, metrics=metrics)) as daemon:
        assert daemon.api is not None and daemon.http is not None
        assert daemon.api.port != daemon.http.port
        _settled(daemon, idp, sink)
        # Without a probe and without trust, a report is counted and ignored.
        answer = _report(daemon, fingerprint(sink.read_text().strip()))
        assert answer.json()["outcome"] == "ignored"
        body = requests.get(f"http://127.0.0.1:{daemon.http.port}/metrics", timeout=5).text
        assert (
            'refresher_rejection_reports_total{outcome="ignored",token="lucidworks-job"} 1.0'
            in body
        )
        assert 'refresher_token_contested{token="lucidworks-job"} 0.0' in body
