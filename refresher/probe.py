"""Asking the real API whether it still accepts a token (rule 11 of docs/design.md).

A token can die before its `exp`: on an IdP that revokes the previous token on reissue, one
token request by anyone else with the same client and scope kills it, and a successor
leader may adopt a token whose replacement was issued but never written. `Prober.probe`
sends one request to the job's `probe.url` with the token and judges the answer:

- a status in the job's `rejected_statuses` (default 401): **rejected**, the token is dead;
- any 2xx: **accepted**;
- anything else (a 5xx, a 403 or 404 not listed, a redirect, a timeout, no connection):
  **error**, which says nothing about the token and never leads to a refresh.

The token goes to that URL only: redirects are never followed, and a plain-http probe URL
(loopback, or allowed with `allow_insecure_http`) never goes through a proxy. The answer's
body is never read (a huge or endless body costs nothing) and never logged. Every probe runs
in a thread of its own (at most `workers` at once) and is waited for at most
`connect_timeout + read_timeout`, a wait for a free thread included: a server that trickles
its headers a byte at a time holds that thread, not the refresh. The threads are daemon
threads, so a stuck one never holds up the end of `refresher once`.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

import requests
import urllib3

from refresher import __version__
from refresher.config import ProbeConfig, TokenJobConfig
from refresher.credentials import read_credentials
from refresher.errors import RefreshError
from refresher.idp import SendSettings
from refresher.tokens import Token

ProbeOutcome = Literal["accepted", "rejected", "error"]

# Probes in flight at once, across every job; one stuck on a slow server holds one of these.
PROBE_WORKERS = 16


@dataclass(frozen=True)
class ProbeResult:
    outcome: ProbeOutcome
    detail: str  # `HTTP 401`, `read timeout talking to api.example.com`: never a secret
    status: int | None = None


def judge(status: int, rejected_statuses: list[int]) -> ProbeResult:
    """An answer's status as a probe outcome (the rule of the module docstring)."""
    if status in rejected_statuses:
        return ProbeResult("rejected", f"HTTP {status}", status)
    if 200 <= status < 300:
        return ProbeResult("accepted", f"HTTP {status}", status)
    if 300 <= status < 400:
        return ProbeResult("error", f"HTTP {status} redirect not followed", status)
    return ProbeResult("error", f"HTTP {status}", status)


def probe_seconds(config: ProbeConfig) -> float:
    """The longest a probe is waited for, queueing for a slot included."""
    return config.connect_timeout + config.read_timeout


class Prober:
    """Sends probes over one shared `requests.Session`, at most `workers` at once."""

    def __init__(self, session: requests.Session, workers: int = PROBE_WORKERS) -> None:
        self.session = session
        self._settings = SendSettings(session)
        self._slots = threading.BoundedSemaphore(workers)

    def probe(self, job: TokenJobConfig, token: Token) -> ProbeResult:
        """Probe `token` with `job`'s probe; an error result when the job has none."""
        config = job.probe
        if config is None:
            return ProbeResult("error", "no probe configured")
        host = urlsplit(config.url).netloc
        deadline = time.monotonic() + probe_seconds(config)
        late = ProbeResult("error", f"no answer from {host} within the probe's timeouts")
        if not self._slots.acquire(timeout=probe_seconds(config)):
            return late  # every slot is held by a probe stuck on a slow server
        result: Future[ProbeResult] = Future()

        def run() -> None:
            try:
                result.set_result(self._send(job, config, token, host))
            except BaseException as err:  # handed to the waiting caller, which counts it
                result.set_exception(err)
            finally:
                self._slots.release()

        try:
            threading.Thread(target=run, name="refresher-probe", daemon=True).start()
        except BaseException:
            self._slots.release()
            raise
        try:
            return result.result(timeout=max(deadline - time.monotonic(), 0.0))
        except FutureTimeout:
            return late

    def _send(
        self, job: TokenJobConfig, config: ProbeConfig, token: Token, host: str
    ) -> ProbeResult:
        headers = {
            "Accept": "*/*",
            "Cache-Control": "no-cache",
            "User-Agent": f"refresher/{__version__}",
            **config.headers,
            "Authorization": f"Bearer {token.access_token}",
        }
        if config.credential_headers:
            try:
                extras = read_credentials(job).extras
            except RefreshError as err:
                return ProbeResult("error", f"cannot read the probe's credentials: {err.message}")
            for header, extra in config.credential_headers.items():
                if extra not in extras:
                    return ProbeResult("error", f"the credentials have no {extra!r}")
                headers[header] = extras[extra]
        verify: bool | str = str(config.ca_bundle) if config.ca_bundle else True
        try:
            prepared = requests.Request(config.method, config.url, headers=headers).prepare()
            with self.session.send(
                prepared,
                timeout=(config.connect_timeout, config.read_timeout),
                allow_redirects=False,
                stream=True,  # the body is never read: closing drops the connection
                **self._settings.for_url(config.url, verify),
            ) as response:
                status = response.status_code
        except (requests.Timeout, urllib3.exceptions.ReadTimeoutError) as err:
            phase = "connect" if isinstance(err, requests.ConnectTimeout) else "read"
            return ProbeResult("error", f"{phase} timeout talking to {host}")
        except (requests.exceptions.SSLError, urllib3.exceptions.SSLError):
            return ProbeResult("error", f"TLS verification with {host} failed (set ca_bundle?)")
        except (requests.RequestException, urllib3.exceptions.HTTPError) as err:
            # The exception's text can quote the URL and its query; the class name is enough.
            return ProbeResult("error", f"{type(err).__name__} talking to {host}")
        return judge(status, job.rejected_statuses)
