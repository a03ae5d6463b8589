"""Self-healing against rogue reissues: `python -m bench.heal [--reissues 20] [--json]`.

It prints tables (with `--json`, the figures as JSON on stdout and the tables on stderr);
tests/test_heal.py runs `python -m bench.heal --reissues 3 ... --json` and checks the figures.

Every refresher is a `refresher run` child process. The token server is the Lucidworks-shaped
LocalIdP (a new token for a client and scope revokes the previous one at once) in this
process, one per scenario so their counts do not mix; its protected API is the probe's URL
and what consumers call. Tokens live 6 s, are refreshed 2 s before expiry, floor 0.5 s. A
*rogue reissue* is one token request with the refresher's client and scope by someone else
(the harness): it kills the token every sink holds.

Scenarios (run at once, each on its own IdP; `--sequential` runs them one after another):
- `interval`: the probe runs every 2 s; three consumers (threads reading the JSON file sink
  every 50 ms and calling the API with what they read) do nothing special.
- `report`: no probe interval; a consumer that gets a 401 re-reads the sink and, when the
  fingerprint did not change, POSTs `/v1/tokens/predict/rejected` to the API listener; when
  the answer says `refreshing` it re-reads until the new token is there.
  In both modes each rogue reissue comes 0.1-1.9 s after a refresh landed (so no scheduled
  refresh heals it first) and more than a token lifetime after the previous one (so the
  contest rule does not trip, by design). Measured per reissue, from the revocation: until the
  refresher asks the IdP again, until the first consumer call that succeeds, until every
  consumer's; and the 401s consumers saw. 401s for a token the refresher's own refresh revoked
  are counted apart (read within 250 ms of that refresh: its write window); any other 401
  means a dead token was left in the sink (must be 0).
- `fight`: two refreshers with the same client and scope, each its own file sink, probing
  every second; the second starts once the first holds a token, as a second deployment would.
  Each refresh revokes the other's token. The first to have refreshed `CONTEST_LIMIT` times
  on a rejection within one lifetime finds the token contested at its next rejection
  (`refresher_token_contested` 1 on /metrics, and the error log line) and stands down until
  its next scheduled refresh; the other's token then lives, so it is found contested only
  when the order flips at a later round. Neither refreshes more than `CONTEST_LIMIT` times
  on rejections in any lifetime, and the IdP's token requests stay bounded.
- `successor`: two replicas elect a leader on a local Kubernetes API (FakeKubeAPI); the sink is
  a Secret; tokens live 20 s here, so no refresh is due around a takeover. The leader is killed
  with SIGKILL and a rogue reissue revokes the Secret's token: the state a leader killed
  between the IdP's answer and its write leaves. The follower takes over, probes the adopted
  token, finds it dead and refreshes. Each round starts a fresh follower.

Last, no refresher's log may hold the client secret or any token the IdPs issued.
`--logs DIR` keeps every config and log there.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.__main__ import secret_file
from refresher.idp import basic_authorization
from refresher.localidp import LocalIdP
from refresher.schedule import CONTEST_LIMIT
from testdoubles.kubeapi import FakeKubeAPI

CLIENT_ID, CLIENT_SECRET = "heal-client", "heal-secret-3f9a71"
SCOPE = "machinelearning.predict"
JOB = "predict"
LIFETIME, MARGIN, FLOOR = 6.0, 2.0, 0.5
PROBE_INTERVAL = 2.0  # interval mode
FIGHT_PROBE_INTERVAL = 1.0  # the shortest `probe.interval` the config allows
CONSUMERS = 3
READ_EVERY = 0.05
SUCCESSOR_LIFETIME = 20.0
NAMESPACE = "tokens"
SECRET = "heal-token"
LEASE = {"lease_duration": 2.0, "renew_deadline": 1.5, "retry_period": 0.25}
SCENARIOS = ("interval", "report", "fight", "successor")

# Log messages this harness looks for (refresher/refresh.py, daemon.py, leader.py).
REJECTED_REFRESHING = "token rejected by the API; refreshing"
CONTESTED = "token contested:"
BLIND = "the probe rejects the token the IdP has just issued"


# --------------------------------------------------------------------------- plumbing


def loopback_session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # loopback only: no proxy from the environment in between
    return session


def _child_env(**extra: str) -> dict[str, str]:
    proxies = {"http_proxy", "https_proxy", "all_proxy"}
    env = {k: v for k, v in os.environ.items() if k.lower() not in proxies}
    return {**env, **extra}


def _wait(
    condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.005
) -> float:
    """Poll until `condition()` holds; the monotonic time it did. RuntimeError otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout:g} s")
        time.sleep(interval)


