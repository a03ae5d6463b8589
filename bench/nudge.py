"""Nudging consumer pods (issue 18): `python -m bench.nudge [--refreshes 8] [--pods 50] [--json]`.

One `refresher run` child process refreshes a Lucidworks-shaped token (LocalIdP, 4 s tokens
refreshed 1.5 s before expiry) into a Secret on a local Kubernetes API (FakeKubeAPI, in this
process), twice: once with a plain Secret sink, once with `nudge: {selector: app=consumer}`
and `--pods` pods that mount the Secret as a volume. For each run:

- the **write window** (the refresher's `write_window_ms`: from the IdP's answer to the last
  sink written), which a nudge must leave as it is: it starts after the last write, on a
  thread of its own;
- the **API calls per refresh**, counted by the API double: Secret patches, pod lists and
  pod patches (a nudge is one list plus one patch per pod that does not carry the new
  fingerprint yet);
- the **nudge's duration** (`refresher_pod_nudge_duration_seconds`), and the time from the
  IdP's answer (its `token refreshed` log line's time minus the refresh's duration) to the
  last pod's patch reaching the API: what a nudged pod waits, before its kubelet's own part
  (a sync of that pod, which this machine has no kubelet to show).

The figures are measured on the machine it runs on; nothing here is asserted (the nudge's
behaviour is tested in tests/test_nudge.py).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench.__main__ import secret_file
from bench.heal import Refresher, emit, log_time, scrape, table
from bench.tokenapi import _spread
from refresher.localidp import LocalIdP
from testdoubles.kubeapi import FakeKubeAPI

CLIENT_ID, CLIENT_SECRET = "nudge-client", "nudge-secret-61c0d2"
SCOPE = "machinelearning.predict"
JOB = "predict"
NAMESPACE = "apps"
SECRET = "predict-token"
LIFETIME, MARGIN = 4.0, 1.5


def _pod_spec() -> dict[str, Any]:
    return {
        "volumes": [{"name": "token", "secret": {"secretName": SECRET}}],
        "containers": [
            {
                "name": "app",
                "image": "consumer:1",
                "volumeMounts": [{"name": "token", "mountPath": "/var/run/token"}],
            }
        ],
    }


def _config(folder: Path, idp: LocalIdP, kube: FakeKubeAPI, nudge: bool) -> Path:
    sink: dict[str, Any] = {"type": "kubernetes", "name": SECRET, "create": True}
    if nudge:
        sink["nudge"] = {"selector": "app=consumer"}
    job = {
        "name": JOB,
        "provider": "lucidworks",
        "token_url": idp.token_url,
        "client_id": CLIENT_ID,
        "client_secret": {"file": str(secret_file(folder, CLIENT_SECRET))},
        "scopes": [SCOPE],
        "margin": MARGIN,
        "min_refresh_interval": 0.5,
        "sinks": [sink],
    }
    kubeconfig = kube.write_kubeconfig(folder / "kubeconfig", namespace=NAMESPACE)
    settings = {
        "metrics": {"enabled": True, "bind": "127.0.0.1", "port": 0},
        "kubernetes": {"kubeconfig": str(kubeconfig), "request_timeout": 5},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump({"tokens": [job], **settings}))
    return path


def measure(refreshes: int, pods: int, nudge: bool, folder: Path) -> dict[str, Any]:
    """One refresher, `refreshes` refreshes after its first token; the run's figures."""
    with (
        LocalIdP("lucidworks", lifetime=LIFETIME, clients={CLIENT_ID: CLIENT_SECRET}) as idp,
        FakeKubeAPI() as kube,
    ):
        for index in range(pods):
            kube.add_pod(
                NAMESPACE, f"consumer-{index}", labels={"app": "consumer"}, spec=_pod_spec()
            )
        refresher = Refresher(
            "nudged" if nudge else "plain", _config(folder, idp, kube, nudge), folder
        )
        try:
            port = refresher.port("serving metrics")
            refresher.wait_logged("token refreshed")
            time.sleep(0.5)  # the first token's nudge, if any, is not counted
            kube.clear_requests()
            first = len(refresher.logged("token refreshed"))
            deadline = time.monotonic() + refreshes * LIFETIME + 30
            while len(refresher.logged("token refreshed")) < first + refreshes:
                if time.monotonic() > deadline:
                    raise RuntimeError("the refreshes did not come in time")
                time.sleep(0.05)
            time.sleep(1.0)  # the last refresh's nudge
            logged = refresher.logged("token refreshed")[first : first + refreshes]
            series = scrape(port, {"refresher_pod_nudge_duration_seconds_sum",
                                   "refresher_pod_nudge_duration_seconds_count"})  # fmt: skip
            requests = kube.requests
        finally:
            refresher.stop()
    windows = [float(r["write_window_ms"]) / 1000 for r in logged if "write_window_ms" in r]
    answered = [log_time(r) - float(r.get("duration_ms", 0)) / 1000 for r in logged]
    patches = sorted(r.received_at for r in requests if r.resource == "pods" and r.verb == "patch")
    # Per refresh: the last pod patch before the next refresh's answer, after this one's.
    reach = []
    for index, start in enumerate(answered):
        end = answered[index + 1] if index + 1 < len(answered) else float("inf")
        inside = [at for at in patches if start <= at < end]
        if inside:
            reach.append(max(inside) - start)
    count = sum(series.get("refresher_pod_nudge_duration_seconds_count", {}).values())
    total = sum(series.get("refresher_pod_nudge_duration_seconds_sum", {}).values())
    counted = len(logged) or 1
    return {
        "nudge": nudge,
        "pods": pods,
        "refreshes": len(logged),
        "write_window": _spread(windows),
        "calls_per_refresh": {
            "secret patches": sum(
                1 for r in requests if r.resource == "secrets" and r.verb == "patch"
            )
            / counted,
            "pod lists": sum(1 for r in requests if r.resource == "pods" and r.verb == "list")
            / counted,
            "pod patches": len(patches) / counted,
        },
        "nudge_mean": total / count if count else None,
        "answer_to_last_pod": _spread(reach),
        "stray_log_lines": refresher.stray_lines(),
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.2f} ms"


def report(runs: list[dict[str, Any]]) -> str:
    rows = []
    for run in runs:
        window = run["write_window"] or {}
        reach = run["answer_to_last_pod"] or {}
        calls = run["calls_per_refresh"]
        rows.append(
            [
                f"{'nudge' if run['nudge'] else 'no nudge'}, {run['pods']} pods",
                run["refreshes"],
                f"{_ms(window.get('median'))} / {_ms(window.get('max'))}",
                ", ".join(f"{value:g} {what}" for what, value in calls.items()),
                _ms(run["nudge_mean"]),
                f"{_ms(reach.get('median'))} / {_ms(reach.get('max'))}" if reach else "-",
            ]
        )
    header = [
        "run",
        "refreshes",
        "write window p50 / max",
        "API calls per refresh",
        "nudge (mean)",
        "IdP answer to last pod patched, p50 / max",
    ]
    return table("Nudging consumer pods (FakeKubeAPI on loopback)", header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.nudge")
    parser.add_argument("--refreshes", type=int, default=8)
    parser.add_argument("--pods", type=int, default=50)
    parser.add_argument("--json", action="store_true", help="figures as JSON on stdout")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-nudge-") as root:
        runs = []
        for nudge in (False, True):
            folder = Path(root) / ("nudged" if nudge else "plain")
            folder.mkdir()
            runs.append(measure(args.refreshes, args.pods if nudge else 0, nudge, folder))
    emit({"runs": runs}, report(runs), as_json=args.json)


if __name__ == "__main__":
    main()
