"""The metrics and alert rules against real Prometheus parts, all on loopback.

- `promtool` checks `helm/refresher/files/refresher-rules.yaml` and runs its unit tests;
- a real Prometheus scrapes a running daemon every second, with tokens that live 3 s, and
  evaluates the alert rules; its HTTP API then shows what it stored;
- `refresher once --pushgateway` pushes to a real Pushgateway, read back from its /metrics.

Binaries missing: skipped, or failed when CI is set (see tests/promtools.py).
"""

from __future__ import annotations

import itertools
import math
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from refresher import __version__
from refresher.cli import main
from refresher.errors import Reason
from testdoubles.idp import Fault, LocalIdP
from tests.conftest import config_of, job_for, running, wait_for
from tests.promtools import (
    RULE_TESTS,
    RULES,
    PromAPI,
    poll,
    prometheus,
    pushgateway,
    require_binary,
    scrape,
)

METRICS_ON = {"enabled": True, "bind": "127.0.0.1", "port": 0}

# ---------------------------------------------------------------------------- the rules file


def _rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def _alert_tests() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULE_TESTS.read_text())
    return [case for test in document["tests"] for case in test.get("alert_rule_test", [])]


def test_every_alert_has_a_severity_a_summary_and_firing_and_quiet_unit_tests() -> None:
    rules = _rules()
    names = [rule["alert"] for rule in rules]
    assert set(names) >= {
        "RefresherTokenExpiringSoon",
        "RefresherTokenExpired",
        "RefresherTokenMissing",
        "RefresherRefreshFailing",
        "RefresherTokenContested",
        "RefresherNoLeader",
        "RefresherDown",
        "RefresherAbsent",
        "RefresherSecretWatchDown",
        "RefresherConsumerAuthFailures",
    }
    assert len(names) == len(set(names))
    cases = _alert_tests()
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]
        per_token = ("refresher_token_", "refresher_consecutive_failures", "refresher_secret_watch")
        if any(name in rule["expr"] for name in per_token):
            for text in rule["annotations"].values():
                assert "{{ $labels.token }}" in text, rule["alert"]
        own = [case for case in cases if case["alertname"] == rule["alert"]]
        assert any(case["exp_alerts"] for case in own), f"{rule['alert']}: no firing case"
        assert any(not case["exp_alerts"] for case in own), f"{rule['alert']}: no quiet case"


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = require_binary("promtool")
    return subprocess.run(
        [promtool, *args], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )


def test_promtool_checks_the_rules_and_their_unit_tests_pass() -> None:
    check = _promtool("check", "rules", str(RULES))
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in check.stdout
    unit = _promtool("test", "rules", str(RULE_TESTS))
    assert unit.returncode == 0, unit.stdout + unit.stderr
    assert "SUCCESS" in unit.stdout
    print(f"\npromtool test rules: {' '.join(unit.stdout.split())}")


@pytest.mark.parametrize(
    ("mutation", "original", "broken"),
    [
        ("threshold", "time() < 300", "time() < 3000"),
        (
            "missing",
            "unless on (job, instance, token) refresher_token_expiry_timestamp_seconds",
            "",
        ),
        (
            "followers",
            "refresher_consecutive_failures > 0\n          unless on (job, instance)",
            "refresher_consecutive_failures > 0\n          or on (job, instance)",
        ),
        ("for", "for: 10m", "for: 5m"),
        # Without the window the alert resolves at each scheduled refresh mid-fight.
        (
            "flapping",
            "max_over_time(refresher_token_contested[15m]) > 0",
            "refresher_token_contested > 0",
        ),
        # A watch's routine reconnects are not an outage.
        (
            "watch-blips",
            "expr: refresher_secret_watch_up == 0\n        for: 2m",
            "expr: refresher_secret_watch_up == 0\n        for: 30s",
        ),
        # Each replica's broken watch is its own alert, not one per token across replicas.
        (
            "watch-aggregated",
            "expr: refresher_secret_watch_up == 0",
            "expr: min by (job, token) (refresher_secret_watch_up) == 0",
        ),
        # Per replica, a consumer's failures spread over two replicas stay below the
        # threshold on each; per replica and summed, one cause would alert once per replica.
        (
            "auth-per-replica",
            "sum by (job, namespace) (rate(refresher_consumer_auth_failures_total[5m]))",
            "sum by (job, instance) (rate(refresher_consumer_auth_failures_total[5m]))",
        ),
        ("auth-burst", "> 0.2\n        for: 10m", "> 0.2\n        for: 2m"),
    ],
)
def test_the_rule_unit_tests_catch_a_broken_rule(
    tmp_path: Path, mutation: str, original: str, broken: str
) -> None:
    """The unit tests can fail: each of these changes to the rules makes them fail."""
    text = RULES.read_text()
    assert original in text, f"{mutation}: the rules file changed; update this test"
    (tmp_path / RULES.name).write_text(text.replace(original, broken, 1))
    (tmp_path / RULE_TESTS.name).write_text(RULE_TESTS.read_text())
    unit = _promtool("test", "rules", str(tmp_path / RULE_TESTS.name))
    assert unit.returncode != 0, unit.stdout
    assert "FAILED" in unit.stdout + unit.stderr