def log_time(record: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(record["time"]).replace("Z", "+00:00")).timestamp()


class Refresher:
    """`refresher run -c CONFIG` in a child process, logging JSON lines to NAME.log."""

    def __init__(self, name: str, config: Path, folder: Path, **env: str) -> None:
        self.name = name
        self.log = folder / f"{name}.log"
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "refresher", "run", "-c", str(config),
                 "--log-format", "json"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=_child_env(**env),
            )  # fmt: skip

    def records(self) -> list[dict[str, Any]]:
        """The log's JSON lines so far (a line being written is skipped)."""
        records = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def stray_lines(self) -> int:
        """Lines that are not JSON log lines (a traceback, say); after the process ended."""
        count = 0
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                json.loads(line)
            except ValueError:
                count += 1
        return count

    def logged(self, prefix: str) -> list[dict[str, Any]]:
        return [r for r in self.records() if str(r.get("message", "")).startswith(prefix)]

    def wait_logged(self, prefix: str, timeout: float = 30) -> dict[str, Any]:
        found: list[dict[str, Any]] = []

        def seen() -> bool:
            found.extend(self.logged(prefix))
            if not found and self.process.poll() is not None:
                tail = self.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{self.name} exited {self.process.returncode}:\n{tail}")
            return bool(found)

        _wait(seen, timeout, f"{self.name}: {prefix!r} logged", interval=0.02)
        return found[0]

    def port(self, message: str) -> int:
        return int(self.wait_logged(message)["port"])

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


# The self-healing series `scrape` reads unless told otherwise.
HEALING_SERIES = frozenset(
    {
        "refresher_probes_total",
        "refresher_token_rejections_total",
        "refresher_rejection_reports_total",
        "refresher_token_contested",
    }
)
# The one label `scrape` keys a sample by: the first of these it has.
SCRAPED_LABELS = ("outcome", "source", "code", "reason")


def scrape(port: int, wanted: Collection[str] = HEALING_SERIES) -> dict[str, dict[str, float]]:
    """The `wanted` series of one job on a /metrics port (the self-healing ones by default):
    name -> label value (outcome, source, code or reason) -> value."""
    with loopback_session() as session:
        body = session.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    series: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name in wanted:
                label = next((sample.labels[k] for k in SCRAPED_LABELS if sample.labels.get(k)), "")
                series.setdefault(sample.name, {})[label] = sample.value
    return series


def rogue_reissue(idp: LocalIdP) -> str:
    """One token request with the refresher's client and scope: revokes the token it holds."""
    with loopback_session() as session:
        answer = session.post(
            idp.token_url,
            params={"grant_type": "client_credentials", "scope": SCOPE},
            headers={
                "Accept": "application/json",
                "Authorization": basic_authorization(CLIENT_ID, CLIENT_SECRET, form_encode=True),
            },
            data={"rogue": "1"},
            timeout=10,
        )
    if answer.status_code != 200:
        raise RuntimeError(f"the rogue reissue was answered {answer.status_code}")
    return str(answer.json()["access_token"])


def _job(
    idp: LocalIdP,
    secret: Path,
    sinks: list[dict[str, Any]],
    probe_interval: float | None,
    margin: float = MARGIN,
) -> dict[str, Any]:
    probe: dict[str, Any] = {"url": idp.protected_url, "connect_timeout": 1, "read_timeout": 2}
    if probe_interval is not None:
        probe["interval"] = probe_interval
    return {
        "name": JOB,
        "provider": "lucidworks",
        "token_url": idp.token_url,
        "client_id": CLIENT_ID,
        "client_secret": {"file": str(secret)},
        "scopes": [SCOPE],
        "margin": margin,
        "min_refresh_interval": FLOOR,
        "read_timeout": 2,
        "sinks": sinks,
        "probe": probe,
    }


def _config(path: Path, job: dict[str, Any], **settings: Any) -> Path:
    settings.setdefault("metrics", {"enabled": True, "bind": "127.0.0.1", "port": 0})
    path.write_text(yaml.safe_dump({"tokens": [job], **settings}))
    return path


def read_sink(path: Path) -> tuple[str, str] | None:
    """(token, fingerprint) from a JSON file sink; None while there is none."""
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    return str(document["access_token"]), str(document["fingerprint"])


