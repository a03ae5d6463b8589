"""`refresher demo`: the whole loop on this machine, with no outside service.

A loopback IdP that behaves like Lucidworks (JWTs of 20 s that are revoked as soon as a new
one is issued) is refreshed into a file by the real daemon, metrics are served, and two
consumer threads call the IdP's protected endpoint every 50 ms, as workloads would: one with
the token it reads from the file, one through the job's proxy (which adds the token and
replays a request the API rejected because the token was just replaced). Each refresh prints
one line; the end prints what each consumer saw.
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
from refresher.localidp import PROTECTED_PATH, LocalIdP
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
    """Calls the API every 50 ms: with the token file's token (`proxy_url` None), like a
    workload mounting the file, or through the proxy, adding no token of its own."""

    def __init__(self, token_file: Path, idp: LocalIdP, proxy_url: str | None = None) -> None:
        super().__init__(name="consumer", daemon=True)
        self.token_file, self.idp, self.proxy_url = token_file, idp, proxy_url
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
            if self.proxy_url is None:
                headers = {"Authorization": f"Bearer {token}"}
                answer = session.get(self.idp.protected_url, headers=headers, timeout=10)
            else:
                answer = session.get(self.proxy_url, timeout=10)
            with self.stats.lock:
                if answer.status_code == 200:
                    self.stats.ok += 1
                else:
                    self.stats.rejected.append((read_at, self.idp.token_status(token)))

    def summary(self) -> str:
        with self.stats.lock:
            return f"{self.stats.ok} ok, {len(self.stats.rejected)} rejected"


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
                    # Consumers may call the API through the refresher instead (proxy.py).
                    "proxy": {"listen": "127.0.0.1:0", "upstream": idp.base_url},
                }
            ],
            "metrics": {"bind": "127.0.0.1", "port": _port_or_any(port)},
        }
    )
    started = time.time()
    written: list[float] = []
    consumer = Consumer(token_file, idp)
    proxied: Consumer | None = None

    def show(event: RefreshEvent) -> None:
        now = time.time()
        if event.outcome == "success":
            written.append(now)
        stats = f"file consumer {consumer.summary()}"
        if proxied is not None:
            stats += f", proxy consumer {proxied.summary()}"
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
    proxy_url = f"http://127.0.0.1:{daemon.proxies['demo'].port}{PROTECTED_PATH}"
    proxied = Consumer(token_file, idp, proxy_url)
    print(f"IdP (Lucidworks-like, {lifetime:g}s JWTs, revoke on reissue): {idp.token_url}")
    print(f"token file: {token_file}")
    print(f"proxy: {proxy_url} (adds the token)")
    print(f"metrics: http://127.0.0.1:{daemon.http.port}/metrics  (also /healthz, /readyz)")
    print("Ctrl-C to stop" + (f"; stopping by itself after {duration:g}s" if duration else ""))

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        daemon.start()
        consumer.start()
        proxied.start()
        stop.wait(duration)
    finally:
        for each in (consumer, proxied):
            each.stop_event.set()
            if each.is_alive():
                each.join(timeout=5)
        daemon.stop()
        idp.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    inside, dead = consumer.stats.judge(written)
    print(
        f"done: {len(idp.issued)} token(s) issued; file consumer calls: {consumer.stats.ok} "
        f"accepted, {inside} rejected inside the write window, {dead} rejected otherwise; "
        f"proxy consumer calls: {proxied.summary()}"
    )
    return 0 if dead == 0 and not proxied.stats.rejected else 1
