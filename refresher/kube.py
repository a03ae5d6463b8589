"""The Kubernetes API client, built once and only when a job needs it.

Importing `kubernetes` takes a large part of a second and a lot of memory, so nothing else
imports it at module level: a file-only refresher never pays for it. Inside a pod the
in-cluster config is used; elsewhere a kubeconfig (`$KUBECONFIG`, `~/.kube/config`, or the
configured file and context).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refresher.config import KubernetesSettings
from refresher.errors import ConfigError

# The in-cluster config does not say which namespace the pod runs in; this file does.
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


@dataclass
class Kube:
    """An API client plus what every call needs: the timeout and the default namespace."""

    api_client: Any  # kubernetes.client.ApiClient
    namespace: str
    request_timeout: float

    def core(self) -> Any:
        import kubernetes

        return kubernetes.client.CoreV1Api(self.api_client)

    def authentication(self) -> Any:
        import kubernetes

        return kubernetes.client.AuthenticationV1Api(self.api_client)

    def coordination(self) -> Any:
        import kubernetes

        return kubernetes.client.CoordinationV1Api(self.api_client)


def in_cluster() -> bool:
    return "KUBERNETES_SERVICE_HOST" in os.environ and SERVICE_ACCOUNT_NAMESPACE.parent.is_dir()


def connect(settings: KubernetesSettings) -> Kube:
    """A client for the API server, from the in-cluster service account or a kubeconfig.
    Raises ConfigError (exit 2) when neither can be loaded."""
    import kubernetes

    try:
        return _connect(settings)
    except (kubernetes.config.ConfigException, OSError, ValueError, TypeError) as err:
        # The exception's text may quote the kubeconfig; its type says enough.
        where = settings.kubeconfig or "$KUBECONFIG or ~/.kube/config"
        raise ConfigError(
            [
                "kubernetes: cannot load the client configuration (in-cluster service account "
                f"or kubeconfig {where}): {type(err).__name__}"
            ]
        ) from None


def _connect(settings: KubernetesSettings) -> Kube:
    import kubernetes

    configuration = kubernetes.client.Configuration()
    namespace = "default"
    if settings.kubeconfig is None and settings.context is None and in_cluster():
        kubernetes.config.load_incluster_config(client_configuration=configuration)
        namespace = SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or namespace
    else:
        config_file = str(settings.kubeconfig) if settings.kubeconfig else None
        kubernetes.config.load_kube_config(
            config_file=config_file, context=settings.context, client_configuration=configuration
        )
        _, active = kubernetes.config.list_kube_config_contexts(config_file=config_file)
        if settings.context:
            contexts, _ = kubernetes.config.list_kube_config_contexts(config_file=config_file)
            active = next((c for c in contexts if c["name"] == settings.context), active)
        namespace = (active or {}).get("context", {}).get("namespace") or namespace
    # urllib3 would re-send a PUT whose answer timed out (and report our own write as a
    # conflict); retries here are the refresher's decision, made with fresh state.
    configuration.retries = False
    return Kube(
        api_client=kubernetes.client.ApiClient(configuration),
        namespace=namespace,
        request_timeout=settings.request_timeout,
    )