@dataclass
class Scenario:
    """What every scenario hands back besides its figures: for the leak check."""

    figures: dict[str, Any]
    logs: list[Refresher]
    tokens: set[str]
    problems: list[str] = field(default_factory=list)


# ------------------------------------------------------------------ interval and report


@dataclass(frozen=True)
class Call:
    read_at: float  # wall time the consumer read the token it called with
    token: str
    status: int


class Consumer(threading.Thread):
    """Reads the sink every 50 ms and calls the API with what it read. With `report_url`, a
    401 for a token the sink still holds is reported, and the new token waited for."""

    def __init__(
        self, sink: Path, api_url: str, stop: threading.Event, report_url: str | None
    ) -> None:
        super().__init__(daemon=True)
        self.sink, self.api_url, self.stop, self.report_url = sink, api_url, stop, report_url
        self.calls: list[Call] = []
        self.answers: Counter[str] = Counter()  # report answers by status
        self.torn = 0

    def _read(self) -> tuple[str, str] | None:
        try:
            return read_sink(self.sink)
        except (ValueError, KeyError):
            self.torn += 1
            return None

    def run(self) -> None:
        session = loopback_session()
        while not self.stop.is_set():
            held = self._read()
            if held is None:
                self.stop.wait(READ_EVERY)
                continue
            token, fingerprint = held
            read_at = time.time()
            try:
                status = session.get(
                    self.api_url, headers={"Authorization": f"Bearer {token}"}, timeout=5
                ).status_code
            except requests.RequestException:
                status = 0  # no answer: counted with the other failures
            self.calls.append(Call(read_at, token, status))
            if status == 401 and self.report_url is not None and self._report(session, fingerprint):
                continue  # a new token is in the sink: call again at once
            self.stop.wait(READ_EVERY)

    def _report(self, session: requests.Session, fingerprint: str) -> bool:
        """Report a rejected token; True when the sink now holds another one."""
        current = self._read()
        if current is not None and current[1] != fingerprint:
            return True  # replaced already: nothing to report
        try:
            answer = session.post(
                self.report_url or "", json={"fingerprint": fingerprint}, timeout=30
            )
        except requests.RequestException:
            self.answers["no answer"] += 1
            return False
        self.answers[str(answer.status_code)] += 1
        if answer.status_code == 409:
            return True  # not the current token any more: re-read
        if answer.status_code == 429:
            self.stop.wait(float(answer.headers.get("Retry-After", "1")))
            return True
        if answer.status_code != 202 or not answer.json().get("refreshing"):
            return False
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not self.stop.is_set():
            current = self._read()
            if current is not None and current[1] != fingerprint:
                return True
            time.sleep(0.002)
        return False


@dataclass(frozen=True)
class Reissue:
    victim: str  # the token the sink held
    rogue: str  # the one the rogue request got
    delay: float  # after the refresh it followed


def _next_token(sink: Path, idp: LocalIdP, after: str | None, timeout: float) -> None:
    """Wait until the sink holds a live token with another fingerprint than `after`."""

    def landed() -> bool:
        held = read_sink(sink)
        return held is not None and held[1] != after and idp.token_status(held[0]) == "valid"

    _wait(landed, timeout, "a new token in the sink")


