"""The Kubernetes API double (testdoubles/kubeapi.py), driven through the real client."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import http.client
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import urllib3
from kubernetes.client import (
    ApiClient,
    AuthenticationV1Api,
    CoordinationV1Api,
    CoreV1Api,
    V1Lease,
    V1LeaseSpec,
    V1ObjectMeta,
    V1Secret,
    V1TokenReview,
    V1TokenReviewSpec,
)
from kubernetes.client.exceptions import ApiException
from kubernetes.watch import Watch

from testdoubles.kubeapi import RBAC, ApiStatusError, FakeKubeAPI, Rule

NS = "default"
T = 5  # _request_timeout for every call
USER = "system:serviceaccount:default:refresher"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def status_of(error: ApiException) -> dict[str, Any]:
    """The parsed Status body of an error response."""
    body = json.loads(error.body)
    assert body["kind"] == "Status"
    assert body["code"] == error.status
    return body


@pytest.fixture
def kube() -> Iterator[FakeKubeAPI]:
    with FakeKubeAPI() as api:
        yield api
        assert api.internal_errors == []


def client_for(kube: FakeKubeAPI, tmp_path: Path, name: str = "kubeconfig") -> ApiClient:
    """An ApiClient built the way production code builds one."""
    path = kube.write_kubeconfig(tmp_path / name, namespace=NS)
    cfg = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=str(path), client_configuration=cfg)
    return ApiClient(cfg)


@pytest.fixture
def api_client(kube: FakeKubeAPI, tmp_path: Path) -> Iterator[ApiClient]:
    with client_for(kube, tmp_path) as client:
        yield client


@pytest.fixture
def core(api_client: ApiClient) -> CoreV1Api:
    return CoreV1Api(api_client)


@pytest.fixture
def coord(api_client: ApiClient) -> CoordinationV1Api:
    return CoordinationV1Api(api_client)


def seed_secret(kube: FakeKubeAPI, name: str = "tok", **data: str) -> dict[str, Any]:
    return kube.put_object(
        "secrets",
        NS,
        name,
        {"metadata": {"name": name}, "data": {k: b64(v) for k, v in data.items()}},
    )


def last_request(kube: FakeKubeAPI, method: str) -> Any:
    return [r for r in kube.requests if r.method == method][-1]


# --------------------------------------------------------------------------------------------
# Secrets: create, read, replace, patch
# --------------------------------------------------------------------------------------------


def test_create_and_read_secret_merges_string_data(kube: FakeKubeAPI, core: CoreV1Api) -> None:
    body = V1Secret(
        metadata=V1ObjectMeta(name="tok", labels={"app": "refresher"}),
        data={"a": b64("alpha")},
        string_data={"token": "s3cr3t"},
    )
    created = core.create_namespaced_secret(NS, body, _request_timeout=T)

    assert created.data == {"a": b64("alpha"), "token": b64("s3cr3t")}
    assert created.string_data is None
    assert created.type == "Opaque"
    assert created.kind == "Secret" and created.api_version == "v1"
    meta = created.metadata
    assert meta.namespace == NS and meta.uid and int(meta.resource_version) > 0
    assert isinstance(meta.creation_timestamp, dt.datetime)

    read = core.read_namespaced_secret("tok", NS, _request_timeout=T)
    assert read.data == created.data
    assert read.metadata.resource_version == meta.resource_version

    stored = kube.get_object("secrets", NS, "tok")
    assert stored is not None
    assert stored["data"]["token"] == b64("s3cr3t")  # base64, as on the wire
    assert "stringData" not in stored

    post = last_request(kube, "POST")
    assert post.path == f"/api/v1/namespaces/{NS}/secrets"
    assert post.headers["authorization"] == "Bearer fake-sa-token"
    # The generated client sends no Content-Type for POST/PUT; the API server assumes JSON.
    assert post.headers.get("content-type") in (None, "application/json")
    assert post.json()["stringData"] == {"token": "s3cr3t"}


def test_create_existing_secret_is_already_exists(kube: FakeKubeAPI, core: CoreV1Api) -> None:
    seed_secret(kube)
    with pytest.raises(ApiException) as caught:
        core.create_namespaced_secret(
            NS, {"metadata": {"name": "tok"}, "data": {}}, _request_timeout=T
        )
    assert caught.value.status == 409
    body = status_of(caught.value)
    assert body["reason"] == "AlreadyExists"
    assert body["message"] == 'secrets "tok" already exists'


def test_replace_and_stale_replace(kube: FakeKubeAPI, core: CoreV1Api) -> None:
    seed_secret(kube, other="keep")
    first = core.read_namespaced_secret("tok", NS, _request_timeout=T)
    first.data["token"] = b64("v1")
    replaced = core.replace_namespaced_secret("tok", NS, first, _request_timeout=T)
    assert int(replaced.metadata.resource_version) > int(first.metadata.resource_version)
    assert replaced.metadata.uid == first.metadata.uid

    # `first` still carries the old resourceVersion: a real 409.
    first.data["token"] = b64("v2")
    with pytest.raises(ApiException) as caught:
        core.replace_namespaced_secret("tok", NS, first, _request_timeout=T)
    assert caught.value.status == 409
    body = status_of(caught.value)
    assert body["reason"] == "Conflict"
    assert body["message"] == (
        'Operation cannot be fulfilled on secrets "tok": the object has been modified; '
        "please apply your changes to the latest version and try again"
    )
    assert body["details"] == {"name": "tok", "kind": "secrets"}

    # Without a resourceVersion the replace is unconditional.
    first.metadata.resource_version = None
    core.replace_namespaced_secret("tok", NS, first, _request_timeout=T)
    assert kube.get_object("secrets", NS, "tok")["data"]["token"] == b64("v2")


def test_noop_replace_keeps_resource_version(kube: FakeKubeAPI, core: CoreV1Api) -> None:
    seed_secret(kube, token="x")
    current = core.read_namespaced_secret("tok", NS, _request_timeout=T)
    again = core.replace_namespaced_secret("tok", NS, current, _request_timeout=T)
    assert again.metadata.resource_version == current.metadata.resource_version


def test_default_patch_is_strategic_merge_and_keeps_foreign_keys(
    kube: FakeKubeAPI, core: CoreV1Api
) -> None:
    seed_secret(kube, foreign="theirs", stale="old")
    patched = core.patch_namespaced_secret(
        "tok",
        NS,
        {"data": {"token": b64("new"), "stale": None}, "metadata": {"annotations": {"x": "1"}}},
        _request_timeout=T,
    )
    assert patched.data == {"foreign": b64("theirs"), "token": b64("new")}
    assert patched.metadata.annotations == {"x": "1"}
    assert last_request(kube, "PATCH").headers["content-type"] == (
        "application/strategic-merge-patch+json"
    )


def test_merge_patch_string_data_and_resource_version_precondition(
    kube: FakeKubeAPI, core: CoreV1Api
) -> None:
    seed_secret(kube, foreign="theirs")
    current = core.read_namespaced_secret("tok", NS, _request_timeout=T)
    rv = current.metadata.resource_version

    patched = core.patch_namespaced_secret(
        "tok",
        NS,
        {"metadata": {"resourceVersion": rv}, "stringData": {"token": "t1"}},
        _content_type="application/merge-patch+json",
        _request_timeout=T,
    )
    assert patched.data == {"foreign": b64("theirs"), "token": b64("t1")}
    assert last_request(kube, "PATCH").headers["content-type"] == "application/merge-patch+json"

    # The same precondition again is now stale.
    with pytest.raises(ApiException) as caught:
        core.patch_namespaced_secret(
            "tok",
            NS,
            {"metadata": {"resourceVersion": rv}, "stringData": {"token": "t2"}},
            _content_type="application/merge-patch+json",
            _request_timeout=T,
        )
    assert caught.value.status == 409
    assert "the object has been modified" in status_of(caught.value)["message"]
    assert kube.get_object("secrets", NS, "tok")["data"]["token"] == b64("t1")


def test_json_patch_with_list_body(kube: FakeKubeAPI, core: CoreV1Api) -> None:
    stored = seed_secret(kube, token="old")
    rv = stored["metadata"]["resourceVersion"]
    ops = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
        {"op": "replace", "path": "/data/token", "value": b64("new")},
        {"op": "add", "path": "/metadata/labels", "value": {"a": "b"}},
    ]
    patched = core.patch_namespaced_secret("tok", NS, ops, _request_timeout=T)
    assert patched.data["token"] == b64("new")
    assert patched.metadata.labels == {"a": "b"}
    assert last_request(kube, "PATCH").headers["content-type"] == "application/json-patch+json"

    # The "test" operation now fails: 422 like the API server.
    with pytest.raises(ApiException) as caught:
        core.patch_namespaced_secret("tok", NS, ops, _request_timeout=T)
    assert caught.value.status == 422
    assert "testing value /metadata/resourceVersion failed" in status_of(caught.value)["message"]


def test_explicit_json_patch_type_with_dict_body_becomes_strategic(
    kube: FakeKubeAPI, core: CoreV1Api
) -> None:
    seed_secret(kube)
    core.patch_namespaced_secret(
        "tok",
        NS,
        {"data": {"k": b64("v")}},
        _content_type="application/json-patch+json",
        _request_timeout=T,
    )
    # The client's REST layer rewrites json-patch+json with a non-list body.
    assert last_request(kube, "PATCH").headers["content-type"] == (
        "application/strategic-merge-patch+json"
    )


def test_unknown_patch_content_type_is_415(kube: FakeKubeAPI, core: CoreV1Api) -> None:
    seed_secret(kube)
    with pytest.raises(ApiException) as caught:
        core.patch_namespaced_secret(
            "tok", NS, {"data": {}}, _content_type="application/vnd.x+json", _request_timeout=T
        )
    assert caught.value.status == 415
    assert status_of(caught.value)["reason"] == "UnsupportedMediaType"


def test_validation_errors(kube: FakeKubeAPI, core: CoreV1Api) -> None:
    with pytest.raises(ApiException) as caught:
        core.create_namespaced_secret(NS, {"metadata": {"name": "Bad_Name"}}, _request_timeout=T)
    assert caught.value.status == 422
    assert status_of(caught.value)["message"].startswith(
        'Secret "Bad_Name" is invalid: metadata.name: Invalid value: "Bad_Name"'
    )

    with pytest.raises(ApiException) as caught:
        core.create_namespaced_secret(
            NS, {"metadata": {"name": "x"}, "data": {"k": "not base64!"}}, _request_timeout=T
        )
    assert caught.value.status == 400
    assert "illegal base64 data" in status_of(caught.value)["message"]

    with pytest.raises(ApiException) as caught:
        core.create_namespaced_secret(
            NS, {"metadata": {"name": "x", "namespace": "other"}}, _request_timeout=T
        )
    assert caught.value.status == 400
    assert status_of(caught.value)["reason"] == "BadRequest"


# --------------------------------------------------------------------------------------------
# Fault injection
# --------------------------------------------------------------------------------------------


def test_injected_conflict_then_success_after_reread(kube: FakeKubeAPI, core: CoreV1Api) -> None:
    seed_secret(kube, token="old")
    current = core.read_namespaced_secret("tok", NS, _request_timeout=T)
    kube.inject_conflicts(1)

    current.data["token"] = b64("mine")
    with pytest.raises(ApiException) as caught:
        core.replace_namespaced_secret("tok", NS, current, _request_timeout=T)
    assert caught.value.status == 409
    assert status_of(caught.value)["reason"] == "Conflict"

    fresh = core.read_namespaced_secret("tok", NS, _request_timeout=T)
    assert fresh.metadata.annotations["other-writer/touched"]
    assert int(fresh.metadata.resource_version) > int(current.metadata.resource_version)
    fresh.data["token"] = b64("mine")
    done = core.replace_namespaced_secret("tok", NS, fresh, _request_timeout=T)
    assert done.data["token"] == b64("mine")
    assert done.metadata.annotations["other-writer/touched"]  # the other writer's change kept
    assert kube.write_count("secrets") == 2
    assert kube.write_count("leases") == 0


def test_injected_conflict_does_not_affect_unconditional_merge_patch(
    kube: FakeKubeAPI, core: CoreV1Api
) -> None:
    seed_secret(kube, token="old")
    kube.inject_conflicts(1)
    patched = core.patch_namespaced_secret(
        "tok",
        NS,
        {"data": {"token": b64("new")}},
        _content_type="application/merge-patch+json",
        _request_timeout=T,
    )
    assert patched.data["token"] == b64("new")
    assert "other-writer/touched" in patched.metadata.annotations


def test_injected_errors(kube: FakeKubeAPI, core: CoreV1Api) -> None:
    seed_secret(kube)
    kube.inject_errors(1)
    with pytest.raises(ApiException) as caught:
        core.read_namespaced_secret("tok", NS, _request_timeout=T)
    assert caught.value.status == 500
    assert status_of(caught.value)["reason"] == "InternalError"
    assert core.read_namespaced_secret("tok", NS, _request_timeout=T).metadata.name == "tok"

    kube.inject_errors(1, status=429)
    with pytest.raises(ApiException) as caught:
        core.patch_namespaced_secret("tok", NS, {"data": {}}, _request_timeout=T)
    assert caught.value.status == 429
    assert caught.value.headers["Retry-After"] == "1"
    assert status_of(caught.value)["reason"] == "TooManyRequests"


def test_slow_response_times_out_with_a_urllib3_error(kube: FakeKubeAPI, core: CoreV1Api) -> None:
    seed_secret(kube)
    kube.inject_delay(1, 3)
    # Not an ApiException: timeouts surface as urllib3 errors.
    with pytest.raises(urllib3.exceptions.ReadTimeoutError):
        core.patch_namespaced_secret("tok", NS, {"data": {"a": b64("1")}}, _request_timeout=0.3)
    # The server applied the write although the client gave up waiting.
    assert kube.get_object("secrets", NS, "tok")["data"]["a"] == b64("1")


def test_urllib3_silently_retries_a_timed_out_put(kube: FakeKubeAPI, core: CoreV1Api) -> None:
    seed_secret(kube)
    current = core.read_namespaced_secret("tok", NS, _request_timeout=T)
    current.data = {"a": b64("1")}
    kube.inject_delay(1, 3)
    # urllib3's default Retry(3) re-sends PUT/DELETE (idempotent methods) after a read
    # timeout: the first PUT succeeded, so the caller sees its own retry's 409.
    with pytest.raises(ApiException) as caught:
        core.replace_namespaced_secret("tok", NS, current, _request_timeout=0.3)
    assert caught.value.status == 409
    assert [r.method for r in kube.requests].count("PUT") == 2
    assert kube.get_object("secrets", NS, "tok")["data"] == {"a": b64("1")}


# --------------------------------------------------------------------------------------------
# Errors: 404, 403, 401
# --------------------------------------------------------------------------------------------


def test_not_found(kube: FakeKubeAPI, core: CoreV1Api) -> None:
    for call in (
        lambda: core.read_namespaced_secret("nope", NS, _request_timeout=T),
        lambda: core.patch_namespaced_secret("nope", NS, {"data": {}}, _request_timeout=T),
        lambda: core.delete_namespaced_secret("nope", NS, _request_timeout=T),
        lambda: core.replace_namespaced_secret(
            "nope", NS, {"metadata": {"name": "nope"}}, _request_timeout=T
        ),
    ):
        with pytest.raises(ApiException) as caught:
            call()
        assert caught.value.status == 404
        body = status_of(caught.value)
        assert body["reason"] == "NotFound"
        assert body["message"] == 'secrets "nope" not found'
        assert body["details"] == {"name": "nope", "kind": "secrets"}


def test_unknown_path_is_404_status(kube: FakeKubeAPI) -> None:
    request = urllib.request.Request(
        f"{kube.url}/api/v1/namespaces/default/configmaps/x",
        headers={"Authorization": "Bearer fake-sa-token"},
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=T)
    assert caught.value.code == 404
    assert json.loads(caught.value.read())["reason"] == "NotFound"


def test_rbac_forbidden_messages(kube: FakeKubeAPI, tmp_path: Path) -> None:
    kube.rbac = RBAC(
        rules=[
            Rule(verbs=frozenset({"get"}), resource="secrets", namespace=NS),
            Rule(verbs=frozenset({"get", "update"}), resource="leases", namespace=NS),
        ]
    )
    seed_secret(kube)
    with client_for(kube, tmp_path) as client:
        core, coord = CoreV1Api(client), CoordinationV1Api(client)
        assert core.read_namespaced_secret("tok", NS, _request_timeout=T).metadata.name == "tok"

        with pytest.raises(ApiException) as caught:
            core.patch_namespaced_secret("tok", NS, {"data": {}}, _request_timeout=T)
        assert caught.value.status == 403
        body = status_of(caught.value)
        assert body["reason"] == "Forbidden"
        assert body["message"] == (
            f'secrets "tok" is forbidden: User "{USER}" cannot patch resource "secrets" '
            f'in API group "" in the namespace "{NS}"'
        )
        assert body["details"] == {"name": "tok", "kind": "secrets"}

        with pytest.raises(ApiException) as caught:
            core.list_namespaced_secret("kube-system", _request_timeout=T)
        assert status_of(caught.value)["message"] == (
            f'secrets is forbidden: User "{USER}" cannot list resource "secrets" '
            'in API group "" in the namespace "kube-system"'
        )

        with pytest.raises(ApiException) as caught:
            coord.create_namespaced_lease(
                NS, {"metadata": {"name": "leader"}, "spec": {}}, _request_timeout=T
            )
        assert caught.value.status == 403
        assert status_of(caught.value)["message"] == (
            f'leases.coordination.k8s.io is forbidden: User "{USER}" cannot create resource '
            f'"leases" in API group "coordination.k8s.io" in the namespace "{NS}"'
        )
        # 403 comes before 404, as authorization runs before the handler.
        with pytest.raises(ApiException) as caught:
            core.delete_namespaced_secret("missing", NS, _request_timeout=T)
        assert caught.value.status == 403


def test_rbac_resource_names(kube: FakeKubeAPI, tmp_path: Path) -> None:
    kube.rbac = RBAC(
        rules=[
            Rule(
                verbs=frozenset({"get", "list", "create", "patch"}),
                resource="secrets",
                namespace=NS,
                names=frozenset({"tok"}),
            )
        ]
    )
    seed_secret(kube, "tok")
    seed_secret(kube, "other")
    with client_for(kube, tmp_path) as client:
        core = CoreV1Api(client)
        core.read_namespaced_secret("tok", NS, _request_timeout=T)
        with pytest.raises(ApiException) as caught:
            core.read_namespaced_secret("other", NS, _request_timeout=T)
        assert caught.value.status == 403
        # A name-restricted rule never allows create (as in real RBAC)...
        with pytest.raises(ApiException) as caught:
            core.create_namespaced_secret(NS, {"metadata": {"name": "tok2"}}, _request_timeout=T)
        assert caught.value.status == 403
        assert "cannot create resource" in status_of(caught.value)["message"]
        # ...and allows list only when the field selector names an allowed object.
        listed = core.list_namespaced_secret(
            NS, field_selector="metadata.name=tok", _request_timeout=T
        )
        assert [s.metadata.name for s in listed.items] == ["tok"]
        with pytest.raises(ApiException):
            core.list_namespaced_secret(NS, _request_timeout=T)


def test_missing_or_wrong_token_is_401(kube: FakeKubeAPI, tmp_path: Path) -> None:
    seed_secret(kube)
    cfg = kubernetes.client.Configuration(host=kube.url)  # no token at all
    with ApiClient(cfg) as client, pytest.raises(ApiException) as caught:
        CoreV1Api(client).read_namespaced_secret("tok", NS, _request_timeout=T)
    assert caught.value.status == 401
    body = status_of(caught.value)
    assert body["reason"] == "Unauthorized" and body["message"] == "Unauthorized"
    assert "authorization" not in kube.requests[-1].headers  # recorded before the auth check

    with client_for(kube, tmp_path) as client:
        kube.token = "rotated"
        with pytest.raises(ApiException) as caught:
            CoreV1Api(client).read_namespaced_secret("tok", NS, _request_timeout=T)
    assert caught.value.status == 401


# --------------------------------------------------------------------------------------------
# Server-side apply
# --------------------------------------------------------------------------------------------


def apply_secret(core: CoreV1Api, data: dict[str, str], **kwargs: Any) -> V1Secret:
    return core.patch_namespaced_secret(
        "tok",
        NS,
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "tok"}, "data": data},
        field_manager="refresher",
        _content_type="application/apply-patch+yaml",
        _request_timeout=T,
        **kwargs,
    )


def test_server_side_apply_creates_updates_and_owns_fields(
    kube: FakeKubeAPI, core: CoreV1Api
) -> None:
    created = apply_secret(core, {"token": b64("t1"), "expiry": b64("1")})
    assert created.data == {"token": b64("t1"), "expiry": b64("1")}
    request = last_request(kube, "PATCH")
    assert request.headers["content-type"] == "application/apply-patch+yaml"
    assert request.query["fieldManager"] == ["refresher"]
    [entry] = created.metadata.managed_fields
    assert (entry.manager, entry.operation) == ("refresher", "Apply")
    assert entry.fields_v1 == {"f:data": {"f:expiry": {}, "f:token": {}}}

    # A foreign key added by someone else survives; a key dropped from the config is removed.
    core.patch_namespaced_secret("tok", NS, {"data": {"foreign": b64("x")}}, _request_timeout=T)
    updated = apply_secret(core, {"token": b64("t2")})
    assert updated.data == {"token": b64("t2"), "foreign": b64("x")}
    managers = {(m.manager, m.operation) for m in updated.metadata.managed_fields}
    assert managers == {("refresher", "Apply"), ("OpenAPI-Generator", "Update")}

    # Applying the same configuration again is a no-op.
    again = apply_secret(core, {"token": b64("t2")})
    assert again.metadata.resource_version == updated.metadata.resource_version


def test_server_side_apply_conflicts_and_force(kube: FakeKubeAPI, core: CoreV1Api) -> None:
    seed_secret(kube, token="from-harness")  # owned by manager "test-harness" (Update)
    with pytest.raises(ApiException) as caught:
        apply_secret(core, {"token": b64("mine")})
    assert caught.value.status == 409
    body = status_of(caught.value)
    assert body["reason"] == "Conflict"
    assert body["message"] == (
        'Apply failed with 1 conflict: conflict with "test-harness" using v1: .data.token'
    )
    forced = apply_secret(core, {"token": b64("mine")}, force=True)
    assert forced.data["token"] == b64("mine")
    owners = {m.manager: m.fields_v1 for m in forced.metadata.managed_fields}
    assert owners == {"test-harness": {"f:type": {}}, "refresher": {"f:data": {"f:token": {}}}}


def test_server_side_apply_requires_field_manager(kube: FakeKubeAPI, core: CoreV1Api) -> None:
    with pytest.raises(ApiException) as caught:
        core.patch_namespaced_secret(
            "tok",
            NS,
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "tok"}},
            _content_type="application/apply-patch+yaml",
            _request_timeout=T,
        )
    assert caught.value.status == 422  # what a real API server answers
    assert status_of(caught.value)["message"] == (
        'PatchOptions.meta.k8s.io "" is invalid: fieldManager: Required value: '
        "is required for apply patch"
    )
    assert kube.get_object("secrets", NS, "tok") is None


# --------------------------------------------------------------------------------------------
# Leases
# --------------------------------------------------------------------------------------------


class MicroTime(dt.datetime):
    """A datetime the client serializes as a metav1.MicroTime (exactly six fraction digits).

    The client serializes datetimes with ``isoformat()``, which the API server rejects for
    MicroTime fields when ``microsecond == 0`` or the datetime is naive.
    """

    def isoformat(self, sep: str = "T", timespec: str = "auto") -> str:
        return self.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    @classmethod
    def of(cls, value: dt.datetime) -> MicroTime:
        return cls.fromtimestamp(value.timestamp(), tz=dt.UTC)


def test_lease_create_get_replace_and_conflict(kube: FakeKubeAPI, coord: CoordinationV1Api) -> None:
    start = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    body = V1Lease(
        metadata=V1ObjectMeta(name="leader"),
        spec=V1LeaseSpec(
            holder_identity="pod-a",
            lease_duration_seconds=15,
            acquire_time=MicroTime.of(start),
            renew_time=MicroTime.of(start),
            lease_transitions=0,
        ),
    )
    created = coord.create_namespaced_lease(NS, body, _request_timeout=T)
    assert created.kind == "Lease" and created.api_version == "coordination.k8s.io/v1"
    assert kube.get_object("leases", NS, "leader")["spec"] == {
        "holderIdentity": "pod-a",
        "leaseDurationSeconds": 15,
        "acquireTime": "2024-01-01T00:00:00.000000Z",
        "renewTime": "2024-01-01T00:00:00.000000Z",
        "leaseTransitions": 0,
    }
    assert last_request(kube, "POST").path == (
        f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases"
    )

    lease = coord.read_namespaced_lease("leader", NS, _request_timeout=T)
    assert lease.spec.holder_identity == "pod-a"
    assert lease.spec.renew_time == start

    # Take over with the read resourceVersion; read-back datetimes must be re-wrapped.
    lease.spec.holder_identity = "pod-b"
    lease.spec.lease_transitions = 1
    lease.spec.acquire_time = MicroTime.of(lease.spec.acquire_time)
    lease.spec.renew_time = MicroTime.of(start + dt.timedelta(seconds=60, microseconds=500))
    taken = coord.replace_namespaced_lease("leader", NS, lease, _request_timeout=T)
    assert taken.spec.holder_identity == "pod-b"
    assert kube.get_object("leases", NS, "leader")["spec"]["renewTime"] == (
        "2024-01-01T00:01:00.000500Z"
    )

    # A second contender still holding the old resourceVersion loses.
    lease.spec.holder_identity = "pod-c"
    with pytest.raises(ApiException) as caught:
        coord.replace_namespaced_lease("leader", NS, lease, _request_timeout=T)
    assert caught.value.status == 409
    body_ = status_of(caught.value)
    assert body_["message"].startswith(
        'Operation cannot be fulfilled on leases.coordination.k8s.io "leader": '
        "the object has been modified"
    )
    assert body_["details"] == {
        "name": "leader",
        "group": "coordination.k8s.io",
        "kind": "leases",
    }


def test_lease_merge_patch_keeps_microtime_strings(
    kube: FakeKubeAPI, coord: CoordinationV1Api
) -> None:
    stored = kube.put_object("leases", NS, "leader", {"spec": {"holderIdentity": "pod-a"}})
    # PATCH bodies stay dicts (create/replace bodies are coerced into models).
    patched = coord.patch_namespaced_lease(
        "leader",
        NS,
        {
            "metadata": {"resourceVersion": stored["metadata"]["resourceVersion"]},
            "spec": {"holderIdentity": "pod-b", "renewTime": "2024-01-01T00:00:00.000000Z"},
        },
        _content_type="application/merge-patch+json",
        _request_timeout=T,
    )
    assert patched.spec.holder_identity == "pod-b"
    assert kube.get_object("leases", NS, "leader")["spec"]["renewTime"] == (
        "2024-01-01T00:00:00.000000Z"
    )


def test_lease_microtime_must_have_six_fraction_digits(
    kube: FakeKubeAPI, coord: CoordinationV1Api
) -> None:
    # Plain datetimes (and even dict bodies: create/replace coerce them into models) are sent
    # with isoformat(): "2024-01-01T00:00:00+00:00" when microsecond == 0, no zone when naive.
    for renew in (dt.datetime(2024, 1, 1, tzinfo=dt.UTC), "2024-01-01T00:00:00.000000Z"):
        body = {"metadata": {"name": "leader"}, "spec": {"holderIdentity": "a", "renewTime": renew}}
        with pytest.raises(ApiException) as caught:
            coord.create_namespaced_lease(NS, body, _request_timeout=T)
        assert caught.value.status == 400
        assert status_of(caught.value)["message"] == (
            'Lease in version "v1" cannot be handled as a Lease: parsing time '
            '"2024-01-01T00:00:00+00:00" as "2006-01-02T15:04:05.000000Z07:00": '
            'cannot parse "+00:00" as ".000000"'
        )
    assert kube.get_object("leases", NS, "leader") is None


def test_lease_delete_and_preconditions(kube: FakeKubeAPI, coord: CoordinationV1Api) -> None:
    created = kube.put_object(
        "leases", NS, "leader", {"metadata": {"name": "leader"}, "spec": {"holderIdentity": "a"}}
    )
    with pytest.raises(ApiException) as caught:
        coord.delete_namespaced_lease(
            "leader",
            NS,
            body={"preconditions": {"resourceVersion": "1"}},
            _request_timeout=T,
        )
    assert caught.value.status == 409
    status = coord.delete_namespaced_lease(
        "leader",
        NS,
        body={"preconditions": {"uid": created["metadata"]["uid"]}},
        _request_timeout=T,
    )
    assert status["kind"] == "Status" and status["status"] == "Success"  # client 37: a dict
    assert kube.get_object("leases", NS, "leader") is None


# --------------------------------------------------------------------------------------------
# Lists, direct access, concurrency
# --------------------------------------------------------------------------------------------


def test_list_with_label_selector(kube: FakeKubeAPI, core: CoreV1Api) -> None:
    for name, app in (("a", "x"), ("b", "y"), ("c", "x")):
        kube.put_object("secrets", NS, name, {"metadata": {"name": name, "labels": {"app": app}}})
    kube.put_object("secrets", "elsewhere", "d", {"metadata": {"labels": {"app": "x"}}})
    listed = core.list_namespaced_secret(NS, label_selector="app=x", _request_timeout=T)
    assert [s.metadata.name for s in listed.items] == ["a", "c"]
    assert int(listed.metadata.resource_version) > 0


def test_out_of_band_writes_make_client_copies_stale(kube: FakeKubeAPI, core: CoreV1Api) -> None:
    seed_secret(kube, token="a")
    mine = core.read_namespaced_secret("tok", NS, _request_timeout=T)
    kube.put_object("secrets", NS, "tok", {"data": {"token": b64("b")}})
    with pytest.raises(ApiException) as caught:
        core.replace_namespaced_secret("tok", NS, mine, _request_timeout=T)
    assert caught.value.status == 409

    kube.delete_object("secrets", NS, "tok")
    with pytest.raises(ApiException) as caught:
        core.read_namespaced_secret("tok", NS, _request_timeout=T)
    assert caught.value.status == 404


def test_concurrent_patches_are_serialized(kube: FakeKubeAPI, core: CoreV1Api) -> None:
    seed_secret(kube)
    errors: list[BaseException] = []

    def writer(index: int) -> None:
        try:
            for round_ in range(5):
                core.patch_namespaced_secret(
                    "tok",
                    NS,
                    {"data": {f"k{index}-{round_}": b64("v")}},
                    _request_timeout=T,
                )
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert len(kube.get_object("secrets", NS, "tok")["data"]) == 30
    assert kube.write_count("secrets") == 30


# --------------------------------------------------------------------------------------------
# Lifecycle (the shared loopback base, refresher.loopback)
# --------------------------------------------------------------------------------------------


def test_stop_is_prompt_and_a_restart_serves_the_same_url(
    kube: FakeKubeAPI, core: CoreV1Api
) -> None:
    seed_secret(kube)
    url = kube.url
    path = f"/api/v1/namespaces/{NS}/secrets/tok"
    kept_alive = http.client.HTTPConnection(kube.host, kube.port, timeout=T)
    kept_alive.request("GET", path, headers={"Authorization": "Bearer fake-sa-token"})
    answer = kept_alive.getresponse()
    answer.read()
    assert answer.status == 200 and not answer.will_close  # HTTP/1.1 keep-alive
    assert answer.getheader("Server") == "fake-kube-api"  # no Python version in it

    kube.inject_delay(1, 30)
    outcome: list[object] = []

    def slow_read() -> None:
        try:
            outcome.append(core.read_namespaced_secret("tok", NS, _request_timeout=T))
        except Exception as error:
            outcome.append(error)

    reader = threading.Thread(target=slow_read)
    reader.start()
    deadline = time.monotonic() + T
    while len(kube.requests) < 2:  # the slow read has arrived and waits out its delay
        assert time.monotonic() < deadline
        time.sleep(0.01)
    started = time.monotonic()
    kube.stop()
    assert time.monotonic() - started < 1.0  # the delayed response does not hold it up
    reader.join(timeout=T)
    assert outcome and isinstance(outcome[0], Exception)
    assert kept_alive.sock is not None
    assert kept_alive.sock.recv(1) == b""  # the kept-alive connection was closed by stop()
    kept_alive.close()
    with pytest.raises(RuntimeError, match="not running"):
        _ = kube.url

    kube.start()
    assert kube.url == url
    assert core.read_namespaced_secret("tok", NS, _request_timeout=T).metadata.name == "tok"


# --------------------------------------------------------------------------------------------
# Watches (issue 15): list, then watch from the list's resourceVersion
# --------------------------------------------------------------------------------------------

WATCH_READ_TIMEOUT = 10  # above every timeout_seconds below: an idle stream is not a timeout


@contextlib.contextmanager
def watching(core: CoreV1Api, **kwargs: Any) -> Iterator[Iterator[dict[str, Any]]]:
    """The real client's watch of Secrets in NS; ends after 5 s unless told otherwise."""
    kwargs.setdefault("timeout_seconds", 5)
    stream = Watch().stream(
        core.list_namespaced_secret, NS, _request_timeout=(T, WATCH_READ_TIMEOUT), **kwargs
    )
    with contextlib.closing(stream):
        yield stream


