"""A follower's view of one job's Secret: list, then watch, so every replica serves the token
the leader wrote within milliseconds of the write, without asking the IdP (issue 15).

One thread per watched Secret:

1. **list** the Secret by name (`fieldSelector=metadata.name=NAME`, which a Role limited to
   that name allows), publish the token it holds, and note the list's `resourceVersion`;
2. **watch** from that `resourceVersion`: every ADDED or MODIFIED event publishes the token,
   DELETED publishes none. A stream that ends after its `timeoutSeconds` is opened again from
   the last version seen; `410 Gone` (on the request or in the stream: the version is older
   than the server's history) goes back to 1;
3. anything else (the API unreachable, a 5xx, a dropped connection) backs off, from 0.5 s
   doubling to `MAX_BACKOFF`, and goes back to 1. Every call has a timeout.

Staleness is measured from the last proof that the watch works: a list, an event, or a
stream the server ended on time. Streams are asked to end after half of `max_staleness`
(and reads time out shortly after that), so even a connection that goes silent without
closing is found out in time. Past `max_staleness` without such proof the board says why it
cannot vouch for the token (the token API answers 503, `/readyz` names it) until the watch
works again; `check_stale` is also called from the daemon's heartbeat, so a list call that
hangs for its timeout cannot delay that. `up` and `restarts` are exported as metrics.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from refresher.tokens import Token

log = logging.getLogger(__name__)

WATCH_SECONDS = 60  # the longest a stream is asked to last; then it is opened again
MAX_BACKOFF = 10.0


class SecretWatch:
    def __init__(
        self,
        job: str,
        namespace: str,
        name: str,
        *,
        core: Callable[[], Any],
        token_of: Callable[[Any, float], Token | None],
        publish: Callable[[Token | None], None],
        mark_stale: Callable[[str | None], None],
        reported: Callable[[Any], None] = lambda secret: None,
        request_timeout: float,
        max_staleness: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.job = job
        self.namespace = namespace
        self.name = name
        self._core = core  # returns a kubernetes CoreV1Api
        self._token_of = token_of
        self._publish = publish
        self._mark_stale = mark_stale
        self._reported = reported  # sees every Secret object (a follower's report on it)
        self._timeout = request_timeout
        self._max_staleness = max_staleness
        self._clock = clock
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.up = False
        self.restarts = 0  # lists after the first: every recovery from a broken or expired watch
        self._alive_at: float | None = None  # monotonic: the last proof the watch works
        self._started_at = time.monotonic()
        # Streams end (and are opened again) within half the staleness allowed.
        self._stream_seconds = max(1, min(WATCH_SECONDS, int(max_staleness / 2)))
        self._stale_reason: str | None = None
        self.last_token: Token | None = None

    # ------------------------------------------------------------------------- lifecycle

    def start(self) -> SecretWatch:
        self._thread = threading.Thread(
            target=self._run, name=f"refresher-watch-{self.job}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching. Not waited for: a stream blocked in a read ends by itself within
        WATCH_SECONDS (it is a daemon thread), and publishes nothing from now on."""
        self._stopping.set()

    def staleness(self) -> float:
        """Seconds since the last proof that the watch works (since start, before any)."""
        with self._lock:
            since = self._alive_at if self._alive_at is not None else self._started_at
        return time.monotonic() - since

    # ---------------------------------------------------------------------------- thread

    def _run(self) -> None:
        backoff = 0.5
        listed_once = False
        while not self._stopping.is_set():
            try:
                version = self._list()
                if listed_once:
                    self.restarts += 1
                listed_once = True
                while not self._stopping.is_set():
                    version = self._watch(version)
                    backoff = 0.5  # a stream lasted its time: the watch works
            except _Expired:
                log.info("secret watch expired; listing again", extra={"token": self.job})
                continue
            except Exception as err:  # the API unreachable, a 5xx, a dropped stream
                self._broken(type(err).__name__)
            # Back off, but come back in time to say the token is stale.
            wait = backoff * (0.5 + random.random() / 2)
            self._stopping.wait(min(wait, max(self._max_staleness / 2, 0.1)))
            self.check_stale()
            backoff = min(backoff * 2, MAX_BACKOFF)

    def _list(self) -> str:
        from kubernetes.client.exceptions import ApiException

        try:
            listed = self._core().list_namespaced_secret(
                self.namespace,
                field_selector=f"metadata.name={self.name}",
                _request_timeout=self._timeout,
            )
        except ApiException as err:
            if err.status == 410:
                raise _Expired from None
            raise
        items = listed.items or []
        self._deliver(self._token_of(items[0], self._clock()) if items else None)
        if items and not self._stopping.is_set():
            self._reported(items[0])
        self._healthy()
        return str(listed.metadata.resource_version)

    def _watch(self, version: str) -> str:
        """One stream from `version`; the last version it saw. Raises _Expired on 410."""
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        stream = watch.Watch()
        try:
            for event in stream.stream(
                self._core().list_namespaced_secret,
                self.namespace,
                field_selector=f"metadata.name={self.name}",
                resource_version=version,
                timeout_seconds=self._stream_seconds,
                # Past the stream's end plus a little, silence means a dead connection.
                _request_timeout=(self._timeout, self._stream_seconds + 2.0),
            ):
                if self._stopping.is_set():
                    break
                kind = event.get("type")
                obj = event.get("object")
                if kind == "ERROR":
                    code = getattr(obj, "code", None) or (obj or {}).get("code")
                    if code == 410:
                        raise _Expired
                    raise RuntimeError(f"watch error {code}")
                version = str(obj.metadata.resource_version)
                token = None if kind == "DELETED" else self._token_of(obj, self._clock())
                self._deliver(token)
                if kind != "DELETED":
                    self._reported(obj)
                self._healthy()
        except ApiException as err:
            if err.status == 410:
                raise _Expired from None
            raise
        finally:
            stream.stop()
        self._healthy()  # the server ended the stream on time
        return version

    # ----------------------------------------------------------------------------- state

    def _deliver(self, token: Token | None) -> None:
        self.last_token = token
        if not self._stopping.is_set():
            self._publish(token)

    @property
    def stale_reason(self) -> str | None:
        return self._stale_reason

    def _healthy(self) -> None:
        with self._lock:
            self._alive_at = time.monotonic()
            self.up = True
            was_stale, self._stale_reason = self._stale_reason is not None, None
        if was_stale and not self._stopping.is_set():
            self._mark_stale(None)

    def _broken(self, why: str) -> None:
        with self._lock:
            self.up = False
        log.warning("secret watch broken", extra={"token": self.job, "error": why})
        self.check_stale()

    def check_stale(self) -> None:
        """Tell the board when the watch has gone without proof for too long (from any
        thread: the watch's own, and the daemon's heartbeat)."""
        broken_for = self.staleness()
        with self._lock:
            if broken_for <= self._max_staleness or self._stale_reason is not None:
                return
            self._stale_reason = (
                f"the watch of Secret {self.namespace}/{self.name} has been broken for "
                f"{broken_for:.0f} s (api.max_staleness {self._max_staleness:g} s): this "
                "replica cannot vouch for the token"
            )
            reason = self._stale_reason
        if not self._stopping.is_set():
            self._mark_stale(reason)


class _Expired(Exception):
    """The watch's resourceVersion is older than the server's history (410 Gone)."""