def heal_mode(mode: str, reissues: int, rng: random.Random, root: Path) -> Scenario:
    folder = root / mode
    folder.mkdir()
    secret = secret_file(folder, CLIENT_SECRET)
    sink = folder / "token.json"
    settings: dict[str, Any] = {}
    if mode == "report":
        settings["api"] = {"enabled": True, "listen": "127.0.0.1:0"}
    with LocalIdP("lucidworks", lifetime=LIFETIME, clients={CLIENT_ID: CLIENT_SECRET}) as idp:
        interval = PROBE_INTERVAL if mode == "interval" else None
        sinks = [{"type": "file", "path": str(sink), "format": "json"}]
        config = _config(folder / "config.yaml", _job(idp, secret, sinks, interval), **settings)
        begun = time.monotonic()
        refresher = Refresher(mode, config, folder)
        stop = threading.Event()
        consumers: list[Consumer] = []
        done: list[Reissue] = []
        problems: list[str] = []
        try:
            metrics_port = refresher.port("serving metrics")
            report_url = None
            if mode == "report":
                api_port = refresher.port("serving the token API")
                report_url = f"http://127.0.0.1:{api_port}/v1/tokens/{JOB}/rejected"
            _next_token(sink, idp, None, timeout=30)
            consumers = [
                Consumer(sink, idp.protected_url, stop, report_url) for _ in range(CONSUMERS)
            ]
            for consumer in consumers:
                consumer.start()
            not_before = 0.0
            for _ in range(reissues):
                time.sleep(max(not_before - time.monotonic(), 0))
                held = read_sink(sink)
                # The next refresh lands (a scheduled one, past the previous reissue's heal),
                # then the rogue reissue comes a little later, before any probe of it is due.
                _next_token(sink, idp, held[1] if held else None, timeout=4 * LIFETIME)
                delay = rng.uniform(0.1, PROBE_INTERVAL - 0.1)
                time.sleep(delay)
                victim = read_sink(sink)
                assert victim is not None
                rogue = rogue_reissue(idp)
                not_before = time.monotonic() + LIFETIME + 0.2
                done.append(Reissue(victim[0], rogue, delay))
                try:
                    _next_token(sink, idp, victim[1], timeout=PROBE_INTERVAL + 10)
                except RuntimeError as err:
                    problems.append(f"{mode}: reissue {len(done)} not healed ({err})")
            time.sleep(0.5)  # the consumers see the last heal
            stop.set()
            for consumer in consumers:
                consumer.join(timeout=30)
            metrics = scrape(metrics_port)
        finally:
            stop.set()
            refresher.stop()
        seconds = time.monotonic() - begun
        figures = _mode_figures(idp, done, consumers, refresher, problems)
        figures.update(seconds=seconds, metrics=metrics, probe_interval=interval)
    return Scenario(figures, [refresher], {t.access_token for t in idp.issued}, problems)


def _mode_figures(
    idp: LocalIdP,
    done: list[Reissue],
    consumers: list[Consumer],
    refresher: Refresher,
    problems: list[str],
) -> dict[str, Any]:
    issued = idp.issued
    by_token = {t.access_token: t for t in issued}
    rogues = {r.rogue for r in done}
    victims = {r.victim for r in done}
    replaced, recovered, all_recovered, unauthorized = [], [], [], []
    for number, reissue in enumerate(done, 1):
        victim, rogue = by_token.get(reissue.victim), by_token[reissue.rogue]
        if victim is None or victim.revoked_at != rogue.issued_at:
            problems.append(f"reissue {number}: the sink's token was not revoked by it")
            continue
        revoked = victim.revoked_at
        replacement = next(
            (t for t in issued if t.issued_at >= rogue.issued_at and t.access_token not in rogues),
            None,
        )
        if replacement is None:
            problems.append(f"reissue {number}: the refresher never asked the IdP again")
            continue
        replaced.append(replacement.issued_at - revoked)
        firsts = []
        for consumer in consumers:
            first = next(
                (c.read_at for c in consumer.calls if c.read_at >= revoked and c.status == 200),
                None,
            )
            if first is None:
                problems.append(f"reissue {number}: a consumer never got a valid token again")
            else:
                firsts.append(first - revoked)
        if firsts:
            recovered.append(min(firsts))
            all_recovered.append(max(firsts))
        unauthorized.append(
            sum(
                1
                for consumer in consumers
                for c in consumer.calls
                if c.token == reissue.victim and c.status == 401
            )
        )
    calls = [c for consumer in consumers for c in consumer.calls]
    own = [c for c in calls if c.status == 401 and c.token not in victims]
    outside = [
        c
        for c in own
        if c.token not in by_token
        or (revoked_at := by_token[c.token].revoked_at) is None
        or c.read_at > revoked_at + 0.25
    ]
    answers: Counter[str] = Counter()
    for consumer in consumers:
        answers.update(consumer.answers)
    return {
        "reissues": len(done),
        "delays": [r.delay for r in done],
        "replaced_after": replaced,
        "recovered_after": recovered,
        "all_recovered_after": all_recovered,
        "unauthorized": unauthorized,
        # 401s for a token the refresher's own refresh revoked: read (or in flight) within
        # its write window, or 250 ms of it; anything else is a dead token left in the sink.
        "unauthorized_own_refresh": len(own) - len(outside),
        "unauthorized_outside": len(outside),
        "other_failures": sum(1 for c in calls if c.status not in (200, 401)),
        "consumer_calls": len(calls),
        "torn_reads": sum(consumer.torn for consumer in consumers),
        "reports": dict(answers),
        "idp_token_requests": idp.token_requests,
        "refresher_token_requests": idp.token_requests - len(done),
        "rejection_refreshes": len(refresher.logged(REJECTED_REFRESHING)),
        "contested_lines": len(refresher.logged(CONTESTED)),
    }


