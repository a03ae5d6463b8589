"""What the token API serves: each job's current token, and a wake-up for long polls.

The runner (on the leader) or the Secret watch (on a follower) `publish`es a job's token from
its own thread; handlers on the HTTP loop read `current` and `await changed(...)`. Every
publication of a different token bumps the job's version and wakes every waiter, so a long
poll wakes on a change of token, not on a comparison of fingerprints. `close` wakes every
waiter at once (SIGTERM): none holds the process up.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass

from refresher.tokens import Token


@dataclass(frozen=True)
class Entry:
    token: Token | None
    version: int
    stale_reason: str | None = None  # set while this replica cannot vouch for the token

    def unservable(self, now: float) -> str | None:
        """Why this token must not be served now, or None."""
        if self.stale_reason is not None:
            return self.stale_reason
        if self.token is None:
            return "no token yet"
        if not self.token.is_valid(now):
            return "the token this replica holds has expired; a new one is being fetched"
        return None


class TokenBoard:
    def __init__(self, names: list[str]) -> None:
        self._lock = threading.Lock()
        self._entries = {name: Entry(None, 0) for name in names}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: dict[str, set[asyncio.Future[None]]] = {name: set() for name in names}
        self.closed = False

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The HTTP loop the waiters live on (known once the HTTP stack runs)."""
        self._loop = loop

    def current(self, name: str) -> Entry | None:
        with self._lock:
            return self._entries.get(name)

    def publish(self, name: str, token: Token | None) -> None:
        """`token` is what `name` holds now (None: nothing). From any thread."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                return
            same = (entry.token is None and token is None) or (
                entry.token is not None
                and token is not None
                and entry.token.access_token == token.access_token
            )
            if same and entry.stale_reason is None:
                self._entries[name] = Entry(token, entry.version)
                return
            self._entries[name] = Entry(token, entry.version + 1)
        self._wake(name)

    def show(self, name: str, token: Token | None, stale_reason: str | None) -> None:
        """Set the token and whether this replica can vouch for it in one step (a follower
        taking over what its watch holds): never a moment of vouching for the wrong one."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                return
            self._entries[name] = Entry(token, entry.version + 1, stale_reason)
        self._wake(name)

    def mark_stale(self, name: str, reason: str | None) -> None:
        """This replica cannot vouch for `name`'s token (`reason`), or can again (None)."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or entry.stale_reason == reason:
                return
            self._entries[name] = Entry(entry.token, entry.version + 1, reason)
        self._wake(name)

    async def changed(self, name: str, version: int, timeout: float) -> Entry | None:
        """Wait until `name`'s version is past `version`, at most `timeout` seconds; the entry
        then (None: it did not change, or the board closed)."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        waiters = self._waiters[name]
        waiters.add(waiter)
        try:
            entry = self.current(name)
            if entry is not None and entry.version > version:
                return entry
            if self.closed:
                return None
            try:
                await asyncio.wait_for(asyncio.shield(waiter), timeout)
            except TimeoutError:
                return None
            if self.closed:
                return None
            entry = self.current(name)
            return entry if entry is not None and entry.version > version else None
        finally:
            waiters.discard(waiter)

    async def newer(self, name: str, entry: Entry, timeout: float) -> Entry | None:
        """Wait for another token than `entry`'s (or for this replica to stop vouching), at
        most `timeout`: a board change that leaves the same token (vouched for again) is not
        one. None when the time is up or the board closed."""
        deadline = time.monotonic() + timeout
        version = entry.version
        held = entry.token.access_token if entry.token is not None else None
        while (left := deadline - time.monotonic()) > 0:
            newer = await self.changed(name, version, left)
            if newer is None:
                return None
            same = newer.token is not None and newer.token.access_token == held
            if not same or newer.stale_reason is not None:
                return newer
            version = newer.version
        return None

    def close(self) -> None:
        """Answer every long poll now (stopping)."""
        self.closed = True
        for name in list(self._waiters):
            self._wake(name)

    def _wake(self, name: str) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
            loop.call_soon_threadsafe(self._wake_on_loop, name)

    def _wake_on_loop(self, name: str) -> None:
        for waiter in list(self._waiters.get(name, ())):
            if not waiter.done():
                waiter.set_result(None)