def seen(event: dict[str, Any]) -> tuple[str, str, str]:
    raw = event["raw_object"]
    return event["type"], raw["metadata"]["name"], raw["metadata"]["resourceVersion"]


def raw_watch(kube: FakeKubeAPI, query: str) -> tuple[http.client.HTTPResponse, Any]:
    connection = http.client.HTTPConnection(kube.host, kube.port, timeout=T)
    connection.request(
        "GET",
        f"/api/v1/namespaces/{NS}/secrets?{query}",
        headers={"Authorization": "Bearer fake-sa-token"},
    )
    return connection.getresponse(), connection


def test_list_then_watch_streams_every_later_change_in_order(
    kube: FakeKubeAPI, core: CoreV1Api
) -> None:
    seed_secret(kube, "tok", token="v1")
    seed_secret(kube, "other")
    listed = core.list_namespaced_secret(NS, field_selector="metadata.name=tok", _request_timeout=T)
    assert [s.metadata.name for s in listed.items] == ["tok"]
    rv = listed.metadata.resource_version
    assert rv == str(max(int(s["metadata"]["resourceVersion"]) for s in kube_secrets(kube)))

    # Changes between the list and the watch are not lost: the watch resumes from rv.
    patched = core.patch_namespaced_secret(
        "tok", NS, {"data": {"token": b64("v2")}}, _request_timeout=T
    )
    kube.put_object("secrets", NS, "other", {"data": {"x": b64("filtered out")}})
    patched.data["token"] = b64("v3")
    replaced = core.replace_namespaced_secret("tok", NS, patched, _request_timeout=T)
    applied = apply_secret(core, {"token": b64("v4")}, force=True)

    with watching(core, field_selector="metadata.name=tok", resource_version=rv) as stream:
        history = [next(stream) for _ in range(3)]
        assert [seen(e) for e in history] == [
            ("MODIFIED", "tok", patched.metadata.resource_version),
            ("MODIFIED", "tok", replaced.metadata.resource_version),
            ("MODIFIED", "tok", applied.metadata.resource_version),
        ]
        secret = history[-1]["object"]
        assert isinstance(secret, V1Secret) and secret.data["token"] == b64("v4")
        assert history[-1]["raw_object"]["kind"] == "Secret"
        assert kube.open_watches == 1

        # Live: every write path is an event, in order; the other Secret never shows.
        core.delete_namespaced_secret("tok", NS, _request_timeout=T)
        deleted = next(stream)
        assert deleted["type"] == "DELETED"
        assert deleted["object"].data["token"] == b64("v4")  # the last state...
        assert int(deleted["object"].metadata.resource_version) > int(
            applied.metadata.resource_version
        )  # ...at the deletion's resourceVersion
        kube.put_object("secrets", NS, "other", {"data": {}})
        core.create_namespaced_secret(NS, {"metadata": {"name": "tok"}}, _request_timeout=T)
        kube.put_object("secrets", NS, "tok", {"data": {"token": b64("v5")}})
        kube.delete_object("secrets", NS, "tok")
        live = [seen(next(stream)) for _ in range(3)]
        assert [kind for kind, _, _ in live] == ["ADDED", "MODIFIED", "DELETED"]
        versions = [int(v) for _, _, v in live]
        assert versions == sorted(versions) and len(set(versions)) == 3

    request = [r for r in kube.requests if r.query.get("watch")][-1]
    assert request.query["watch"] == ["true"]
    assert request.query["resourceVersion"] == [rv]
    assert request.query["fieldSelector"] == ["metadata.name=tok"]
    assert kube.wait_for_watches(0)


