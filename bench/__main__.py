"""`python -m bench [--quick] [--idle SECONDS] [--scale 1,100,1000,10000]`: print four tables.

1. write window: from the IdP's answer to the last sink written, file and Secret sinks;
2. overhead: one refresh cycle against a bare `requests` POST plus one fsynced file write;
3. scale: N jobs in one process: start-up, RSS, idle CPU, sustained refreshes per second;
4. start-up latency: `refresher --version`, first token written for a file-only config.

Every server runs on loopback; the IdP runs in a process of its own so that CPU figures are
the refresher's. Figures are measured on the machine it runs on; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench.idp_process import CLIENT_ID, CLIENT_SECRET, idp_process


def table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    cells = [header, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n## {title}\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f} ms"


def quantiles(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return statistics.median(ordered), p99, ordered[-1]


def secret_file(folder: Path, secret: str = CLIENT_SECRET) -> Path:
    path = folder / "client-secret"
    path.write_text(secret)
    path.chmod(0o600)
    return path


def job(
    name: str, url: str, secret: Path, sinks: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    return {
        "name": name,
        "token_url": url,
        "client_id": CLIENT_ID,
        "client_secret": {"file": str(secret)},
        "scopes": [name],
        "sinks": sinks,
        **extra,
    }


def run_child(section: str, *args: str) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter (clean RSS, clean imports)."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.measure", section, *args],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"bench.measure {section} failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def write_window(refreshes: int) -> None:
    rows = []
    for sink in ("file", "kubernetes"):
        r = run_child("window", sink, str(refreshes))
        p50, p99, worst = quantiles(r["windows"])
        rows.append(
            [
                sink,
                refreshes,
                ms(p50),
                ms(p99),
                ms(worst),
                f"{r['api_requests_per_refresh']:.2f}" if sink == "kubernetes" else "-",
            ]
        )
    table(
        "1. Write window (IdP answer -> last sink written)",
        ["sink", "refreshes", "p50", "p99", "max", "API requests / refresh"],
        rows,
    )
    print("\ntargets: file p50 < 1 ms, p99 < 5 ms; Secret exactly 1 API request per refresh")


def overhead(cycles: int) -> None:
    r = run_child("overhead", str(cycles))
    rows = [
        ["bare requests.post + fsynced write", ms(r["bare_wall"]), ms(r["bare_cpu"])],
        [
            "refresher cycle (fetch, validate, write, metrics, log, reschedule)",
            ms(r["cycle_wall"]),
            ms(r["cycle_cpu"]),
        ],
        [
            "ratio",
            f"{r['cycle_wall'] / r['bare_wall']:.3f}",
            f"{r['cycle_cpu'] / r['bare_cpu']:.3f}",
        ],
    ]
    table(f"2. Overhead per refresh (median of {cycles}, interleaved)", ["", "wall", "CPU"], rows)
    print("\ntarget: ratio <= 1.15")


def scale(sizes: list[int], idle: float) -> None:
    rows = []
    for n in sizes:
        r = run_child("scale", str(n), str(idle))
        ideal = n * r["rtt"] / r["concurrency"]
        rows.append(
            [
                n,
                f"{r['startup']:.2f} s",
                f"{r['startup'] / ideal:.2f}" if ideal > 0 else "-",
                f"{r['bare_startup']:.2f} s",
                f"{r['startup'] / r['bare_startup']:.2f}",
                f"{r['peak_rss_mb']:.1f} MB",
                # Below ~100 jobs the difference drowns in allocator noise.
                f"{(r['peak_rss_mb'] - r['base_rss_mb']) * 1024 / n:.1f} KB" if n >= 100 else "-",
                f"{r['idle_cpu_percent']:.3f} %",
                f"{r['refreshes_per_second']:.0f}/s" if r["refreshes_per_second"] else "-",
            ]
        )
    table(
        f"3. Scale (idle CPU over {idle:g} s with no refresh due)",
        [
            "jobs",
            "start-up (all written)",
            "/ (N x RTT / concurrency)",
            "bare clients, same concurrency",
            "/ bare",
            "peak RSS",
            "RSS per job",
            "idle CPU (one core)",
            "sustained refreshes",
        ],
        rows,
    )
    print(
        "\ntargets: 10,000 jobs < 250 MB RSS; idle CPU < 0.5 %; start-up limited by the IdP"
        "\n(bare clients: as many threads as refreshes run at once, each a bare requests.post"
        " plus an fsynced write, on one process: what this IdP and machine allow)"
    )


def startup(repeats: int) -> None:
    version = []
    for _ in range(repeats):
        begun = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "refresher", "--version"],
            capture_output=True,
            check=True,
        )
        version.append(time.perf_counter() - begun)
    first = []
    imported_kubernetes = False
    with idp_process() as url, tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        secret = secret_file(folder)
        for i in range(repeats):
            token_file = folder / f"token-{i}"
            config = folder / f"c{i}.yaml"
            config.write_text(
                yaml.safe_dump(
                    {
                        "tokens": [
                            job("first", url, secret, [{"type": "file", "path": str(token_file)}])
                        ],
                        "metrics": {"enabled": False},
                    }
                )
            )
            command = [sys.executable, "-m", "refresher", "run", "-c", str(config)]
            if i == 0:  # once with the import log, to see what a file-only start imports
                command = [sys.executable, "-X", "importtime", *command[1:]]
            begun = time.perf_counter()
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            while not token_file.exists():
                if time.perf_counter() - begun > 30:
                    process.kill()
                    raise SystemExit("no token within 30 s")
                time.sleep(0.001)
            first.append(time.perf_counter() - begun)
            process.terminate()
            _, err = process.communicate(timeout=30)
            if i == 0:
                imported_kubernetes = any(
                    line.rstrip().endswith("| kubernetes")
                    for line in err.decode(errors="replace").splitlines()
                )
    rows = [
        [
            "refresher --version",
            f"{statistics.median(version) * 1000:.0f} ms",
            f"{max(version) * 1000:.0f} ms",
        ],
        [
            "process start -> first token written (file sink)",
            f"{statistics.median(first) * 1000:.0f} ms",
            f"{max(first) * 1000:.0f} ms",
        ],
    ]
    table(f"4. Start-up latency ({repeats} runs)", ["", "median", "max"], rows)
    print(
        f"\n`kubernetes` imported for a file-only config: {'YES' if imported_kubernetes else 'no'}"
    )
    print("target: first token within 1 s")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, shorter idle")
    parser.add_argument("--idle", type=float, default=None, help="idle CPU window in seconds (60)")
    parser.add_argument("--scale", default="1,100,1000,10000", help="job counts")
    parser.add_argument("--only", default="1234", help="which tables, e.g. 13")
    args = parser.parse_args()
    idle = args.idle if args.idle is not None else (10.0 if args.quick else 60.0)
    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}, {sys.platform}")
    if "1" in args.only:
        write_window(200 if args.quick else 1000)
    if "2" in args.only:
        overhead(100 if args.quick else 500)
    if "3" in args.only:
        scale([int(n) for n in args.scale.split(",")], idle)
    if "4" in args.only:
        startup(3 if args.quick else 5)


if __name__ == "__main__":
    main()
