"""The Secret sink, through the real `kubernetes` client, against a local Kubernetes API."""

from __future__ import annotations

import base64
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from refresher.config import KubernetesSettings, KubernetesSinkConfig
from refresher.errors import Reason, RefreshError
from refresher.kube import Kube, connect
from refresher.localidp import LocalIdP
from refresher.sinks.kubernetes import KubernetesSecretSink
from refresher.tokens import Token
from testdoubles.kubeapi import RBAC, FakeKubeAPI, Rule
from tests.conftest import config_of, job_for, running, wait_for

NS = "tokens"
ROOT = Path(__file__).parent.parent


@pytest.fixture
def kube_api() -> Iterator[FakeKubeAPI]:
    with FakeKubeAPI() as api:
        yield api
        assert api.internal_errors == []


@pytest.fixture
def kubeconfig(kube_api: FakeKubeAPI, tmp_path: Path) -> Path:
    return kube_api.write_kubeconfig(tmp_path / "kubeconfig", namespace=NS)


@pytest.fixture
def kube(kubeconfig: Path) -> Kube:
    return connect(KubernetesSettings(kubeconfig=kubeconfig, request_timeout=5))


def secret_sink(kube: Kube, **config: Any) -> KubernetesSecretSink:
    config.setdefault("name", "api-token")
    return KubernetesSecretSink(
        KubernetesSinkConfig.model_validate({"type": "kubernetes", **config}), kube, job="job-a"
    )


def token(value: str = "opaque-token-1", lifetime: float = 3600, **kw: Any) -> Token:
    now = time.time()
    return Token(value, now, now + lifetime, scope="read", **kw)


def data_of(kube_api: FakeKubeAPI, name: str = "api-token", namespace: str = NS) -> dict[str, str]:
    secret = kube_api.get_object("secrets", namespace, name)
    assert secret is not None
    return {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}


def writes(kube_api: FakeKubeAPI) -> list[str]:
    return [f"{r.method} {r.path}" for r in kube_api.requests if r.method != "GET"]


def test_namespace_comes_from_the_kubeconfig_context(kube: Kube) -> None:
    assert kube.namespace == NS