def kube_secrets(kube: FakeKubeAPI) -> list[dict[str, Any]]:
    return [kube.get_object("secrets", NS, name) or {} for name in ("tok", "other")]


def test_watch_without_resource_version_starts_with_the_current_objects(
    kube: FakeKubeAPI, core: CoreV1Api
) -> None:
    for name, app in (("a", "x"), ("b", "x"), ("c", "y")):
        kube.put_object("secrets", NS, name, {"metadata": {"labels": {"app": app}}})
    kube.put_object("secrets", "elsewhere", "d", {"metadata": {"labels": {"app": "x"}}})
    with watching(core, label_selector="app=x") as stream:
        assert [seen(next(stream))[:2] for _ in range(2)] == [("ADDED", "a"), ("ADDED", "b")]
        # An object that stops (starts) matching the selector is a DELETED (ADDED) event.
        kube.put_object("secrets", NS, "b", {"metadata": {"labels": {"app": "y"}}})
        kube.put_object("secrets", NS, "c", {"metadata": {"labels": {"app": "x"}}})
        assert [seen(next(stream))[:2] for _ in range(2)] == [("DELETED", "b"), ("ADDED", "c")]
    with watching(core, field_selector="metadata.name=c", resource_version="0") as stream:
        assert seen(next(stream))[:2] == ("ADDED", "c")


