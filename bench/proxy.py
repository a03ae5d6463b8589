"""The header-injecting proxy against its upstream: `python -m bench.proxy [--seconds 10] [--json]`.

Issue 16: the same requests direct to an upstream and through the refresher's proxy
(refresher/proxy.py), side by side in one run. It prints tables (with `--json`, the figures
as JSON on stdout and the tables on stderr); `--quick` streams 10 MiB instead of 100 MiB and
watches one refresh per phase instead of three; `--keep DIR` keeps the configs and logs.

It needs nginx and wrk, which `make bench` and CI do not have: on Debian or Ubuntu,
`apt-get install -y nginx-light wrk`. Without them it says so and exits non-zero. That is why
it is not a section of `python -m bench`, and tests/test_bench_proxy.py skips its run then.

Processes, each its own, all on loopback:
- **nginx** (the upstream, fast enough not to be the bottleneck), a non-daemon child with one
  worker and no access log: `GET /small` (100 bytes), `POST /post` (reads a body of up to
  2 MiB whole, then answers 100 bytes), `GET /big` (a file of random bytes, sendfile);
- **the IdP** (bench/idp_process.py): tokens live 6 s, refreshed 3 s before expiry, so a
  refresh lands every 2.4-3 s;
- **the refresher**, `refresher run` with one job: a file sink, metrics, and a proxy whose
  upstream is nginx (a loopback listener without consumers: anonymous callers);
- **wrk** drives the HTTP load; this process reads /proc, downloads /big and reads the logs.

On two or more cores the refresher is pinned to the first core and everything else (nginx,
wrk, the IdP, this harness) to the others, so "requests per second on one core" is the
refresher's alone; the output says which pinning was used.

Figures (targets from the issue: benchmark figures, not assertions):
1. **added latency**: wrk with one connection in a closed loop for `--seconds`, direct and
   through the proxy, for the small GET and the 1 MiB POST (a body the proxy buffers, as
   `max_replay_body` allows): p50 and p99 of each, added = proxy - direct; beside them the
   proxy's own account (`refresher_proxy_request_duration_seconds`, mean per request).
   Target: added p50 under 1 ms for the small GET;
2. **throughput**: wrk with 2 threads and 64 connections, small GET, direct and through the
   proxy: requests per second, and the refresher's CPU over the proxied run (utime + stime
   from /proc), so requests per CPU-second too; and what else ran on the refresher's core
   (/proc/stat: other processes, time stolen by the hypervisor), which is why the refresher
   may have had less than the whole core. Target: 2,000 per second on one core;
3. **memory while streaming**: the refresher's RSS (VmRSS, every 20 ms) before, at its peak
   during, and after a download of /big through the proxy by a reader that hashes and
   discards 64 KiB chunks, and by a slow one (2 ms pause per chunk, at most 32 MiB/s): the
   back-pressure keeps the proxy from buffering what the reader has not taken. The sha256 of
   every download is checked against the file's. Target: flat (the peak under 16 MiB above
   the start, for a body of 100 MiB);
4. **write window under load**: the refresher's `write_window_ms` (its log line per refresh:
   from the IdP's answer to the last sink written) for refreshes while nothing else runs, and
   for those during the proxied throughput run, which lasts until as many refreshes landed;
   those during the direct run are the control (the machine busy, the refresher not).
   Target: unchanged (here: under load within 1 ms of idle, p50 and max).

A POST to `return 200` makes nginx answer before it has read the body (it discards the rest
afterwards), which would time half an upload and leave wrk's connection mid-request; `/post`
mirrors the request with its body to an internal location instead, so nginx reads it whole
first, and then answers through `error_page` (a POST to a static file is a 405).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.__main__ import job, quantiles, secret_file
from bench.heal import Refresher, emit, log_time, loopback_session, table
from bench.idp_process import idp_process

INSTALL = "apt-get install -y nginx-light wrk"
JOB = "proxied"
LIFETIME, MARGIN, FLOOR = 6.0, 3.0, 1.0
SMALL = "x" * 99 + "\n"  # the small answer: 100 bytes
POST_BYTES = 1 << 20  # the POST's body: exactly `max_replay_body`, so the proxy buffers it
BIG_BYTES, QUICK_BIG_BYTES = 100 << 20, 10 << 20
CHUNK = 64 << 10  # what the downloads read at a time
SLOW_PAUSE = 0.002  # the slow reader's pause per chunk
RSS_EVERY = 0.02
LOAD_THREADS, LOAD_CONNECTIONS = 2, 64
FLAT_GROWTH_MB = 16.0  # "flat": the peak RSS at most this far above the start
WINDOW_SLACK = 0.001  # "unchanged": under load within this of idle
MARK = "wrk-json "  # the line the wrk script's done() prints
PROXY_DURATION = "refresher_proxy_request_duration_seconds"
PROXY_REQUESTS = "refresher_proxy_requests_total"
# Where Debian puts nginx, often not on a user's PATH.
SBIN = ("/usr/sbin", "/usr/local/sbin")
# Modules whose temporary folder nginx creates at start-up (under /var/lib/nginx by
# default, which only root may write): each one in the run's folder, unless built without.
TEMP_PATHS = {
    "client_body_temp_path": None,  # core: always there
    "proxy_temp_path": "http_proxy",
    "fastcgi_temp_path": "http_fastcgi",
    "uwsgi_temp_path": "http_uwsgi",
    "scgi_temp_path": "http_scgi",
}


# ----------------------------------------------------------------------------- tools


def find_tools(search_path: str) -> dict[str, str | None]:
    """nginx and wrk on `search_path` (a PATH-style list), None for one that is missing."""
    return {name: shutil.which(name, path=search_path) for name in ("nginx", "wrk")}


def require_tools(search_path: str) -> dict[str, str]:
    """Both binaries, or SystemExit saying what to install."""
    found = find_tools(search_path)
    missing = sorted(name for name, where in found.items() if where is None)
    if missing:
        raise SystemExit(
            f"bench.proxy needs {' and '.join(missing)}, not found on PATH or in "
            f"{', '.join(SBIN)}. On Debian or Ubuntu: {INSTALL}"
        )
    return {name: str(where) for name, where in found.items()}


def tool_path() -> str:
    return os.pathsep.join([os.environ.get("PATH", ""), *SBIN])


def version(command: list[str]) -> str:
    """A tool's version line (nginx writes it to stderr; wrk exits 1 after it)."""
    out = subprocess.run(command, capture_output=True, text=True, check=False, timeout=10)
    lines = (out.stdout + out.stderr).strip().splitlines()
    return lines[0].split(" Copyright")[0].strip() if lines else "?"


