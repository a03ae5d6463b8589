"""Self-healing (rule 11 of docs/design.md): the heal harness (bench/heal.py) run as a program,
and `refresher once` replacing a stored token the API no longer accepts.

The harness is a benchmark that prints its figures (`--json`, with its tables on stderr); this
test runs it from the repository's root and checks them with generous bounds, so the tests and
the benchmarks do not import each other. `pytest -s` shows the tables.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from refresher.idp import basic_authorization
from refresher.schedule import CONTEST_LIMIT
from testdoubles.idp import LocalIdP
from tests.conftest import CLIENT_ID, CLIENT_SECRET, SHAPE_SCOPES, job_for
from tests.runproc import ROOT, run_harness, write_config


def test_reissues_heal_fights_are_called_contested_and_a_successor_replaces_a_dead_token() -> None:
    result, table = run_harness(
        "bench.heal",
        "--reissues", "3",
        "--successions", "2",
        "--fight-seconds", "20",
        "--seed", "5",
        "--json",
        timeout=150,
    )  # fmt: skip
    print("\n" + table)
    settings = result["settings"]
    assert result["problems"] == []

    # Probe every `interval`: each reissue healed within the interval plus a few seconds, by
    # a refresh the probe's rejection caused (each comes 0.1-1.9 s after a refresh, before the
    # next scheduled one is due; on a slow machine a scheduled refresh may still win once).
    interval = result["interval"]
    assert interval["reissues"] == 3
    assert len(interval["recovered_after"]) == len(interval["all_recovered_after"]) == 3
    assert max(interval["all_recovered_after"]) < settings["probe_interval"] + 3
    assert 2 <= interval["rejection_refreshes"] <= 3
    probe_rejections = interval["metrics"]["refresher_token_rejections_total"]["probe"]
    assert probe_rejections >= interval["rejection_refreshes"]

    # Consumers report their 401s: healed within a couple of seconds (tens of ms when idle),
    # with a handful of 401s per reissue rather than one per read until the next probe.
    report = result["report"]
    assert report["reissues"] == 3
    assert len(report["recovered_after"]) == len(report["all_recovered_after"]) == 3
    assert max(report["all_recovered_after"]) < 2.0
    assert report["rejection_refreshes"] == 3
    assert report["reports"].get("202", 0) >= 3
    assert max(report["unauthorized"]) <= 5 * settings["consumers"]
    assert report["metrics"]["refresher_rejection_reports_total"]["rejected"] >= 3
    assert statistics.median(report["recovered_after"]) < statistics.median(
        interval["recovered_after"]
    )

    for mode in (interval, report):
        assert mode["unauthorized_outside"] == 0  # never a dead token left in the sink
        assert mode["torn_reads"] == 0 and mode["other_failures"] == 0
        assert mode["contested_lines"] == 0  # spaced a lifetime apart: no contest, by design
        assert mode["metrics"]["refresher_token_contested"][""] == 0
        # One request per reissue on top of the scheduled refreshes (one every 2.4 s or more).
        scheduled = mode["seconds"] / 2.4 + 2
        assert mode["refresher_token_requests"] <= mode["reissues"] + scheduled

    # Two refreshers on one client and scope. The first to have refreshed CONTEST_LIMIT times
    # on rejections within a lifetime finds the token contested at its next rejection (error
    # line, gauge 1) and stands down; the other's token then lives, so it is found contested
    # only if the order flips later (usual within the run, not promised). Neither ever
    # refreshes on rejections more than CONTEST_LIMIT times in one lifetime.
    fight = result["fight"]
    assert len(fight["refreshers"]) == 2
    assert fight["first_contested_after"] is not None and fight["first_contested_after"] < 10
    first = min(
        (f for f in fight["refreshers"] if f["contested_after"] is not None),
        key=lambda f: f["contested_after"],
    )
    assert first["rejection_refreshes_before_contest"] >= CONTEST_LIMIT
    for fighter in fight["refreshers"]:
        assert fighter["most_rejection_refreshes_in_a_lifetime"] <= CONTEST_LIMIT
        if fighter["contested_logged"]:
            assert fighter["contest_level"] == "error" and fighter["contested_metric_seen"]
    assert fight["idp_token_requests"] <= fight["request_bound"]

    # A successor finds the token its killed predecessor left dead, and replaces it at once.
    rounds = result["successor"]["rounds"]
    assert len(rounds) == 2
    for taken in rounds:
        assert taken["idp_requests_before_takeover"] == 0  # a follower never asks
        assert taken["adopted_token_probed_rejected"]
        assert taken["dead_token_replaced"]
        assert taken["healed_after_takeover"] < 3.0
        assert taken["idp_requests_after_takeover"] == 1

    # No client secret and no token in any refresher's log; every line is a JSON line.
    assert result["log_lines"] > 50
    assert result["secret_leaks"] == 0, result["leaking_logs"]
    assert result["stray_log_lines"] == 0


# ------------------------------------------------------------------------- refresher once


def _issue(idp: LocalIdP) -> str:
    """A token for the test client and the job's scope, asked by someone else: it revokes the
    one issued before it."""
    answer = requests.post(
        idp.token_url,
        params={"grant_type": "client_credentials", "scope": SHAPE_SCOPES["lucidworks"][0]},
        headers={
            "Accept": "application/json",
            "Authorization": basic_authorization(CLIENT_ID, CLIENT_SECRET, form_encode=True),
        },
        data={"reissued": "1"},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    return str(answer.json()["access_token"])


def _once(config: Path) -> tuple[int, str, list[dict[str, Any]]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "refresher", "once", "-c", str(config), "--log-format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
        check=False,
    )
    return done.returncode, done.stderr, [json.loads(line) for line in done.stderr.splitlines()]


def test_once_with_a_probe_replaces_a_revoked_stored_token_and_exits_0(
    make_idp: Callable[..., LocalIdP], secret_file: Path, tmp_path: Path
) -> None:
    # Tokens live 5 minutes: the stored one is far from its refresh point, so only the probe
    # can tell that it is dead.
    idp = make_idp("lucidworks", lifetime=300)
    sink = tmp_path / "token"
    dead = _issue(idp)
    _issue(idp)
    assert idp.token_status(dead) == "revoked"
    sink.write_text(dead)

    # Without a probe, `once` trusts the stored token: nothing is due, nothing is asked.
    blind = write_config(
        tmp_path / "blind.yaml", job_for(idp, secret_file, sink), metrics={"enabled": False}
    )
    asked = idp.token_requests
    code, stderr, _ = _once(blind)
    assert code == 0, stderr
    assert sink.read_text() == dead and idp.token_requests == asked

    # With a probe, it finds the token dead before trusting it, fetches one, and succeeds.
    probed = write_config(
        tmp_path / "probed.yaml",
        job_for(idp, secret_file, sink, probe={"url": idp.protected_url}),
        metrics={"enabled": False},
    )
    code, stderr, records = _once(probed)
    assert code == 0, stderr
    fresh = sink.read_text()
    assert fresh != dead and idp.token_status(fresh) == "valid"
    assert idp.token_requests == asked + 1
    rejected = [r for r in records if r["message"] == "probe: token rejected"]
    assert [r["why"] for r in rejected] == ["adopted"]
    assert any(r["message"] == "token refreshed" for r in records)
    for secret in (CLIENT_SECRET, dead, fresh):
        assert secret not in stderr

    # Run again: the stored token is alive now; the probe accepts it and nothing is asked.
    code, stderr, records = _once(probed)
    assert code == 0, stderr
    assert sink.read_text() == fresh and idp.token_requests == asked + 1
    assert [r["message"] for r in records if r["message"].startswith("probe:")] == []
    assert any(r["message"] == "token reused from sink" for r in records)