def test_watch_wire_format_and_timeout_seconds_end_the_stream_cleanly(
    kube: FakeKubeAPI,
) -> None:
    seed_secret(kube, "tok")
    started = time.monotonic()
    response, connection = raw_watch(
        kube, "watch=1&fieldSelector=metadata.name%3Dtok&timeoutSeconds=1"
    )
    assert response.status == 200
    assert response.getheader("Content-Type") == "application/json"
    assert response.getheader("Transfer-Encoding") == "chunked"
    body = response.read()  # returns at the last chunk: the server ended the stream
    elapsed = time.monotonic() - started
    assert 0.9 < elapsed < 3
    [line] = body.decode().splitlines()
    event = json.loads(line)
    assert event["type"] == "ADDED" and event["object"]["metadata"]["name"] == "tok"
    assert event["object"]["kind"] == "Secret" and event["object"]["apiVersion"] == "v1"
    # A clean end keeps the connection: the next request goes over it.
    connection.request(
        "GET",
        f"/api/v1/namespaces/{NS}/secrets/tok",
        headers={"Authorization": "Bearer fake-sa-token"},
    )
    again = connection.getresponse()
    assert again.status == 200 and json.loads(again.read())["metadata"]["name"] == "tok"
    connection.close()
    assert kube.open_watches == 0