def test_creates_a_missing_secret_when_allowed(kube: Kube, kube_api: FakeKubeAPI) -> None:
    sink = secret_sink(
        kube,
        create=True,
        authorization_key="authorization",
        expires_at_key="expires_at",
        fingerprint_key="fingerprint",
    )
    written = token(extras={"api_key": "k-1"})
    sink.write(written)
    secret = kube_api.get_object("secrets", NS, "api-token")
    assert secret is not None and secret["type"] == "Opaque"
    assert secret["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "refresher"}
    annotations = secret["metadata"]["annotations"]
    assert annotations["refresher.io/fingerprint"] == written.fingerprint
    assert (
        annotations["refresher.io/token-job"] == "job-a"
        and annotations["refresher.io/scope"] == "read"
    )
    assert written.access_token not in str(secret["metadata"])
    data = data_of(kube_api)
    assert (
        data["token"] == written.access_token
        and data["authorization"] == f"Bearer {written.access_token}"
    )
    assert data["api_key"] == "k-1" and data["expires_at"].endswith("Z")
    assert data["fingerprint"] == written.fingerprint  # for consumers that report a rejection


def test_missing_secret_without_create_names_it(kube: Kube) -> None:
    with pytest.raises(RefreshError) as caught:
        secret_sink(kube).write(token())
    assert caught.value.reason is Reason.SINK
    assert "secret 'api-token' in namespace 'tokens' does not exist" in caught.value.message
    assert "create: true" in caught.value.message


def test_updates_keep_foreign_keys_and_cost_one_request(kube: Kube, kube_api: FakeKubeAPI) -> None:
    kube_api.put_object(
        "secrets",
        NS,
        "api-token",
        {
            "metadata": {"name": "api-token", "annotations": {"team": "x"}},
            "data": {"other": "b3RoZXI="},
        },
    )
    sink = secret_sink(kube)
    assert sink.read(time.time()) is None  # start-up read: no token key yet
    for n in range(3):
        kube_api.clear_requests()
        sink.write(token(f"token-{n}"))
        assert len(kube_api.requests) == 1 and kube_api.requests[0].method == "PATCH"
    data = data_of(kube_api)
    assert data == {"other": "other", "token": "token-2"}
    annotations = kube_api.get_object("secrets", NS, "api-token")["metadata"]["annotations"]  # type: ignore[index]
    assert annotations["team"] == "x"
    # The write carried the resourceVersion as a precondition.
    assert b'"resourceVersion"' in kube_api.requests[0].body


def test_a_concurrent_writer_causes_a_conflict_then_a_reread(
    kube: Kube, kube_api: FakeKubeAPI
) -> None:
    sink = secret_sink(kube, create=True)
    sink.write(token("first"))
    kube_api.clear_requests()
    kube_api.inject_conflicts(2)
    sink.write(token("second"))
    methods = [r.method for r in kube_api.requests]
    assert methods == ["PATCH", "GET", "PATCH", "GET", "PATCH"]
    assert data_of(kube_api)["token"] == "second"
    secret = kube_api.get_object("secrets", NS, "api-token")
    assert secret is not None and "other-writer/touched" in secret["metadata"]["annotations"]


def test_forbidden_names_the_verb_secret_and_namespace(kube_api: FakeKubeAPI, kube: Kube) -> None:
    kube_api.rbac = RBAC([Rule(frozenset({"get"}), "secrets", NS, frozenset({"api-token"}))])
    kube_api.put_object("secrets", NS, "api-token", {"metadata": {"name": "api-token"}, "data": {}})
    with pytest.raises(RefreshError) as caught:
        secret_sink(kube).write(token())
    message = caught.value.message
    assert "RBAC does not allow `patch` on secret 'api-token' in namespace 'tokens'" in message
    assert 'cannot patch resource "secrets"' in message
    with pytest.raises(RefreshError, match="RBAC does not allow `get` on secret 'other'"):
        secret_sink(kube, name="other").read(time.time())


def test_reads_back_an_opaque_token_by_its_annotations(kube: Kube) -> None:
    sink = secret_sink(kube, create=True)
    written = token("opaque-xyz", lifetime=600)
    sink.write(written)
    back = secret_sink(kube).read(time.time())
    assert back is not None and back.access_token == "opaque-xyz"
    assert abs(back.expires_at - written.expires_at) < 0.002 and back.scope == "read"


def test_the_bearer_token_reaches_the_api_server(kube: Kube, kube_api: FakeKubeAPI) -> None:
    secret_sink(kube, create=True).write(token())
    assert kube_api.requests
    assert all(r.headers.get("authorization") == "Bearer fake-sa-token" for r in kube_api.requests)


def test_api_server_down_is_a_sink_failure(kube: Kube, kube_api: FakeKubeAPI) -> None:
    kube_api.stop()
    with pytest.raises(RefreshError, match="Kubernetes API unreachable") as caught:
        secret_sink(kube).write(token())
    assert caught.value.reason is Reason.SINK


def k8s_job(idp: LocalIdP, secret_file: Path, tmp_path: Path, **sink: Any) -> dict[str, Any]:
    job = job_for(idp, secret_file, tmp_path / "token")
    job["sinks"] = [{"type": "kubernetes", "name": "api-token", "create": True, **sink}]
    return job


def test_daemon_reuses_the_secret_on_restart_with_zero_idp_calls(
    make_idp: Callable[..., LocalIdP],
    secret_file: Path,
    tmp_path: Path,
    kubeconfig: Path,
    kube_api: FakeKubeAPI,
) -> None:
    idp = make_idp("lucidworks", lifetime=3600)
    config = config_of(
        k8s_job(idp, secret_file, tmp_path), kubernetes={"kubeconfig": str(kubeconfig)}
    )
    with running(config):
        wait_for(lambda: kube_api.get_object("secrets", NS, "api-token") is not None)
    assert idp.token_requests == 1
    first = data_of(kube_api)["token"]
    kube_api.clear_requests()
    with running(config) as daemon:
        wait_for(lambda: daemon.ready()[0])
        time.sleep(0.3)
    assert idp.token_requests == 1
    assert data_of(kube_api)["token"] == first
    assert [r.method for r in kube_api.requests] == ["GET"]  # one read, no write


def test_a_forbidden_secret_keeps_the_file_and_is_classified(
    make_idp: Callable[..., LocalIdP],
    secret_file: Path,
    tmp_path: Path,
    kubeconfig: Path,
    kube_api: FakeKubeAPI,
) -> None:
    kube_api.rbac = RBAC([Rule(frozenset({"get"}), "secrets", NS)])
    idp = make_idp("usage-engine", lifetime=3600)
    job = k8s_job(idp, secret_file, tmp_path)
    job["sinks"].insert(0, {"type": "file", "path": str(tmp_path / "token")})
    config = config_of(job, kubernetes={"kubeconfig": str(kubeconfig)})
    with running(config) as daemon:
        wait_for(lambda: daemon.runners[0].failures >= 2)
        runner = daemon.runners[0]
        assert runner.last_error is not None and runner.last_error.reason is Reason.SINK
        assert (tmp_path / "token").exists()
        assert not daemon.ready()[0]
        kube_api.rbac = None  # RBAC fixed: the pending Secret is written, no new token asked
        wait_for(lambda: daemon.ready()[0], timeout=10)
    assert idp.token_requests == 1
    assert data_of(kube_api)["token"] == (tmp_path / "token").read_text()


def test_file_only_setups_never_import_kubernetes(
    make_idp: Callable[..., LocalIdP], secret_file: Path, tmp_path: Path
) -> None:
    import yaml

    idp = make_idp("generic")
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {"tokens": [job_for(idp, secret_file, tmp_path / "t")], "metrics": {"enabled": False}}
        )
    )
    code = (
        "import sys; from refresher.cli import main; rc = main(['once', '-c', sys.argv[1]]);"
        "sys.exit(10 if 'kubernetes' in sys.modules else rc)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(config)],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "t").exists()


def _empty_secret(kube_api: FakeKubeAPI) -> None:
    kube_api.put_object("secrets", NS, "api-token", {"metadata": {"name": "api-token"}, "data": {}})


def _revoke_rbac_in_namespace(kube_api: FakeKubeAPI) -> None:
    everything = frozenset({"get", "list", "create", "update", "patch", "delete"})
    kube_api.rbac = RBAC([Rule(everything, "*", "elsewhere")])


def _restore_rbac(kube_api: FakeKubeAPI) -> None:
    kube_api.rbac = None


# (break the Secret sink, what its error says, fix it)
SECRET_TROUBLE = {
    "deleted": (
        lambda api: api.delete_object("secrets", NS, "api-token"),
        "secret 'api-token' in namespace 'tokens' does not exist",
        _empty_secret,
    ),
    "rbac-revoked": (
        _revoke_rbac_in_namespace,
        "RBAC does not allow `patch` on secret 'api-token' in namespace 'tokens'",
        _restore_rbac,
    ),
}


@pytest.mark.parametrize("trouble", list(SECRET_TROUBLE))
def test_a_broken_secret_fails_its_job_alone_and_it_recovers(
    trouble: str,
    make_idp: Callable[..., LocalIdP],
    secret_file: Path,
    tmp_path: Path,
    kubeconfig: Path,
    kube_api: FakeKubeAPI,
    all_logs: Any,
) -> None:
    break_it, says, fix_it = SECRET_TROUBLE[trouble]
    idp = make_idp("lucidworks", lifetime=3)
    broken = job_for(idp, secret_file, tmp_path / "unused", name="broken")
    broken["sinks"] = [{"type": "kubernetes", "name": "api-token"}]  # no create
    other = job_for(
        idp, secret_file, tmp_path / "other", name="other", scopes=["machinelearning.model"]
    )
    _empty_secret(kube_api)
    config = config_of(broken, other, kubernetes={"kubeconfig": str(kubeconfig)})
    with running(config) as daemon:
        runner, other_runner = daemon.runners
        wait_for(lambda: runner.snapshot().ready and other_runner.snapshot().ready)
        break_it(kube_api)
        wait_for(lambda: runner.failures >= 2, timeout=10)
        assert runner.last_error is not None and runner.last_error.reason is Reason.SINK
        assert says in runner.last_error.message
        assert says in all_logs.text
        failures = daemon.metrics.registry.get_sample_value(
            "refresher_refresh_failures_total", {"token": "broken", "reason": "sink"}
        )
        assert failures is not None and failures >= 2
        # The other job goes on refreshing on its own schedule, undisturbed.
        issued_other = sum(1 for t in idp.issued if "machinelearning.model" in t.scopes)
        wait_for(
            lambda: (
                sum(1 for t in idp.issued if "machinelearning.model" in t.scopes) > issued_other
            ),
            timeout=5,
        )
        assert other_runner.failures == 0
        # Fixed: the held token is written without asking the IdP again (one more request at
        # most: the held token may have reached its refresh point meanwhile).
        requests_before = len([t for t in idp.issued if "machinelearning.predict" in t.scopes])
        fix_it(kube_api)
        wait_for(lambda: runner.snapshot().ready, timeout=5)
    assert data_of(kube_api)["token"] == runner.token.access_token  # type: ignore[union-attr]
    assert (
        len([t for t in idp.issued if "machinelearning.predict" in t.scopes]) <= requests_before + 1
    )


@pytest.mark.parametrize("command", ["once", "status", "run"])
def test_no_kubernetes_client_config_is_one_line_and_exit_2(
    command: str, tmp_path: Path, secret_file: Path
) -> None:
    import subprocess
    import sys

    import yaml

    config = tmp_path / "c.yaml"
    job = {
        "name": "k",
        "token_url": "http://127.0.0.1:9/token",
        "client_id": "c",
        "client_secret": {"file": str(secret_file)},
        "sinks": [{"type": "kubernetes", "name": "api-token"}],
    }
    config.write_text(yaml.safe_dump({"tokens": [job], "metrics": {"enabled": False}}))
    root = Path(__file__).resolve().parent.parent
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(root)}
    result = subprocess.run(
        [sys.executable, "-m", "refresher", command, "-c", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "cannot load the client configuration" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_probes_verdict_is_noted_on_the_secret_and_cleared_by_the_next_token(
    kube: Kube, kube_api: FakeKubeAPI
) -> None:
    """A token the probe rejected at issue is noted in an annotation (rule 11), which a
    restarted process reads back; the next token's write removes the note."""
    sink = secret_sink(kube, create=True)
    first = token("opaque-token-1")
    sink.write(first)
    sink.mark_unprobeable(first)
    secret = kube_api.get_object("secrets", NS, "api-token")
    assert secret is not None
    assert secret["metadata"]["annotations"]["refresher.io/probe"] == "rejected-at-issue"
    read = secret_sink(kube).read(time.time())
    assert read is not None and read.unprobeable
    second = token("opaque-token-2")
    sink.write(second)
    secret = kube_api.get_object("secrets", NS, "api-token")
    assert secret is not None
    assert "refresher.io/probe" not in secret["metadata"]["annotations"]
    read = secret_sink(kube).read(time.time())
    assert read is not None and not read.unprobeable


def test_a_note_on_a_secret_someone_rewrote_meanwhile_is_dropped(
    kube: Kube, kube_api: FakeKubeAPI
) -> None:
    sink = secret_sink(kube, create=True)
    first = token("opaque-token-1")
    sink.write(first)
    secret_sink(kube).write(token("opaque-token-2"))  # another writer: a new resourceVersion
    sink.mark_unprobeable(first)  # conflicts: the Secret holds another token now
    secret = kube_api.get_object("secrets", NS, "api-token")
    assert secret is not None
    assert "refresher.io/probe" not in secret["metadata"]["annotations"]