# ------------------------------------------------------------------------------- fight


def _most_within(times: list[float], window: float) -> int:
    """The most of `times` (sorted) inside any span shorter than `window`."""
    return max(
        (sum(1 for t in times[i:] if t - start < window) for i, start in enumerate(times)),
        default=0,
    )


def fight(seconds: float, root: Path) -> Scenario:
    """Two refreshers on one client and scope for `seconds` from the second one's start.

    The second starts once the first holds its token, as a second deployment with the same
    credentials would come up: from then on each refresh revokes the other's token, and each
    one's probe finds out within its interval. Every 100 ms: each one's /metrics (contested?)
    and whether the token in each one's sink is alive."""
    folder = root / "fight"
    folder.mkdir()
    secret = secret_file(folder, CLIENT_SECRET)
    fighters: list[Refresher] = []
    problems: list[str] = []
    contested_seen: list[float | None] = [None, None]  # wall time /metrics first said 1
    samples, alive = 0, [0, 0]
    with LocalIdP("lucidworks", lifetime=LIFETIME, clients={CLIENT_ID: CLIENT_SECRET}) as idp:
        begun = time.monotonic()
        try:
            for name in ("fight-a", "fight-b"):
                sinks = [{"type": "file", "path": str(folder / f"{name}.json"), "format": "json"}]
                job = _job(idp, secret, sinks, FIGHT_PROBE_INTERVAL)
                fighters.append(Refresher(name, _config(folder / f"{name}.yaml", job), folder))
                fighters[-1].wait_logged("token refreshed")
            ports = [fighter.port("serving metrics") for fighter in fighters]
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                samples += 1
                for index, (fighter, port) in enumerate(zip(fighters, ports, strict=True)):
                    value = scrape(port).get("refresher_token_contested", {}).get("", 0.0)
                    if value == 1 and contested_seen[index] is None:
                        contested_seen[index] = time.time()
                    held = read_sink(folder / f"{fighter.name}.json")
                    alive[index] += held is not None and idp.token_status(held[0]) == "valid"
                time.sleep(0.1)
        except RuntimeError as err:
            problems.append(f"fight: {err}")
        finally:
            for fighter in fighters:
                fighter.stop()
        ran = time.monotonic() - begun
        requests_made = idp.token_requests
        tokens = {t.access_token for t in idp.issued}
    # A JWT's whole-second `exp` takes up to a second off the lifetime the contest rule uses.
    shortest = LIFETIME - 1
    per: list[dict[str, Any]] = []
    refreshed = [fighter.logged("token refreshed") for fighter in fighters]
    # The fight begins with the second refresher's first token.
    fight_began = log_time(refreshed[-1][0]) if len(refreshed) == 2 and refreshed[-1] else None
    for index, fighter in enumerate(fighters):
        seen = contested_seen[index]
        records = fighter.records()
        messages = [str(r.get("message", "")) for r in records]
        contest = next((i for i, m in enumerate(messages) if m.startswith(CONTESTED)), None)
        before = messages[:contest] if contest is not None else messages
        rejection_times = [log_time(r) for r in records if r.get("message") == REJECTED_REFRESHING]
        per.append(
            {
                "name": fighter.name,
                "contested_metric_seen": seen is not None,
                "contested_metric_after": seen - fight_began
                if seen is not None and fight_began is not None
                else None,
                "contested_logged": contest is not None,
                "contested_lines": sum(1 for m in messages if m.startswith(CONTESTED)),
                "contest_level": records[contest].get("level") if contest is not None else None,
                "contested_after": log_time(records[contest]) - fight_began
                if contest is not None and fight_began is not None
                else None,
                "rejection_refreshes_before_contest": before.count(REJECTED_REFRESHING),
                "rejection_refreshes": len(rejection_times),
                # The contest rule's promise: never more than CONTEST_LIMIT in one lifetime.
                "most_rejection_refreshes_in_a_lifetime": _most_within(
                    rejection_times, shortest - 0.5
                ),
                "refreshes": messages.count("token refreshed"),
                "blamed_on_fresh_token": sum(1 for m in messages if m.startswith(BLIND)),
                "sink_alive_fraction": alive[index] / samples if samples else None,
            }
        )
    contested = [r["contested_after"] for r in per if r["contested_after"] is not None]
    if not contested:
        problems.append("fight: neither refresher found the token contested")
    # Per refresher: its first token; at most CONTEST_LIMIT rejection-driven refreshes in any
    # window of one lifetime; scheduled refreshes no closer than the shortest lifetime minus
    # the margin and the jitter.
    scheduled_gap = shortest - MARGIN - 0.1 * LIFETIME
    bound = 2 * (1 + CONTEST_LIMIT * math.ceil(ran / shortest) + math.ceil(ran / scheduled_gap))
    figures = {
        "seconds": ran,
        "refreshers": per,
        "first_contested_after": min(contested, default=None),
        "both_contested": len(contested) == 2,
        "idp_token_requests": requests_made,
        "request_bound": bound,
        "requests_per_refresher_per_lifetime": requests_made / 2 / (ran / LIFETIME),
        "contest_limit": CONTEST_LIMIT,
    }
    return Scenario(figures, fighters, tokens, problems)