def test_the_client_generator_ends_after_timeout_seconds(
    kube: FakeKubeAPI, core: CoreV1Api
) -> None:
    started = time.monotonic()
    with watching(core, field_selector="metadata.name=nothing", timeout_seconds=1) as stream:
        assert list(stream) == []
    assert 0.9 < time.monotonic() - started < 3
    assert kube.wait_for_watches(0)


def test_a_watch_from_a_compacted_resource_version_is_expired(
    kube: FakeKubeAPI, core: CoreV1Api
) -> None:
    seed_secret(kube, "tok")
    rv = core.list_namespaced_secret(NS, _request_timeout=T).metadata.resource_version
    kube.compact_history()
    floor = int(rv) + 1

    # The real server answers 200 and one ERROR event; the client raises it as a 410.
    with watching(core, resource_version=rv) as stream, pytest.raises(ApiException) as caught:
        next(stream)
    assert caught.value.status == 410
    assert caught.value.reason == f"Expired: too old resource version: {rv} ({floor})"
    assert caught.value.body is None
    response, connection = raw_watch(kube, f"watch=true&resourceVersion={rv}")
    assert response.status == 200
    [line] = response.read().decode().splitlines()
    connection.close()
    assert json.loads(line) == {
        "type": "ERROR",
        "object": {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": f"too old resource version: {rv} ({floor})",
            "reason": "Expired",
            "code": 410,
        },
    }

    # Optionally an HTTP 410 with a Status body instead.
    kube.expired_watch_as_http_410 = True
    with watching(core, resource_version=rv) as stream, pytest.raises(ApiException) as caught:
        next(stream)
    assert caught.value.status == 410
    assert status_of(caught.value)["reason"] == "Expired"
    assert status_of(caught.value)["message"] == f"too old resource version: {rv} ({floor})"
    kube.expired_watch_as_http_410 = False

    # Re-list, and watch from the new resourceVersion: that one is served.
    relisted = core.list_namespaced_secret(NS, _request_timeout=T)
    assert relisted.metadata.resource_version == str(floor)
    with watching(core, resource_version=relisted.metadata.resource_version) as stream:
        kube.put_object("secrets", NS, "tok", {"data": {"k": b64("v")}})
        assert seen(next(stream))[:2] == ("MODIFIED", "tok")


def test_the_history_is_bounded(kube: FakeKubeAPI, core: CoreV1Api) -> None:
    kube.watch_history = 3
    rv = int(core.list_namespaced_secret(NS, _request_timeout=T).metadata.resource_version)
    for index in range(4):
        seed_secret(kube, f"s{index}")  # rv+1 .. rv+4; rv+2 .. rv+4 are kept
    with watching(core, resource_version=str(rv)) as stream, pytest.raises(ApiException) as caught:
        next(stream)
    assert caught.value.status == 410
    assert caught.value.reason == f"Expired: too old resource version: {rv} ({rv + 1})"
    with watching(core, resource_version=str(rv + 1)) as stream:
        assert [seen(next(stream))[1] for _ in range(3)] == ["s1", "s2", "s3"]
    # An RV ahead of the server's is refused too (the real server first waits ~3 s).
    with (
        watching(core, resource_version=str(rv + 100)) as stream,
        pytest.raises(ApiException) as caught,
    ):
        next(stream)
    assert caught.value.status == 504


def test_expire_watches_sends_an_in_stream_410(kube: FakeKubeAPI, core: CoreV1Api) -> None:
    seed_secret(kube, "tok")
    with watching(core, field_selector="metadata.name=tok") as stream:
        assert seen(next(stream))[0] == "ADDED"
        assert kube.expire_watches() == 1
        with pytest.raises(ApiException) as caught:
            next(stream)
    assert caught.value.status == 410
    assert caught.value.reason.startswith("Expired: too old resource version: ")
    assert kube.wait_for_watches(0)

    # Without timeout_seconds the client first retries once, silently, from the last RV it
    # saw: that one is expired too (the history was compacted), so the client raises.
    rv = core.list_namespaced_secret(NS, _request_timeout=T).metadata.resource_version
    kube.clear_requests()
    stream = Watch().stream(
        core.list_namespaced_secret,
        NS,
        resource_version=rv,
        _request_timeout=(T, WATCH_READ_TIMEOUT),
    )
    with contextlib.closing(stream):
        kube.put_object("secrets", NS, "tok", {"data": {"k": b64("v")}})
        assert seen(next(stream))[0] == "MODIFIED"
        kube.expire_watches()
        with pytest.raises(ApiException) as caught:
            next(stream)
    assert caught.value.status == 410
    assert [r.query["resourceVersion"] for r in kube.requests] == [
        [rv],
        [kube.get_object("secrets", NS, "tok")["metadata"]["resourceVersion"]],
    ]


def test_a_dropped_watch_breaks_the_stream_and_loses_nothing(
    kube: FakeKubeAPI, core: CoreV1Api
) -> None:
    seed_secret(kube, "tok")
    with watching(core, field_selector="metadata.name=tok") as stream:
        last = seen(next(stream))[2]
        assert kube.wait_for_watches(1)
        assert kube.drop_watches() == 1
        with pytest.raises(urllib3.exceptions.ProtocolError):
            next(stream)
    assert kube.wait_for_watches(0)
    kube.put_object("secrets", NS, "tok", {"data": {"k": b64("while away")}})
    with watching(core, field_selector="metadata.name=tok", resource_version=last) as stream:
        event = next(stream)
        assert event["type"] == "MODIFIED" and event["object"].data == {"k": b64("while away")}


def test_stop_ends_open_watches_promptly(kube: FakeKubeAPI, core: CoreV1Api) -> None:
    seed_secret(kube, "tok")
    with watching(core, field_selector="metadata.name=tok", timeout_seconds=30) as stream:
        last = seen(next(stream))[2]
        assert kube.wait_for_watches(1)
        started = time.monotonic()
        kube.stop()
        assert time.monotonic() - started < 1.0
        with pytest.raises(urllib3.exceptions.ProtocolError):
            next(stream)
    kube.start()  # same port, same objects and resourceVersions
    assert kube.open_watches == 0
    kube.put_object("secrets", NS, "tok", {"data": {"k": b64("after restart")}})
    with watching(core, field_selector="metadata.name=tok", resource_version=last) as stream:
        assert seen(next(stream))[0] == "MODIFIED"


def test_a_client_that_leaves_ends_its_watch(kube: FakeKubeAPI, core: CoreV1Api) -> None:
    with watching(core, field_selector="metadata.name=tok") as stream:
        kube.put_object("secrets", NS, "tok", {})
        next(stream)
        assert kube.open_watches == 1
    assert kube.wait_for_watches(0, timeout=2)  # noticed without a write to send


