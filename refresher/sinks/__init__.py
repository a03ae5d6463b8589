"""Sinks: the places a token is written to and read back from.

Every sink offers the same two operations (see `Sink`); which one a job uses is config.
`SinkFactory` imports a sink's module only when it is used, so that a file-only setup never
pays for importing the `kubernetes` package.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Protocol

from refresher.config import FileSinkConfig, KubernetesSettings, KubernetesSinkConfig
from refresher.metrics import NudgeStats
from refresher.tokens import Token

if TYPE_CHECKING:
    from refresher.kube import Kube


class Sink(Protocol):
    # Bounded and free of secrets: used as a metric label and in log lines.
    name: str

    def read(self, now: float) -> Token | None:
        """The token this sink holds now, or None when it holds none (or one it cannot use).

        Raises RefreshError(SINK) when the place cannot be read at all (permissions, API).
        """
        ...

    def write(self, token: Token) -> None:
        """Make `token` the one readers see, atomically. Raises RefreshError(SINK).

        Only what consumers need belongs here: the time from the IdP's answer to the last
        `write` is the window in which an invalidate-on-reissue IdP leaves them with a dead
        token.
        """
        ...

    def settle(self, token: Token) -> None:
        """Follow-up work once every sink shows `token` (durability, metadata); best effort."""
        ...

    def mark_unprobeable(self, token: Token) -> None:
        """Record beside `token` (which this sink holds) that the probe rejected it as soon
        as it was issued, so that `read` says so to a restarted process; best effort."""
        ...

    def remove_leftovers(self, now: float) -> None:
        """Clean up what a killed predecessor left behind (a file sink's abandoned temp files).
        Called by the runner on start, never by read-only commands; best effort, never raises."""
        ...


class SinkFactory:
    """Builds sinks; connects to Kubernetes once, on the first Kubernetes sink."""

    def __init__(self, kubernetes: KubernetesSettings) -> None:
        self._settings = kubernetes
        self._kube: Kube | None = None
        self._lock = threading.Lock()
        # Every Secret sink's nudges (nudge.py), for the daemon's metrics.
        self.nudge_stats = NudgeStats()

    def kube(self) -> Kube:
        with self._lock:
            if self._kube is None:
                from refresher.kube import connect

                self._kube = connect(self._settings)
            return self._kube

    def build(self, config: FileSinkConfig | KubernetesSinkConfig, *, job: str) -> Sink:
        if isinstance(config, FileSinkConfig):
            from refresher.sinks.file import FileSink

            return FileSink(config)
        from refresher.sinks.kubernetes import KubernetesSecretSink

        return KubernetesSecretSink(config, self.kube(), job=job, nudge_stats=self.nudge_stats)


def describe(config: FileSinkConfig | KubernetesSinkConfig) -> str:
    """A sink's place in words, without connecting anywhere."""
    if isinstance(config, FileSinkConfig):
        return f"file:{config.path}"
    return f"kubernetes:{config.namespace or '(pod namespace)'}/{config.name}"
