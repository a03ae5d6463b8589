"""Nudging the consumers' pods after a Secret write, so a mounted Secret arrives in seconds.

The kubelet updates a mounted Secret on its periodic sync of the pod (a minute by default)
plus its cache delay; a change to the pod object makes it sync that pod at once. So after
each successful write of a Secret whose sink has `nudge: {selector: ...}`, the refresher
lists the pods that match the selector in the Secret's namespace (one LIST), and sets one
annotation of its own on each pod that mounts this Secret as a volume the kubelet updates
(a `secret` volume, or a `projected` volume with a `secret` source, mounted without
`subPath`): `refresher.io/token-fingerprint: <fingerprint>` (never the token), with one merge
patch per pod, `max_concurrent` at a time, each with a timeout. No other field of the pod is
touched: this is the one place the refresher writes to objects it does not own, and only
because the user named them (rule 14 of docs/design.md).

Nudging never delays or fails a refresh: the Secret sink starts it from `settle`, after the
last sink of the refresh was written, on a thread of its own; a nudge asked for while one
runs runs once more afterwards, for the newest token. Its failures (a pod gone between the
list and its patch, a 403, a slow API) are counted and logged, and the next write nudges
again.

Where a nudge cannot help the refresher says so instead: a pod that mounts the Secret
through `subPath` (the kubelet never updates it) or reads it through `env`/`envFrom` (read
once, at start) gets one warning per pod and reason, and counts in
`refresher_consumers_never_updated{token,reason}`; `refresher status` lists them. Restarting
other people's pods is not the refresher's call.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import CancelledError, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from refresher.config import NudgeConfig
from refresher.kube import Kube
from refresher.metrics import NudgeStats
from refresher.tokens import Token

log = logging.getLogger(__name__)

FINGERPRINT_ANNOTATION = "refresher.io/token-fingerprint"
# Why a pod's copy of the Secret is never updated by the kubelet.
SUBPATH, ENV = "subpath", "env"
NEVER_WHY = {
    SUBPATH: "it mounts the Secret through subPath, which the kubelet never updates",
    ENV: "it reads the Secret into environment variables, once, when it starts",
}


@dataclass(frozen=True)
class Usage:
    """How one pod uses one Secret."""

    updated: bool  # mounted where the kubelet updates it: a nudge helps
    never: tuple[str, ...] = ()  # SUBPATH, ENV: copies the kubelet never updates


def usage(pod: Mapping[str, Any], secret: str, keys: Iterable[str] | None = None) -> Usage:
    """How `pod` (the API's JSON) uses the Secret named `secret`; with `keys`, a volume whose
    `items` pick none of those keys does not count. Pure.

    Only containers that run while the token changes count: the app's, ephemeral ones, and
    init containers that are sidecars (`restartPolicy: Always`); an ordinary init container
    has finished by then."""
    spec = pod.get("spec") or {}
    wanted = None if keys is None else frozenset(keys)
    volumes = {
        volume.get("name") for volume in spec.get("volumes") or [] if _holds(volume, secret, wanted)
    }
    updated = False
    never: set[str] = set()
    for container in _running_containers(spec):
        for mount in container.get("volumeMounts") or []:
            if mount.get("name") in volumes:
                if mount.get("subPath") or mount.get("subPathExpr"):
                    never.add(SUBPATH)
                else:
                    updated = True
        for variable in container.get("env") or []:
            reference = (variable.get("valueFrom") or {}).get("secretKeyRef") or {}
            if reference.get("name") == secret:
                never.add(ENV)
        for source in container.get("envFrom") or []:
            if (source.get("secretRef") or {}).get("name") == secret:
                never.add(ENV)
    return Usage(updated, tuple(sorted(never)))


def _holds(volume: Mapping[str, Any], secret: str, keys: frozenset[str] | None) -> bool:
    """Whether a pod volume holds the Secret (a `secret` volume, or a `projected` one with a
    `secret` source) and, with `keys`, one of those keys."""
    sources = [volume.get("secret") or {}]
    sources += [
        (each.get("secret") or {}) for each in (volume.get("projected") or {}).get("sources") or []
    ]
    for source in sources:
        if (source.get("secretName") or source.get("name")) != secret:
            continue
        items = source.get("items")
        if keys is None or not items or any(item.get("key") in keys for item in items):
            return True
    return False


def _running_containers(spec: Mapping[str, Any]) -> Iterable[Mapping[str, Any]]:
    yield from spec.get("containers") or []
    yield from spec.get("ephemeralContainers") or []
    for container in spec.get("initContainers") or []:
        if container.get("restartPolicy") == "Always":  # a sidecar: it runs along
            yield container


def _settled(pod: Mapping[str, Any]) -> bool:
    """A pod that is going away or done: nothing of it will read a new token."""
    metadata = pod.get("metadata") or {}
    phase = (pod.get("status") or {}).get("phase")
    return bool(metadata.get("deletionTimestamp")) or phase in ("Succeeded", "Failed")


@dataclass(frozen=True)
class NeverUpdated:
    """A pod whose copy of the Secret the kubelet never updates, and why."""

    pod: str  # NAMESPACE/NAME
    reason: str  # SUBPATH or ENV


class Nudger:
    """Nudges the pods of one Secret sink; `nudge(token)` returns at once."""

    def __init__(
        self,
        job: str,
        namespace: str,
        secret: str,
        config: NudgeConfig,
        kube: Kube,
        stats: NudgeStats,
        keys: Iterable[str] | None = None,
    ) -> None:
        self.job = job
        self.namespace = namespace
        self.secret = secret
        self.keys = None if keys is None else frozenset(keys)  # the sink's own keys
        self.config = config
        self.kube = kube
        self.stats = stats
        self._core = kube.core()
        self._patches = ThreadPoolExecutor(
            config.max_concurrent, thread_name_prefix=f"refresher-nudge-{job}"
        )
        self._lock = threading.Lock()
        self._running = False
        self._next: Token | None = None  # asked for while a nudge runs
        self._warned: set[tuple[str, str]] = set()  # (pod uid, reason) already logged
        self.idle = threading.Event()  # set while no nudge runs (tests and benchmarks wait)
        self.idle.set()
        self._closed = threading.Event()

    def nudge(self, token: Token) -> None:
        """Nudge the pods for `token`, on a thread of its own; never raises."""
        with self._lock:
            if self._closed.is_set():
                return
            if self._running:
                self._next = token  # the running one is followed by one for the newest
                return
            self._running = True
            self.idle.clear()
        try:
            threading.Thread(
                target=self._run, args=(token,), name=f"refresher-nudge-{self.job}", daemon=True
            ).start()
        except Exception as err:  # no thread to be had: this write is not nudged, the next is
            with self._lock:
                self._running = False
                self.idle.set()
            self.stats.record_nudge(self.job, "error")
            log.error("cannot start a nudge", extra={"token": self.job, "error": _why(err)})

    def close(self) -> None:
        """Stop nudging (the daemon stops, or `once` is done): patches not yet sent are not
        sent, and nothing waits for them at exit."""
        self._closed.set()
        self._patches.shutdown(wait=False, cancel_futures=True)

    def _run(self, token: Token) -> None:
        next_token: Token | None = token
        while next_token is not None:
            try:
                self._nudge(next_token)
            except Exception:  # a bug here must not end the thread with `_running` set
                log.exception("nudge failed", extra={"token": self.job})
            with self._lock:
                next_token, self._next = self._next, None
                if next_token is None:
                    self._running = False
                    self.idle.set()

    def _nudge(self, token: Token) -> None:
        started = time.perf_counter()
        try:
            pods = self.list_pods()
        except Exception as err:
            self.stats.record_nudge(self.job, "list_failed")
            self.stats.record_nudge_duration(time.perf_counter() - started)
            log.warning(
                "cannot list the pods to nudge",
                extra={"token": self.job, "error": _why(err), "selector": self.config.selector},
            )
            return
        self._judge_never_updated(pods)
        fingerprint = token.fingerprint
        targets = [
            pod
            for pod in pods
            if not _settled(pod)
            and usage(pod, self.secret, self.keys).updated
            and _annotation(pod) != fingerprint
        ]
        if len(targets) > self.config.max_pods:
            log.warning(
                "more pods to nudge than max_pods; the rest wait for the kubelet",
                extra={"token": self.job, "pods": len(targets), "max_pods": self.config.max_pods},
            )
            targets = targets[: self.config.max_pods]
        try:
            outcomes = list(self._patches.map(lambda pod: self._patch(pod, fingerprint), targets))
        except (CancelledError, RuntimeError):  # closed meanwhile: the process is stopping
            return
        for outcome in outcomes:
            self.stats.record_nudge(self.job, outcome)
        self.stats.record_nudge_duration(time.perf_counter() - started)
        counts = {outcome: outcomes.count(outcome) for outcome in set(outcomes)}
        log.info(
            "pods nudged",
            extra={"token": self.job, "fingerprint": fingerprint, "pods": len(pods), **counts},
        )

    def list_pods(self) -> list[dict[str, Any]]:
        """The pods the selector matches, as the API's JSON (one LIST)."""
        answer = self._core.list_namespaced_pod(
            self.namespace,
            label_selector=self.config.selector,
            resource_version="0",  # from the API server's cache, not a read of etcd each time
            _request_timeout=self.config.timeout,
            _preload_content=False,  # plain JSON: no model objects for every pod field
        )
        items = json.loads(answer.data).get("items") or []
        return [item for item in items if isinstance(item, dict)]

    def never_updated(self, pods: Iterable[Mapping[str, Any]]) -> list[NeverUpdated]:
        """The pods among `pods` whose copy of the Secret the kubelet never updates."""
        return [found for each in self.never_updated_each(pods) for found in each]

    def never_updated_each(self, pods: Iterable[Mapping[str, Any]]) -> list[list[NeverUpdated]]:
        result: list[list[NeverUpdated]] = []
        for pod in pods:
            if _settled(pod):  # done or going away: nothing to tell its owner
                result.append([])
                continue
            metadata = pod.get("metadata") or {}
            where = f"{metadata.get('namespace') or self.namespace}/{metadata.get('name')}"
            result.append(
                [NeverUpdated(where, reason) for reason in usage(pod, self.secret, self.keys).never]
            )
        return result

    def _judge_never_updated(self, pods: list[dict[str, Any]]) -> None:
        """Count the pods a nudge cannot help, and warn once per pod and reason."""
        counts = dict.fromkeys((SUBPATH, ENV), 0)
        seen: set[tuple[str, str]] = set()
        for pod, each in zip(pods, self.never_updated_each(pods), strict=True):
            uid = str((pod.get("metadata") or {}).get("uid") or "")
            for found in each:
                counts[found.reason] += 1
                key = (uid or found.pod, found.reason)
                seen.add(key)
                if key not in self._warned:
                    log.warning(
                        f"pod will never see a new token: {NEVER_WHY[found.reason]}",
                        extra={"token": self.job, "pod": found.pod, "secret": self.secret},
                    )
        self._warned = seen  # pods gone since are forgotten
        self.stats.set_never_updated(self.job, counts)

    def _patch(self, pod: Mapping[str, Any], fingerprint: str) -> str:
        """One merge patch of our one annotation; the outcome."""
        from kubernetes.client.exceptions import ApiException

        name = (pod.get("metadata") or {}).get("name")
        if self._closed.is_set():
            return "error"
        body = {"metadata": {"annotations": {FINGERPRINT_ANNOTATION: fingerprint}}}
        try:
            self._core.patch_namespaced_pod(
                name,
                self.namespace,
                body,
                _content_type="application/merge-patch+json",  # exactly this key, nothing else
                _request_timeout=self.config.timeout,
            )
        except ApiException as err:
            outcome = {404: "gone", 403: "forbidden"}.get(err.status or 0, "error")
            if outcome != "gone":  # deleted since the list: nothing to tell
                log.warning(
                    "cannot nudge a pod",
                    extra={
                        "token": self.job,
                        "pod": f"{self.namespace}/{name}",
                        "status": err.status,
                    },
                )
            return outcome
        except Exception as err:  # timeouts, connection errors
            log.warning(
                "cannot nudge a pod",
                extra={"token": self.job, "pod": f"{self.namespace}/{name}", "error": _why(err)},
            )
            return "error"
        return "nudged"


def nudgers(sinks: Iterable[object]) -> list[Nudger]:
    """The nudgers of those of `sinks` that nudge (Secret sinks with a `nudge`)."""
    found = (getattr(sink, "nudger", None) for sink in sinks)
    return [nudger for nudger in found if isinstance(nudger, Nudger)]


def _annotation(pod: Mapping[str, Any]) -> str | None:
    """The fingerprint a previous nudge left on the pod (no patch when it is this one)."""
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    value = annotations.get(FINGERPRINT_ANNOTATION)
    return value if isinstance(value, str) else None


def _why(err: BaseException) -> str:
    status = getattr(err, "status", None)
    return f"HTTP {status}" if status else type(err).__name__