# --------------------------------------------------------------------------- successor


def holder(kube: FakeKubeAPI) -> str | None:
    lease = kube.get_object("leases", NAMESPACE, "refresher")
    return None if lease is None else lease["spec"].get("holderIdentity")


def secret_token(kube: FakeKubeAPI, name: str = SECRET) -> str | None:
    secret = kube.get_object("secrets", NAMESPACE, name)
    if secret is None or "token" not in secret.get("data", {}):
        return None
    return base64.b64decode(secret["data"]["token"]).decode()


def successor(rounds: int, rng: random.Random, root: Path) -> Scenario:
    folder = root / "successor"
    folder.mkdir()
    secret = secret_file(folder, CLIENT_SECRET)
    replicas: list[Refresher] = []
    results: list[dict[str, Any]] = []
    problems: list[str] = []
    with (
        FakeKubeAPI() as kube,
        LocalIdP(
            "lucidworks", lifetime=SUCCESSOR_LIFETIME, clients={CLIENT_ID: CLIENT_SECRET}
        ) as idp,
    ):
        kubeconfig = kube.write_kubeconfig(folder / "kubeconfig", namespace=NAMESPACE)
        sinks = [{"type": "kubernetes", "name": SECRET, "create": True}]
        config = _config(
            folder / "config.yaml",
            _job(idp, secret, sinks, None),
            metrics={"enabled": False},
            kubernetes={"kubeconfig": str(kubeconfig), "request_timeout": 1},
            leader_election={"enabled": True, "namespace": NAMESPACE, **LEASE},
        )

        def replica() -> Refresher:
            name = f"successor-{len(replicas) + 1}"
            started = Refresher(name, config, folder, POD_NAME=name)
            replicas.append(started)
            return started

        def live(token: str | None) -> bool:
            return token is not None and idp.token_status(token) == "valid"

        def leads(process: Refresher) -> Callable[[], bool]:
            return lambda: holder(kube) == process.name

        def replaced(dead: str) -> Callable[[], bool]:
            return lambda: (token := secret_token(kube)) != dead and live(token)

        try:
            first = replica()
            _wait(leads(first), 30, "the first replica leads")
            _wait(lambda: live(secret_token(kube)), 30, "a token in the Secret")
            replica().wait_logged("leader election started")
            for number in range(1, rounds + 1):
                leader, follower = replicas[-2], replicas[-1]
                time.sleep(rng.uniform(0.3, 1.0))  # the follower campaigns; nothing in flight
                victim = secret_token(kube)
                assert victim is not None and live(victim)
                leader.kill()
                killed = time.monotonic()
                asked = idp.token_requests
                rogue_reissue(idp)
                revoked = time.monotonic()
                took_over = _wait(leads(follower), 15, "the takeover")
                asked_before = idp.token_requests - asked - 1
                healed = _wait(replaced(victim), 15, "a live token in the Secret")
                time.sleep(0.3)  # anything more it would ask for
                probed = [
                    r for r in follower.logged("probe: token rejected") if r.get("why") == "adopted"
                ]
                results.append(
                    {
                        "round": number,
                        "takeover_after_kill": took_over - killed,
                        "healed_after_takeover": healed - took_over,
                        "dead_for": healed - revoked,  # what its consumers went without
                        "idp_requests_before_takeover": asked_before,
                        "idp_requests_after_takeover": idp.token_requests
                        - asked
                        - 1
                        - asked_before,
                        "adopted_token_probed_rejected": bool(probed),
                        "dead_token_replaced": secret_token(kube) != victim,
                    }
                )
                replica().wait_logged("leader election started")
        except RuntimeError as err:
            problems.append(f"successor: {err}")
        finally:
            for process in replicas:
                process.stop()
        tokens = {t.access_token for t in idp.issued}
    return Scenario({"rounds": results}, replicas, tokens, problems)


