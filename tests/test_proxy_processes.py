"""The header-injecting proxy (issue 16) on real `refresher run` processes: two replicas
behind one Lease proxying consumers' GETs and POSTs to the Lucidworks-shaped token server's
protected API through refreshes, rogue reissues and a kill -9 of the leader
(bench/proxysoak.py, run as a program).

The harness is a benchmark that prints its figures (`--json`, with its tables on stderr); the
test runs it from the repository's root and checks them with generous bounds, so the tests
and the benchmarks do not import each other. `pytest -s` shows the tables.
"""

from __future__ import annotations

from tests.runproc import run_harness

LEADER, SURVIVOR = "proxysoak-1", "proxysoak-2"
CONSUMERS = 4
REISSUES = 4


def test_proxy_consumers_never_see_a_401_through_refreshes_reissues_and_a_kill_9() -> None:
    result, table = run_harness(
        "bench.proxysoak",
        "--seconds", "28",
        "--reissues", str(REISSUES),
        "--consumers", str(CONSUMERS),
        "--seed", "3",
        "--json",
        timeout=120,
    )  # fmt: skip
    print("\n" + table)
    assert result["problems"] == []

    # The acceptance figure: not one 401 reached a proxy consumer, over many GETs and POSTs,
    # and every POST answered carried the hash of the body sent (a replay resent it whole).
    total = result["proxy"]["total"]
    assert total["unauthorized"] == 0
    assert total["get"] > 300 and total["post"] > 300
    assert total["integrity_failures"] == 0
    assert set(total["statuses"]) <= {"200", "connection"}, total["statuses"]
    for replica in (LEADER, SURVIVOR):
        served = result["proxy"]["by_replica"][replica]
        assert served["requests"] > 100, replica
        assert served["unauthorized"] == 0, replica

    # The upstream did reject what the proxies sent (rogue reissues, and a follower's token
    # for the moment its watch lags a refresh), and the proxies replayed it: without
    # replays those would be the consumers' 401s.
    assert result["idp"]["rogue_reissues"] == REISSUES
    assert result["idp"]["unauthorized_to_proxies"] >= REISSUES
    replays = result["replays_total"]
    assert replays.get("accepted", 0) >= REISSUES, replays
    for outcome in ("rejected", "failed", "no_new_token", "not_replayable"):
        assert replays.get(outcome, 0) == 0, replays
    assert result["replays"][SURVIVOR]["logged"].get("accepted", 0) > 0
    # ... while the same traffic with the token read from the file got 401s in this run.
    assert result["file_consumer"]["requests"] > 200
    assert result["file_consumer"]["unauthorized"] >= 1

    # Connection errors only from the killed leader, at the kill: at most one per consumer
    # that was on it, each retried on the survivor and answered there, never with a 401.
    errors = result["connection_errors"]
    assert 1 <= errors["count"] <= CONSUMERS // 2 + 1, errors
    assert errors["before_kill"] == 0
    assert errors["last_after_kill"] < 3.0
    assert errors["retries"] == {"200": errors["count"]}
    assert errors["retries_unauthorized"] == 0

    # Many refreshes; the follower never asked the IdP while it followed, then took the
    # Lease over and refreshed by itself; reissues came on both sides of the kill.
    idp, events = result["idp"], result["events"]
    assert idp["refreshes"] >= 6
    assert idp["follower_refreshes_while_following"] == 0
    assert idp["issuers"].get(SURVIVOR, 0) >= 1
    assert set(idp["issuers"]) <= {LEADER, SURVIVOR, "rogue", "?"}
    assert events["takeover_after_kill"] < 10
    assert 1 <= events["reissues_before_kill"] < REISSUES
    killed, healed = events["no_reissue_window"]
    assert not [at for at in events["reissues_at"] if killed <= at <= healed]

    # No client secret and no token in either replica's log; every line is a JSON line.
    assert result["log_lines"] > 20
    assert result["secret_leaks"] == 0, result["leaking_logs"]
    assert result["stray_log_lines"] == 0
