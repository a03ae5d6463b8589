"""The proxy benchmark (bench/proxy.py) as a program: a quick run against nginx, driven by
wrk, has every figure it promises, and the proxy answered every request it was sent.

CI installs both (`.ci/install-bench-tools`); elsewhere the test is skipped when one is
missing. Like the other harness tests it runs the harness and reads its JSON, so `tests` and
`bench` never import each other. `pytest -s` shows the run's tables.
"""

from __future__ import annotations

import shutil

import pytest

from tests.runproc import run_harness

SBIN = "/usr/local/sbin:/usr/sbin:/sbin"
HAVE_TOOLS = all(shutil.which(name) or shutil.which(name, path=SBIN) for name in ("nginx", "wrk"))
INSTALL = "bash .ci/install-bench-tools"


@pytest.mark.skipif(not HAVE_TOOLS, reason=f"needs nginx and wrk ({INSTALL})")
def test_a_quick_run_has_every_figure() -> None:
    result, tables = run_harness("bench.proxy", "--quick", "--seconds", "1", "--json", timeout=90)
    print("\n" + tables)
    assert result["problems"] == [], result["problems"]
    for name in ("small_get", "post_1mib"):
        figures = result["latency"][name]
        for where in ("direct", "proxy"):
            assert figures[where]["requests"] > 0 and figures[where]["failed"] == 0
            assert 0 < figures[where]["p50_us"] <= figures[where]["p99_us"]
        assert figures["added_p50"] is not None and figures["added_p99"] is not None
        assert figures["proxy_own_mean"]["added"] is not None
    throughput = result["throughput"]
    assert throughput["direct"]["per_second"] > 0
    assert throughput["proxy"]["per_second"] > 0
    assert throughput["proxy"]["refresher_cpu_seconds"] > 0
    streaming = result["streaming"]
    assert streaming["intact"] and streaming["bytes"] == 10 << 20
    assert [r["reader"] for r in streaming["readers"]] == [
        "direct (control), fast reader",
        "proxy, fast reader",
        "proxy, slow reader",
    ]
    for reader in streaming["readers"]:
        assert reader["rss_peak_mb"] >= reader["rss_before_mb"] > 0
        # Streamed, not held: 10 MiB passed through with the refresher's memory nearly flat
        # (a proxy that buffered the answer would grow by at least its size).
        if reader["reader"].startswith("proxy"):
            assert reader["rss_peak_mb"] - reader["rss_before_mb"] < 5, reader
    windows = result["write_window"]
    assert windows["idle"]["count"] >= 1 and windows["load"]["count"] >= 1
    assert "direct_load" in windows  # a 1 s run may see no refresh
    assert throughput["proxy"]["others_on_core"] is not None  # two cores here: pinned
    assert result["proxy_requests"] > 0
    assert result["proxy_answers"].get("200", 0) == result["proxy_requests"]
    assert result["stray_log_lines"] == 0
