"""Time as the refresher sees it: one clock type, and one way to write and read UTC times.

Every time the refresher holds is Unix seconds (a float) from an injected `Clock`, so tests
can move time without sleeping. Text forms appear only at the edges: sink files, Secret
annotations, Lease MicroTimes, log lines, `refresher status`.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Literal

Clock = Callable[[], float]
"""Returns the current time in seconds (`time.time` for the wall clock, `time.monotonic`)."""

TimeSpec = Literal["seconds", "milliseconds", "microseconds"]


def format_utc(epoch: float, timespec: TimeSpec = "milliseconds") -> str:
    """`2026-12-01T09:40:06.123Z`. Never raises: a time no calendar holds (a stored expiry
    edited to year 300,000, say) prints as `out-of-range(<seconds>)`."""
    try:
        when = datetime.fromtimestamp(epoch, UTC)
    except (OverflowError, OSError, ValueError):
        return f"out-of-range({epoch:.6g})"
    return when.isoformat(timespec=timespec).replace("+00:00", "Z")


def parse_utc(text: str | None) -> float | None:
    """The Unix time of an ISO 8601 UTC text written by `format_utc`; None when it is not one."""
    if not text:
        return None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        return None  # a time without a zone is no time at all here
    return when.timestamp()