# ------------------------------------------------------------------------------ report


def _leaks(scenarios: list[Scenario]) -> tuple[int, int, list[str]]:
    """(log lines read, lines holding a secret, which logs)."""
    secrets = {CLIENT_SECRET}.union(*(s.tokens for s in scenarios))
    lines = leaked = 0
    where = []
    for scenario in scenarios:
        for process in scenario.logs:
            text = process.log.read_text(errors="replace")
            for line in text.splitlines():
                lines += 1
                if any(secret in line for secret in secrets):
                    leaked += 1
                    where.append(process.name)
    return lines, leaked, sorted(set(where))


def run(
    scenarios: list[str],
    reissues: int,
    fight_seconds: float,
    successions: int,
    seed: int,
    sequential: bool = False,
    logs: Path | None = None,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) if logs is None else logs
        root.mkdir(parents=True, exist_ok=True)
        work: dict[str, Callable[[], Scenario]] = {
            "interval": lambda: heal_mode("interval", reissues, random.Random(seed), root),
            "report": lambda: heal_mode("report", reissues, random.Random(seed + 1), root),
            "fight": lambda: fight(fight_seconds, root),
            "successor": lambda: successor(successions, random.Random(seed + 2), root),
        }
        chosen = [name for name in SCENARIOS if name in scenarios]
        with ThreadPoolExecutor(1 if sequential else len(chosen)) as pool:
            futures = {name: pool.submit(work[name]) for name in chosen}
            done = {name: future.result() for name, future in futures.items()}
        lines, leaked, where = _leaks(list(done.values()))
        stray = sum(p.stray_lines() for s in done.values() for p in s.logs)
    figures: dict[str, Any] = {name: scenario.figures for name, scenario in done.items()}
    figures.update(
        settings={
            "lifetime": LIFETIME,
            "margin": MARGIN,
            "min_refresh_interval": FLOOR,
            "probe_interval": PROBE_INTERVAL,
            "fight_probe_interval": FIGHT_PROBE_INTERVAL,
            "successor_lifetime": SUCCESSOR_LIFETIME,
            "consumers": CONSUMERS,
            "read_every": READ_EVERY,
            "contest_limit": CONTEST_LIMIT,
            "sequential": sequential,
            "seed": seed,
        },
        log_lines=lines,
        secret_leaks=leaked,
        leaking_logs=where,
        stray_log_lines=stray,
        problems=[p for s in done.values() for p in s.problems],
    )
    return figures


def _s(values: list[float]) -> str:
    if not values:
        return "-"

    def one(value: float) -> str:
        return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"

    return f"{one(statistics.median(values))} / {one(max(values))}"


