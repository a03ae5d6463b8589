"""A file sink on a full or read-only filesystem: a real tmpfs, really full or remounted
read-only (root ignores permission bits, not a read-only mount or ENOSPC).

The job fails with a classified `sink` failure, a metric and a log line naming the file; its
consumers keep the last good token, complete; the other job is not disturbed; once space is
freed (or the mount is writable again) the held token is written without a new IdP request.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from refresher.errors import Reason
from refresher.localidp import LocalIdP
from refresher.metrics import Metrics
from tests.conftest import config_of, job_for, running, wait_for


@pytest.fixture
def small_mount(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs, unmounted after the test. Needs root (CI runs as root)."""
    mount_point = tmp_path / "mnt"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"CI must be able to mount a tmpfs: {done.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(folder: Path) -> Path:
    """Write zeros until the filesystem says it is full; return the filler file."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as handle, contextlib.suppress(OSError):
        while True:
            handle.write(b"\0" * 4096)
    with pytest.raises(OSError) as caught:
        (folder / "probe").write_bytes(b"x" * 4096)
    assert caught.value.errno == errno.ENOSPC
    (folder / "probe").unlink(missing_ok=True)
    return filler


def remount(mount_point: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(mount_point)], check=True)


def make_full(mount_point: Path) -> Callable[[], None]:
    return fill(mount_point).unlink


def make_read_only(mount_point: Path) -> Callable[[], None]:
    remount(mount_point, "ro")
    return lambda: remount(mount_point, "rw")


# fault: (make the fault, which returns how to fix it; the OS's words in the error)
FAULTS: dict[str, tuple[Callable[[Path], Callable[[], None]], str]] = {
    "full": (make_full, "No space left on device"),
    "read-only": (make_read_only, "Read-only file system"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_full_or_read_only_filesystem_fails_the_job_alone_and_it_recovers(
    fault: str,
    small_mount: Path,
    make_idp: Callable[..., LocalIdP],
    secret_file: Path,
    tmp_path: Path,
    all_logs: Any,
) -> None:
    make_fault, os_words = FAULTS[fault]
    idp, other_idp = make_idp("generic", lifetime=6), make_idp("generic", lifetime=3)
    token_file = small_mount / "token"
    other_file = tmp_path / "other" / "token"
    jobs = (
        job_for(idp, secret_file, token_file, name="on-small-disk", margin=3),
        job_for(other_idp, secret_file, other_file, name="other"),
    )
    metrics = Metrics()
    with running(config_of(*jobs), metrics=metrics) as daemon:
        runner, other_runner = daemon.runners
        wait_for(lambda: runner.snapshot().ready and other_runner.snapshot().ready)
        good = token_file.read_text()
        other_before = other_idp.token_requests
        fix = make_fault(small_mount)
        # The next refresh (~3 s on) gets a token from the IdP and cannot write it.
        wait_for(lambda: runner.failures >= 2, timeout=10)
        assert runner.last_error is not None and runner.last_error.reason is Reason.SINK
        assert runner.last_error.message == f"cannot write {token_file}: {os_words}"
        assert token_file.read_text() == good  # the last good token, complete
        assert idp.token_status(good) == "valid"
        assert f"cannot write {token_file}: {os_words}" in all_logs.text
        exposition = generate_latest(metrics.registry).decode()
        assert 'refresher_refresh_failures_total{reason="sink",token="on-small-disk"}' in exposition
        issued_before_fix = idp.token_requests
        fix()
        wait_for(lambda: runner.snapshot().ready, timeout=5)
        held = runner.token
        # The other job went on all along, undisturbed.
        wait_for(lambda: other_idp.token_requests > other_before, timeout=5)
        assert other_runner.failures == 0
    assert held is not None
    assert token_file.read_text() == held.access_token
    assert idp.token_status(held.access_token) == "valid"
    # Written from what the runner held: no new token was asked for to recover.
    assert idp.token_requests == issued_before_fix
    # No temp file left: only the token and its metadata file (the times held, for restarts).
    assert {p.name for p in small_mount.iterdir()} <= {"token", ".token.refresher.json"}
