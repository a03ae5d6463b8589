"""A LocalIdP in a process of its own, so the benchmarks' CPU figures are the refresher's.

Run as `python -m bench.idp_process SHAPE LIFETIME`; prints the base URL on stdout, serves
until stdin closes.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from refresher.localidp import LocalIdP

CLIENT_ID, CLIENT_SECRET = "bench-client", "bench-secret"


@contextmanager
def idp_process(shape: str = "generic", lifetime: float = 3600) -> Iterator[str]:
    """Start the IdP in a child process; yield its token URL."""
    child = subprocess.Popen(
        [sys.executable, "-m", "bench.idp_process", shape, str(lifetime)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stdin is not None
    try:
        yield child.stdout.readline().strip()
    finally:
        child.stdin.close()
        child.wait(timeout=10)


def main() -> None:
    shape, lifetime = sys.argv[1], float(sys.argv[2])
    with LocalIdP(shape, lifetime=lifetime, clients={CLIENT_ID: CLIENT_SECRET}) as idp:
        print(idp.token_url, flush=True)
        sys.stdin.read()  # until the parent closes our stdin


if __name__ == "__main__":
    main()
