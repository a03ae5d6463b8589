"""`/metrics`, `/healthz` and `/readyz` of a running daemon, over HTTP, with real token servers.

Every metric the Observability issue lists is scraped from the daemon's port and parsed with
prometheus_client's own parser, then checked against what the daemon did: the token in the
files, the faults the IdP was told to inject, the sinks it wrote.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import jwt
import pytest
import requests
from prometheus_client.samples import Sample

from refresher import __version__
from refresher.config import Config
from refresher.daemon import Daemon
from refresher.errors import Reason
from testdoubles.idp import Fault, LocalIdP
from tests.conftest import CLIENT_SECRET, config_of, job_for, running, wait_for
from tests.promtools import scrape, session

METRICS_ON = {"enabled": True, "bind": "127.0.0.1", "port": 0}

# Every sample name the issue asks for (counters with `_total`, histograms by `_count`).
REQUIRED = {
    "refresher_refresh_attempts_total",
    "refresher_refresh_failures_total",
    "refresher_token_expiry_timestamp_seconds",
    "refresher_token_ttl_seconds",
    "refresher_last_success_timestamp_seconds",
    "refresher_next_refresh_timestamp_seconds",
    "refresher_refresh_duration_seconds_count",
    "refresher_sink_writes_total",
    "refresher_sink_write_duration_seconds_count",
    "refresher_write_window_seconds_count",
    "refresher_consecutive_failures",
    "refresher_leader",
    "refresher_build_info",
}
# The only label names any refresher_ sample may carry: all of them take bounded values.
ALLOWED_LABELS = {"token", "outcome", "reason", "sink", "version", "le"}


class Endpoint:
    """The daemon's HTTP port."""

    def __init__(self, daemon: Daemon) -> None:
        assert daemon.http is not None, "the config must enable metrics"
        self.base_url = f"http://127.0.0.1:{daemon.http.port}"
        self.http = session()

    def get(self, path: str) -> requests.Response:
        return self.http.get(self.base_url + path, timeout=5)

    def samples(self) -> list[Sample]:
        return scrape(self.base_url + "/metrics")


