"""Log output: one JSON object per line (for machines) or `key=value` text (for people).

Fields given as `extra={...}` become keys of the line. Nothing here redacts: secrets are kept
out of log records at the source (tokens and secrets have no printable form, errors carry
fingerprints), and the test suite checks that with known secret values.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

# Attributes every LogRecord has; anything else on a record came from `extra`.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {key: value for key, value in record.__dict__.items() if key not in _STANDARD}


def _timestamp(record: logging.LogRecord) -> str:
    return (
        datetime.fromtimestamp(record.created, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


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
            line["stack"] = self.formatStack(self.formatException(record.exc_info))
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{key}={value}" for key, value in _extras(record).items())
        text = f"{_timestamp(record)} {record.levelname.lower():<7} {record.getMessage()}"
        if fields:
            text += f"  {fields}"
        if record.exc_info and record.exc_info[0] is not None:
            text += "\n" + self.formatException(record.exc_info)
        return text


def configure(
    log_format: str | None = None, level: str = "info", stream: TextIO | None = None
) -> None:
    """Route the `refresher` loggers to `stream`; JSON unless the stream is a terminal."""
    stream = stream or sys.stderr
    if log_format is None:
        log_format = "text" if stream.isatty() else "json"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Library chatter (urllib3 connection lines, apscheduler job lines) only when debugging.
    for noisy in ("urllib3", "apscheduler", "kubernetes"):
        logging.getLogger(noisy).setLevel(
            logging.WARNING if level.lower() != "debug" else logging.DEBUG
        )