def test_bookmarks_only_when_asked_for(kube: FakeKubeAPI, core: CoreV1Api) -> None:
    seed_secret(kube, "tok")
    rv = core.list_namespaced_secret(NS, _request_timeout=T).metadata.resource_version
    with (
        watching(core, resource_version=rv, allow_watch_bookmarks=True) as with_bookmarks,
        watching(core, resource_version=rv) as without,
    ):
        kube.put_object("secrets", NS, "tok", {"data": {"k": b64("1")}})
        # The client's generator sends its request at the first next().
        assert seen(next(with_bookmarks))[0] == seen(next(without))[0] == "MODIFIED"
        kube.compact_history()  # moves the resourceVersion on
        assert kube.send_bookmarks() == 1
        bookmark = next(with_bookmarks)
        assert bookmark["type"] == "BOOKMARK"
        assert bookmark["raw_object"] == {
            "kind": "Secret",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": str(int(rv) + 2)},
        }
        kube.put_object("secrets", NS, "tok", {"data": {"k": b64("2")}})
        assert seen(next(without))[0] == seen(next(with_bookmarks))[0] == "MODIFIED"


def test_injected_errors_and_delays_apply_to_lists_and_watches(
    kube: FakeKubeAPI, core: CoreV1Api
) -> None:
    kube.inject_errors(2, status=503)
    with pytest.raises(ApiException) as caught:
        core.list_namespaced_secret(NS, _request_timeout=T)
    assert caught.value.status == 503
    with watching(core) as stream, pytest.raises(ApiException) as caught:
        next(stream)
    assert caught.value.status == 503

    seed_secret(kube, "tok")
    kube.inject_delay(1, 0.5)
    started = time.monotonic()
    with watching(core, field_selector="metadata.name=tok") as stream:
        assert seen(next(stream))[0] == "ADDED"
        assert time.monotonic() - started >= 0.5


def test_rbac_by_name_for_list_and_watch(kube: FakeKubeAPI, tmp_path: Path) -> None:
    kube.rbac = RBAC(
        rules=[
            Rule(frozenset({"get", "list", "watch"}), "secrets", NS, frozenset({"tok"})),
            Rule(frozenset({"list"}), "secrets", NS, frozenset({"listed-only"})),
        ]
    )
    seed_secret(kube, "tok")
    seed_secret(kube, "other")
    with client_for(kube, tmp_path) as client:
        core = CoreV1Api(client)
        listed = core.list_namespaced_secret(
            NS, field_selector="metadata.name=tok", _request_timeout=T
        )
        with watching(
            core,
            field_selector="metadata.name=tok",
            resource_version=listed.metadata.resource_version,
        ) as stream:
            kube.put_object("secrets", NS, "tok", {"data": {"k": b64("v")}})
            assert seen(next(stream))[:2] == ("MODIFIED", "tok")

        for selector, target in (
            (None, "secrets"),
            ("metadata.name=other", 'secrets "other"'),
            ("metadata.name=listed-only", 'secrets "listed-only"'),
            ("metadata.name!=tok", "secrets"),
        ):
            options = {} if selector is None else {"field_selector": selector}
            with watching(core, **options) as stream, pytest.raises(ApiException) as caught:
                next(stream)
            assert caught.value.status == 403
            assert status_of(caught.value)["message"] == (
                f'{target} is forbidden: User "{USER}" cannot watch resource "secrets" '
                f'in API group "" in the namespace "{NS}"'
            )
        with pytest.raises(ApiException) as caught:
            core.list_namespaced_secret(
                NS, field_selector="metadata.name=other", _request_timeout=T
            )
        assert caught.value.status == 403
        assert "cannot list resource" in status_of(caught.value)["message"]


# --------------------------------------------------------------------------------------------
# TokenReview (issue 15)
# --------------------------------------------------------------------------------------------


@pytest.fixture
def authn(api_client: ApiClient) -> AuthenticationV1Api:
    return AuthenticationV1Api(api_client)


def review(authn: AuthenticationV1Api, token: str, audiences: list[str] | None = None) -> Any:
    body = V1TokenReview(spec=V1TokenReviewSpec(token=token, audiences=audiences))
    return authn.create_token_review(body, _request_timeout=T).status


def test_token_review_authenticates_a_service_account_token(
    kube: FakeKubeAPI, authn: AuthenticationV1Api
) -> None:
    token = kube.issue_service_account_token("team", "reader", audiences=["refresher", "x"])
    assert token.count(".") == 2 and len(token) > 500  # shaped like a projected token
    body = V1TokenReview(spec=V1TokenReviewSpec(token=token, audiences=["other", "refresher"]))
    review_, code, _headers = authn.create_token_review_with_http_info(body, _request_timeout=T)
    assert code == 201
    request = last_request(kube, "POST")
    assert request.path == "/apis/authentication.k8s.io/v1/tokenreviews"
    assert request.json()["spec"] == {"token": token, "audiences": ["other", "refresher"]}
    assert review_.kind == "TokenReview" and review_.api_version == "authentication.k8s.io/v1"
    status = review_.status
    assert status.authenticated is True
    assert status.error is None
    assert status.audiences == ["refresher"]  # the intersection
    user = status.user
    assert user.username == "system:serviceaccount:team:reader"
    assert user.groups == [
        "system:serviceaccounts",
        "system:serviceaccounts:team",
        "system:authenticated",
    ]
    assert user.uid
    [credential] = user.extra["authentication.kubernetes.io/credential-id"]
    assert credential.startswith("JTI=")

    again = review(
        authn, kube.issue_service_account_token("team", "reader", audiences=["x"]), ["x"]
    )
    assert again.user.uid == user.uid  # one service account, one uid
    assert kube.token_reviews == 2
    assert kube.write_count() == 0  # a TokenReview writes nothing


def test_token_review_refusals(kube: FakeKubeAPI, authn: AuthenticationV1Api) -> None:
    valid = kube.issue_service_account_token("team", "reader", audiences=["refresher"])
    expired = kube.issue_service_account_token(
        "team", "reader", audiences=["refresher"], expires_in=0
    )
    revoked = kube.issue_service_account_token("team", "reader", audiences=["refresher"])
    kube.revoke_token(revoked)
    cases = {
        "unknown-token": "[invalid bearer token, token lookup failed]",
        valid[:-1]
        + ("A" if valid[-1] != "A" else "B"): "[invalid bearer token, token lookup failed]",
        expired: "[invalid bearer token, service account token has expired]",
        revoked: "[invalid bearer token, service account token has been invalidated]",
    }
    for token, error in cases.items():
        status = review(authn, token, ["refresher"])
        assert status.authenticated is None  # false is omitted on the wire
        assert status.error == error
        assert status.user.username is None and status.audiences is None
    wrong = review(authn, valid, ["vault"])
    assert wrong.authenticated is None
    assert wrong.error == (
        '[invalid bearer token, token audiences ["refresher"] is invalid for the target '
        'audiences ["vault"]]'
    )
    assert review(authn, valid, ["refresher"]).authenticated is True
    assert kube.token_reviews == len(cases) + 2

    with pytest.raises(ApiException) as caught:
        review(authn, "")
    assert caught.value.status == 400
    assert (
        status_of(caught.value)["message"] == "token is required for TokenReview in authentication"
    )


def test_token_review_default_audience(kube: FakeKubeAPI, authn: AuthenticationV1Api) -> None:
    default = kube.issue_service_account_token("team", "app")  # the pod's API token
    custom = kube.issue_service_account_token("team", "app", audiences=["refresher"])

    # Without spec.audiences the review checks the API server's own audience.
    status = review(authn, default)
    assert status.authenticated is True
    assert status.audiences == ["https://kubernetes.default.svc"]
    status = review(authn, custom)
    assert status.authenticated is None
    assert status.error == (
        '[invalid bearer token, token audiences ["refresher"] is invalid for the target '
        'audiences ["https://kubernetes.default.svc"]]'
    )
    # With spec.audiences, the pod's API token is refused: the point of setting them.
    status = review(authn, default, ["refresher"])
    assert status.authenticated is None
    assert status.error == (
        '[invalid bearer token, token audiences ["https://kubernetes.default.svc"] is invalid '
        'for the target audiences ["refresher"]]'
    )
    assert review(authn, custom, ["refresher"]).authenticated is True


def test_token_review_needs_create_on_tokenreviews_at_the_cluster_scope(
    kube: FakeKubeAPI, tmp_path: Path
) -> None:
    token = kube.issue_service_account_token("team", "reader", audiences=["refresher"])
    # A Role (namespaced rule) cannot grant a cluster-scoped resource.
    kube.rbac = RBAC([Rule(frozenset({"create", "get"}), "tokenreviews", NS)])
    with client_for(kube, tmp_path) as client:
        authn = AuthenticationV1Api(client)
        with pytest.raises(ApiException) as caught:
            review(authn, token, ["refresher"])
        assert caught.value.status == 403
        body = status_of(caught.value)
        assert body["message"] == (
            f'tokenreviews.authentication.k8s.io is forbidden: User "{USER}" cannot create '
            'resource "tokenreviews" in API group "authentication.k8s.io" at the cluster scope'
        )
        assert body["details"] == {"group": "authentication.k8s.io", "kind": "tokenreviews"}
        assert kube.token_reviews == 0

        # What system:auth-delegator grants, through a ClusterRoleBinding.
        kube.rbac = RBAC([Rule(frozenset({"create"}), "tokenreviews")])
        assert review(authn, token, ["refresher"]).authenticated is True
        assert kube.token_reviews == 1

        kube.token = "rotated"  # the caller itself must authenticate
        with pytest.raises(ApiException) as caught:
            review(authn, token, ["refresher"])
        assert caught.value.status == 401


# --------------------------------------------------------------------------------------------
# Pods (issue 18: nudging the pods that mount a Secret)
# --------------------------------------------------------------------------------------------