def select(samples: Iterable[Sample], name: str, **labels: str) -> list[Sample]:
    return [
        s
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def value(samples: Iterable[Sample], name: str, **labels: str) -> float:
    """The value of the one sample with this name and these labels."""
    found = select(samples, name, **labels)
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples: {found}"
    return float(found[0].value)


def test_every_metric_is_served_with_the_right_labels_and_values(
    make_idp: Callable[..., LocalIdP], secret_file: Path, tmp_path: Path
) -> None:
    idp = make_idp("generic", lifetime=3)
    idp.fail_next(Fault.SERVER_ERROR)
    idp.fail_next(Fault.INVALID_CLIENT)
    other_idp = make_idp("usage-engine", lifetime=60)
    raw, document = tmp_path / "api.token", tmp_path / "api.json"
    api = job_for(
        idp,
        secret_file,
        raw,
        name="api",
        sinks=[
            {"type": "file", "path": str(raw)},
            {"type": "file", "path": str(document), "format": "json"},
        ],
    )
    other = job_for(other_idp, secret_file, tmp_path / "other.token", name="other")

    with running(config_of(api, other, metrics=METRICS_ON)) as daemon:
        endpoint = Endpoint(daemon)

        # While `api` fails (the IdP refuses its first two requests, with >= 1.5 s of backoff
        # between them and the first success) and `other` already holds its token.
        def failing_and_other_ready() -> bool:
            s = endpoint.samples()
            return bool(
                select(s, "refresher_refresh_failures_total", token="api", reason="http_5xx")
                and value(s, "refresher_consecutive_failures", token="api") >= 1
                and select(s, "refresher_token_ttl_seconds", token="other")
                # TTL shows from the IdP's answer; ready waits for the sink's write too.
                and daemon.runners[1].snapshot().ready
            )

        wait_for(failing_and_other_ready, timeout=10)
        early = endpoint.samples()
        ready = endpoint.get("/readyz")
        assert ready.status_code == 503
        assert "api" in ready.text and "other" not in ready.text
        assert endpoint.get("/healthz").status_code == 200
        assert not select(early, "refresher_token_ttl_seconds", token="api")  # holds no token
        assert not select(early, "refresher_token_expiry_timestamp_seconds", token="api")
        assert value(early, "refresher_refresh_failures_total", token="api", reason="http_5xx") == 1
        assert value(early, "refresher_refresh_attempts_total", token="api", outcome="success") == 0

        # The first token: ready, and the next refresh is >= 1.7 s away (a third of 3 s left,
        # at most 0.3 s of jitter), so the two scrapes below see the same token.
        wait_for(lambda: endpoint.get("/readyz").status_code == 200, timeout=10)
        first, first_at = endpoint.samples(), time.time()
        time.sleep(0.25)  # let the time left visibly fall
        second, second_at = endpoint.samples(), time.time()
        held = document.read_text()

    # Time left: computed at scrape time, falling, and matching the token in the files.
    expiry = value(second, "refresher_token_expiry_timestamp_seconds", token="api")
    assert value(first, "refresher_token_expiry_timestamp_seconds", token="api") == expiry
    ttl_1 = value(first, "refresher_token_ttl_seconds", token="api")
    ttl_2 = value(second, "refresher_token_ttl_seconds", token="api")
    assert 0 < ttl_2 < ttl_1 <= 3
    assert ttl_1 - ttl_2 == pytest.approx(0.25, abs=0.2)
    assert ttl_2 == pytest.approx(expiry - second_at, abs=0.2)
    assert json.loads(held)["expires_at_epoch"] == pytest.approx(expiry, abs=0.001)
    claims = jwt.decode(raw.read_text(), options={"verify_signature": False})
    assert expiry == pytest.approx(claims["exp"], abs=1.0)
    assert first_at < value(second, "refresher_next_refresh_timestamp_seconds", token="api")
    assert value(second, "refresher_next_refresh_timestamp_seconds", token="api") < expiry
    last_success = value(second, "refresher_last_success_timestamp_seconds", token="api")
    assert first_at - 5 < last_success <= first_at

    # Counters: the two injected faults by reason, then one success.
    assert value(second, "refresher_refresh_attempts_total", token="api", outcome="failure") == 2
    assert value(second, "refresher_refresh_attempts_total", token="api", outcome="success") == 1
    failures = {
        s.labels["reason"]: s.value
        for s in select(second, "refresher_refresh_failures_total", token="api")
    }
    assert set(failures) == {reason.value for reason in Reason}  # every reason, from zero
    assert {r: n for r, n in failures.items() if n} == {"http_5xx": 1, "invalid_client": 1}
    assert value(second, "refresher_consecutive_failures", token="api") == 0
    assert value(second, "refresher_refresh_duration_seconds_count", token="api") == 3
    assert value(second, "refresher_write_window_seconds_count", token="api") == 1

    # Sinks: one series per sink, labelled with the place (never the token).
    sinks = {f"file:{raw}", f"file:{document}"}
    writes = select(second, "refresher_sink_writes_total", token="api")
    assert {s.labels["sink"] for s in writes} == sinks
    for sink in sinks:
        assert value(writes, "refresher_sink_writes_total", sink=sink, outcome="success") == 1
        assert value(writes, "refresher_sink_writes_total", sink=sink, outcome="failure") == 0
        assert value(second, "refresher_sink_write_duration_seconds_count", sink=sink) == 1

    # The other job has series of its own, labelled with its name.
    assert value(second, "refresher_refresh_attempts_total", token="other", outcome="success") == 1
    assert value(second, "refresher_token_ttl_seconds", token="other") > 50

    assert value(second, "refresher_leader") == 1
    assert value(second, "refresher_build_info", version=__version__) == 1

    # Every metric is there, and no label can carry a secret or an unbounded value.
    names = {s.name for s in second}
    assert names >= REQUIRED, REQUIRED - names
    tokens = [t.access_token for t in idp.issued + other_idp.issued]
    assert len(tokens) == 2
    for sample in first + second:
        if not sample.name.startswith("refresher_"):
            continue
        assert set(sample.labels) <= ALLOWED_LABELS, sample
        assert sample.labels.get("token", "api") in {"api", "other"}, sample
        assert sample.labels.get("outcome", "success") in {"success", "failure"}, sample
        for label in sample.labels.values():
            assert CLIENT_SECRET not in label and "SUPERSECRET" not in label
            assert not any(token in label or label in token for token in tokens), sample
            assert "?" not in label and "://" not in label, sample  # no URLs, no queries
            assert len(label) < 200, sample


def test_metrics_text_never_contains_a_token_or_the_secret(
    make_idp: Callable[..., LocalIdP], secret_file: Path, tmp_path: Path
) -> None:
    idp = make_idp("lucidworks", lifetime=3)
    token_file = tmp_path / "token"
    with running(config_of(job_for(idp, secret_file, token_file), metrics=METRICS_ON)) as daemon:
        endpoint = Endpoint(daemon)
        wait_for(lambda: len(idp.issued) >= 2, timeout=10)  # a refresh, not just the first
        response = endpoint.get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=")  # Prometheus text
    body = response.text
    assert "refresher_token_ttl_seconds{" in body
    assert CLIENT_SECRET not in body and "SUPERSECRET" not in body
    for token in idp.issued:
        assert token.access_token not in body
        assert token.access_token.split(".")[1] not in body  # not even the JWT's claims


def test_ttl_goes_negative_once_the_held_token_expires_and_readyz_fails_again(
    make_idp: Callable[..., LocalIdP], secret_file: Path, tmp_path: Path
) -> None:
    idp = make_idp("generic", lifetime=2)
    token_file = tmp_path / "token"
    with running(config_of(job_for(idp, secret_file, token_file), metrics=METRICS_ON)) as daemon:
        endpoint = Endpoint(daemon)
        wait_for(lambda: endpoint.get("/readyz").status_code == 200, timeout=10)
        idp.set_fault(Fault.SERVER_ERROR)
        expiry = daemon.snapshots()[0].expires_at
        assert expiry is not None

        def expired() -> bool:
            samples = endpoint.samples()
            return value(samples, "refresher_token_ttl_seconds", token="generic-job") < 0

        wait_for(expired, timeout=6, interval=0.05)
        samples = endpoint.samples()
        readyz, healthz = endpoint.get("/readyz"), endpoint.get("/healthz")

    # The held token is still the one that expired: failures never replace or drop it.
    assert value(samples, "refresher_token_expiry_timestamp_seconds", token="generic-job") == (
        pytest.approx(expiry)
    )
    assert value(samples, "refresher_consecutive_failures", token="generic-job") >= 1
    assert value(
        samples, "refresher_refresh_failures_total", token="generic-job", reason="http_5xx"
    ) == value(samples, "refresher_consecutive_failures", token="generic-job")
    assert readyz.status_code == 503 and "generic-job" in readyz.text
    assert healthz.status_code == 200  # alive: still retrying


def test_health_endpoints_and_unknown_paths(
    make_idp: Callable[..., LocalIdP], secret_file: Path, tmp_path: Path
) -> None:
    idp = make_idp("generic", lifetime=60)
    with running(
        config_of(job_for(idp, secret_file, tmp_path / "token"), metrics=METRICS_ON)
    ) as daemon:
        endpoint = Endpoint(daemon)
        wait_for(lambda: endpoint.get("/readyz").status_code == 200, timeout=10)
        healthz = endpoint.get("/healthz")
        assert (healthz.status_code, healthz.text) == (200, "ok\n")
        assert endpoint.get("/readyz").text == "ok\n"
        assert endpoint.get("/metrics?name[]=refresher_leader").status_code == 200
        for path in ("/", "/metric", "/metrics/x", "/healthz/", "/ready", "/debug/pprof"):
            response = endpoint.get(path)
            assert response.status_code == 404, path
            assert "refresher_" not in response.text


def test_leader_gauge_and_readyz_of_a_leader_and_a_follower(
    make_idp: Callable[..., LocalIdP], secret_file: Path, tmp_path: Path
) -> None:
    """Two replicas elect through a Lease on a local Kubernetes API: one leads, one follows."""
    from testdoubles.kubeapi import FakeKubeAPI

    idp = make_idp("lucidworks", lifetime=30)
    job = job_for(idp, secret_file, tmp_path / "token", name="api")
    fast = {"lease_duration": 2.0, "renew_deadline": 1.5, "retry_period": 0.25}

    def replica(identity: str, kube_api: FakeKubeAPI) -> Config:
        kubeconfig = kube_api.write_kubeconfig(tmp_path / f"kubeconfig-{identity}", namespace="ns")
        return config_of(
            job,
            metrics=METRICS_ON,
            kubernetes={"kubeconfig": str(kubeconfig), "request_timeout": 2},
            leader_election={"enabled": True, "identity": identity, **fast},
        )

    with FakeKubeAPI() as kube_api, running(replica("pod-a", kube_api)) as a:
        leader = Endpoint(a)
        # Leading and holding its token (a replica that has not won yet is ready as well).
        wait_for(lambda: a.is_leader and leader.get("/readyz").text == "ok\n", timeout=10)
        with running(replica("pod-b", kube_api)) as b:
            follower = Endpoint(b)

            # The follower is ready (it serves no token of its own) and, once it has read the
            # Lease, says whom it follows.
            def follows_a() -> bool:
                response = follower.get("/readyz")
                return response.status_code == 200 and "pod-a" in response.text

            wait_for(follows_a, timeout=10)
            follower_ready = follower.get("/readyz").text
            leading, following = leader.samples(), follower.samples()
    assert value(leading, "refresher_leader") == 1
    assert value(following, "refresher_leader") == 0
    assert "follower" in follower_ready and "pod-a" in follower_ready
    assert value(leading, "refresher_token_ttl_seconds", token="api") > 20
    assert not select(following, "refresher_token_ttl_seconds")  # never led: holds no token
    assert value(following, "refresher_build_info", version=__version__) == 1
    assert idp.token_requests == 1
