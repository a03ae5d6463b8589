"""Every replica serves (issue 15): a follower serves the token it watches in the leader's
Secret, and stops vouching for it once its watch has been broken past `api.max_staleness`.

Two daemons in this process elect a leader through a Lease on the local Kubernetes API
double, whose Secret watch streams events, expires them (410) and drops them on demand; the
real `kubernetes` client does the listing and watching.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import requests

from refresher.daemon import Daemon
from refresher.metrics import Metrics
from testdoubles.idp import LocalIdP
from testdoubles.kubeapi import FakeKubeAPI
from tests.conftest import LogCapture, config_of, job_for, wait_for

NS = "tokens"
FAST = {"lease_duration": 2.0, "renew_deadline": 1.5, "retry_period": 0.25}


@pytest.fixture
def kube_api() -> Iterator[FakeKubeAPI]:
    with FakeKubeAPI() as api:
        yield api


def _replica(
    idp: LocalIdP,
    secret_file: Path,
    tmp_path: Path,
    kube_api: FakeKubeAPI,
    identity: str,
    probe: bool = False,
    **api: Any,
) -> Daemon:
    kubeconfig = kube_api.write_kubeconfig(tmp_path / f"kubeconfig-{identity}", namespace=NS)
    job = job_for(idp, secret_file, tmp_path / f"unused-{identity}")
    if probe:
        job["probe"] = {"url": idp.protected_url}
    job["sinks"] = [{"type": "kubernetes", "name": "api-token", "create": True}]
    config = config_of(
        job,
        api={"enabled": True, "listen": "127.0.0.1:0", **api},
        kubernetes={"kubeconfig": str(kubeconfig), "request_timeout": 2},
        leader_election={"enabled": True, "namespace": NS, "identity": identity, **FAST},
    )
    return Daemon(config, metrics=Metrics())


def _get(daemon: Daemon) -> requests.Response:
    assert daemon.api is not None
    return requests.get(
        f"http://127.0.0.1:{daemon.api.port}/v1/tokens/{daemon.runners[0].job.name}", timeout=10
    )


def _served(daemon: Daemon) -> str | None:
    answer = _get(daemon)
    return answer.json()["access_token"] if answer.status_code == 200 else None


def test_a_follower_serves_the_leaders_token_within_moments_of_each_refresh(
    make_idp: Any, secret_file: Path, tmp_path: Path, kube_api: FakeKubeAPI, all_logs: LogCapture
) -> None:
    idp: LocalIdP = make_idp("lucidworks", lifetime=600)
    with ExitStack() as stack:
        first = _replica(idp, secret_file, tmp_path, kube_api, "one").start()
        stack.callback(first.stop)
        wait_for(lambda: first.is_leader and first.runners[0].snapshot().ready)
        second = _replica(idp, secret_file, tmp_path, kube_api, "two").start()
        stack.callback(second.stop)
        wait_for(lambda: _served(second) is not None)
        assert _served(second) == _served(first)
        assert idp.token_requests == 1  # the follower never asks the IdP
        for _ in range(3):
            first.runners[0].refresh_now()
            fresh = _served(first)
            wait_for(lambda fresh=fresh: _served(second) == fresh, timeout=5)
            assert idp.token_status(fresh or "") == "valid"
        assert idp.token_requests == 4
        assert kube_api.open_watches >= 2  # both replicas watch
        # The watch expires (410): it lists again and keeps serving.
        restarts = second.watches[second.runners[0].job.name].restarts
        kube_api.expire_watches()
        wait_for(lambda: second.watches[second.runners[0].job.name].restarts > restarts)
        first.runners[0].refresh_now()
        fresh = _served(first)
        wait_for(lambda: _served(second) == fresh, timeout=5)
        # Dropped connections: it reconnects and keeps serving.
        kube_api.drop_watches()
        first.runners[0].refresh_now()
        fresh = _served(first)
        wait_for(lambda: _served(second) == fresh, timeout=10)


def test_past_max_staleness_a_follower_answers_503_and_is_not_ready(
    make_idp: Any, secret_file: Path, tmp_path: Path, kube_api: FakeKubeAPI
) -> None:
    idp: LocalIdP = make_idp("lucidworks", lifetime=600)
    with ExitStack() as stack:
        leader = _replica(idp, secret_file, tmp_path, kube_api, "one").start()
        stack.callback(leader.stop)
        wait_for(lambda: leader.is_leader and leader.runners[0].snapshot().ready)
        follower = _replica(idp, secret_file, tmp_path, kube_api, "two", max_staleness="1s").start()
        stack.callback(follower.stop)
        wait_for(lambda: _served(follower) is not None)
        # The API server stops answering the follower's watch (and everything else).
        kube_api.inject_errors(10_000, status=503)
        kube_api.drop_watches()
        wait_for(lambda: _get(follower).status_code == 503, timeout=15)
        answer = _get(follower)
        assert "cannot vouch" in answer.json()["error"]
        assert "access_token" not in answer.text
        ready, why = follower.ready()
        assert not ready and "watch" in why
        # The API server is back: it serves again.
        kube_api.inject_errors(0)
        wait_for(lambda: _get(follower).status_code == 200, timeout=20)
        assert follower.ready()[0]


def test_a_report_made_to_a_follower_heals_the_token_through_the_leader(
    make_idp: Any, secret_file: Path, tmp_path: Path, kube_api: FakeKubeAPI
) -> None:
    from tests.conftest import rogue_request

    idp: LocalIdP = make_idp("lucidworks", lifetime=600)
    with ExitStack() as stack:
        leader = _replica(idp, secret_file, tmp_path, kube_api, "one", probe=True).start()
        stack.callback(leader.stop)
        wait_for(lambda: leader.is_leader and leader.runners[0].snapshot().ready)
        follower = _replica(idp, secret_file, tmp_path, kube_api, "two", probe=True).start()
        stack.callback(follower.stop)
        wait_for(lambda: _served(follower) is not None)
        dead = _served(follower)
        assert dead is not None
        rogue_request(idp)  # someone else's reissue: the token both replicas serve is dead
        assert idp.token_status(dead) == "revoked"
        assert follower.api is not None
        url = f"http://127.0.0.1:{follower.api.port}/v1/tokens/{follower.runners[0].job.name}"
        answer = requests.post(url + "/rejected", json={"fingerprint": _fp(dead)}, timeout=10)
        assert answer.status_code == 202
        assert answer.json()["outcome"] == "forwarded"
        wait_for(lambda: (_served(follower) or dead) != dead, timeout=10)
        healed = _served(follower)
        assert healed is not None and idp.token_status(healed) == "valid"
        assert _served(leader) == healed
        # The same report again: one write to the Secret per reported token, not per report.
        writes = kube_api.write_count("secrets")
        for _ in range(5):
            requests.post(url + "/rejected", json={"fingerprint": _fp(healed)}, timeout=10)
        assert kube_api.write_count("secrets") <= writes + 1


def _fp(token: str) -> str:
    from refresher.tokens import fingerprint

    return fingerprint(token)