def table(title: str, header: list[str], rows: list[list[Any]]) -> str:
    cells = [header, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [f"\n## {title}\n"]
    lines.append("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    return "\n".join(lines)


def report(figures: dict[str, Any]) -> str:
    out = []
    modes = [m for m in ("interval", "report") if m in figures]
    if modes:
        rows = []
        for mode in modes:
            f = figures[mode]
            label = (
                f"interval (probe every {PROBE_INTERVAL:g} s)"
                if mode == "interval"
                else "report (consumers report 401s)"
            )
            rows.append(
                [
                    label,
                    f["reissues"],
                    _s(f["replaced_after"]),
                    _s(f["recovered_after"]),
                    _s(f["all_recovered_after"]),
                    f"{sum(f['unauthorized'])} ({max(f['unauthorized'], default=0)})",
                    f["unauthorized_own_refresh"],
                    f["unauthorized_outside"],
                    f["rejection_refreshes"],
                    f"{f['refresher_token_requests']} + {f['reissues']}",
                    f"{f['seconds']:.0f} s",
                ]
            )
        out.append(
            table(
                f"Rogue reissues (tokens live {LIFETIME:g} s, refreshed {MARGIN:g} s before "
                f"expiry; {CONSUMERS} consumers read every {READ_EVERY * 1000:.0f} ms; "
                "times from the revocation, median / max)",
                [
                    "mode",
                    "reissues",
                    "refresher asks the IdP",
                    "first consumer call OK",
                    "every consumer OK",
                    "401s (max per reissue)",
                    "401s in its own write windows",
                    "other 401s (must be 0)",
                    "refreshes on rejection",
                    "IdP token requests (refresher + rogue)",
                    "duration",
                ],
                rows,
            )
        )
        if "report" in figures:
            answers = ", ".join(
                f"{k} x{v}" for k, v in sorted(figures["report"]["reports"].items())
            )
            out.append(f"\nreport mode, answers to the consumers' reports: {answers or 'none'}")
    if "fight" in figures:
        f = figures["fight"]
        rows = [
            [
                r["name"],
                "yes" if r["contested_metric_seen"] else "no",
                f"{r['contest_level']}" if r["contested_logged"] else "no",
                f"{r['contested_after']:.2f} s" if r["contested_after"] is not None else "-",
                r["rejection_refreshes_before_contest"] if r["contested_logged"] else "-",
                r["rejection_refreshes"],
                r["most_rejection_refreshes_in_a_lifetime"],
                r["refreshes"],
                f"{r['sink_alive_fraction']:.0%}" if r["sink_alive_fraction"] is not None else "-",
                r["blamed_on_fresh_token"],
            ]
            for r in f["refreshers"]
        ]
        out.append(
            table(
                f"Fight: two refreshers, one client and scope, probing every "
                f"{FIGHT_PROBE_INTERVAL:g} s, for {f['seconds']:.0f} s",
                [
                    "refresher",
                    "contested metric 1",
                    "contested log line",
                    "contested after the fight began",
                    "rejection refreshes before",
                    "rejection refreshes",
                    f"most in a lifetime (limit {CONTEST_LIMIT})",
                    "tokens fetched",
                    "sink held a live token",
                    "rejections blamed on the probe",
                ],
                rows,
            )
        )
        out.append(
            f"\nIdP token requests: {f['idp_token_requests']} (bound {f['request_bound']}; "
            f"{f['requests_per_refresher_per_lifetime']:.1f} per refresher per lifetime)"
        )
    if "successor" in figures:
        rounds = figures["successor"]["rounds"]
        rows = [
            [
                r["round"],
                f"{r['takeover_after_kill']:.2f} s",
                f"{r['healed_after_takeover'] * 1000:.0f} ms",
                f"{r['dead_for']:.2f} s",
                r["idp_requests_before_takeover"],
                r["idp_requests_after_takeover"],
                "rejected" if r["adopted_token_probed_rejected"] else "NOT PROBED",
                "yes" if r["dead_token_replaced"] else "NO",
            ]
            for r in rounds
        ]
        out.append(
            table(
                "Successor: the leader killed -9, the Secret's token revoked, the follower "
                f"takes over (lease {LEASE['lease_duration']:g} s)",
                [
                    "round",
                    "takeover after the kill",
                    "live token in the Secret after takeover",
                    "Secret held a dead token for",
                    "IdP requests before takeover",
                    "after",
                    "adopted token's probe",
                    "dead token replaced",
                ],
                rows,
            )
        )
    out += log_findings(figures)
    return "\n".join(out)


def log_findings(figures: dict[str, Any]) -> list[str]:
    """The lines every harness ends its report with: leaks, stray lines, problems."""
    lines = [
        f"\nsecrets in {figures['log_lines']} log lines: {figures['secret_leaks']}"
        + (f" ({', '.join(figures['leaking_logs'])})" if figures["leaking_logs"] else "")
        + f"; lines that are not JSON: {figures['stray_log_lines']}"
    ]
    lines += [f"  problem: {problem}" for problem in figures["problems"][:20]]
    return lines


def emit(figures: dict[str, Any], text: str, *, as_json: bool) -> None:
    """The tables on stdout; with `--json` the figures there and the tables on stderr."""
    if as_json:
        print(text, file=sys.stderr)
        print(json.dumps(figures))
    else:
        print(text)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.heal")
    parser.add_argument("--reissues", type=int, default=20, help="rogue reissues per mode")
    parser.add_argument("--fight-seconds", type=float, default=20.0)
    parser.add_argument("--successions", type=int, default=5, help="takeover rounds")
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help="comma-separated: " + ", ".join(SCENARIOS)
    )
    parser.add_argument("--sequential", action="store_true", help="one scenario at a time")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--logs", type=Path, help="keep every config and refresher log here (an empty folder)"
    )
    parser.add_argument(
        "--json", action="store_true", help="figures as JSON on stdout, the tables on stderr"
    )
    args = parser.parse_args()
    scenarios = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown or not scenarios:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown)) or '(none given)'}")
    figures = run(
        scenarios,
        args.reissues,
        args.fight_seconds,
        args.successions,
        args.seed,
        args.sequential,
        args.logs,
    )
    emit(figures, report(figures), as_json=args.json)


if __name__ == "__main__":
    main()