POD_SPEC_FORBIDDEN = (
    "spec: Forbidden: pod updates may not change fields other than "
    "`spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,"
    "`spec.tolerations` (only additions to existing tolerations),"
    "`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously "
    "negative)\n"
)


def consumer_spec(secret: str = "tok") -> dict[str, Any]:
    """A pod that uses `secret` every way the refresher has to tell apart."""
    return {
        "volumes": [
            {"name": "direct", "secret": {"secretName": secret}},
            {"name": "bundle", "projected": {"sources": [{"secret": {"name": secret}}]}},
        ],
        "initContainers": [
            {"name": "init", "image": "busybox:1", "envFrom": [{"secretRef": {"name": secret}}]}
        ],
        "containers": [
            {
                "name": "app",
                "image": "app:1",
                "volumeMounts": [
                    {"name": "direct", "mountPath": "/var/run/tok", "readOnly": True},
                    {"name": "bundle", "mountPath": "/etc/tok", "subPath": "token"},
                ],
                "env": [
                    {
                        "name": "TOKEN",
                        "valueFrom": {"secretKeyRef": {"name": secret, "key": "token"}},
                    }
                ],
            },
            {"name": "sidecar", "image": "sidecar:1"},
        ],
    }


def without_volatile(pod: dict[str, Any] | None) -> dict[str, Any]:
    """A pod without what every write changes (resourceVersion, managedFields)."""
    assert pod is not None
    pod = json.loads(json.dumps(pod))
    pod["metadata"].pop("resourceVersion")
    pod["metadata"].pop("managedFields", None)
    return pod


def test_seeded_pods_get_server_fields_and_are_validated(kube: FakeKubeAPI) -> None:
    pod = kube.add_pod(NS, "web-1", labels={"app": "web"}, annotations={"note": "x"})
    assert pod["kind"] == "Pod" and pod["apiVersion"] == "v1"
    meta = pod["metadata"]
    assert meta["name"] == "web-1" and meta["namespace"] == NS
    assert meta["uid"] and int(meta["resourceVersion"]) > 0 and meta["creationTimestamp"]
    assert meta["labels"] == {"app": "web"} and meta["annotations"] == {"note": "x"}
    assert pod["spec"] == {"containers": [{"name": "app", "image": "registry.example/app:1"}]}
    assert pod["status"] == {"phase": "Running"}
    assert kube.pod(NS, "web-1") == pod
    assert kube.get_object("pods", NS, "web-1") == pod

    with pytest.raises(ApiStatusError) as caught:
        kube.add_pod(NS, "web-1")
    assert caught.value.code == 409 and caught.value.message == 'pods "web-1" already exists'

    spec = consumer_spec()
    spec["containers"][0]["volumeMounts"].append({"name": "missing", "mountPath": "/m"})
    with pytest.raises(ApiStatusError) as caught:
        kube.add_pod(NS, "broken", spec=spec)
    assert caught.value.code == 422
    assert caught.value.message == (
        'Pod "broken" is invalid: spec.containers[0].volumeMounts[2].name: Not found: "missing"'
    )
    assert kube.pod(NS, "broken") is None

    kube.delete_pod(NS, "web-1")
    kube.delete_pod(NS, "web-1")  # already gone: nothing happens
    assert kube.pod(NS, "web-1") is None


def test_list_pods_with_label_and_field_selectors(kube: FakeKubeAPI, core: CoreV1Api) -> None:
    for name, labels in (
        ("a", {"app": "web", "tier": "front"}),
        ("b", {"app": "web", "tier": "back", "canary": "true"}),
        ("c", {"app": "db", "tier": "back"}),
        ("d", {"app": "web"}),
    ):
        kube.add_pod(NS, name, labels=labels)
    kube.add_pod("elsewhere", "e", labels={"app": "web"})
    kube.add_pod(NS, "pending", labels={"app": "web"}, status={"phase": "Pending"})

    def names(**selectors: str) -> list[str]:
        listed = core.list_namespaced_pod(NS, _request_timeout=T, **selectors)
        return [pod.metadata.name for pod in listed.items]

    assert names(label_selector="app=web") == ["a", "b", "d", "pending"]
    assert names(label_selector="app==web,tier=back") == ["b"]
    assert names(label_selector="app!=web") == ["c"]
    assert names(label_selector="tier in (front, back)") == ["a", "b", "c"]
    assert names(label_selector="app=web,tier notin (front)") == ["b", "d", "pending"]
    assert names(label_selector="app=web,!canary") == ["a", "d", "pending"]
    assert names(label_selector="canary") == ["b"]
    assert names(label_selector="app=web", field_selector="status.phase=Running") == [
        "a",
        "b",
        "d",
    ]
    assert names(field_selector="metadata.name=c") == ["c"]
    assert names(field_selector=f"metadata.namespace={NS},metadata.name!=a") == [
        "b",
        "c",
        "d",
        "pending",
    ]

    raw = core.list_namespaced_pod(NS, _request_timeout=T, _preload_content=False)
    body = json.loads(raw.data)
    assert body["kind"] == "PodList" and body["apiVersion"] == "v1"
    assert int(body["metadata"]["resourceVersion"]) > 0
    assert "kind" not in body["items"][0]  # typed list items carry no kind

    with pytest.raises(ApiException) as caught:
        core.list_namespaced_pod(NS, field_selector="spec.foo=x", _request_timeout=T)
    assert caught.value.status == 400
    assert status_of(caught.value)["message"] == "field label not supported: spec.foo"


def test_get_pod_parses_in_the_client(kube: FakeKubeAPI, core: CoreV1Api) -> None:
    kube.add_pod(NS, "consumer", spec=consumer_spec())
    pod = core.read_namespaced_pod("consumer", NS, _request_timeout=T)
    assert pod.kind == "Pod" and pod.status.phase == "Running"
    spec = pod.spec
    assert spec.volumes[0].secret.secret_name == "tok"
    assert spec.volumes[1].projected.sources[0].secret.name == "tok"
    assert spec.init_containers[0].env_from[0].secret_ref.name == "tok"
    app = spec.containers[0]
    assert app.volume_mounts[1].sub_path == "token"
    assert app.env[0].value_from.secret_key_ref.name == "tok"
    assert last_request(kube, "GET").path == f"/api/v1/namespaces/{NS}/pods/consumer"

    with pytest.raises(ApiException) as caught:
        core.read_namespaced_pod("nope", NS, _request_timeout=T)
    assert caught.value.status == 404
    assert status_of(caught.value)["message"] == 'pods "nope" not found'


def test_annotation_patch_changes_only_the_annotation(kube: FakeKubeAPI, core: CoreV1Api) -> None:
    seeded = kube.add_pod(NS, "consumer", labels={"app": "web"}, spec=consumer_spec())
    before = without_volatile(seeded)
    body = {"metadata": {"annotations": {"refresher.io/token-fingerprint": "abc"}}}

    # A dict body: the client picks the strategic merge patch.
    patched = core.patch_namespaced_pod("consumer", NS, body, _request_timeout=T)
    assert last_request(kube, "PATCH").headers["content-type"] == (
        "application/strategic-merge-patch+json"
    )
    assert patched.metadata.annotations == {"refresher.io/token-fingerprint": "abc"}
    first_rv = int(patched.metadata.resource_version)
    assert first_rv > int(seeded["metadata"]["resourceVersion"])
    after = without_volatile(kube.pod(NS, "consumer"))
    assert after["metadata"].pop("annotations") == {"refresher.io/token-fingerprint": "abc"}
    assert after == before  # nothing else changed

    # The same patch again changes nothing: no write, the same resourceVersion.
    again = core.patch_namespaced_pod("consumer", NS, body, _request_timeout=T)
    assert int(again.metadata.resource_version) == first_rv

    # A merge patch, and a JSON patch (a list body), work the same way.
    merge = {"metadata": {"annotations": {"refresher.io/token-fingerprint": "def"}}}
    core.patch_namespaced_pod(
        "consumer", NS, merge, _content_type="application/merge-patch+json", _request_timeout=T
    )
    assert last_request(kube, "PATCH").headers["content-type"] == "application/merge-patch+json"
    operations = [
        {
            "op": "replace",
            "path": "/metadata/annotations/refresher.io~1token-fingerprint",
            "value": "x",
        }
    ]
    final = core.patch_namespaced_pod("consumer", NS, operations, _request_timeout=T)
    assert last_request(kube, "PATCH").headers["content-type"] == "application/json-patch+json"
    assert final.metadata.annotations == {"refresher.io/token-fingerprint": "x"}
    assert int(final.metadata.resource_version) > first_rv
    after = without_volatile(kube.pod(NS, "consumer"))
    after["metadata"].pop("annotations")
    assert after == before