# ----------------------------------------------------------------------------- nginx


def render_nginx_conf(folder: Path, port: int, *, user: str | None, configure: str) -> str:
    """nginx.conf for one run: everything it writes goes in `folder`, it serves `folder/www`.
    `configure` is `nginx -V`'s output (which modules it was built without); `user` is the
    user the worker runs as, when nginx starts as root (else it is `nobody`, who cannot read
    a private temporary folder)."""
    temp = [
        f"    {directive} {folder / directive.removesuffix('_temp_path')};"
        for directive, module in TEMP_PATHS.items()
        if module is None or f"--without-{module}_module" not in configure
    ]
    return "\n".join(
        [
            "# Written by bench/proxy.py for one run.",
            "worker_processes 1;",
            *([f"user {user};"] if user else []),
            f"pid {folder / 'nginx.pid'};",
            f"error_log {folder / 'error.log'} warn;",
            "events { worker_connections 1024; }",
            "http {",
            "    access_log off;",
            "    sendfile on;",
            "    tcp_nopush on;",
            "    keepalive_requests 1000000;",
            "    keepalive_timeout 300s;",
            "    default_type application/octet-stream;",
            *temp,
            "    server {",
            f"        listen 127.0.0.1:{port};",
            f"        root {folder / 'www'};",
            f'        location = /small {{ return 200 "{SMALL.rstrip()}\\n"; }}',
            "        location = /post {",
            "            client_max_body_size 2m;",
            "            client_body_buffer_size 2m;",
            "            # the mirror reads the body whole first: `return` would answer before it",
            "            mirror /drop;",
            "            mirror_request_body on;",
            "            error_page 405 =200 /small;",
            "        }",
            "        location = /drop { internal; return 204; }",
            "        location = /big { }",
            "    }",
            "}",
            "",
        ]
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


@contextlib.contextmanager
def nginx(binary: str, folder: Path) -> Iterator[int]:
    """nginx serving `folder/www` in the foreground; yields its port."""
    port = free_port()
    configure = subprocess.run([binary, "-V"], capture_output=True, text=True, check=False).stderr
    user = "root" if os.geteuid() == 0 else None
    config = folder / "nginx.conf"
    config.write_text(render_nginx_conf(folder, port, user=user, configure=configure))
    with open(folder / "nginx.out", "ab") as out:
        process = subprocess.Popen(
            [binary, "-p", str(folder), "-c", str(config), "-g", "daemon off;"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _until_listening(port, process, folder)
        yield port
    finally:
        workers = _children(process.pid)
        if process.poll() is None:
            process.terminate()  # nginx's fast shutdown: the master stops its worker
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            for pid in [process.pid, *workers]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            process.wait()


def _until_listening(port: int, process: subprocess.Popen[bytes], folder: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    logs = [folder / "nginx.out", folder / "error.log"]
    text = "".join(p.read_text(errors="replace") for p in logs if p.exists())
    raise RuntimeError(f"nginx did not start listening on {port}:\n{text[-2000:]}")


def write_big(path: Path, size: int) -> str:
    """`size` random bytes (nothing compresses or caches them into a shortcut); the sha256."""
    digest = hashlib.sha256()
    with open(path, "wb") as out:
        for _ in range(size // (1 << 20)):
            block = os.urandom(1 << 20)
            digest.update(block)
            out.write(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------- wrk


def wrk_script(body_bytes: int | None) -> str:
    """The Lua script for every wrk run: the request (a POST of `body_bytes` if given), and a
    done() printing the figures read here as one JSON line, in microseconds."""
    request = (
        f'wrk.method = "POST"\nwrk.body = string.rep("x", {body_bytes})\n'
        'wrk.headers["Content-Type"] = "application/octet-stream"\n'
        if body_bytes
        else ""
    )
    # %.0f throughout: wrk's numbers are Lua doubles, and %d refuses a fraction on some Luas.
    fields = ", ".join(
        f'\\"{name}\\":%.0f'
        for name in ("requests", "duration_us", "bytes", "p50_us", "p99_us", "max_us")
    )
    errors = ", ".join(
        f'\\"{name}\\":%.0f' for name in ("connect", "read", "write", "status", "timeout")
    )
    return (
        request
        + "done = function(summary, latency, requests)\n"
        + "  local e = summary.errors\n"
        + f'  io.write(string.format("{MARK}{{{fields}, \\"errors\\": {{{errors}}}}}\\n",\n'
        + "    summary.requests, summary.duration, summary.bytes,\n"
        + "    latency:percentile(50), latency:percentile(99), latency.max,\n"
        + "    e.connect, e.read, e.write, e.status, e.timeout))\n"
        + "end\n"
    )


def parse_wrk(output: str) -> dict[str, Any]:
    """The figures of one wrk run from its output (the done() line), per second added."""
    for line in output.splitlines():
        if line.startswith(MARK):
            figures: dict[str, Any] = json.loads(line[len(MARK) :])
            seconds = figures["duration_us"] / 1e6
            figures["per_second"] = figures["requests"] / seconds if seconds else 0.0
            figures["failed"] = sum(figures["errors"].values())
            return figures
    raise RuntimeError(f"no {MARK.strip()} line in wrk's output:\n{output[-2000:]}")


@dataclass(frozen=True)
class Load:
    """How wrk loads one URL."""

    threads: int
    connections: int
    script: Path
    latency: bool = False

    def command(self, binary: str, url: str, seconds: float) -> list[str]:
        return [
            binary,
            f"-t{self.threads}",
            f"-c{self.connections}",
            f"-d{max(1, round(seconds))}s",
            *(["--latency"] if self.latency else []),
            "-s",
            str(self.script),
            url,
        ]


def run_wrk(binary: str, load: Load, url: str, seconds: float) -> dict[str, Any]:
    out = subprocess.run(
        load.command(binary, url, seconds),
        capture_output=True,
        text=True,
        check=False,
        timeout=seconds + 30,
    )
    return parse_wrk(out.stdout + out.stderr)


def wrk_until(
    binary: str, load: Load, url: str, enough: Callable[[], bool], bound: float
) -> dict[str, Any]:
    """wrk on `url` until `enough()` holds (at most `bound` seconds), then stopped with
    SIGINT, on which wrk reports what it did so far."""
    process = subprocess.Popen(
        load.command(binary, url, bound),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + bound
        while process.poll() is None and time.monotonic() < deadline and not enough():
            time.sleep(0.05)
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return parse_wrk(out)


# ------------------------------------------------------------------------------ /proc


def parse_cpu_seconds(stat: str, ticks: int) -> float:
    """utime + stime from a /proc/PID/stat line (after the command's closing parenthesis,
    since the command itself may hold spaces and parentheses)."""
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / ticks  # fields 14 and 15 of stat


def cpu_seconds(pid: int) -> float:
    return parse_cpu_seconds(Path(f"/proc/{pid}/stat").read_text(), os.sysconf("SC_CLK_TCK"))


def parse_core_times(stat: str, cpus: frozenset[int], ticks: int) -> tuple[float, float, float]:
    """Seconds `cpus` spent, from /proc/stat: on processes (user, nice, system: whose ever),
    on interrupts (irq, softirq: loopback traffic is handled there, by whoever sent it),
    and stolen (the hypervisor ran another machine)."""
    processes = interrupts = stolen = 0
    for line in stat.splitlines():
        name, _, rest = line.partition(" ")
        if name[:3] == "cpu" and name[3:].isdigit() and int(name[3:]) in cpus:
            user, nice, system, _, _, irq, softirq, steal = (int(v) for v in rest.split()[:8])
            processes += user + nice + system
            interrupts += irq + softirq
            stolen += steal
    return processes / ticks, interrupts / ticks, stolen / ticks


def core_times(cpus: frozenset[int]) -> tuple[float, float, float]:
    return parse_core_times(Path("/proc/stat").read_text(), cpus, os.sysconf("SC_CLK_TCK"))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class RssSampler(threading.Thread):
    """A process's RSS every `RSS_EVERY` seconds, as (monotonic time, MB)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.samples: list[tuple[float, float]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            with contextlib.suppress(OSError):
                self.samples.append((time.monotonic(), rss_mb(self.pid)))
            self.halt.wait(RSS_EVERY)

    def peak(self, begun: float, ended: float) -> float:
        return max((mb for at, mb in self.samples if begun <= at <= ended), default=0.0)


@dataclass(frozen=True)
class Pinning:
    """Which CPUs the refresher and everything else run on (None: not pinned)."""

    refresher: frozenset[int] | None
    others: frozenset[int] | None

    def describe(self, cores: int) -> str:
        if self.refresher is None or self.others is None:
            return f"{cores} core(s): nothing pinned (one CPU available)"
        return (
            f"{cores} cores: the refresher pinned to CPU {_cpus(self.refresher)}; nginx, wrk, "
            f"the IdP and the harness to CPU {_cpus(self.others)}"
        )


def _cpus(cpus: frozenset[int]) -> str:
    return ",".join(str(cpu) for cpu in sorted(cpus))


def plan_pinning(available: set[int]) -> Pinning:
    if len(available) < 2:
        return Pinning(None, None)
    first = min(available)
    return Pinning(frozenset({first}), frozenset(available - {first}))


def pin(pid: int, cpus: frozenset[int]) -> None:
    """Every thread of `pid` onto `cpus`: sched_setaffinity moves one thread, and the ones a
    thread starts later inherit its mask."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(task.name), cpus)


# ------------------------------------------------------------------------- refresher


def refresher_config(folder: Path, token_url: str, upstream_port: int) -> Path:
    proxy = {
        "listen": "127.0.0.1:0",
        "upstream": f"http://127.0.0.1:{upstream_port}",
        "max_replay_body": "1MiB",
        "replay_wait": "2s",
        "timeouts": {"connect": "5s", "read": "60s", "request": "300s"},
        "upstream_connections": 100,
    }
    sinks = [{"type": "file", "path": str(folder / "token")}]
    tokens = [
        job(JOB, token_url, secret_file(folder), sinks, margin=MARGIN,
            min_refresh_interval=FLOOR, proxy=proxy)
    ]  # fmt: skip
    path = folder / "config.yaml"
    metrics = {"enabled": True, "bind": "127.0.0.1", "port": 0}
    path.write_text(yaml.safe_dump({"tokens": tokens, "metrics": metrics}))
    return path


def refresh_records(refresher: Refresher) -> list[dict[str, Any]]:
    return refresher.logged("token refreshed")


def windows_within(records: list[dict[str, Any]], spans: list[tuple[float, float]]) -> list[float]:
    """The write windows (seconds) of the refreshes logged inside any of `spans` (wall time)."""
    return [
        float(r["write_window_ms"]) / 1000
        for r in records
        if "write_window_ms" in r and any(a <= log_time(r) <= b for a, b in spans)
    ]


def spread(values: list[float]) -> dict[str, Any] | None:
    if not values:
        return None
    p50, _, worst = quantiles(values)
    return {"count": len(values), "p50": p50, "max": worst, "values": values}


def proxy_metrics(port: int) -> dict[str, dict[str, float]]:
    """The proxy's series on /metrics: answers by status, and per part (upstream, added) the
    duration histogram's count and sum."""
    with loopback_session() as session:
        body = session.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    found: dict[str, dict[str, float]] = {"answers": {}}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == PROXY_REQUESTS:
                found["answers"][sample.labels["code"]] = sample.value
            elif sample.name in (f"{PROXY_DURATION}_count", f"{PROXY_DURATION}_sum"):
                kind = sample.name.rsplit("_", 1)[1]
                found.setdefault(sample.labels["part"], {})[kind] = sample.value
    return found


def mean_parts(
    before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]
) -> dict[str, float | None]:
    """Mean seconds per request of each part between two scrapes."""
    means: dict[str, float | None] = {}
    for part in ("upstream", "added"):
        count = after.get(part, {}).get("count", 0) - before.get(part, {}).get("count", 0)
        total = after.get(part, {}).get("sum", 0) - before.get(part, {}).get("sum", 0)
        means[part] = total / count if count else None
    return means


# ---------------------------------------------------------------------------- phases


Span = tuple[float, float]  # wall times


@dataclass
class Bench:
    """Everything the phases share."""

    wrk: str
    direct: str  # nginx's base URL
    proxy: str  # the proxy listener's base URL
    refresher: Refresher
    cpus: frozenset[int] | None  # the refresher's, when pinned
    metrics_port: int
    folder: Path
    seconds: float
    refreshes: int
    problems: list[str]

    @property
    def pid(self) -> int:
        return self.refresher.process.pid

    def script(self, name: str, body_bytes: int | None) -> Path:
        path = self.folder / f"{name}.lua"
        path.write_text(wrk_script(body_bytes))
        return path


def _wait_refreshes(refresher: Refresher, after: float, count: int, timeout: float) -> float:
    """Wait until `count` refreshes were logged after wall time `after`; the wall time then."""
    deadline = time.monotonic() + timeout
    while sum(1 for r in refresh_records(refresher) if log_time(r) > after) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"not {count} refreshes within {timeout:g} s")
        time.sleep(0.1)
    return time.time()


def idle_phase(bench: Bench) -> Span:
    """Nothing but the refresher's own refreshes: the span they were watched in."""
    begun = time.time()
    ended = _wait_refreshes(
        bench.refresher, begun, bench.refreshes, bench.refreshes * LIFETIME + 10
    )
    return begun, ended


def measured(bench: Bench, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`run()`'s wrk figures, with the refresher's CPU over it and, when it is pinned, what
    else its core did: other processes (others_on_core) and the hypervisor (core_stolen)
    explain a refresher that had less than a whole core, or a long tail."""
    cores = bench.cpus or frozenset()
    cpu_before, core_before = cpu_seconds(bench.pid), core_times(cores)
    figures = run()
    cpu = cpu_seconds(bench.pid) - cpu_before
    seconds = figures["duration_us"] / 1e6 or 1.0
    processes, interrupts, stolen = (
        (after - before) / seconds
        for after, before in zip(core_times(cores), core_before, strict=True)
    )
    figures.update(
        refresher_cpu_seconds=cpu,
        refresher_cores=cpu / seconds,
        per_cpu_second=figures["requests"] / cpu if cpu else 0.0,
    )
    if bench.cpus:
        figures.update(
            others_on_core=max(0.0, processes - cpu / seconds),
            core_interrupts=interrupts,
            core_stolen=stolen,
        )
    else:
        figures.update(others_on_core=None, core_interrupts=None, core_stolen=None)
    return figures


def _check(bench: Bench, label: str, runs: dict[str, dict[str, Any]]) -> None:
    for where, figures in runs.items():
        if figures["failed"] or not figures["requests"]:
            bench.problems.append(
                f"{label} {where}: {figures['requests']} requests, errors {figures['errors']}"
            )


def latency_phase(bench: Bench) -> dict[str, Any]:
    one = {
        "small_get": Load(1, 1, bench.script("get", None), latency=True),
        "post_1mib": Load(1, 1, bench.script("post", POST_BYTES), latency=True),
    }
    paths = {"small_get": "/small", "post_1mib": "/post"}
    figures: dict[str, Any] = {}
    for name, load in one.items():
        url = paths[name]
        direct = run_wrk(bench.wrk, load, bench.direct + url, bench.seconds)
        before = proxy_metrics(bench.metrics_port)
        proxied = measured(
            bench, functools.partial(run_wrk, bench.wrk, load, bench.proxy + url, bench.seconds)
        )
        own = mean_parts(before, proxy_metrics(bench.metrics_port))
        figures[name] = {
            "direct": direct,
            "proxy": proxied,
            "added_p50": (proxied["p50_us"] - direct["p50_us"]) / 1e6,
            "added_p99": (proxied["p99_us"] - direct["p99_us"]) / 1e6,
            "proxy_own_mean": own,
        }
        _check(bench, name, {"direct": direct, "proxy": proxied})
    return figures


def throughput_phase(bench: Bench) -> tuple[dict[str, Any], Span, Span]:
    """Many connections, direct for `seconds`; then through the proxy until both `seconds`
    passed and `refreshes` refreshes landed during it (the write window under load). The
    spans of both runs: refreshes during the direct one are the control (the machine busy,
    the refresher not)."""
    load = Load(LOAD_THREADS, LOAD_CONNECTIONS, bench.script("load", None))
    begun = time.time()
    direct = run_wrk(bench.wrk, load, bench.direct + "/small", bench.seconds)
    direct_span = (begun, time.time())
    begun, minimum = time.time(), time.monotonic() + bench.seconds

    def enough() -> bool:
        landed = windows_within(refresh_records(bench.refresher), [(begun, time.time())])
        return time.monotonic() >= minimum and len(landed) >= bench.refreshes

    bound = bench.seconds + bench.refreshes * LIFETIME + 10
    proxied = measured(
        bench, functools.partial(wrk_until, bench.wrk, load, bench.proxy + "/small", enough, bound)
    )
    _check(bench, "throughput", {"direct": direct, "proxy": proxied})
    figures = {"threads": LOAD_THREADS, "connections": LOAD_CONNECTIONS}
    return {**figures, "direct": direct, "proxy": proxied}, direct_span, (begun, time.time())


def download(url: str, pause: float) -> dict[str, Any]:
    """GET `url`, hashing and dropping CHUNK bytes at a time (pausing `pause` after each)."""
    digest, size = hashlib.sha256(), 0
    begun = time.perf_counter()
    with loopback_session() as session, session.get(url, stream=True, timeout=60) as answer:
        answer.raise_for_status()
        for chunk in answer.iter_content(CHUNK):
            digest.update(chunk)
            size += len(chunk)
            if pause:
                time.sleep(pause)
    seconds = time.perf_counter() - begun
    return {"bytes": size, "seconds": seconds, "sha256": digest.hexdigest()}


def streaming_phase(bench: Bench, size: int, sha256: str) -> dict[str, Any]:
    sampler = RssSampler(bench.pid)
    sampler.start()
    readers = []
    try:
        for reader, base, pause in (
            ("direct (control), fast reader", bench.direct, 0.0),
            ("proxy, fast reader", bench.proxy, 0.0),
            ("proxy, slow reader", bench.proxy, SLOW_PAUSE),
        ):
            time.sleep(0.2)  # a few samples of the resting RSS
            before, begun = rss_mb(bench.pid), time.monotonic()
            got = download(base + "/big", pause)
            time.sleep(0.2)  # what the answer's end frees, or keeps, shows by now
            after = rss_mb(bench.pid)
            peak = max(sampler.peak(begun, time.monotonic()), before, after)
            got.update(
                reader=reader,
                intact=got["bytes"] == size and got["sha256"] == sha256,
                rss_before_mb=before,
                rss_peak_mb=peak,
                rss_after_mb=after,
                rss_growth_mb=peak - before,
            )
            if not got["intact"]:
                bench.problems.append(f"{reader}: {got['bytes']} bytes, sha256 {got['sha256']}")
            readers.append(got)
    finally:
        sampler.halt.set()
        sampler.join(5)
    return {
        "bytes": size,
        "sha256": sha256,
        "readers": readers,
        "intact": all(r["intact"] for r in readers),
    }


# ------------------------------------------------------------------------------- run


def run(seconds: float, rounds: int, size: int, keep: Path | None) -> dict[str, Any]:
    tools = require_tools(tool_path())
    # Others' work on the machine moves every figure; the load says how much there was.
    load = os.getloadavg()
    pinning = plan_pinning(os.sched_getaffinity(0))
    if pinning.others is not None:
        os.sched_setaffinity(0, pinning.others)  # before any thread: children inherit it
    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp:
        folder = Path(tmp) if keep is None else keep
        (folder / "www").mkdir(parents=True, exist_ok=True)
        # A POST to a static file that exists is a 405, which `error_page` turns into /small.
        (folder / "www" / "post").write_text(SMALL)
        big = folder / "www" / "big"
        try:
            sha256 = write_big(big, size)
            figures = _measure(tools, folder, pinning, seconds, rounds, size, sha256)
        finally:
            big.unlink(missing_ok=True)  # even with --keep: 100 MiB of noise
    figures["settings"].update(
        load_average=load,
        nginx=version([tools["nginx"], "-v"]),
        wrk=version([tools["wrk"], "-v"]),
        python=sys.version.split()[0],
    )
    return figures


def _measure(
    tools: dict[str, str],
    folder: Path,
    pinning: Pinning,
    seconds: float,
    rounds: int,
    size: int,
    sha256: str,
) -> dict[str, Any]:
    problems: list[str] = []
    with nginx(tools["nginx"], folder) as port, idp_process("generic", LIFETIME) as token_url:
        config = refresher_config(folder, token_url, port)
        refresher = Refresher("refresher", config, folder)
        try:
            proxy_port = refresher.port("serving the proxy")
            metrics_port = refresher.port("serving metrics")
            refresher.wait_logged("token refreshed")  # the first token: at start-up, not idle
            if pinning.refresher is not None:
                pin(refresher.process.pid, pinning.refresher)
            bench = Bench(
                tools["wrk"], f"http://127.0.0.1:{port}", f"http://127.0.0.1:{proxy_port}",
                refresher, pinning.refresher, metrics_port, folder, seconds, rounds, problems,
            )  # fmt: skip
            idle = idle_phase(bench)
            latency = latency_phase(bench)
            throughput, busy, loaded = throughput_phase(bench)
            streaming = streaming_phase(bench, size, sha256)
            answers = proxy_metrics(metrics_port)["answers"]
        finally:
            refresher.stop()
        records = refresh_records(refresher)
        stray = refresher.stray_lines()
    return {
        "settings": {
            "cores": os.cpu_count(),
            "pinning": pinning.describe(os.cpu_count() or 1),
            "seconds": seconds,
            "lifetime": LIFETIME,
            "margin": MARGIN,
            "refreshes_per_phase": rounds,
            "stream_bytes": size,
        },
        "latency": latency,
        "throughput": throughput,
        "streaming": streaming,
        "write_window": {
            "idle": spread(windows_within(records, [idle])),
            "direct_load": spread(windows_within(records, [busy])),
            "load": spread(windows_within(records, [loaded])),
        },
        "proxy_answers": answers,
        "proxy_requests": sum(answers.values()),
        "stray_log_lines": stray,
        "problems": problems,
    }


# ---------------------------------------------------------------------------- report


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.3f} ms"


def _fraction(cores: float | None) -> str:
    return "-" if cores is None else f"{cores:.2f}"


def _verdict(met: bool) -> str:
    return "yes" if met else "NO"


def report(figures: dict[str, Any]) -> str:
    settings = figures["settings"]
    out = [
        f"machine: {settings['pinning']}; Python {settings.get('python', '?')}, "
        f"{settings.get('nginx', 'nginx')}, {settings.get('wrk', 'wrk')}",
        f"load average at the start: {' '.join(f'{v:.2f}' for v in settings['load_average'])}"
        f"; tokens live {settings['lifetime']:g} s, refreshed {settings['margin']:g} s before "
        f"expiry; each wrk run {settings['seconds']:g} s",
    ]
    out.append(_latency_table(figures["latency"]))
    out.append(_throughput_table(figures["throughput"]))
    out.append(_streaming_table(figures["streaming"]))
    out.append(_window_table(figures["write_window"], settings["refreshes_per_phase"]))
    answers = ", ".join(f"{k} x{v:.0f}" for k, v in sorted(figures["proxy_answers"].items()))
    out.append(f"\nproxy answers (its metric): {answers or 'none'}")
    out.append(f"refresher log lines that are not JSON: {figures['stray_log_lines']}")
    out += [f"  problem: {problem}" for problem in figures["problems"][:20]]
    return "\n".join(out)


def _latency_table(latency: dict[str, Any]) -> str:
    rows = []
    for name, label, target in (
        ("small_get", "GET /small (100 B)", "added p50 < 1 ms"),
        ("post_1mib", "POST /post (1 MiB body)", "-"),
    ):
        f = latency[name]
        direct, proxied, own = f["direct"], f["proxy"], f["proxy_own_mean"]
        met = f" ({_verdict(f['added_p50'] < 0.001)})" if name == "small_get" else ""
        rows.append(
            [
                label,
                _ms(direct["p50_us"] / 1e6),
                _ms(proxied["p50_us"] / 1e6),
                _ms(f["added_p50"]),
                _ms(direct["p99_us"] / 1e6),
                _ms(proxied["p99_us"] / 1e6),
                _ms(f["added_p99"]),
                f"{_ms(own['added'])} / {_ms(own['upstream'])}",
                _fraction(proxied["others_on_core"]),
                f"{direct['requests']:.0f} / {proxied['requests']:.0f}",
                target + met,
            ]
        )
    return table(
        "1. Added latency (wrk, 1 connection, closed loop; added = proxy - direct)",
        ["request", "direct p50", "proxy p50", "added p50", "direct p99", "proxy p99",
         "added p99", "proxy's own mean: added / upstream",
         "others on the refresher's core (cores)", "requests direct / proxy",
         "target (met?)"],
        rows,
    )  # fmt: skip


def _throughput_table(throughput: dict[str, Any]) -> str:
    direct, proxied = throughput["direct"], throughput["proxy"]
    ratio = proxied["per_second"] / direct["per_second"] if direct["per_second"] else 0.0
    rows = [
        [
            "direct to nginx",
            f"{direct['per_second']:,.0f}",
            "-",
            "-",
            "-",
            "-",
            direct["failed"],
            "-",
        ],
        [
            f"through the proxy ({ratio:.3f} of direct)",
            f"{proxied['per_second']:,.0f}",
            f"{proxied['refresher_cores']:.2f}",
            _fraction(proxied["others_on_core"]),
            _fraction(proxied["core_stolen"]),
            f"{proxied['per_cpu_second']:,.0f}",
            proxied["failed"],
            f">= 2,000/s on one core ({_verdict(proxied['per_second'] >= 2000)})",
        ],
    ]
    return table(
        f"2. Throughput (wrk, {throughput['threads']} threads, {throughput['connections']} "
        "connections, GET /small)",
        ["path", "requests/s", "refresher CPU (cores)", "others on its core (cores)",
         "its core stolen (cores)", "requests per refresher CPU-second", "wrk errors",
         "target (met?)"],
        rows,
    )  # fmt: skip


def _streaming_table(streaming: dict[str, Any]) -> str:
    rows = []
    for r in streaming["readers"]:
        proxied = r["reader"].startswith("proxy")
        flat = f"growth < {FLAT_GROWTH_MB:g} MB ({_verdict(r['rss_growth_mb'] < FLAT_GROWTH_MB)})"
        rows.append(
            [
                r["reader"],
                f"{r['bytes'] / (1 << 20) / r['seconds']:,.0f} MiB/s",
                f"{r['rss_before_mb']:.1f} MB",
                f"{r['rss_peak_mb']:.1f} MB",
                f"{r['rss_after_mb']:.1f} MB",
                f"{r['rss_growth_mb']:+.1f} MB",
                "ok" if r["intact"] else "MISMATCH",
                flat if proxied else "-",
            ]
        )
    return table(
        f"3. Refresher RSS while streaming GET /big ({streaming['bytes'] / (1 << 20):.0f} MiB; "
        f"slow reader: {SLOW_PAUSE * 1000:g} ms pause per {CHUNK >> 10} KiB)",
        ["download", "rate", "RSS before", "peak", "after", "peak - before", "sha256",
         "target: flat (met?)"],
        rows,
    )  # fmt: skip


def _window_table(windows: dict[str, Any], wanted: int) -> str:
    idle, load = windows["idle"], windows["load"]
    rows = []
    for label, figures in (
        ("idle", idle),
        ("wrk direct to nginx (control: the refresher idle)", windows["direct_load"]),
        ("wrk through the proxy", load),
    ):
        if figures is None:
            rows.append([label, 0, "-", "-", ""])
        else:
            rows.append([label, figures["count"], _ms(figures["p50"]), _ms(figures["max"]), ""])
    if idle and load:
        unchanged = (
            load["p50"] <= idle["p50"] + WINDOW_SLACK and load["max"] <= idle["max"] + WINDOW_SLACK
        )
        rows[-1][-1] = f"within {WINDOW_SLACK * 1000:g} ms of idle ({_verdict(unchanged)})"
    return table(
        f"4. Write window (IdP answer -> file sink written); idle and through the proxy at "
        f"least {wanted} refreshes each",
        ["while", "refreshes", "p50", "max", "target: unchanged (met?)"],
        rows,
    )


def _terminated(signum: int, _: object) -> None:
    raise SystemExit(128 + signum)  # so every `finally` stops its child


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.proxy")
    parser.add_argument("--seconds", type=int, default=10, help="each wrk run (at least 1)")
    parser.add_argument(
        "--refreshes", type=int, default=None, help="refreshes watched idle and under load (3)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="stream 10 MiB, watch 1 refresh per phase"
    )
    parser.add_argument(
        "--keep", type=Path, help="keep configs and logs in this folder (empty or new)"
    )
    parser.add_argument(
        "--json", action="store_true", help="figures as JSON on stdout, the tables on stderr"
    )
    args = parser.parse_args()
    rounds = args.refreshes if args.refreshes is not None else (1 if args.quick else 3)
    if args.seconds < 1 or rounds < 1:
        parser.error("--seconds and --refreshes must be at least 1")
    if args.keep is not None and args.keep.exists() and any(args.keep.iterdir()):
        parser.error("--keep needs an empty folder (the logs are read from the start)")
    signal.signal(signal.SIGTERM, _terminated)
    size = QUICK_BIG_BYTES if args.quick else BIG_BYTES
    try:
        figures = run(args.seconds, rounds, size, args.keep)
    except KeyboardInterrupt:
        raise SystemExit("bench.proxy: interrupted (every child stopped)") from None
    emit(figures, report(figures), as_json=args.json)


if __name__ == "__main__":
    main()
