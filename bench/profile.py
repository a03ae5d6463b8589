"""Where one refresh cycle spends its time: `python -m bench.profile [--cycles 500]`.

Runs the cycle that `python -m bench --only 2` times (fetch, validate, write, metrics, log,
reschedule, one file job, the IdP in its own process) under cProfile and prints the functions
with the most cumulative time. cProfile slows every Python call, so read the shares, not the
absolute times; the overhead table gives those.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
from pathlib import Path

from bench.idp_process import idp_process
from bench.measure import one_job_daemon, quiet_logs


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("--cycles", type=int, default=500)
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    quiet_logs()
    with idp_process("generic") as url, tempfile.TemporaryDirectory() as tmp:
        daemon, cycle = one_job_daemon(url, Path(tmp))
        for _ in range(20):  # warm connections and caches
            cycle()
        profile = cProfile.Profile()
        profile.runcall(lambda: [cycle() for _ in range(args.cycles)])
        daemon.scheduler.shutdown(wait=False)
    stats = pstats.Stats(profile)
    stats.sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    main()
