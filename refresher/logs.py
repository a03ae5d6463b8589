"""Log output: one JSON object per line (for machines) or `key=value` text (for people).

Fields given as `extra={...}` become keys of the line. Nothing here redacts: secrets are kept
out of log records at the source (tokens and secrets have no printable form, errors carry
fingerprints), and the test suite checks that with known secret values.

Logging never blocks the caller and never raises into it. A record is formatted by the thread
that logs it and put on a bounded queue (`QUEUE_LINES`); one writer thread writes the lines
out. When the stream does not keep up (stderr a pipe nobody reads) the queue fills and further
lines are dropped and counted (`refresher_log_records_dropped_total`); a line the stream
refuses (stderr closed, EPIPE) is counted too (`refresher_log_write_errors_total`), and no
`--- Logging error ---` traceback is printed. Standard error is written with `os.write` on
its descriptor, not through `sys.stderr`, so a writer stuck on a full pipe holds no lock the
interpreter needs to exit.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import select
import sys
import threading
import traceback
from typing import Any, TextIO

from refresher.clock import format_utc

# Lines waiting for the writer: a few hundred KB at most; the writer normally keeps up with
# any refresh rate (the IdP rate limit spaces refreshes), so only a stuck stream fills it.
QUEUE_LINES = 1000
FLUSH_SECONDS = 2.0  # at exit, how long to wait for queued lines (a stuck pipe never drains)

# Attributes every LogRecord has; anything else on a record came from `extra`.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {key: value for key, value in record.__dict__.items() if key not in _STANDARD}


def _timestamp(record: logging.LogRecord) -> str:
    return format_utc(record.created)


def _places(record: logging.LogRecord) -> str:
    """Where an exception was raised: the frames of its traceback (and of its causes), never
    its message, which may quote a value (a library's error can echo what it was given)."""
    assert record.exc_info is not None
    error = record.exc_info[1]
    parts: list[str] = []
    while error is not None and len(parts) < 5:
        frames = "".join(traceback.format_tb(error.__traceback__)).rstrip()
        parts.append(f"{type(error).__name__}:\n{frames}")
        error = error.__cause__ or error.__context__
    return "\n".join(parts)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **_extras(record),
        }
        if record.exc_info and record.exc_info[0] is not None:
            # The type and place only: exception messages from libraries can quote values.
            line["exception"] = record.exc_info[0].__name__
            line["stack"] = _places(record)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{key}={value}" for key, value in _extras(record).items())
        text = f"{_timestamp(record)} {record.levelname.lower():<7} {record.getMessage()}"
        if fields:
            text += f"  {fields}"
        if record.exc_info and record.exc_info[0] is not None:
            text += f"\n{record.exc_info[0].__name__} at\n{_places(record)}"
        return text


