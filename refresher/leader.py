"""Leader election through a coordination.k8s.io/v1 Lease (rule 1 of docs/design.md).

Only the leader talks to the IdP: on an invalidate-on-reissue IdP, two replicas refreshing the
same scope would revoke each other's tokens. The algorithm is client-go's:
- a Lease held by someone else is taken over only once it has not changed for its
  `leaseDurationSeconds`, measured on *our* monotonic clock from when we first saw that
  version (so clock skew between nodes does not matter);
- writes carry the resourceVersion read just before, so two candidates cannot both win;
- a leader that has not renewed for `renew_deadline` stops leading at once, which is
  `lease_duration - renew_deadline` before any other replica may take over;
- on shutdown the leader releases the Lease so a successor takes over without waiting.

`kubernetes.leaderelection` is not used because it keeps the leader's work running after it
stops leading and never releases the Lease.
"""

from __future__ import annotations

import logging
import math
import os
import random
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import urllib3
from kubernetes.client.exceptions import ApiException

from refresher.clock import format_utc
from refresher.config import LeaderElectionConfig
from refresher.kube import Kube

log = logging.getLogger(__name__)


def default_identity() -> str:
    """The pod's name (set $POD_NAME from the downward API); else unique on this host."""
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}_{os.getpid()}"


def micro_time(epoch: float) -> str:
    """A metav1.MicroTime: the API server wants exactly six fraction digits and a Z."""
    return format_utc(epoch, "microseconds")


