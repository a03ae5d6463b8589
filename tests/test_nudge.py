"""Nudging consumer pods after a Secret write (refresher/nudge.py, rule 14 of docs/design.md).

The pure part (`usage`: how a pod uses a Secret) is checked on pod JSON as the API serves it;
the rest runs a daemon against the Kubernetes API double with the real `kubernetes` client:
pods that mount the Secret are annotated after each write, pods a nudge cannot help are
warned about once, the rest are left alone, and nothing a nudge meets fails a refresh.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from refresher.config import validate
from refresher.daemon import Daemon
from refresher.errors import ConfigError
from refresher.nudge import ENV, FINGERPRINT_ANNOTATION, SUBPATH, usage
from testdoubles.idp import LocalIdP
from testdoubles.kubeapi import RBAC, FakeKubeAPI, Rule
from tests.conftest import (
    LogCapture,
    config_of,
    job_for,
    offline_job,
    running,
    wait_for,
)
from tests.conftest import (
    metric_value as _samples,
)

NS = "apps"
SECRET = "predict-token"
SELECTOR = "app=consumer"


# ----------------------------------------------------------------------------- pod shapes


def _container(name: str = "app", **fields: Any) -> dict[str, Any]:
    return {"name": name, "image": "consumer:1", **fields}


def _pod_spec(kind: str, secret: str = SECRET) -> dict[str, Any]:
    """A pod spec that uses `secret` the way `kind` says."""
    if kind == "volume":
        return {
            "volumes": [{"name": "token", "secret": {"secretName": secret}}],
            "containers": [_container(volumeMounts=[{"name": "token", "mountPath": "/t"}])],
        }
    if kind == "projected":
        sources = [{"configMap": {"name": "other"}}, {"secret": {"name": secret}}]
        return {
            "volumes": [{"name": "all", "projected": {"sources": sources}}],
            "containers": [_container(volumeMounts=[{"name": "all", "mountPath": "/p"}])],
        }
    if kind == "subpath":
        mount = {"name": "token", "mountPath": "/t/token", "subPath": "token"}
        return {
            "volumes": [{"name": "token", "secret": {"secretName": secret}}],
            "containers": [_container(volumeMounts=[mount])],
        }
    if kind == "env":
        ref = {"secretKeyRef": {"name": secret, "key": "token"}}
        return {"containers": [_container(env=[{"name": "TOKEN", "valueFrom": ref}])]}
    if kind == "envfrom":
        return {"containers": [_container(envFrom=[{"secretRef": {"name": secret}}])]}
    if kind == "unrelated":
        return {
            "volumes": [{"name": "other", "secret": {"secretName": "someone-elses"}}],
            "containers": [_container(volumeMounts=[{"name": "other", "mountPath": "/o"}])],
        }
    raise ValueError(kind)


@pytest.mark.parametrize(
    ("kind", "updated", "never"),
    [
        ("volume", True, ()),
        ("projected", True, ()),
        ("subpath", False, (SUBPATH,)),
        ("env", False, (ENV,)),
        ("envfrom", False, (ENV,)),
        ("unrelated", False, ()),
    ],
)
def test_how_a_pod_uses_the_secret(kind: str, updated: bool, never: tuple[str, ...]) -> None:
    found = usage({"spec": _pod_spec(kind)}, SECRET)
    assert (found.updated, found.never) == (updated, never)


def test_a_pod_that_mounts_it_both_ways_is_nudged_and_warned_about() -> None:
    spec = _pod_spec("volume")
    sidecar = _container("sidecar", restartPolicy="Always")  # an init container that runs on
    sidecar["volumeMounts"] = [{"name": "token", "mountPath": "/x", "subPath": "t"}]
    spec["initContainers"] = [sidecar]
    spec["containers"][0]["envFrom"] = [{"secretRef": {"name": SECRET}}]
    found = usage({"spec": spec}, SECRET)
    assert found.updated and found.never == (ENV, SUBPATH)
    # An ordinary init container has finished before any token changes.
    done = {"volumes": spec["volumes"], "containers": [_container()]}
    done["initContainers"] = [
        _container(
            "init",
            volumeMounts=[{"name": "token", "mountPath": "/x"}],
            envFrom=[{"secretRef": {"name": SECRET}}],
        )
    ]
    assert usage({"spec": done}, SECRET) == usage({}, SECRET)
    # A declared volume no container mounts: nothing to update, nothing to warn about.
    bare = {"volumes": [{"name": "token", "secret": {"secretName": SECRET}}], "containers": []}
    assert usage({"spec": bare}, SECRET) == usage({}, SECRET)


def test_what_counts_as_mounting_it() -> None:
    ephemeral = {
        "volumes": [{"name": "token", "secret": {"secretName": SECRET}}],
        "ephemeralContainers": [
            _container("debug", volumeMounts=[{"name": "token", "mountPath": "/t"}])
        ],
    }
    assert usage({"spec": ephemeral}, SECRET).updated
    expression = _pod_spec("volume")
    expression["containers"][0]["volumeMounts"][0]["subPathExpr"] = "$(POD)"
    assert usage({"spec": expression}, SECRET).never == (SUBPATH,)
    # A mount of a volume that holds another Secret, though named like ours.
    other = _pod_spec("volume", secret="someone-elses")
    assert not usage({"spec": other}, SECRET).updated
    # `items` that pick none of the sink's keys: the pod does not read the token.
    picked = _pod_spec("volume")
    picked["volumes"][0]["secret"]["items"] = [{"key": "ca.crt", "path": "ca.crt"}]
    assert usage({"spec": picked}, SECRET, keys={"token"}).updated is False
    picked["volumes"][0]["secret"]["items"].append({"key": "token", "path": "t"})
    assert usage({"spec": picked}, SECRET, keys={"token"}).updated


@pytest.mark.parametrize(
    ("selector", "ok"),
    [
        ("app=consumer", True),
        ("app=consumer,tier in (web, api),!canary", True),
        ("example.com/part-of!=batch", True),
        ("tier", True),
        ("replicas>1,replicas<3", True),
        ("", False),
        ("a..b/x=y", False),
        ("app\u00a0=x", False),
        ("   ", False),
        ("app=a b", False),
        ("app in (a b)", False),
        ("=x", False),
    ],
)
def test_the_selector_is_a_label_selector(tmp_path: Path, selector: str, ok: bool) -> None:
    sink = {"type": "kubernetes", "name": SECRET, "nudge": {"selector": selector}}
    job = offline_job(tmp_path, sinks=[sink])
    if ok:
        validate({"tokens": [job]})
        return
    with pytest.raises(ConfigError) as caught:
        validate({"tokens": [job]})
    (problem,) = caught.value.problems
    assert problem.startswith("tokens[0].sinks[0].nudge.selector"), problem


# --------------------------------------------------------------------- against the double

KINDS = ("volume", "projected", "subpath", "env", "unrelated")


@pytest.fixture
def kube() -> Iterator[FakeKubeAPI]:
    with FakeKubeAPI() as api:
        yield api


def _seed(kube: FakeKubeAPI) -> None:
    """One consumer pod of each kind, and one that mounts the Secret but is not selected."""
    for kind in KINDS:
        kube.add_pod(NS, f"{kind}-pod", labels={"app": "consumer"}, spec=_pod_spec(kind))
    kube.add_pod(NS, "not-selected", labels={"app": "other"}, spec=_pod_spec("volume"))


def _nudging_job(idp: LocalIdP, secret_file: Path, tmp_path: Path, **nudge: Any) -> dict[str, Any]:
    job = job_for(idp, secret_file, tmp_path / "token.file")
    job["sinks"] = [
        {
            "type": "kubernetes",
            "name": SECRET,
            "create": True,
            "nudge": {"selector": SELECTOR, **nudge},
        },
        {"type": "file", "path": str(tmp_path / "token.file")},  # written before the nudge starts
    ]
    return job


def _running(kube: FakeKubeAPI, tmp_path: Path, job: dict[str, Any]) -> Any:
    kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig", namespace=NS)
    config = config_of(job, kubernetes={"kubeconfig": str(kubeconfig), "request_timeout": 2})
    return running(config)


def _nudger_idle(daemon: Daemon) -> bool:
    sink = daemon.runners[0].sinks[0]
    nudger = getattr(sink, "nudger")  # noqa: B009 - the Secret sink's, typed as a Sink
    return bool(nudger.idle.wait(10))


def _annotation(kube: FakeKubeAPI, name: str) -> str | None:
    pod = kube.pod(NS, name)
    assert pod is not None
    return (pod["metadata"].get("annotations") or {}).get(FINGERPRINT_ANNOTATION)


@pytest.fixture
def idp(make_idp: Any) -> LocalIdP:
    return make_idp("lucidworks", lifetime=600)


def test_only_pods_that_mount_the_secret_are_annotated_after_each_write(
    idp: LocalIdP, secret_file: Path, tmp_path: Path, kube: FakeKubeAPI, all_logs: LogCapture
) -> None:
    _seed(kube)
    before = {
        name: kube.pod(NS, name)
        for name in ("subpath-pod", "env-pod", "unrelated-pod", "not-selected")
    }
    spec_before = (kube.pod(NS, "volume-pod") or {})["spec"]
    job = _nudging_job(idp, secret_file, tmp_path)
    with _running(kube, tmp_path, job) as daemon:
        runner = daemon.runners[0]
        for round_ in range(3):
            if round_:
                kube.clear_requests()
                runner.refresh_now()
            else:
                wait_for(lambda: runner.snapshot().ready)
            assert _nudger_idle(daemon)
            assert runner.token is not None
            fingerprint = runner.token.fingerprint
            assert _annotation(kube, "volume-pod") == fingerprint
            assert _annotation(kube, "projected-pod") == fingerprint
            if round_:
                # One list and one patch per pod that mounts it: the cost of a nudge; each
                # patch a JSON merge patch of our one annotation.
                assert kube.request_count("list", "pods") == 1
                assert kube.request_count("patch", "pods") == 2
                patches = [r for r in kube.requests if r.resource == "pods" and r.verb == "patch"]
                for patch in patches:
                    assert patch.headers["content-type"] == "application/merge-patch+json"
                    assert patch.json() == {
                        "metadata": {"annotations": {FINGERPRINT_ANNOTATION: fingerprint}}
                    }
        # The same token again (a sink write retried): pods that carry it are not patched.
        kube.clear_requests()
        nudger = daemon.runners[0].sinks[0].nudger  # type: ignore[attr-defined]
        nudger.nudge(runner.token)
        assert _nudger_idle(daemon)
        assert kube.request_count("list", "pods") == 1
        assert kube.request_count("patch", "pods") == 0
        # The others are exactly as they were (same resourceVersion: never written).
        for name, pod in before.items():
            now = kube.pod(NS, name)
            assert now is not None and pod is not None
            assert now["metadata"]["resourceVersion"] == pod["metadata"]["resourceVersion"], name
        # Nudged pods: only our annotation changed.
        volume = kube.pod(NS, "volume-pod")
        assert volume is not None and volume["spec"] == spec_before
        assert set(volume["metadata"]["annotations"]) == {FINGERPRINT_ANNOTATION}
        assert (
            _samples(daemon, "refresher_pod_nudges_total", token=job["name"], outcome="nudged") == 6
        )
        never = "refresher_consumers_never_updated"
        assert _samples(daemon, never, token=job["name"], reason="subpath") == 1
        assert _samples(daemon, never, token=job["name"], reason="env") == 1
    warnings = [line for line in all_logs.lines if "will never see a new token" in line]
    # Once per pod and reason (each line is captured in two formats), not once per refresh.
    assert len([w for w in warnings if "subpath-pod" in w]) == 2
    assert len([w for w in warnings if "env-pod" in w]) == 2
    assert not any("unrelated-pod" in line or "not-selected" in line for line in warnings)
    tokens = {token.access_token for token in idp.issued}
    assert not any(token in all_logs.text for token in tokens)


def test_the_nudge_starts_after_the_last_sink_write_and_never_holds_the_refresh(
    idp: LocalIdP, secret_file: Path, tmp_path: Path, kube: FakeKubeAPI
) -> None:
    _seed(kube)
    job = _nudging_job(idp, secret_file, tmp_path)
    with _running(kube, tmp_path, job) as daemon:
        runner = daemon.runners[0]
        wait_for(lambda: runner.snapshot().ready)
        assert _nudger_idle(daemon)
        # Pod requests are answered 1.5 s late: the refresh does not wait for them.
        kube.inject_delay(3, 1.5, resource="pods")
        started = time.monotonic()
        runner.refresh_now()
        took = time.monotonic() - started
        new = runner.token
        assert new is not None
        assert took < 1.5, took
        # When the pods were listed, the last sink (the file, after the Secret) held the token.
        assert _nudger_idle(daemon)
        listed = [r for r in kube.requests if r.resource == "pods" and r.verb == "list"]
        assert listed and listed[-1].received_at >= (tmp_path / "token.file").stat().st_mtime
        assert _annotation(kube, "volume-pod") == new.fingerprint


def test_pods_that_vanish_refuse_or_crawl_are_counted_and_never_fail_a_refresh(
    idp: LocalIdP, secret_file: Path, tmp_path: Path, kube: FakeKubeAPI, all_logs: LogCapture
) -> None:
    _seed(kube)
    job = _nudging_job(idp, secret_file, tmp_path, timeout="0.5s")
    name = job["name"]
    with _running(kube, tmp_path, job) as daemon:
        runner = daemon.runners[0]
        wait_for(lambda: runner.snapshot().ready)
        assert _nudger_idle(daemon)

        def refreshed() -> None:
            old = runner.token
            runner.refresh_now()
            assert runner.token is not old and runner.snapshot().ready
            assert runner.snapshot().consecutive_failures == 0
            assert _nudger_idle(daemon)

        # A pod deleted between the list and its patch: `gone`, quietly.
        kube.vanish_after_next_list(NS, ["projected-pod"])
        refreshed()
        assert _samples(daemon, "refresher_pod_nudges_total", token=name, outcome="gone") == 1
        # Patching forbidden (listing allowed): `forbidden`, logged.
        kube.rbac = RBAC(
            [
                Rule(frozenset({"get", "patch", "create", "update"}), "secrets", NS),
                Rule(frozenset({"list"}), "pods", NS),
            ]
        )
        refreshed()
        assert _samples(daemon, "refresher_pod_nudges_total", token=name, outcome="forbidden") == 1
        assert "cannot nudge a pod" in all_logs.text
        # Listing forbidden too: the nudge stops there, counted.
        kube.rbac = RBAC([Rule(frozenset({"get", "patch", "create", "update"}), "secrets", NS)])
        refreshed()
        assert (
            _samples(daemon, "refresher_pod_nudges_total", token=name, outcome="list_failed") == 1
        )
        # A pod API slower than the nudge's timeout: counted, the refresh unaffected.
        kube.rbac = None
        kube.inject_delay(1, 2.0, resource="pods")  # the list, answered after its timeout
        refreshed()
        assert (
            _samples(daemon, "refresher_pod_nudges_total", token=name, outcome="list_failed") == 2
        )
        # The API well again: the next write nudges again.
        refreshed()
        assert runner.token is not None
        assert _annotation(kube, "volume-pod") == runner.token.fingerprint


def test_status_lists_the_pods_a_nudge_cannot_help_and_once_waits_for_its_nudge(
    idp: LocalIdP, secret_file: Path, tmp_path: Path, kube: FakeKubeAPI
) -> None:
    from refresher.cli import never_updated_rows, run_once
    from refresher.metrics import Metrics

    _seed(kube)
    kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig", namespace=NS)
    job = _nudging_job(idp, secret_file, tmp_path)
    config = config_of(job, kubernetes={"kubeconfig": str(kubeconfig), "request_timeout": 2})
    rows = never_updated_rows(config)
    assert sorted((row[2], row[3].split(",")[0]) for row in rows) == [
        (f"{NS}/env-pod", "it reads the Secret into environment variables"),
        (f"{NS}/subpath-pod", "it mounts the Secret through subPath"),
    ]
    # `refresher once` (a CronJob) exits only once its write's nudge is done, even when the
    # pod list is slow to come.
    kube.inject_delay(1, 0.5, resource="pods")
    (runner,) = run_once(config, Metrics())
    assert runner.token is not None
    assert _annotation(kube, "volume-pod") == runner.token.fingerprint
    assert _annotation(kube, "projected-pod") == runner.token.fingerprint


def test_the_benchmark_counts_one_list_and_one_patch_per_pod() -> None:
    from tests.runproc import run_harness

    result, tables = run_harness(
        "bench.nudge", "--refreshes", "2", "--pods", "10", "--json", timeout=90
    )
    print("\n" + tables)
    plain, nudged = result["runs"]
    assert plain["calls_per_refresh"] == {"secret patches": 1, "pod lists": 0, "pod patches": 0}
    assert nudged["calls_per_refresh"] == {"secret patches": 1, "pod lists": 1, "pod patches": 10}
    for run in (plain, nudged):
        assert run["refreshes"] == 2 and run["write_window"]["count"] == 2
        assert run["stray_log_lines"] == 0
    assert nudged["answer_to_last_pod"]["count"] == 2


def test_a_stopping_daemon_sends_no_more_patches(
    idp: LocalIdP, secret_file: Path, tmp_path: Path, kube: FakeKubeAPI
) -> None:
    for index in range(10):
        kube.add_pod(NS, f"consumer-{index}", labels={"app": "consumer"}, spec=_pod_spec("volume"))
    job = _nudging_job(idp, secret_file, tmp_path, max_concurrent=1, timeout="5s")
    with _running(kube, tmp_path, job) as daemon:
        runner = daemon.runners[0]
        wait_for(lambda: runner.snapshot().ready)
        assert _nudger_idle(daemon)
        kube.clear_requests()
        kube.inject_delay(11, 0.5, resource="pods")  # the list and each patch: 0.5 s
        runner.refresh_now()
        wait_for(lambda: kube.request_count("patch", "pods") >= 1)
    # Stopped: the patches still queued are never sent (and nothing waits for them at exit).
    nudger = daemon.runners[0].sinks[0].nudger  # type: ignore[attr-defined]
    assert nudger.idle.wait(5)
    time.sleep(1.0)
    assert kube.request_count("patch", "pods") <= 3