# ------------------------------------------------------------------ Prometheus scraping us


def _upward_steps(samples: list[tuple[float, float]]) -> int:
    """How often the time left went up between two scrapes: a new token each time."""
    return sum(1 for (_, a), (_, b) in itertools.pairwise(samples) if b > a)


def test_prometheus_sees_ttl_stay_positive_over_refreshes_and_failures_counted(
    make_idp: Callable[..., LocalIdP], secret_file: Path, tmp_path: Path
) -> None:
    idp = make_idp("generic", lifetime=3)
    config = config_of(
        job_for(idp, secret_file, tmp_path / "token", name="api"), metrics=METRICS_ON
    )
    with running(config) as daemon:
        assert daemon.http is not None
        target = f"127.0.0.1:{daemon.http.port}"
        with prometheus(tmp_path / "prometheus", [target], rule_files=[RULES]) as server:
            api = PromAPI(server.base_url)
            started = time.time()
            ttl = 'refresher_token_ttl_seconds{job="refresher", token="api"}'

            # Healthy: Prometheus records several refreshes (the time left jumps back up).
            poll(
                lambda: _upward_steps(api.samples(ttl, started, time.time())) >= 4,
                timeout=25,
                interval=0.5,
                what="four refreshes seen by Prometheus",
            )
            healthy_until = time.time()
            healthy = api.samples(ttl, started, healthy_until)
            window = f"{int(healthy_until - started) + 1}s"
            min_ttl = api.scalar(f"min_over_time({ttl}[{window}])", at=healthy_until)
            max_ttl = api.scalar(f"max_over_time({ttl}[{window}])", at=healthy_until)
            assert api.scalar(f'up{{job="refresher", instance="{target}"}}') == 1
            success = (
                'refresher_refresh_attempts_total{job="refresher", token="api", outcome="success"}'
            )
            successes_before = api.scalar(success, at=healthy_until)
            failures = 'refresher_refresh_failures_total{job="refresher", token="api"}'
            assert api.scalar(f"sum({failures})", at=healthy_until) == 0

            # The IdP fails: two failed attempts, then it answers again. The second failure
            # comes with ~0.5 s left and the next retry a quarter second later.
            failing_from = time.time()
            idp.set_fault(Fault.SERVER_ERROR)
            wait_for(lambda: daemon.snapshots()[0].consecutive_failures >= 2, timeout=10)
            idp.set_fault(None)
            failing_until = time.time()
            http_5xx = (
                'refresher_refresh_failures_total{job="refresher", token="api", reason="http_5xx"}'
            )
            poll(
                lambda: (api.scalar(http_5xx) or 0) >= 2,
                timeout=10,
                what="the failures seen by Prometheus",
            )
            poll(
                lambda: (
                    (api.scalar(success) or 0) > (successes_before or 0)
                    and api.scalar('refresher_consecutive_failures{token="api"}') == 0
                ),
                timeout=10,
                what="the recovery seen by Prometheus",
            )
            # Evaluated every 0.5 s up to exactly `end` (after the polls above saw the latest).
            end = round(time.time(), 3)
            steps = math.ceil((end - failing_from + 2) / 0.5)
            rising = api.query_range(http_5xx, end - steps * 0.5, end, step=0.5)
            increase = api.scalar(f"increase({http_5xx}[{int(end - failing_from) + 2}s])", at=end)
            other_reasons = api.scalar(
                'sum(refresher_refresh_failures_total{token="api", reason!="http_5xx"})', at=end
            )
            # The rules' time left, expiry - time(), is the scraped ttl give or take a scrape.
            drift = api.scalar(
                f'refresher_token_expiry_timestamp_seconds{{token="api"}} - time() - {ttl}',
                at=end,
            )
            whole_run = f"{int(end - started) + 1}s"
            min_ttl_all = api.scalar(f"min_over_time({ttl}[{whole_run}])", at=end)
            rules = api.rules()
            # Rules are evaluated every second; ExpiringSoon matches 3-second tokens at once
            # (their time left is always below 300 s) and is pending for its `for: 1m`.
            pending = poll(
                lambda: [
                    alert
                    for alert in api.alerts()
                    if alert["labels"]["alertname"] == "RefresherTokenExpiringSoon"
                ],
                timeout=5,
                what="RefresherTokenExpiringSoon pending",
            )
            active = {alert["labels"]["alertname"] for alert in api.alerts()}

    assert min_ttl is not None and max_ttl is not None and min_ttl_all is not None
    assert increase is not None and len(rising) == 1 and drift is not None
    print(
        f"\nPrometheus: {len(healthy)} ttl samples over {healthy_until - started:.1f} s, "
        f"{_upward_steps(healthy)} refreshes seen, min ttl {min_ttl:.3f} s, max {max_ttl:.3f} s; "
        f"http_5xx failures {rising[0]['values'][0][1]} -> {rising[0]['values'][-1][1]} "
        f"(increase() {increase:.2f}) while failing for {failing_until - failing_from:.2f} s; "
        f"min ttl over the whole run {min_ttl_all:.3f} s; expiry - time() - ttl {drift:.3f} s"
    )
    # The time left stayed positive across several refreshes, each scrape below 3 s. (The
    # first scrape comes up to ~5 s after Prometheus is ready: it applies targets that late.)
    assert len(healthy) >= 5
    assert _upward_steps(healthy) >= 4
    assert 0 < min_ttl < max_ttl <= 3
    # The failure counter rose while the IdP failed, by reason, and never went down.
    values = [float(v) for _, v in rising[0]["values"]]
    assert values[0] == 0 and values[-1] >= 2
    assert all(b >= a for a, b in itertools.pairwise(values))
    assert increase > 0
    assert other_reasons == 0
    # Retries grow denser as expiry nears: the IdP came back before the token expired.
    assert min_ttl_all > 0
    assert -1.5 < drift <= 0.01
    # The rules loaded, evaluate without error against the real series, and match them.
    assert {rule["name"] for rule in rules} == {rule["alert"] for rule in _rules()}
    assert all(rule["health"] == "ok" and not rule.get("lastError") for rule in rules), rules
    assert pending[0]["state"] == "pending"
    assert pending[0]["labels"] == {
        "alertname": "RefresherTokenExpiringSoon",
        "instance": target,
        "job": "refresher",
        "severity": "critical",
        "token": "api",
    }
    assert not active & {
        "RefresherTokenExpired",
        "RefresherTokenMissing",
        "RefresherNoLeader",
        "RefresherDown",
        "RefresherAbsent",
    }


