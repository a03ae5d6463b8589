"""Sinks: the places a token is written to and read back from.

Every sink offers the same two operations (see `Sink`); which one a job uses is config.
`build_sink` imports a sink's module only when it is used, so that a file-only setup never
pays for importing the `kubernetes` package.
"""

from __future__ import annotations

from typing import Protocol

from refresher.tokens import Token


class Sink(Protocol):
    # Bounded and free of secrets: used as a metric label and in log lines.
    name: str

    def read(self, now: float) -> Token | None:
        """The token this sink holds now, or None when it holds none (or one it cannot use).

        Raises RefreshError(SINK) when the place cannot be read at all (permissions, API).
        """
        ...

    def write(self, token: Token) -> None:
        """Replace the held token with `token`, atomically. Raises RefreshError(SINK)."""
        ...


def build_sink(config: object) -> Sink:
    """The sink for one `sinks[]` entry of the config."""
    from refresher.config import FileSinkConfig

    if isinstance(config, FileSinkConfig):
        from refresher.sinks.file import FileSink

        return FileSink(config)
    raise TypeError(f"no sink for {type(config).__name__}")