class _Counts:
    """Process-wide, since logging is set up before anything else exists; the metrics
    collector reads them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.dropped = 0
        self.write_errors = 0

    def add(self, dropped: int = 0, write_errors: int = 0) -> None:
        with self.lock:
            self.dropped += dropped
            self.write_errors += write_errors


_counts = _Counts()


def dropped_records() -> int:
    """Log lines dropped because the queue was full (the stream did not keep up)."""
    return _counts.dropped


def write_errors() -> int:
    """Log lines the stream refused (closed, broken pipe) or that could not be formatted."""
    return _counts.write_errors


class _Target:
    """Where lines go. Standard output and error by descriptor; other streams (a test's
    capture, a file) through their `write`; nothing at all when stderr was closed at start."""

    def __init__(self, stream: TextIO | None) -> None:
        self.stream = stream
        self.fd: int | None = None
        try:
            fd = stream.fileno() if stream is not None and hasattr(stream, "fileno") else None
        except (OSError, ValueError):  # io.UnsupportedOperation is both
            fd = None
        if fd in (1, 2):
            self.fd = fd

    def isatty(self) -> bool:
        try:
            return self.stream is not None and self.stream.isatty()
        except (OSError, ValueError):
            return False

    def write(self, line: str) -> None:
        if self.fd is not None:
            data = line.encode("utf-8", "backslashreplace")
            while data:
                try:
                    data = data[os.write(self.fd, data) :]
                except BlockingIOError:  # a non-blocking stderr: wait, as a full pipe blocks
                    select.select([], [self.fd], [], 1.0)
        elif self.stream is not None:
            self.stream.write(line)
            self.stream.flush()
        else:
            raise OSError("standard error is closed")


_Item = tuple[_Target, str] | threading.Event
_queue: queue.Queue[_Item] = queue.Queue(QUEUE_LINES)
_writer: threading.Thread | None = None
_writer_lock = threading.Lock()
_log = logging.getLogger("refresher.logs")


def _write_forever() -> None:
    reported = 0
    while True:
        item = _queue.get()
        if isinstance(item, threading.Event):
            item.set()
            continue
        target, line = item
        try:
            target.write(line)
        except Exception:
            _counts.add(write_errors=1)
            continue
        dropped = _counts.dropped
        if dropped > reported and _queue.qsize() < QUEUE_LINES // 2:
            reported = dropped  # the stream caught up: say, once, that lines are missing
            _log.warning(
                "log lines were dropped: the log stream did not keep up",
                extra={"dropped_total": dropped},
            )


def _start_writer() -> None:
    global _writer
    with _writer_lock:
        if _writer is None:
            _writer = threading.Thread(target=_write_forever, name="refresher-log", daemon=True)
            _writer.start()
            atexit.register(flush)


def flush(timeout: float = FLUSH_SECONDS) -> bool:
    """Wait until the lines queued so far are written (or refused); False after `timeout`."""
    if _writer is None:
        return True
    done = threading.Event()
    try:
        _queue.put(done, timeout=timeout)
    except queue.Full:
        return False
    return done.wait(timeout)


class QueueHandler(logging.Handler):
    """Formats in the caller's thread and queues the line; never blocks, never raises."""

    def __init__(self, target: _Target) -> None:
        super().__init__()
        self.target = target

    def handle(self, record: logging.LogRecord) -> bool:  # no handler lock: emit is safe
        rv = self.filter(record)
        if rv:
            self.emit(record)
        return bool(rv)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:
            _counts.add(write_errors=1)
            return
        try:
            _queue.put_nowait((self.target, line))
        except queue.Full:
            _counts.add(dropped=1)

    def handleError(self, record: logging.LogRecord) -> None:
        _counts.add(write_errors=1)  # never the `--- Logging error ---` report on stderr


def _reserve_standard_fds() -> None:
    """A process started with a standard descriptor closed (`2>&-`) would hand that number to
    the next file it opens, a token file say, and anything written to "stderr" would land in
    it. Point closed ones at /dev/null; `sys.stderr` stays None and lines are counted."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            opened = os.open(os.devnull, os.O_RDWR)
            if opened != fd:
                os.dup2(opened, fd)
                os.close(opened)


# Library chatter (connection lines, job lines, aiohttp's notes on clients that sent garbage
# or went away) only when debugging.
_NOISY = {
    "urllib3": logging.WARNING,
    "apscheduler": logging.WARNING,
    "kubernetes": logging.WARNING,
    "asyncio": logging.WARNING,
    "aiohttp": logging.WARNING,
    "refresher.http.protocol": logging.CRITICAL,
}
_level = {"configured": logging.INFO}


def _apply_level(level: int) -> None:
    logging.getLogger().setLevel(level)
    for name, quiet in _NOISY.items():
        logging.getLogger(name).setLevel(logging.DEBUG if level <= logging.DEBUG else quiet)


def toggle_debug() -> bool:
    """Switch between debug and the configured level (SIGUSR2); True when debug is now on."""
    debug = logging.getLogger().level > logging.DEBUG
    _apply_level(logging.DEBUG if debug else _level["configured"])
    return debug


def configure(
    log_format: str | None = None, level: str = "info", stream: TextIO | None = None
) -> None:
    """Route every logger to `stream` (default: standard error) through the queue; JSON
    unless the stream is a terminal."""
    if stream is None:
        _reserve_standard_fds()
        stream = sys.stderr  # None when the process was started with stderr closed
    target = _Target(stream)
    if log_format is None:
        log_format = "text" if target.isatty() else "json"
    _start_writer()
    handler = QueueHandler(target)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    logging.getLogger().handlers[:] = [handler]
    _level["configured"] = logging.getLevelName(level.upper())
    _apply_level(_level["configured"])
