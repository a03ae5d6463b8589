"""`refresher demo`: the whole loop on this machine, with no outside service.

A loopback IdP that behaves like Lucidworks (JWTs of 20 s that are revoked as soon as a new
one is issued) is refreshed into a file by the real daemon, metrics are served, and a consumer
thread reads the file and calls the IdP's protected endpoint every 50 ms, as a workload would.
Each refresh prints one line; the end prints what the consumer saw.
"""

from __future__ import annotations

import signal
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import requests

from refresher.config import validate
from refresher.daemon import Daemon
from refresher.localidp import LocalIdP
from refresher.refresh import RefreshEvent

CLIENT_ID, CLIENT_SECRET = "demo-client", "demo-secret-not-for-production"
SCOPE = "machinelearning.predict"


@dataclass
class ConsumerStats:
    ok: int = 0
    # (read time, token status) of every rejected call, judged once the run is over
    rejected: list[tuple[float, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def judge(self, written: list[float]) -> tuple[int, int]:
        """(inside the write window, otherwise). A call is inside the window when its token
        was revoked by a refresh whose file write finished after the call read the file."""
        inside = sum(
            1
            for read_at, status in self.rejected
            if status == "revoked" and any(read_at <= at for at in written)
        )
        return inside, len(self.rejected) - inside


class Consumer(threading.Thread):
    """Reads the token file and calls the API with it, like a workload mounting the file."""

    def __init__(self, token_file: Path, idp: LocalIdP) -> None:
        super().__init__(name="consumer", daemon=True)
        self.token_file, self.idp = token_file, idp
        self.stats = ConsumerStats()
        self.stop_event = threading.Event()

    def run(self) -> None:
        session = requests.Session()
        while not self.stop_event.wait(0.05):
            read_at = time.time()
            try:
                token = self.token_file.read_text()
            except FileNotFoundError:
                continue
            answer = session.get(
                self.idp.protected_url, headers={"Authorization": f"Bearer {token}"}
            )
            with self.stats.lock:
                if answer.status_code == 200:
                    self.stats.ok += 1
                else:
                    self.stats.rejected.append((read_at, self.idp.token_status(token)))


def _port_or_any(port: int) -> int:
    """`port` if it is free on loopback, else 0 (any free port), so a second demo still runs."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            print(f"port {port} is busy; serving metrics on a free port instead")
            return 0
    return port


def run_demo(*, duration: float | None, directory: Path | None, port: int, lifetime: float) -> int:
    folder = directory or Path(tempfile.mkdtemp(prefix="refresher-demo-"))
    folder.mkdir(parents=True, exist_ok=True)
    secret_file = folder / "client-secret"
    secret_file.write_text(CLIENT_SECRET)
    secret_file.chmod(0o600)
    token_file = folder / "token"

    idp = LocalIdP("lucidworks", lifetime=lifetime, clients={CLIENT_ID: CLIENT_SECRET}).start()
    config = validate(
        {
            "tokens": [
                {
                    "name": "demo",
                    "provider": "lucidworks",
                    "token_url": idp.token_url,
                    "client_id": CLIENT_ID,
                    "client_secret": {"file": str(secret_file)},
                    "scopes": [SCOPE],
                    # Demo tokens live seconds; production keeps the 30 s floor.
                    "min_refresh_interval": 1,
                    "sinks": [{"type": "file", "path": str(token_file)}],
                }
            ],
            "metrics": {"bind": "127.0.0.1", "port": _port_or_any(port)},
        }
    )
    started = time.time()
    written: list[float] = []
    consumer = Consumer(token_file, idp)

    def show(event: RefreshEvent) -> None:
        now = time.time()
        if event.outcome == "success":
            written.append(now)
        with consumer.stats.lock:
            stats = f"consumer {consumer.stats.ok} ok, {len(consumer.stats.rejected)} rejected"
        expires = f"expires in {event.expires_at - now:4.1f}s" if event.expires_at else ""
        window = f"write window {event.write_window * 1000:.2f} ms" if event.write_window else ""
        detail = event.message if event.outcome == "failure" else f"fp={event.fingerprint}"
        print(
            f"[{now - started:6.1f}s] {event.outcome:<8} {event.job} {detail}  {expires}  "
            f"next in {event.next_attempt_at - now:4.1f}s  IdP {event.duration * 1000:.1f} ms  "
            f"{window}  {stats}",
            flush=True,
        )

    daemon = Daemon(config, listeners=[show])
    assert daemon.http is not None
    print(f"IdP (Lucidworks-like, {lifetime:g}s JWTs, revoke on reissue): {idp.token_url}")
    print(f"token file: {token_file}")
    print(f"metrics: http://127.0.0.1:{daemon.http.port}/metrics  (also /healthz, /readyz)")
    print("Ctrl-C to stop" + (f"; stopping by itself after {duration:g}s" if duration else ""))

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        daemon.start()
        consumer.start()
        stop.wait(duration)
    finally:
        consumer.stop_event.set()
        consumer.join(timeout=5)
        daemon.stop()
        idp.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    inside, dead = consumer.stats.judge(written)
    print(
        f"done: {len(idp.issued)} token(s) issued; consumer calls: {consumer.stats.ok} accepted, "
        f"{inside} rejected inside the write window, {dead} rejected otherwise"
    )
    return 0 if dead == 0 else 1