class LeaseElector:
    def __init__(
        self,
        kube: Kube,
        config: LeaderElectionConfig,
        *,
        on_started_leading: Callable[[], None],
        on_stopped_leading: Callable[[], None],
        identity: str | None = None,
        wall_clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.kube = kube
        self.namespace = config.namespace or kube.namespace
        self.identity = identity or config.identity or default_identity()
        self._api = kube.coordination()
        self._on_started = on_started_leading
        self._on_stopped = on_stopped_leading
        self._wall = wall_clock
        self._monotonic = monotonic
        self._leading = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="leader-election", daemon=True)
        self._observed: tuple[Any, ...] | None = None  # (holder, renewTime, duration) last seen
        self._observed_at = 0.0  # monotonic time it was first seen
        self._last_renew = 0.0  # monotonic time of our last successful renewal
        self.holder: str | None = None  # who holds the Lease, as far as we know

    @property
    def is_leader(self) -> bool:
        return self._leading.is_set()

    def start(self) -> LeaseElector:
        log.info(
            "leader election started", extra={"identity": self.identity, "lease": self._lease_name}
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop campaigning; a leader stops leading, then releases the Lease."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self._leading.is_set():
            self._step_down("shutting down")
            self._release()

    # ---------------------------------------------------------------------------- the loop

    @property
    def _lease_name(self) -> str:
        return f"{self.namespace}/{self.config.name}"

    def _deadline_left(self) -> float:
        return self._last_renew + self.config.renew_deadline - self._monotonic()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self._leading.is_set():
                # Never let one slow call carry us past the renew deadline.
                timeout = max(min(self.kube.request_timeout, self._deadline_left()), 0.05)
            else:
                timeout = min(self.kube.request_timeout, self.config.retry_period)
            renewed = self._try_acquire_or_renew(timeout)
            if renewed:
                self._last_renew = self._monotonic()
                if not self._leading.is_set():
                    self._leading.set()
                    log.info(
                        "became leader",
                        extra={"identity": self.identity, "lease": self._lease_name},
                    )
                    self._on_started()
            elif self._leading.is_set():
                if self.holder not in (None, self.identity):
                    self._step_down(f"lease taken by {self.holder}")
                elif self._deadline_left() <= 0:
                    self._step_down("could not renew the lease before the deadline")
            if self._leading.is_set():
                wait = min(self.config.retry_period, max(self._deadline_left(), 0.0))
            else:  # candidates spread out so they do not hit the API server together
                wait = self.config.retry_period * (1 + 0.2 * random.random())
            self._stop.wait(wait)

    def _step_down(self, why: str) -> None:
        self._leading.clear()
        log.warning("stopped leading", extra={"identity": self.identity, "reason": why})
        self._on_stopped()

    # ------------------------------------------------------------------------- lease calls

    def _try_acquire_or_renew(self, timeout: float) -> bool:
        now = self._wall()
        try:
            lease = self._api.read_namespaced_lease(
                self.config.name, self.namespace, _request_timeout=timeout
            )
        except ApiException as err:
            if err.status == 404:
                return self._create(now, timeout)
            self._log_failure("get", err.status)
            return False
        except (urllib3.exceptions.HTTPError, OSError) as err:
            self._log_failure("get", type(err).__name__)
            return False

        spec = lease.spec
        holder = spec.holder_identity or None
        record = (holder, spec.renew_time, spec.lease_duration_seconds)
        if record != self._observed:
            self._observed, self._observed_at = record, self._monotonic()
        self.holder = holder
        duration = spec.lease_duration_seconds or self.config.lease_duration
        if holder not in (None, self.identity) and self._monotonic() < self._observed_at + duration:
            return False  # someone else's, and alive

        taking_over = holder != self.identity
        acquire_time = (
            micro_time(now)
            if taking_over or spec.acquire_time is None
            else micro_time(spec.acquire_time.timestamp())
        )
        # As client-go: every change of holder counts, also after a release.
        transitions = (spec.lease_transitions or 0) + (1 if taking_over else 0)
        patch = {
            "metadata": {"resourceVersion": lease.metadata.resource_version},
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": self._duration_seconds,
                "acquireTime": acquire_time,
                "renewTime": micro_time(now),
                "leaseTransitions": transitions,
            },
        }
        return self._write("patch", timeout, patch)

    @property
    def _duration_seconds(self) -> int:
        return max(1, math.ceil(self.config.lease_duration))

    def _create(self, now: float, timeout: float) -> bool:
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": self.config.name,
                "labels": {"app.kubernetes.io/managed-by": "refresher"},
            },
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": self._duration_seconds,
                "acquireTime": micro_time(now),
                "renewTime": micro_time(now),
                "leaseTransitions": 0,
            },
        }
        return self._write("create", timeout, body)

    def _write(self, verb: str, timeout: float, body: dict[str, Any]) -> bool:
        try:
            if verb == "create":
                self._api.create_namespaced_lease(self.namespace, body, _request_timeout=timeout)
            else:
                self._patch(body, timeout)
        except ApiException as err:
            if err.status != 409:  # 409: another candidate won this round; not worth a line
                self._log_failure(verb, err.status)
            return False
        except (urllib3.exceptions.HTTPError, OSError) as err:
            self._log_failure(verb, type(err).__name__)
            return False
        self.holder = self.identity
        return True

    def _patch(self, body: dict[str, Any], timeout: float) -> None:
        # A merge patch whose body carries metadata.resourceVersion: a compare-and-swap.
        self._api.patch_namespaced_lease(
            self.config.name,
            self.namespace,
            body,
            _content_type="application/merge-patch+json",
            _request_timeout=timeout,
        )

    def _release(self) -> None:
        """Give the Lease up (if still ours) so a successor need not wait for it to expire."""
        timeout = self.kube.request_timeout
        try:
            lease = self._api.read_namespaced_lease(
                self.config.name, self.namespace, _request_timeout=timeout
            )
            if lease.spec.holder_identity != self.identity:
                return
            patch = {
                "metadata": {"resourceVersion": lease.metadata.resource_version},
                "spec": {
                    "holderIdentity": None,
                    "leaseDurationSeconds": 1,
                    "renewTime": micro_time(self._wall()),
                },
            }
            self._patch(patch, timeout)
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as err:
            log.warning("could not release the lease", extra={"error": type(err).__name__})
            return
        log.info("released the lease", extra={"identity": self.identity, "lease": self._lease_name})

    def _log_failure(self, verb: str, what: object) -> None:
        log.warning(
            "lease request failed",
            extra={
                "verb": verb,
                "lease": self._lease_name,
                "error": str(what),
                "identity": self.identity,
            },
        )
