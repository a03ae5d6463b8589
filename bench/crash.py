"""kill -9 the daemon while it writes; check what the sinks hold and what a restart does.

`python -m bench.crash [--kills 200] [--json]` prints a table (or the figures as JSON);
tests/test_crash.py runs `python -m bench.crash --kills 20 --json` and checks the figures.

Each round starts `refresher run` (a JSON file sink, a raw file sink and a Kubernetes Secret
on a local API server) and lets it settle (every sink holds the newest token). Every other
round then waits until the local IdP issues the next token and sends SIGKILL a random 0-1 ms
later, inside the write of that token; the rounds between kill at a random idle moment
before the refresh point. Then it checks:
- every file holds a complete token the IdP issued (old or new), never empty or partial;
- the Secret's keys are consistent (token, `Bearer` header and fingerprint annotation agree);
- a restart asks the IdP for nothing while the stored token is still before its refresh point.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from refresher.localidp import LocalIdP
from refresher.schedule import SchedulePolicy, refresh_at
from refresher.tokens import fingerprint
from testdoubles.kubeapi import FakeKubeAPI

CLIENT_ID, CLIENT_SECRET = "crash-client", "crash-secret-5e4d"
LIFETIME = 2.0


@dataclass
class CrashResult:
    kills: int = 0
    kills_during_refresh: int = 0  # the IdP had answered and the files did not yet all agree
    kills_idle: int = 0  # between refreshes: the restart must reuse the stored token
    torn_or_empty_files: int = 0
    unknown_tokens: int = 0  # a token the IdP never issued
    inconsistent_secrets: int = 0
    early_requests_after_restart: int = 0  # asked the IdP although the stored token was fresh
    leftover_temp_files: int = 0  # after the restart that follows each kill
    problems: list[str] = field(default_factory=list)


def _config(folder: Path, idp: LocalIdP, kube: FakeKubeAPI) -> Path:
    secret = folder / "client-secret"
    secret.write_text(CLIENT_SECRET)
    secret.chmod(0o600)
    config = folder / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "tokens": [
                    {
                        "name": "crash",
                        "token_url": idp.token_url,
                        "client_id": CLIENT_ID,
                        "client_secret": {"file": str(secret)},
                        "scopes": ["crash"],
                        "min_refresh_interval": 0.1,
                        "sinks": [
                            {"type": "file", "path": str(folder / "token.json"), "format": "json"},
                            {"type": "file", "path": str(folder / "token")},
                            {
                                "type": "kubernetes",
                                "name": "crash-token",
                                "create": True,
                                "authorization_key": "authorization",
                            },
                        ],
                    }
                ],
                "metrics": {"enabled": False},
                "kubernetes": {"kubeconfig": str(kube.write_kubeconfig(folder / "kubeconfig"))},
            }
        )
    )
    return config


def _start(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "refresher", "run", "-c", str(config), "--log-format", "json"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _file_tokens(folder: Path, issued: set[str], result: CrashResult) -> list[str]:
    found = []
    parsers: tuple[tuple[str, Callable[[str], str]], ...] = (
        ("token", lambda text: text),
        ("token.json", lambda text: str(json.loads(text)["access_token"])),
    )
    for name, parse in parsers:
        path = folder / name
        if not path.exists():
            continue
        text = path.read_text()
        try:
            value = parse(text)
        except (ValueError, KeyError):
            result.torn_or_empty_files += 1
            result.problems.append(f"{name}: unparsable ({len(text)} bytes)")
            continue
        if not value:
            result.torn_or_empty_files += 1
            result.problems.append(f"{name}: empty")
        elif value not in issued:
            result.unknown_tokens += 1
            result.problems.append(f"{name}: a token the IdP never issued")
        found.append(value)
    return found


def _check_secret(kube: FakeKubeAPI, issued: set[str], result: CrashResult) -> None:
    secret = kube.get_object("secrets", "default", "crash-token")
    if secret is None:
        return
    data = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
    token = data.get("token", "")
    consistent = (
        token in issued
        and data.get("authorization") == f"Bearer {token}"
        and secret["metadata"]["annotations"].get("refresher.io/fingerprint") == fingerprint(token)
    )
    if not consistent:
        result.inconsistent_secrets += 1
        result.problems.append("secret keys disagree")


def _old_temp_files(folder: Path) -> int:
    """Abandoned temp files that outlived a sweep: older than the sweep's threshold (60 s)
    by more than a round, so a process started after they crossed it has run."""
    now = time.time()
    old = 0
    for path in folder.iterdir():
        if not path.name.endswith(".tmp"):
            continue
        try:
            # The daemon still running may finish or sweep it between the listing and here.
            old += now - path.stat().st_mtime > 90
        except FileNotFoundError:
            continue
    return old


def _caught_up(folder: Path, idp: LocalIdP) -> bool:
    issued = idp.issued
    if not issued:
        return False
    newest = issued[-1].access_token
    try:
        raw = (folder / "token").read_text()
        from_json = json.loads((folder / "token.json").read_text())["access_token"]
    except (OSError, ValueError, KeyError):
        return False
    return raw == newest and from_json == newest


def _kill_during_next_issue(
    process: subprocess.Popen[bytes], idp: LocalIdP, rng: random.Random, timeout: float
) -> bool:
    """SIGKILL a random 0-1 ms after the IdP's next issuance. False if none came in time."""
    before = len(idp.issued)
    deadline = time.monotonic() + timeout
    while len(idp.issued) == before:
        if time.monotonic() > deadline or process.poll() is not None:
            return False
        time.sleep(0.0002)
    time.sleep(rng.uniform(0, 0.001))
    process.send_signal(signal.SIGKILL)
    process.wait()
    return True