def test_pod_spec_changes_are_refused_with_422(kube: FakeKubeAPI, core: CoreV1Api) -> None:
    kube.add_pod(NS, "consumer", spec=consumer_spec())
    before = kube.pod(NS, "consumer")

    def refused(body: Any, content_type: str | None = None) -> dict[str, Any]:
        options = {} if content_type is None else {"_content_type": content_type}
        with pytest.raises(ApiException) as caught:
            core.patch_namespaced_pod("consumer", NS, body, _request_timeout=T, **options)
        assert caught.value.status == 422
        return status_of(caught.value)

    # Strategic merge: containers merge by name, so this only adds an env variable.
    status = refused(
        {"spec": {"containers": [{"name": "app", "env": [{"name": "X", "value": "1"}]}]}}
    )
    assert status["reason"] == "Invalid"
    assert status["message"].startswith(f'Pod "consumer" is invalid: {POD_SPEC_FORBIDDEN}')
    assert '"X"' in status["message"]  # the diff shows the change
    assert status["details"]["name"] == "consumer" and status["details"]["kind"] == "Pod"
    [cause] = status["details"]["causes"]
    assert cause["reason"] == "FieldValueForbidden" and cause["field"] == "spec"

    # A merge patch replaces lists: new volumes.
    status = refused(
        {"spec": {"volumes": [{"name": "direct", "secret": {"secretName": "other"}}]}},
        "application/merge-patch+json",
    )
    assert status["message"].startswith(f'Pod "consumer" is invalid: {POD_SPEC_FORBIDDEN}')
    status = refused({"spec": {"nodeName": "node-2"}})
    assert status["message"].startswith(f'Pod "consumer" is invalid: {POD_SPEC_FORBIDDEN}')

    status = refused({"spec": {"containers": [{"name": "third", "image": "x:1"}]}})
    assert status["message"] == (
        'Pod "consumer" is invalid: spec.containers: Forbidden: pod updates may not add or '
        "remove containers"
    )
    assert kube.pod(NS, "consumer") == before  # nothing was written

    # What a real server allows: an image (the other fields of the container stay), and the
    # status in a patch of the main resource is ignored.
    patched = core.patch_namespaced_pod(
        "consumer",
        NS,
        {"spec": {"containers": [{"name": "app", "image": "app:2"}]}, "status": {"phase": "X"}},
        _request_timeout=T,
    )
    assert [c.image for c in patched.spec.containers] == ["app:2", "sidecar:1"]
    assert patched.spec.containers[0].env[0].name == "TOKEN"
    assert patched.status.phase == "Running"


def test_patch_of_a_missing_pod_is_404(kube: FakeKubeAPI, core: CoreV1Api) -> None:
    body = {"metadata": {"annotations": {"a": "1"}}}
    with pytest.raises(ApiException) as caught:
        core.patch_namespaced_pod("gone", NS, body, _request_timeout=T)
    assert caught.value.status == 404
    status = status_of(caught.value)
    assert status["reason"] == "NotFound"
    assert status["message"] == 'pods "gone" not found'
    assert status["details"] == {"name": "gone", "kind": "pods"}


def test_pods_vanish_after_the_next_list(kube: FakeKubeAPI, core: CoreV1Api) -> None:
    for name in ("a", "b", "c"):
        kube.add_pod(NS, name, labels={"app": "web"})
    kube.add_pod("elsewhere", "b", labels={"app": "web"})
    kube.vanish_after_next_list(NS, ["b", "c", "never-existed"])

    core.list_namespaced_pod("elsewhere", _request_timeout=T)  # another namespace: no effect
    assert kube.pod(NS, "b") is not None
    core.list_namespaced_secret(NS, _request_timeout=T)  # nor a Secret list, nor a pod watch
    stream = Watch().stream(
        core.list_namespaced_pod, NS, timeout_seconds=5, _request_timeout=(T, WATCH_READ_TIMEOUT)
    )
    with contextlib.closing(stream):
        assert next(stream)["type"] == "ADDED"
    assert kube.pod(NS, "b") is not None

    listed = core.list_namespaced_pod(NS, label_selector="app=web", _request_timeout=T)
    assert [p.metadata.name for p in listed.items] == ["a", "b", "c"]  # the list shows them
    body = {"metadata": {"annotations": {"n": "1"}}}
    core.patch_namespaced_pod("a", NS, body, _request_timeout=T)
    for name in ("b", "c"):
        with pytest.raises(ApiException) as caught:
            core.patch_namespaced_pod(name, NS, body, _request_timeout=T)
        assert caught.value.status == 404
    assert kube.pod("elsewhere", "b") is not None
    relisted = core.list_namespaced_pod(NS, _request_timeout=T)
    assert [p.metadata.name for p in relisted.items] == ["a"]
    assert int(relisted.metadata.resource_version) > int(listed.metadata.resource_version)


def test_rbac_list_without_patch_is_403(kube: FakeKubeAPI, tmp_path: Path) -> None:
    kube.rbac = RBAC([Rule(frozenset({"list", "get"}), "pods", NS)])
    kube.add_pod(NS, "web-1")
    before = kube.pod(NS, "web-1")
    with client_for(kube, tmp_path) as client:
        core = CoreV1Api(client)
        assert [
            p.metadata.name for p in core.list_namespaced_pod(NS, _request_timeout=T).items
        ] == ["web-1"]
        with pytest.raises(ApiException) as caught:
            core.patch_namespaced_pod(
                "web-1", NS, {"metadata": {"annotations": {"a": "1"}}}, _request_timeout=T
            )
        assert caught.value.status == 403
        status = status_of(caught.value)
        assert status["reason"] == "Forbidden"
        assert status["message"] == (
            f'pods "web-1" is forbidden: User "{USER}" cannot patch resource "pods" in API group '
            f'"" in the namespace "{NS}"'
        )
        assert status["details"] == {"name": "web-1", "kind": "pods"}
        with pytest.raises(ApiException) as caught:
            core.list_namespaced_pod("kube-system", _request_timeout=T)
        assert caught.value.status == 403
    assert kube.pod(NS, "web-1") == before


def test_injected_error_and_delay_on_a_pod_list(kube: FakeKubeAPI, core: CoreV1Api) -> None:
    kube.add_pod(NS, "web-1")
    kube.inject_errors(1, status=503)
    with pytest.raises(ApiException) as caught:
        core.list_namespaced_pod(NS, _request_timeout=T)
    assert caught.value.status == 503
    assert status_of(caught.value)["reason"] == "ServiceUnavailable"

    kube.inject_delay(1, 0.3)
    started = time.monotonic()
    listed = core.list_namespaced_pod(NS, _request_timeout=T)
    assert time.monotonic() - started >= 0.3
    assert [p.metadata.name for p in listed.items] == ["web-1"]

    # A read timeout on a GET: urllib3's default Retry(3) sends it again, silently.
    kube.clear_requests()
    kube.inject_delay(1, 0.5)
    assert len(core.list_namespaced_pod(NS, _request_timeout=0.1).items) == 1
    assert kube.request_count("list", "pods") == 2
    kube.inject_delay(4, 0.5)
    with pytest.raises(urllib3.exceptions.MaxRetryError) as timed_out:
        core.list_namespaced_pod(NS, _request_timeout=0.1)
    assert isinstance(timed_out.value.reason, urllib3.exceptions.ReadTimeoutError)
    assert kube.request_count("list", "pods") == 2 + 4


def test_faults_limited_to_pods_spare_secret_requests(kube: FakeKubeAPI, core: CoreV1Api) -> None:
    kube.add_pod(NS, "web-1")
    seed_secret(kube)
    kube.inject_errors(1, status=500, resource="pods")
    core.read_namespaced_secret("tok", NS, _request_timeout=T)  # not a pod request: no error
    with pytest.raises(ApiException) as caught:
        core.list_namespaced_pod(NS, _request_timeout=T)
    assert caught.value.status == 500
    core.list_namespaced_pod(NS, _request_timeout=T)  # used up

    kube.inject_delay(1, 0.3, resource="pods")
    started = time.monotonic()
    core.patch_namespaced_secret("tok", NS, {"data": {"a": b64("1")}}, _request_timeout=T)
    assert time.monotonic() - started < 0.3  # the Secret write does not wait
    before_patch = time.time()
    core.patch_namespaced_pod("web-1", NS, {"metadata": {"labels": {"n": "1"}}}, _request_timeout=T)
    assert time.monotonic() - started >= 0.3  # the pod patch does
    [patch] = [r for r in kube.requests if r.verb == "patch" and r.resource == "pods"]
    assert before_patch <= patch.received_at <= time.time()


def test_request_counts_by_verb_and_resource(kube: FakeKubeAPI, core: CoreV1Api) -> None:
    for index in range(5):
        kube.add_pod(NS, f"web-{index}", labels={"app": "web"})
    seed_secret(kube)
    core.read_namespaced_secret("tok", NS, _request_timeout=T)
    kube.clear_requests()

    listed = core.list_namespaced_pod(NS, label_selector="app=web", _request_timeout=T)
    for pod in listed.items:
        core.patch_namespaced_pod(
            pod.metadata.name, NS, {"metadata": {"annotations": {"n": "1"}}}, _request_timeout=T
        )
    core.read_namespaced_pod("web-0", NS, _request_timeout=T)
    core.read_namespaced_secret("tok", NS, _request_timeout=T)

    assert kube.request_count("list", "pods") == 1
    assert kube.request_count("patch", "pods") == 5
    assert kube.request_count("get", "pods") == 1
    assert kube.request_count("GET", "pods") == 2  # an HTTP method: the list and the get
    assert kube.request_count("PATCH") == 5
    assert kube.request_count(resource="secrets") == 1
    assert kube.request_count("patch", "pods", name="web-3") == 1
    assert kube.request_count("patch", "pods", namespace="elsewhere") == 0
    assert kube.request_count() == len(kube.requests) == 8
    assert kube.write_count("pods") == 5
    patches = [r for r in kube.requests if r.verb == "patch" and r.resource == "pods"]
    assert [r.name for r in patches] == [f"web-{i}" for i in range(5)]
    assert {r.namespace for r in patches} == {NS}
