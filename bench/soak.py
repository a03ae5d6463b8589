"""Soak under faults: `python -m bench.soak [--minutes 30 | --seconds S] [--json]`.

It prints a table (with `--json`, the figures as JSON on stdout and the table on stderr);
tests/test_soak.py runs `python -m bench.soak --seconds 45 --json` and checks the figures.

Three jobs (two on a Lucidworks-like IdP that revokes the previous token on reissue, one on a
plain IdP) write to files and to Secrets on a local Kubernetes API server. Tokens live 6 s and
are refreshed 2 s before expiry. A fault injector keeps breaking things for stretches shorter
than the margin: the IdPs answer 5xx, 429/503 with Retry-After, time out, reset connections or
send garbage; the API server answers 409 and 500. Consumer threads read every sink every few
milliseconds and call the IdP's protected endpoint with what they read.

Counted: refreshes; faults by kind; consumer reads; torn reads (must be 0); IdP requests per
issued token in stretches no fault touched (must be 1); and rejected reads, three ways:
- inside the write window: the token was revoked by a reissue whose write to the sinks landed
  within 250 ms, after this read;
- during fault recovery: revoked by a reissue the refresher could not deliver at once (the IdP
  answered after the client timed out, or a sink write failed and was retried);
- outside (must be 0): a newer token had already been written when the consumer read a dead
  one, or the token had simply expired.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from refresher.config import validate
from refresher.daemon import Daemon
from refresher.refresh import RefreshEvent
from testdoubles.idp import Fault, LocalIdP
from testdoubles.kubeapi import FakeKubeAPI

CLIENT_ID, CLIENT_SECRET = "soak-client", "soak-secret-0b1c"
LIFETIME, MARGIN = 6.0, 2.0
IDP_FAULTS = [
    Fault.SERVER_ERROR,
    Fault.UNAVAILABLE,
    Fault.RATE_LIMITED,
    Fault.SLOW,
    Fault.RESET,
    Fault.HTML,
    Fault.NOT_JSON,
]


@dataclass
class SoakResult:
    seconds: float = 0.0
    refreshes: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    reads: int = 0
    rejected_inside_window: int = 0
    rejected_during_recovery: int = 0
    rejected_outside_window: int = 0
    torn_reads: int = 0
    steady_requests: int = 0  # IdP requests in stretches no fault touched
    steady_issued: int = 0  # tokens issued in those stretches
    write_windows: list[float] = field(default_factory=list)

    @property
    def requests_per_token(self) -> float:
        return self.steady_requests / self.steady_issued if self.steady_issued else float("nan")


class Consumer(threading.Thread):
    """Reads one sink and calls the API with what it read, like a workload would."""

    def __init__(
        self,
        job: str,
        read: Callable[[], str | None],
        idp: LocalIdP,
        stop: threading.Event,
        issued: Callable[[], set[str]],
    ) -> None:
        super().__init__(daemon=True)
        self.job, self.read, self.idp, self.stop, self.issued = job, read, idp, stop, issued
        self.reads = 0
        self.torn = 0
        self.rejected: list[tuple[float, str]] = []  # (read time, token)

    def run(self) -> None:
        session = requests.Session()
        while not self.stop.is_set():
            read_at = time.time()
            token = self.read()
            if token is not None:
                if token not in self.issued():
                    self.torn += 1
                elif (
                    session.get(
                        self.idp.protected_url,
                        headers={"Authorization": f"Bearer {token}"},
                        timeout=5,
                    ).status_code
                    != 200
                ):
                    self.rejected.append((read_at, token))
                self.reads += 1
            time.sleep(0.004)


def run(seconds: float, seed: int = 1) -> SoakResult:
    rng = random.Random(seed)
    result = SoakResult(seconds=seconds)
    written_at: dict[str, list[float]] = {}  # job -> when each new token reached all sinks

    def on_event(event: RefreshEvent) -> None:
        if event.outcome == "success" and event.write_window is not None:
            written_at.setdefault(event.job, []).append(time.time())
            result.write_windows.append(event.write_window)

    with (
        tempfile.TemporaryDirectory() as tmp,
        FakeKubeAPI() as kube,
        LocalIdP("lucidworks", lifetime=LIFETIME, clients={CLIENT_ID: CLIENT_SECRET}) as revoking,
        LocalIdP("generic", lifetime=LIFETIME, clients={CLIENT_ID: CLIENT_SECRET}) as plain,
    ):
        folder = Path(tmp)
        secret = folder / "client-secret"
        secret.write_text(CLIENT_SECRET)
        secret.chmod(0o600)

        def job(
            name: str, idp: LocalIdP, scope: str, sinks: list[dict[str, Any]]
        ) -> dict[str, Any]:
            return {
                "name": name,
                "provider": idp.shape.name,
                "token_url": idp.token_url,
                "client_id": CLIENT_ID,
                "client_secret": {"file": str(secret)},
                "scopes": [scope],
                "margin": MARGIN,
                "min_refresh_interval": 0.5,
                "read_timeout": 1,
                "sinks": sinks,
            }

        config = validate(
            {
                "tokens": [
                    job(
                        "predict",
                        revoking,
                        "machinelearning.predict",
                        [{"type": "file", "path": str(folder / "predict")}],
                    ),
                    job(
                        "model",
                        revoking,
                        "machinelearning.model",
                        [{"type": "kubernetes", "name": "model-token", "create": True}],
                    ),
                    job(
                        "plain",
                        plain,
                        "read",
                        [
                            {"type": "file", "path": str(folder / "plain.json"), "format": "json"},
                            {"type": "kubernetes", "name": "plain-token", "create": True},
                        ],
                    ),
                ],
                "metrics": {"enabled": False},
                "kubernetes": {
                    "kubeconfig": str(kube.write_kubeconfig(folder / "kubeconfig")),
                    "request_timeout": 2,
                },
            }
        )

        def issued_tokens() -> set[str]:
            return {t.access_token for t in revoking.issued + plain.issued}

        def file_reader(path: Path, parse: Callable[[str], str]) -> Callable[[], str | None]:
            def read() -> str | None:
                try:
                    return parse(path.read_text())
                except FileNotFoundError:
                    return None
                except (ValueError, KeyError):
                    return ""  # unparsable: counted as torn

            return read

        def secret_reader(name: str) -> Callable[[], str | None]:
            def read() -> str | None:
                obj = kube.get_object("secrets", "default", name)
                return None if obj is None else base64.b64decode(obj["data"]["token"]).decode()

            return read

        stop = threading.Event()
        consumers = [
            Consumer(
                "predict",
                file_reader(folder / "predict", lambda t: t),
                revoking,
                stop,
                issued_tokens,
            ),
            Consumer("model", secret_reader("model-token"), revoking, stop, issued_tokens),
            Consumer(
                "plain",
                file_reader(folder / "plain.json", lambda t: json.loads(t)["access_token"]),
                plain,
                stop,
                issued_tokens,
            ),
            Consumer("plain", secret_reader("plain-token"), plain, stop, issued_tokens),
        ]
        daemon = Daemon(config, listeners=[on_event]).start()
        try:
            deadline = time.monotonic() + 3
            while not all(r.snapshot().ready for r in daemon.runners):
                if time.monotonic() > deadline:
                    raise RuntimeError("jobs did not get their first tokens")
                time.sleep(0.05)
            for consumer in consumers:
                consumer.start()
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                # A quiet stretch first: counted for requests per token if nothing spills in.
                quiet = rng.uniform(2.0, 6.0)
                before = (
                    revoking.token_requests + plain.token_requests,
                    len(revoking.issued) + len(plain.issued),
                )
                time.sleep(min(quiet, max(end - time.monotonic(), 0)))
                after = (
                    revoking.token_requests + plain.token_requests,
                    len(revoking.issued) + len(plain.issued),
                )
                result.steady_requests += after[0] - before[0]
                result.steady_issued += after[1] - before[1]
                if time.monotonic() >= end:
                    break
                # Then a fault, shorter than the margin.
                kinds: list[Fault | str] = [*IDP_FAULTS, "kube-409", "kube-500"]
                kind = rng.choice(kinds)
                stretch = rng.uniform(0.3, MARGIN * 0.75)
                if isinstance(kind, Fault):
                    target = rng.choice([revoking, plain])
                    target.set_fault(kind, retry_after=0.5, slow_seconds=1.5)
                    result.faults[kind.name.lower()] += 1
                    time.sleep(stretch)
                    target.set_fault(None)
                elif kind == "kube-409":
                    kube.inject_conflicts(rng.randint(1, 3))
                    result.faults[kind] += 1
                else:
                    kube.inject_errors(rng.randint(1, 3), status=500)
                    result.faults[kind] += 1
                time.sleep(1.6)  # let a slow request finish before the next quiet stretch counts
        finally:
            stop.set()
            for consumer in consumers:
                consumer.join(timeout=10)
            daemon.stop()
        result.refreshes = sum(len(times) for times in written_at.values())
        revoked_at = {t.access_token: t.revoked_at for t in revoking.issued + plain.issued}
        for consumer in consumers:
            result.reads += consumer.reads
            result.torn_reads += consumer.torn
            writes = written_at.get(consumer.job, [])
            for read_at, token in consumer.rejected:
                revoked = revoked_at.get(token)
                if revoked is None or any(revoked <= w < read_at - 0.005 for w in writes):
                    result.rejected_outside_window += 1  # expired, or a newer token had landed
                elif any(read_at - 0.005 <= w <= revoked + 0.25 for w in writes):
                    result.rejected_inside_window += 1
                else:
                    result.rejected_during_recovery += 1
    return result


def report(result: SoakResult) -> str:
    windows = sorted(result.write_windows)
    rows = [
        ("duration", f"{result.seconds:.0f} s"),
        ("refreshes (tokens written)", result.refreshes),
        ("faults injected", ", ".join(f"{k} {v}" for k, v in sorted(result.faults.items()))),
        ("consumer reads", result.reads),
        ("rejected inside the write window", result.rejected_inside_window),
        (
            "rejected during fault recovery (token reissued, delivery delayed)",
            result.rejected_during_recovery,
        ),
        ("rejected outside the write window (must be 0)", result.rejected_outside_window),
        ("torn reads (must be 0)", result.torn_reads),
        (
            "IdP requests per token in fault-free stretches (must be 1)",
            f"{result.requests_per_token:.3f} ({result.steady_requests}/{result.steady_issued})",
        ),
        (
            "write window p50 / max",
            f"{windows[len(windows) // 2] * 1000:.2f} ms / {windows[-1] * 1000:.2f} ms"
            if windows
            else "-",
        ),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)


def figures(result: SoakResult) -> dict[str, Any]:
    """Every figure of a run, for `--json`."""
    values = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
    # Not dataclasses.asdict: it rebuilds a Counter from (key, count) pairs, counting pairs.
    values["faults"] = dict(result.faults)
    return {**values, "requests_per_token": result.requests_per_token}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.soak")
    duration = parser.add_mutually_exclusive_group()
    duration.add_argument("--minutes", type=float, default=30)
    duration.add_argument("--seconds", type=float, help="instead of --minutes")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--json", action="store_true", help="figures as JSON on stdout, the table on stderr"
    )
    args = parser.parse_args()
    seconds = args.seconds if args.seconds is not None else args.minutes * 60
    result = run(seconds, args.seed)
    if args.json:
        print(report(result), file=sys.stderr)
        print(json.dumps(figures(result)))
    else:
        print(report(result))


if __name__ == "__main__":
    main()
