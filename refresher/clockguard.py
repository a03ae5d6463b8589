"""Wall-clock jumps: every scheduled run also has a deadline on the monotonic clock.

APScheduler 3 fires a date job when the *wall* clock reaches its run date. If the wall clock is
set back an hour (a bad NTP step, a VM restored from a snapshot), a refresh planned for 40 s
from now would wait an hour and 40 s while consumers hold an expired token. So each run also
gets a deadline `delay` seconds away on the monotonic clock, which no clock setting moves, and
a job runs at whichever comes first:
- the wall clock reaching its run date (APScheduler's own work). After a forward jump that is
  early; running early only refreshes early, which is safe, and each job runs once, not in a
  loop, because its next run is planned from the new time;
- its monotonic deadline passing (`ClockGuard`'s work): after a backward jump the wall clock
  would hold the job back, so the guard has the scheduler run it at once. A job late by both
  clocks (waiting for a busy pool) is the scheduler's business and left alone.

The guard is a thread that sleeps until the earliest deadline: no polling, no wake-up while
nothing is due. It also measures jumps (the change of wall minus monotonic time) so the daemon
can log them and move the times it holds.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

from refresher.clock import Clock

log = logging.getLogger(__name__)


# A change of (wall - monotonic) below this is not a jump: NTP slews the wall clock by at most
# 500 ppm, so between two looks `elapsed` seconds apart it drifts by at most 0.0005 * elapsed.
JUMP_THRESHOLD_SECONDS = 1.0
SLEW_RATE = 0.001


def slew_allowance(seconds: float) -> float:
    """How far the wall clock may drift from the monotonic one over `seconds` without having
    jumped."""
    return max(JUMP_THRESHOLD_SECONDS, SLEW_RATE * seconds)


class ClockGuard:
    def __init__(
        self,
        on_overdue: Callable[[str], None],
        on_jump: Callable[[float], None],
        *,
        wall: Clock = time.time,
        monotonic: Clock = time.monotonic,
        grace: float = 0.25,
    ) -> None:
        # `on_overdue(name)`: the job's monotonic deadline passed `grace` ago, it has not
        # started, and the wall clock is still short of its run date by more than slew
        # explains (a job that is merely waiting for a busy pool is the scheduler's business);
        # `on_jump(seconds)`: the wall clock moved by `seconds` against the monotonic one.
        self._on_overdue = on_overdue
        self._on_jump = on_jump
        self._wall = wall
        self._monotonic = monotonic
        self._grace = grace
        self._lock = threading.Lock()
        self._heap: list[tuple[float, int, str]] = []  # (deadline, sequence, job name)
        # job name -> (sequence, wall-clock run date, delay) of its one live deadline
        self._live: dict[str, tuple[int, float, float]] = {}
        self._sequence = itertools.count()
        self._offset = wall() - monotonic()
        self._offset_seen_at = monotonic()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------------------- deadlines

    def arm(self, name: str, delay: float) -> None:
        """`name` should run `delay` seconds from now; replaces its previous deadline."""
        delay = max(delay, 0.0)
        deadline = self._monotonic() + delay
        run_date = self._wall() + delay
        with self._lock:
            sequence = next(self._sequence)
            self._live[name] = (sequence, run_date, delay)
            earliest = not self._heap or deadline < self._heap[0][0]
            heapq.heappush(self._heap, (deadline, sequence, name))
        if earliest:
            self._wake.set()  # the thread sleeps until the old earliest deadline

    def disarm(self, name: str) -> None:
        """`name` has started (or was removed): its deadline no longer matters."""
        with self._lock:
            self._live.pop(name, None)  # its heap entry is dropped when it comes up

    def clear(self) -> None:
        with self._lock:
            self._live.clear()
            self._heap.clear()

    def is_armed(self, name: str) -> bool:
        with self._lock:
            return name in self._live

    def pending(self) -> int:
        with self._lock:
            return len(self._live)

    # --------------------------------------------------------------------------------- jumps

    def check_clock(self) -> float:
        """How far the wall clock jumped since the last look (0.0 if it did not); tells
        `on_jump` when it did. Cheap: called on every run and every metrics scrape."""
        wall, monotonic = self._wall(), self._monotonic()
        with self._lock:
            offset = wall - monotonic
            jump = offset - self._offset
            allowed = slew_allowance(monotonic - self._offset_seen_at)
            self._offset, self._offset_seen_at = offset, monotonic
        if abs(jump) <= allowed:
            return 0.0
        log.warning("wall clock jumped", extra={"seconds": round(jump, 3)})
        self._on_jump(jump)
        return jump

    # -------------------------------------------------------------------------------- thread

    def start(self) -> ClockGuard:
        self._thread = threading.Thread(target=self._loop, name="refresher-clock", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()  # before reading the heap: an arm() from now on wakes us again
            self._wake.wait(self._sleep_seconds())
            if self._stopping.is_set():
                return
            self.check_clock()
            for name in self._take_overdue():
                try:
                    self._on_overdue(name)
                except Exception:  # the guard must outlive any one job's trouble
                    log.exception("cannot run an overdue job", extra={"token": name})

    def _sleep_seconds(self) -> float | None:
        with self._lock:
            while self._heap and self._sequence_of(self._heap[0][2]) != self._heap[0][1]:
                heapq.heappop(self._heap)  # superseded or disarmed
            if not self._heap:
                return None  # nothing scheduled: sleep until arm() or stop()
            return max(self._heap[0][0] + self._grace - self._monotonic(), 0.0)

    def _sequence_of(self, name: str) -> int | None:
        live = self._live.get(name)
        return live[0] if live else None

    def _take_overdue(self) -> list[str]:
        now, wall = self._monotonic(), self._wall()
        overdue: list[str] = []
        with self._lock:
            while self._heap and self._heap[0][0] + self._grace <= now:
                _, sequence, name = heapq.heappop(self._heap)
                live = self._live.get(name)
                if live is None or live[0] != sequence:
                    continue  # superseded or disarmed
                del self._live[name]
                _, run_date, delay = live
                if run_date - wall > slew_allowance(delay):
                    overdue.append(name)
        return overdue
