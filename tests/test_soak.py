"""A short soak under faults: the soak harness (bench/soak.py), run as a program for 45 s.

The harness is a benchmark that prints its figures (`--json`, with its table on stderr); this
test runs it from the repository's root and checks them, so the tests and the benchmarks do
not import each other. `pytest -s` shows the table.
"""

from __future__ import annotations

from tests.runproc import run_harness


def test_soak_under_faults_never_serves_a_dead_token_outside_the_window() -> None:
    result, table = run_harness("bench.soak", "--seconds", "45", "--seed", "11", "--json")
    print("\n" + table)
    assert result["refreshes"] >= 25
    assert sum(result["faults"].values()) >= 4
    assert result["reads"] > 5000
    assert result["torn_reads"] == 0
    assert result["rejected_outside_window"] == 0
    assert result["steady_issued"] > 0 and result["steady_requests"] == result["steady_issued"]
