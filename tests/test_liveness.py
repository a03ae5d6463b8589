"""Liveness: `/healthz` fails when the scheduler stops making progress or a refresh step runs
past every deadline it waits for, never merely because jobs are late (a slow IdP)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from refresher.config import validate
from refresher.liveness import Running, is_alive, stuck_after
from tests.conftest import config_of, job_for, running, wait_for
from tests.runproc import get

# ------------------------------------------------------------------------- the policy


def test_a_recent_heartbeat_and_bounded_steps_are_alive() -> None:
    assert is_alive(now=100.0, last_beat=95.0, heartbeat_timeout=30.0) == (True, "ok")
    # A step running long, but within its bound, is a slow IdP: alive.
    slow = Running("slow-idp", started=10.0, bound=125.0)
    assert is_alive(100.0, 99.0, 30.0, [slow]) == (True, "ok")


def test_a_stale_heartbeat_is_not_alive() -> None:
    alive, why = is_alive(now=1000.0, last_beat=969.0, heartbeat_timeout=30.0)
    assert not alive and "heartbeat is 31 s old" in why
    assert is_alive(now=1000.0, last_beat=970.0, heartbeat_timeout=30.0)[0]  # the bound is in


def test_a_step_past_its_bound_is_stuck() -> None:
    steps = [
        Running("fine", started=900.0, bound=125.0),
        Running("wedged", started=100.0, bound=125.0),
        Running("also-wedged", started=500.0, bound=125.0),
    ]
    alive, why = is_alive(1000.0, 999.0, 30.0, steps)
    assert not alive
    assert why.startswith("refresh of wedged running for 900 s") and "2 stuck" in why


def test_the_stuck_bound_covers_every_deadline_a_step_waits_for(
    tmp_path: Path, secret_file: Path
) -> None:
    def job(**overrides: Any) -> dict[str, Any]:
        base: dict[str, Any] = {
            "name": "j",
            "token_url": "https://idp.example.test/token",
            "client_id": "c",
            "client_secret": {"file": str(secret_file)},
            "sinks": [{"type": "file", "path": str(tmp_path / "t")}],
        }
        return {**base, **overrides}

    config = validate({"tokens": [job()]})
    (plain,) = config.jobs
    bound = stuck_after(plain, config.settings)
    assert bound >= plain.connect_timeout + 2 * plain.read_timeout + 60
    assert bound < 600  # a wedged pod is still restarted within minutes

    slow = validate(
        {
            "tokens": [
                job(
                    read_timeout="120s",
                    sinks=[
                        {"type": "file", "path": str(tmp_path / "t")},
                        {"type": "kubernetes", "name": "s", "namespace": "n"},
                    ],
                )
            ],
            "idp_rate_limit": 0.1,
            "max_concurrent_refreshes": 8,
        }
    )
    (slow_job,) = slow.jobs
    # 8 threads queued at 0.1 requests/s: the last waits 80 s before it may even ask.
    assert stuck_after(slow_job, slow.settings) >= 80 + 5 + 240 + 12 * 10 + 30

    # A probe that never answers is waited for up to its timeouts, up to three times a step.
    probed = validate(
        {"tokens": [job(probe={"url": "https://api.example.test/", "read_timeout": "130s"})]}
    )
    (probed_job,) = probed.jobs
    assert stuck_after(probed_job, probed.settings) >= bound + 3 * (5 + 130)


# ------------------------------------------------------------ the heartbeat, end to end


def test_healthz_fails_when_the_scheduler_stops_making_progress(
    make_idp: Callable[..., Any], secret_file: Path, tmp_path: Path
) -> None:
    idp = make_idp("generic", lifetime=60)
    metrics = {"enabled": True, "bind": "127.0.0.1", "port": 0, "heartbeat_timeout": "1.5s"}
    with running(config_of(job_for(idp, secret_file, tmp_path / "t"), metrics=metrics)) as d:
        assert d.http is not None
        port = d.http.port

        def health() -> tuple[int, str]:
            status, _, body = get("127.0.0.1", port, "/healthz")
            return status, body

        wait_for(lambda: health() == (200, "ok\n"), timeout=10)
        d.scheduler.pause()  # the scheduler stops dispatching, its thread still "running"
        wait_for(lambda: health()[0] == 503, timeout=15, interval=0.1)
        assert "scheduler heartbeat" in health()[1]
        d.scheduler.resume()
        wait_for(lambda: health() == (200, "ok\n"), timeout=15, interval=0.1)
