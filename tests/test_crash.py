"""kill -9 during writes, 20 times: the crash harness (bench/crash.py), run as a program.

The harness is a benchmark that prints its figures (`--json`); this test runs it from the
repository's root and checks them, so the tests and the benchmarks do not import each other.
"""

from __future__ import annotations

from tests.runproc import run_harness


def test_kill_9_during_writes_never_leaves_a_torn_token_or_a_needless_request() -> None:
    result, _ = run_harness("bench.crash", "--kills", "20", "--seed", "7", "--json")
    assert result["kills"] == 20
    assert result["kills_idle"] == 10
    # The kills must land inside refreshes to mean anything (all 10 do on an idle machine).
    assert result["kills_during_refresh"] >= 5
    assert result["problems"] == []
    assert result["torn_or_empty_files"] == 0
    assert result["unknown_tokens"] == 0
    assert result["inconsistent_secrets"] == 0
    assert result["early_requests_after_restart"] == 0
