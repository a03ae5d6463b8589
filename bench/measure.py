"""One measurement in a fresh interpreter: `python -m bench.measure SECTION ARGS...`.

Prints one JSON line of raw figures; `bench/__main__.py` turns them into tables.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from bench.__main__ import job, secret_file
from bench.idp_process import CLIENT_ID, CLIENT_SECRET, idp_process
from refresher import logs
from refresher.config import Config, validate
from refresher.daemon import Daemon, build_runners
from refresher.idp import basic_authorization
from refresher.refresh import RefreshEvent
from refresher.sinks.file import atomic_write, sync_dir

# The default IdP rate limit (20/s per token URL) protects real IdPs; back-to-back refreshes
# against one URL would measure only its spacing (50 ms each).
UNLIMITED: dict[str, Any] = {"idp_rate_limit": 1e6, "idp_rate_burst": 1000}


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def quiet_logs() -> None:
    """Logging as in production (JSON lines at INFO), into /dev/null."""
    logs.configure("json", "info", open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the process


def window(sink: str, refreshes: int) -> dict[str, Any]:
    quiet_logs()
    windows: list[float] = []

    def on_event(event: RefreshEvent) -> None:
        if event.write_window is not None:
            windows.append(event.write_window)

    with idp_process("generic") as url, tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        secret = secret_file(folder)
        settings: dict[str, Any] = {"metrics": {"enabled": False}, **UNLIMITED}
        kube_api = None
        if sink == "file":
            sinks: list[dict[str, Any]] = [{"type": "file", "path": str(folder / "token")}]
        else:
            from testdoubles.kubeapi import FakeKubeAPI  # only here: file runs import less

            kube_api = FakeKubeAPI().start()
            settings["kubernetes"] = {
                "kubeconfig": str(kube_api.write_kubeconfig(folder / "kubeconfig"))
            }
            sinks = [{"type": "kubernetes", "name": "bench-token", "create": True}]
        config = validate({"tokens": [job("w", url, secret, sinks)], **settings})
        (runner,) = build_runners(config, listeners=[on_event])
        runner.step()  # reads the sink, fetches, creates the Secret
        windows.clear()
        requests_before = kube_api.write_count("secrets") if kube_api else 0
        all_before = len(kube_api.requests) if kube_api else 0
        for _ in range(refreshes):
            runner.refresh_now()
        per_refresh = 0.0
        if kube_api is not None:
            per_refresh = (len(kube_api.requests) - all_before) / refreshes
            assert kube_api.write_count("secrets") - requests_before == refreshes
            kube_api.stop()
    return {"windows": windows, "api_requests_per_refresh": per_refresh}


# The physical limit every figure is held against: one bare `requests` POST for a token and
# one fsynced file write of it, nothing else.
BARE_HEADERS = {"Authorization": basic_authorization(CLIENT_ID, CLIENT_SECRET, form_encode=True)}


def bare_refresh(session: requests.Session, url: str, scope: str, path: Path) -> None:
    answer = session.post(
        url,
        data={"grant_type": "client_credentials", "scope": scope},
        headers=BARE_HEADERS,
        timeout=10,
    )
    atomic_write(path, answer.json()["access_token"].encode(), 0o600)
    sync_dir(path.parent)


def one_job_daemon(url: str, folder: Path) -> tuple[Daemon, Callable[[], None]]:
    """A daemon with one file job that has its first token, and one full refresh cycle
    (fetch, validate, write, metrics, log, reschedule) to call as often as wanted."""
    sinks = [{"type": "file", "path": str(folder / "token")}]
    config = validate(
        {
            "tokens": [job("o", url, secret_file(folder), sinks)],
            "metrics": {"enabled": False},
            **UNLIMITED,
        }
    )
    daemon = Daemon(config)
    daemon.scheduler.start(paused=True)  # rescheduling is measured; nothing runs by itself
    daemon._leading.set()
    (runner,) = daemon.runners
    runner.step()

    def cycle() -> None:
        daemon._schedule(runner, runner.refresh_now())

    return daemon, cycle


def overhead(cycles: int) -> dict[str, Any]:
    quiet_logs()
    with idp_process("generic") as url, tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        daemon, cycle = one_job_daemon(url, folder)

        session = requests.Session()

        def bare() -> None:
            bare_refresh(session, url, "o", folder / "bare")

        samples: dict[str, list[tuple[float, float]]] = {"bare": [], "cycle": []}
        for _ in range(10):  # warm both paths (connections, caches)
            bare()
            cycle()
        for _ in range(cycles):
            for name, action in (("bare", bare), ("cycle", cycle)):
                wall, cpu = time.perf_counter(), time.process_time()
                action()
                samples[name].append((time.perf_counter() - wall, time.process_time() - cpu))
        daemon.scheduler.shutdown(wait=False)
    return {
        f"{name}_{kind}": statistics.median(s[i] for s in values)
        for name, values in samples.items()
        for i, kind in enumerate(("wall", "cpu"))
    }


def _config(n: int, url: str, secret: Path, folder: Path, **extra: Any) -> Config:
    return validate(
        {
            "tokens": [
                job(
                    f"job-{i}",
                    url,
                    secret,
                    [{"type": "file", "path": str(folder / f"token-{i}")}],
                    **extra,
                )
                for i in range(n)
            ],
            "metrics": {"enabled": False},
            **UNLIMITED,
        }
    )


class Written:
    """Counts first successes per job, and says when every job has one (no polling: a loop
    over thousands of snapshots would compete with the daemon it measures)."""

    def __init__(self, n: int) -> None:
        self.jobs: set[str] = set()
        self.n = n
        self.done = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, event: RefreshEvent) -> None:
        if event.outcome == "success":
            with self.lock:
                self.jobs.add(event.job)
                if len(self.jobs) >= self.n:
                    self.done.set()


def bare_concurrent(url: str, n: int, folder: Path, concurrency: int) -> float:
    """Seconds for `concurrency` threads of bare `requests` calls plus fsynced writes to
    fetch and write `n` tokens: what this machine and this IdP allow at that concurrency."""
    folder.mkdir()
    remaining = iter(range(n))
    lock = threading.Lock()

    def worker() -> None:
        session = requests.Session()
        while True:
            with lock:
                i = next(remaining, None)
            if i is None:
                return
            bare_refresh(session, url, f"job-{i}", folder / f"token-{i}")

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    begun = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - begun


def scale(n: int, idle: float) -> dict[str, Any]:
    quiet_logs()
    with idp_process("generic", lifetime=3600) as url, tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        secret = secret_file(folder)
        session = requests.Session()
        rtts = []
        for _ in range(30):
            begun = time.perf_counter()
            session.post(
                url, data={"grant_type": "client_credentials", "scope": "x"}, headers=BARE_HEADERS
            )
            rtts.append(time.perf_counter() - begun)
        config = _config(n, url, secret, folder)
        concurrency = config.settings.max_concurrent_refreshes
        bare_startup = bare_concurrent(url, n, folder / "bare", concurrency)
        base_rss = rss_mb()
        written = Written(n)
        begun = time.perf_counter()
        daemon = Daemon(config, listeners=[written]).start()
        if not written.done.wait(timeout=900):
            raise SystemExit(f"only {len(written.jobs)} of {n} jobs got a token in time")
        startup = time.perf_counter() - begun
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        cpu = time.process_time()
        time.sleep(idle)
        idle_cpu = (time.process_time() - cpu) / idle * 100
        daemon.stop()

    # Sustained: every token lives 2 s, so every job wants a refresh every ~1.3 s.
    with idp_process("generic", lifetime=2) as url, tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config = _config(n, url, secret_file(folder), folder, min_refresh_interval=0.1)
        successes = 0

        def count(event: RefreshEvent) -> None:
            nonlocal successes
            if event.outcome == "success":
                successes += 1

        daemon = Daemon(config, listeners=[count]).start()
        time.sleep(3)
        before, begun = successes, time.perf_counter()
        time.sleep(10)
        rate = (successes - before) / (time.perf_counter() - begun)
        daemon.stop()
    return {
        "startup": startup,
        "bare_startup": bare_startup,
        "rtt": statistics.median(rtts),
        "concurrency": concurrency,
        "base_rss_mb": base_rss,
        "peak_rss_mb": peak,
        "idle_cpu_percent": idle_cpu,
        "refreshes_per_second": rate,
    }


def main() -> None:
    section, *args = sys.argv[1:]
    if section == "window":
        result = window(args[0], int(args[1]))
    elif section == "overhead":
        result = overhead(int(args[0]))
    else:
        result = scale(int(args[0]), float(args[1]))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