# ------------------------------------------------------------------------- the Pushgateway


def test_once_pushes_its_metrics_to_a_real_pushgateway_grouped_by_job_and_instance(
    make_idp: Callable[..., LocalIdP],
    secret_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    idp = make_idp("generic", lifetime=3600)
    token_file = tmp_path / "token"
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "tokens": [job_for(idp, secret_file, token_file, name="api")],
                "metrics": {"enabled": False},
            }
        )
    )
    instance = "refresher-cron-29f7q"
    monkeypatch.setenv("HOSTNAME", instance)
    group = {"job": "refresher", "instance": instance}

    with pushgateway(tmp_path / "pushgateway") as gateway:
        pushed_at = time.time()
        args = [
            "once",
            "-c",
            str(config),
            "--pushgateway",
            gateway.base_url,
            "--log-level",
            "warning",
        ]
        assert main(args) == 0
        first = [
            s for s in scrape(f"{gateway.base_url}/metrics") if group.items() <= s.labels.items()
        ]
        # A second run finds the token valid, asks nothing, and replaces the group.
        assert main(args) == 0
        second = [
            s for s in scrape(f"{gateway.base_url}/metrics") if group.items() <= s.labels.items()
        ]

    def value(samples: list[Any], name: str, **labels: str) -> float:
        found = [s for s in samples if s.name == name and labels.items() <= s.labels.items()]
        assert len(found) == 1, (name, labels, found)
        return float(found[0].value)

    assert idp.token_requests == 1
    assert value(first, "refresher_refresh_attempts_total", token="api", outcome="success") == 1
    assert value(first, "refresher_refresh_attempts_total", token="api", outcome="failure") == 0
    for reason in Reason:
        assert (
            value(first, "refresher_refresh_failures_total", token="api", reason=reason.value) == 0
        )
    assert 3590 < value(first, "refresher_token_ttl_seconds", token="api") <= 3600
    assert value(first, "refresher_sink_writes_total", token="api", outcome="success") == 1
    assert value(first, "refresher_consecutive_failures", token="api") == 0
    assert value(first, "refresher_leader") == 1
    assert value(first, "refresher_build_info", version=__version__) == 1
    assert pushed_at <= value(first, "push_time_seconds") <= time.time()
    assert pushed_at <= value(first, "refresher_last_success_timestamp_seconds", token="api")

    # The second push replaced the first: this run made no attempt.
    assert value(second, "refresher_refresh_attempts_total", token="api", outcome="success") == 0
    assert value(second, "refresher_token_expiry_timestamp_seconds", token="api") == value(
        first, "refresher_token_expiry_timestamp_seconds", token="api"
    )
    assert value(second, "refresher_leader") == 1