def run(kills: int, seed: int = 1) -> CrashResult:
    rng = random.Random(seed)
    result = CrashResult()
    policy = SchedulePolicy(min_interval=0.1)
    with (
        tempfile.TemporaryDirectory() as tmp,
        FakeKubeAPI() as kube,
        LocalIdP("generic", lifetime=LIFETIME, clients={CLIENT_ID: CLIENT_SECRET}) as idp,
    ):
        folder = Path(tmp)
        config = _config(folder, idp, kube)
        log = folder / "refresher.log"
        process = _start(config, log)
        try:
            while result.kills < kills:
                # Let the (re)started process settle: every file holds the newest token. Then
                # the kill lands in a refresh that replaces a written token, not in a first one.
                settle_by = time.monotonic() + 15
                while not _caught_up(folder, idp):
                    if time.monotonic() > settle_by:
                        raise RuntimeError(
                            f"sinks never caught up; log tail:\n{log.read_text()[-2000:]}"
                        )
                    time.sleep(0.005)
                # The restarted process has read its sinks (and swept abandoned temp files).
                result.leftover_temp_files = max(
                    result.leftover_temp_files, _old_temp_files(folder)
                )
                if result.kills % 2:
                    # An idle moment, before the refresh point: the restart must reuse.
                    time.sleep(rng.uniform(0.0, 0.8))
                    process.send_signal(signal.SIGKILL)
                    process.wait()
                    result.kills_idle += 1
                elif not _kill_during_next_issue(process, idp, rng, timeout=15):
                    raise RuntimeError(
                        f"no refresh within 15 s; log tail:\n{log.read_text()[-2000:]}"
                    )
                result.kills += 1
                issued = {t.access_token for t in idp.issued}
                values = _file_tokens(folder, issued, result)
                if len(set(values)) > 1 or (values and values[0] != idp.issued[-1].access_token):
                    result.kills_during_refresh += 1
                _check_secret(kube, issued, result)

                # Restart: nothing may be asked while the stored token is before its refresh
                # point (the earliest the jitter allows).
                requests_before = idp.token_requests
                stored = min(
                    (t for t in idp.issued if t.access_token in values),
                    key=lambda t: t.expires_at,
                    default=None,
                )
                process = _start(config, log)
                if stored is not None:
                    earliest = refresh_at(policy, stored.issued_at, stored.expires_at, 0.999)
                    while time.time() < earliest - 0.05 and process.poll() is None:
                        if idp.token_requests != requests_before:
                            result.early_requests_after_restart += 1
                            result.problems.append("asked the IdP while the stored token was fresh")
                            break
                        time.sleep(0.005)
        finally:
            process.kill()
            process.wait()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.crash")
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    begun = time.monotonic()
    result = run(args.kills, args.seed)
    if args.json:
        print(json.dumps(dataclasses.asdict(result)))
        return
    rows: list[tuple[str, Any]] = [
        ("kill -9 rounds", result.kills),
        ("  aimed inside a write (0-1 ms after the IdP issued)", result.kills - result.kills_idle),
        ("  aimed at an idle moment (restart must reuse the token)", result.kills_idle),
        (
            "  found mid-refresh (sinks disagreed or held the old token)",
            result.kills_during_refresh,
        ),
        ("torn or empty files", result.torn_or_empty_files),
        ("tokens the IdP never issued", result.unknown_tokens),
        ("inconsistent Secrets", result.inconsistent_secrets),
        (
            "IdP requests on restart while the stored token was fresh",
            result.early_requests_after_restart,
        ),
        ("abandoned temp files outliving a sweep (> 90 s old)", result.leftover_temp_files),
        ("duration", f"{time.monotonic() - begun:.0f} s"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")
    for problem in result.problems[:20]:
        print("  problem:", problem)


if __name__ == "__main__":
    main()
