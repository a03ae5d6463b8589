"""Failure classification shared by every part that can fail a refresh.

A refresh fails for one of a small, fixed set of reasons. The reason labels metrics and log
lines (so it must be a bounded set) and decides nothing else: every failure is retried with
the same backoff policy, because a token that is not renewed will expire regardless of why.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    NETWORK = "network"  # connection refused, reset, DNS, TLS handshake
    TIMEOUT = "timeout"  # connect or read timeout
    HTTP_4XX = "http_4xx"
    HTTP_5XX = "http_5xx"
    INVALID_RESPONSE = "invalid_response"  # not JSON, no access_token, bad lifetime, redirect
    INVALID_CLIENT = "invalid_client"  # the IdP rejected the client credentials
    CREDENTIALS = "credentials"  # our own credential source (secret, key, certificate) unusable
    DISCOVERY = "discovery"  # the IdP's metadata document is unusable for this job
    SINK = "sink"  # a token could not be written to (or read from) a sink
    INTERNAL = "internal"  # a bug: caught so that one job cannot stop the daemon


class RefreshError(Exception):
    """A classified refresh failure. Its message never contains a token or a secret."""

    def __init__(
        self,
        reason: Reason,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.status = status
        self.retry_after = retry_after

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.message}"


class ConfigError(Exception):
    """A configuration that cannot run, with every problem found (each prefixed by its path)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
