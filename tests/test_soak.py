"""A short soak under faults (bench/soak.py runs any duration and prints the table)."""

from __future__ import annotations

from bench.soak import report, run


def test_soak_under_faults_never_serves_a_dead_token_outside_the_window() -> None:
    result = run(seconds=45, seed=11)
    print("\n" + report(result))
    assert result.refreshes >= 25
    assert sum(result.faults.values()) >= 4
    assert result.reads > 5000
    assert result.torn_reads == 0
    assert result.rejected_outside_window == 0
    assert result.steady_issued > 0 and result.steady_requests == result.steady_issued
