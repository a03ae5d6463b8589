"""The token API across replicas: `python -m bench.tokenapi [--refreshes 20] [--json]`.

It prints tables (with `--json`, the figures as JSON on stdout and the tables on stderr);
tests/test_token_api_processes.py runs it with small numbers and checks the figures.

Two `refresher run` child processes elect a leader through a Lease on a local Kubernetes API
(FakeKubeAPI, in this process); the job's sink is a Secret, and both replicas serve
`GET /v1/tokens/predict` on a loopback API listener: the leader what it fetched, the follower
what its watch of that Secret delivers. The token server is the Lucidworks-shaped LocalIdP,
also in this process: a new token for a client and scope revokes the previous one at once,
and its protected API accepts only the live token. Tokens live 6 s and are refreshed 2 s
before expiry, so a refresh lands every 2.4-4 s.

1. **Load**: for `--seconds` against each replica, a few threads with keep-alive sessions send
   plain `GET /v1/tokens/predict` in a closed loop: requests per second and latency.
2. **Consumers**: `--consumers` of them (6), each a pair of threads, half on each replica. One
   thread of a pair learns the token from its replica with long polls (`If-None-Match` +
   `timeout=30`); the other calls the protected API with the token the pair holds, every
   20 ms. Per refresh (the IdP's `issued` list gives the moment the new token was issued and
   the old one revoked): the long-poll wake-up delay of each consumer; each replica's *dead-token
   window*, from that moment to the replica serving the new token (its first consumer to
   receive it); the follower's delay behind the leader. A rejected call is *inside a window*
   when the token it carried was revoked by a refresh and it was sent before that replica
   served the new token (plus 250 ms for the consumer's own wake-up); any other rejected
   call (must be 0) means a replica served a dead token, or served the new one late.
3. **kill -9**: right after a refresh has reached both replicas the leader is killed (its
   consumers stop with it); the follower takes the Lease over, serving the token it watched
   meanwhile, and then refreshes by itself. Its consumers' rejected calls and the longest
   gap between their accepted calls around the takeover are reported, and every token
   issued is attributed (by fingerprint, from the `token refreshed` log lines) to the
   replica that asked for it: a follower never asks the IdP.

Last, no refresher's log may hold the client secret or any token the IdP issued.
`--logs DIR` keeps every config and log there.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import itertools
import random
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import yaml

from bench.__main__ import quantiles, secret_file
from bench.heal import (
    Refresher,
    emit,
    holder,
    log_findings,
    log_time,
    loopback_session,
    secret_token,
    table,
)
from refresher.localidp import IssuedToken, LocalIdP
from refresher.tokens import fingerprint
from testdoubles.kubeapi import FakeKubeAPI

CLIENT_ID, CLIENT_SECRET = "tokenapi-client", "tokenapi-secret-6b20d9"
SCOPE = "machinelearning.predict"
JOB = "predict"
LIFETIME, MARGIN, FLOOR = 6.0, 2.0, 0.5
NAMESPACE = "tokens"
SECRET = "predict-token"
LEASE = {"lease_duration": 2.0, "renew_deadline": 1.5, "retry_period": 0.25}
LOAD_THREADS = 4
POLL_TIMEOUT = 30  # the `timeout` a consumer's long poll asks for
CALL_EVERY = 0.02  # a consumer's pause between calls to the protected API
RETRY_EVERY = 0.1  # a poller's pause after a 503 or no answer
LAG_SLACK = 0.25  # a consumer's own wake-up after its replica served a new token
SETTLE = 1.0  # the consumers run on after the last refresh watched; later ones are not judged
REPLICAS = ("tokenapi-1", "tokenapi-2")  # the first leads until it is killed
ROLES = ("leader", "follower", "new_leader")  # new_leader: the second, after the takeover


# --------------------------------------------------------------------------- plumbing


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll until `condition()` holds; the wall time it did. RuntimeError otherwise."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout:g} s")
        time.sleep(0.005)
    return time.time()


def _config(folder: Path, idp: LocalIdP, kube: FakeKubeAPI) -> Path:
    secret = secret_file(folder, CLIENT_SECRET)
    kubeconfig = kube.write_kubeconfig(folder / "kubeconfig", namespace=NAMESPACE)
    job = {
        "name": JOB,
        "provider": "lucidworks",
        "token_url": idp.token_url,
        "client_id": CLIENT_ID,
        "client_secret": {"file": str(secret)},
        "scopes": [SCOPE],
        "margin": MARGIN,
        "min_refresh_interval": FLOOR,
        "read_timeout": 2,
        "sinks": [{"type": "kubernetes", "name": SECRET, "create": True}],
    }
    settings = {
        "metrics": {"enabled": True, "bind": "127.0.0.1", "port": 0},
        "api": {"enabled": True, "listen": "127.0.0.1:0"},
        "kubernetes": {"kubeconfig": str(kubeconfig), "request_timeout": 1},
        "leader_election": {"enabled": True, "namespace": NAMESPACE, **LEASE},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump({"tokens": [job], **settings}))
    return path


def _spread(values: list[float]) -> dict[str, float] | None:
    """Median, p99 and max (None without values)."""
    if not values:
        return None
    median, p99, worst = quantiles(values)
    return {"count": len(values), "median": median, "p99": p99, "max": worst}


# ------------------------------------------------------------------------------ load


def load(url: str, threads: int, seconds: float) -> dict[str, Any]:
    """Plain GETs of the token from `threads` keep-alive sessions in a closed loop."""
    latencies: list[list[float]] = [[] for _ in range(threads)]
    statuses: Counter[str] = Counter()
    lock = threading.Lock()
    ready = threading.Barrier(threads + 1)

    def work(mine: list[float]) -> None:
        seen: Counter[str] = Counter()
        with loopback_session() as session:
            with contextlib.suppress(requests.RequestException):
                session.get(url, timeout=5)  # connect before the clock starts
            ready.wait(30)
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                started = time.perf_counter()
                try:
                    status = str(session.get(url, timeout=5).status_code)
                except requests.RequestException:
                    status = "no answer"
                mine.append(time.perf_counter() - started)
                seen[status] += 1
        with lock:
            statuses.update(seen)

    workers = [threading.Thread(target=work, args=(mine,), daemon=True) for mine in latencies]
    for worker in workers:
        worker.start()
    ready.wait(30)
    began = time.monotonic()
    for worker in workers:
        worker.join(seconds + 30)
    elapsed = time.monotonic() - began
    every = [latency for mine in latencies for latency in mine]
    return {
        "threads": threads,
        "seconds": elapsed,
        "requests": len(every),
        "per_second": len(every) / elapsed if elapsed else 0.0,
        "latency": _spread(every),
        "statuses": dict(statuses),
    }


# ------------------------------------------------------------------------- consumers


@dataclass(frozen=True)
class Call:
    sent: float  # wall time the call to the protected API was sent
    token: str
    status: int  # 0: no answer


@dataclass(frozen=True)
class Delivery:
    at: float  # wall time the consumer had a new token from its replica
    token: str


class Consumer:
    """A pair of threads on one replica's token API: a long-poller that keeps `held` current,
    and a caller of the protected API with whatever `held` is."""

    def __init__(self, name: str, replica: str, api_url: str, protected_url: str) -> None:
        self.name, self.replica = name, replica
        self.api_url, self.protected_url = api_url, protected_url
        self.stop = threading.Event()
        self.held: str | None = None
        self.deliveries: list[Delivery] = []
        self.calls: list[Call] = []
        self.answers: Counter[str] = Counter()  # the token API's answers: status or "no answer"
        self.unavailable: list[float] = []  # wall times of a 503 or no answer
        self._threads = [
            threading.Thread(target=self._poll, name=f"{name}-poll", daemon=True),
            threading.Thread(target=self._call, name=f"{name}-call", daemon=True),
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def halt(self) -> None:
        self.stop.set()

    def join(self) -> None:
        for thread in self._threads:
            thread.join(POLL_TIMEOUT + 15)

    def _poll(self) -> None:
        session = loopback_session()
        etag: str | None = None
        while not self.stop.is_set():
            headers: dict[str, str] = {}
            params: dict[str, str] = {}
            if etag is not None:
                headers["If-None-Match"] = etag
                params["timeout"] = str(POLL_TIMEOUT)
            try:
                answer = session.get(
                    self.api_url, headers=headers, params=params, timeout=POLL_TIMEOUT + 10
                )
            except requests.RequestException:
                self.answers["no answer"] += 1
                self.unavailable.append(time.time())
                session.close()
                session = loopback_session()
                self.stop.wait(RETRY_EVERY)
                continue
            now = time.time()
            if self.stop.is_set():
                break
            self.answers[str(answer.status_code)] += 1
            if answer.status_code == 200:
                token = str(answer.json()["access_token"])
                etag = answer.headers.get("ETag")
                if token != self.held:
                    self.held = token
                    self.deliveries.append(Delivery(now, token))
            elif answer.status_code != 304:
                self.unavailable.append(now)
                self.stop.wait(RETRY_EVERY)
        session.close()

    def _call(self) -> None:
        session = loopback_session()
        while not self.stop.is_set():
            token = self.held
            if token is None:
                self.stop.wait(CALL_EVERY)
                continue
            sent = time.time()
            try:
                status = session.get(
                    self.protected_url, headers={"Authorization": f"Bearer {token}"}, timeout=5
                ).status_code
            except requests.RequestException:
                status = 0
            if not self.stop.is_set():
                self.calls.append(Call(sent, token, status))
            self.stop.wait(CALL_EVERY)
        session.close()


# ---------------------------------------------------------------------------- analysis


@dataclass
class Run:
    """What the run left to analyse."""

    issued: list[IssuedToken]
    consumers: list[Consumer]
    replicas: list[Refresher]
    consumers_started: float
    killed: float | None = None
    took_over: float | None = None
    ended: float | None = None  # the consumers stopped
    loads: dict[str, dict[str, Any]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def _served_at(consumers: list[Consumer]) -> dict[str, dict[str, float]]:
    """Replica -> token -> when the replica first served it to one of its consumers."""
    first: dict[str, dict[str, float]] = {}
    for consumer in consumers:
        mine = first.setdefault(consumer.replica, {})
        for delivery in consumer.deliveries:
            if delivery.token not in mine or delivery.at < mine[delivery.token]:
                mine[delivery.token] = delivery.at
    return first


def _issuers(run: Run) -> dict[str, str]:
    """Fingerprint -> the replica that logged `token refreshed` with it."""
    found = {}
    for replica in run.replicas:
        for record in replica.logged("token refreshed"):
            if record.get("fingerprint"):
                found[str(record["fingerprint"])] = replica.name
    return found


@dataclass(frozen=True)
class Refresh:
    issued_at: float  # by the IdP: the previous token is dead from then on
    issuer: str | None  # the replica that logged it
    before_kill: bool
    windows: dict[str, float | None]  # replica -> from the issue to its serving the token


class Judge:
    """Tells a rejected call inside a dead-token window from one outside."""

    def __init__(self, issued: list[IssuedToken], served: dict[str, dict[str, float]]) -> None:
        self.by_token = {t.access_token: t for t in issued}
        self.successor = {a.access_token: b for a, b in itertools.pairwise(issued)}
        self.served = served

    def replaced(self, consumer: Consumer, call: Call) -> tuple[IssuedToken | None, float | None]:
        """The token that revoked the call's token, and when the consumer's replica served it."""
        held = self.by_token.get(call.token)
        replacement = self.successor.get(call.token)
        if held is None or held.revoked_at is None or replacement is None:
            return None, None
        return replacement, self.served.get(consumer.replica, {}).get(replacement.access_token)

    def inside(self, consumer: Consumer, call: Call) -> bool:
        """A 401 for a token a refresh revoked, sent before the consumer's replica served the
        new token (and the consumer's own wake-up after that)."""
        _, at = self.replaced(consumer, call)
        return at is not None and call.sent <= at + LAG_SLACK


def _longest_gap(calls: list[Call], since: float, until: float) -> float | None:
    """The longest time between consecutive accepted calls sent in [since, until]."""
    times = [c.sent for c in calls if c.status == 200 and since <= c.sent <= until]
    if len(times) < 2:
        return None
    return max(b - a for a, b in itertools.pairwise(times))


def _role(replica: str, before_kill: bool) -> str:
    if replica == REPLICAS[0]:
        return "leader"
    return "follower" if before_kill else "new_leader"


def analyse(run: Run) -> dict[str, Any]:
    issued = run.issued
    served = _served_at(run.consumers)
    judge = Judge(issued, served)
    issuers = _issuers(run)
    leader_name, follower_name = REPLICAS
    problems = list(run.problems)
    # A token issued in the last moments before the consumers stopped is not judged.
    until = (run.ended or time.time()) - SETTLE / 2

    # Every refresh the consumers lived through (issued after they started, before the end).
    refreshes: list[Refresh] = []
    for token in issued:
        if not run.consumers_started < token.issued_at < until:
            continue
        before_kill = run.killed is None or token.issued_at < run.killed
        replicas = [leader_name, follower_name] if before_kill else [follower_name]
        windows: dict[str, float | None] = {}
        for name in replicas:
            at = served.get(name, {}).get(token.access_token)
            windows[name] = None if at is None else at - token.issued_at
            if at is None:
                problems.append(f"a token issued at {token.issued_at:.3f} never reached {name}")
        refreshes.append(
            Refresh(
                token.issued_at, issuers.get(fingerprint(token.access_token)), before_kill, windows
            )
        )
    for previous, token in judge.successor.items():
        revoked = judge.by_token[previous].revoked_at
        if revoked is None or abs(revoked - token.issued_at) > 1e-6:
            problems.append(f"a token issued at {token.issued_at:.3f} did not revoke the previous")

    windows_by: dict[str, list[float]] = {role: [] for role in ROLES}
    for r in refreshes:
        for name, window in r.windows.items():
            if window is not None:
                windows_by[_role(name, r.before_kill)].append(window)
    behind = [
        follower - leader
        for r in refreshes
        if r.before_kill
        and (leader := r.windows.get(leader_name)) is not None
        and (follower := r.windows.get(follower_name)) is not None
    ]

    # Each consumer's wake-up on each refresh, and its lag behind its replica's first.
    wakeups: dict[str, list[float]] = {role: [] for role in ROLES}
    lags: list[float] = []
    for consumer in run.consumers:
        for delivery in consumer.deliveries:
            known = judge.by_token.get(delivery.token)
            if known is None:
                problems.append(f"{consumer.name} was served a token the IdP never issued")
                continue
            if known.issued_at <= run.consumers_started:
                continue  # its first GET, not a wake-up
            role = _role(consumer.replica, run.killed is None or known.issued_at < run.killed)
            wakeups[role].append(delivery.at - known.issued_at)
            lags.append(delivery.at - served[consumer.replica][delivery.token])

    # Rejected calls: inside the window of the refresh that revoked their token, or not.
    calls = {"total": 0, "accepted": 0, "rejected_inside": 0, "rejected_outside": 0, "other": 0}
    outside: list[dict[str, Any]] = []
    for consumer in run.consumers:
        for call in consumer.calls:
            calls["total"] += 1
            if call.status == 200:
                calls["accepted"] += 1
            elif call.status != 401:
                calls["other"] += 1
            elif judge.inside(consumer, call):
                calls["rejected_inside"] += 1
            else:
                calls["rejected_outside"] += 1
                known = judge.by_token.get(call.token)
                replacement, at = judge.replaced(consumer, call)
                outside.append(
                    {
                        "consumer": consumer.name,
                        "sent": call.sent,
                        "token_issued_at": None if known is None else known.issued_at,
                        "token_revoked_at": None if known is None else known.revoked_at,
                        "replaced_at": None if replacement is None else replacement.issued_at,
                        "replica_served_replacement_at": at,
                    }
                )

    return {
        "load": run.loads,
        "refreshes": [dataclasses.asdict(r) for r in refreshes],
        "refreshes_before_kill": sum(1 for r in refreshes if r.before_kill),
        "dead_token_window": {name: _spread(values) for name, values in windows_by.items()},
        "dead_token_windows": windows_by,
        "follower_behind_leader": _spread(behind),
        "follower_behind_leader_values": behind,
        "wakeup_delay": {name: _spread(values) for name, values in wakeups.items()},
        "consumer_lag": _spread(lags),
        "calls": calls,
        "rejected_outside_windows": outside[:20],
        "poll_answers": dict(sum((c.answers for c in run.consumers), Counter())),
        "issued_tokens": len(issued),
        "issuers": dict(Counter(issuers.get(fingerprint(t.access_token), "?") for t in issued)),
        "takeover": _takeover(run, judge, issuers),
        "problems": problems,
    }


def _takeover(run: Run, judge: Judge, issuers: dict[str, str]) -> dict[str, Any] | None:
    if run.killed is None:
        return None
    killed, took_over = run.killed, run.took_over
    leader_name, survivor_name = REPLICAS
    served = judge.served.get(survivor_name, {})
    survivors = [c for c in run.consumers if c.replica == survivor_name]
    after = [(c, call) for c in survivors for call in c.calls if call.sent >= killed]
    first_new = next((t for t in run.issued if t.issued_at >= killed), None)
    end = max((call.sent for _, call in after), default=killed)
    gaps = [_longest_gap(c.calls, killed - 1.0, end) for c in survivors]
    # Refreshes the survivor logged while it still followed.
    early = [
        r
        for r in run.replicas[1].logged("token refreshed")
        if took_over is None or log_time(r) < took_over - 0.05
    ]
    return {
        "killed_replica": leader_name,
        "takeover_after_kill": None if took_over is None else took_over - killed,
        "survivor_refreshes_while_following": len(early),
        "first_refresh_after_takeover": None
        if first_new is None or took_over is None
        else first_new.issued_at - took_over,
        "first_refresh_by": None
        if first_new is None
        else issuers.get(fingerprint(first_new.access_token)),
        "first_refresh_window": None
        if first_new is None or first_new.access_token not in served
        else served[first_new.access_token] - first_new.issued_at,
        "survivor_calls_after_kill": len(after),
        "survivor_rejected_after_kill": sum(1 for _, call in after if call.status == 401),
        "survivor_rejected_outside_windows": sum(
            1 for c, call in after if call.status == 401 and not judge.inside(c, call)
        ),
        "survivor_other_failures_after_kill": sum(
            1 for _, call in after if call.status not in (200, 401)
        ),
        "survivor_unavailable_answers_after_kill": sum(
            1 for c in survivors for at in c.unavailable if at >= killed
        ),
        "survivor_longest_gap_between_accepted_calls": max(
            (g for g in gaps if g is not None), default=None
        ),
    }


# -------------------------------------------------------------------------------- run


def _leaks(replicas: list[Refresher], secrets: set[str]) -> tuple[int, int, list[str]]:
    lines = leaked = 0
    where = set()
    for replica in replicas:
        for line in replica.log.read_text(errors="replace").splitlines():
            lines += 1
            if any(secret in line for secret in secrets):
                leaked += 1
                where.add(replica.name)
    return lines, leaked, sorted(where)


def _api_port(replica: Refresher) -> int:
    return int(replica.wait_logged("serving the token API")["port"])


def run(
    refreshes: int,
    seconds: float,
    consumers: int,
    after_takeover: int,
    seed: int,
    logs: Path | None = None,
) -> dict[str, Any]:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) if logs is None else logs
        folder.mkdir(parents=True, exist_ok=True)
        with (
            FakeKubeAPI() as kube,
            LocalIdP("lucidworks", lifetime=LIFETIME, clients={CLIENT_ID: CLIENT_SECRET}) as idp,
        ):
            config = _config(folder, idp, kube)
            replicas: list[Refresher] = []
            pairs: list[Consumer] = []
            outcome = Run([], pairs, replicas, consumers_started=time.time())
            try:
                _exercise(outcome, kube, idp, config, folder, rng, refreshes, seconds, consumers,
                          after_takeover)  # fmt: skip
            except RuntimeError as err:
                outcome.problems.append(str(err))
            finally:
                outcome.ended = time.time()
                for consumer in pairs:
                    consumer.halt()
                for replica in replicas:
                    replica.stop()  # answers the waiting long polls at once
                for consumer in pairs:
                    consumer.join()
            outcome.issued = idp.issued
            requests_made = idp.token_requests
        figures = analyse(outcome)
        figures["idp_token_requests"] = requests_made
        secrets = {CLIENT_SECRET} | {t.access_token for t in outcome.issued}
        lines, leaked, where = _leaks(replicas, secrets)
        stray = sum(replica.stray_lines() for replica in replicas)
    figures.update(
        settings={
            "lifetime": LIFETIME,
            "margin": MARGIN,
            "min_refresh_interval": FLOOR,
            "lease": LEASE,
            "consumers": consumers,
            "call_every": CALL_EVERY,
            "poll_timeout": POLL_TIMEOUT,
            "lag_slack": LAG_SLACK,
            "load_threads": LOAD_THREADS,
            "load_seconds": seconds,
            "refreshes": refreshes,
            "after_takeover": after_takeover,
            "seed": seed,
        },
        log_lines=lines,
        secret_leaks=leaked,
        leaking_logs=where,
        stray_log_lines=stray,
    )
    return figures


def _exercise(
    outcome: Run,
    kube: FakeKubeAPI,
    idp: LocalIdP,
    config: Path,
    folder: Path,
    rng: random.Random,
    refreshes: int,
    seconds: float,
    consumers: int,
    after_takeover: int,
) -> None:
    replicas, pairs = outcome.replicas, outcome.consumers

    def live(token: str | None) -> bool:
        return token is not None and idp.token_status(token) == "valid"

    first = Refresher(REPLICAS[0], config, folder, POD_NAME=REPLICAS[0])
    replicas.append(first)
    _wait(lambda: holder(kube) == first.name, 30, "the first replica leads")
    _wait(lambda: live(secret_token(kube, SECRET)), 30, "a token in the Secret")
    second = Refresher(REPLICAS[1], config, folder, POD_NAME=REPLICAS[1])
    replicas.append(second)
    urls = {r.name: f"http://127.0.0.1:{_api_port(r)}/v1/tokens/{JOB}" for r in replicas}

    def serves(url: str) -> bool:
        try:
            with loopback_session() as session:
                answer = session.get(url, timeout=5)
        except requests.RequestException:
            return False
        return answer.status_code == 200 and live(answer.json()["access_token"])

    for name, url in urls.items():
        _wait(functools.partial(serves, url), 30, f"{name} serves a live token")

    # 1. Plain GETs, one replica at a time.
    for replica in replicas:
        outcome.loads[replica.name] = load(urls[replica.name], LOAD_THREADS, seconds)

    # 2. Consumers, half on each replica, through `refreshes` refreshes.
    for number in range(consumers):
        on = REPLICAS[number % 2]
        pairs.append(Consumer(f"consumer-{number + 1}", on, urls[on], idp.protected_url))
    outcome.consumers_started = time.time()
    for consumer in pairs:
        consumer.start()
    _wait(lambda: all(c.held is not None for c in pairs), 10, "every consumer holds a token")

    def reached(names: tuple[str, ...], since: float) -> int:
        """Tokens issued after `since` that every named replica has served a consumer."""
        served = _served_at(pairs)
        return sum(
            1
            for t in idp.issued
            if t.issued_at > since and all(t.access_token in served.get(n, {}) for n in names)
        )

    _wait(
        lambda: reached(REPLICAS, outcome.consumers_started) >= refreshes,
        refreshes * LIFETIME + 30,
        f"{refreshes} refreshes served by both replicas",
    )

    # 3. kill -9 the leader right after a refresh reached both replicas; the follower takes over.
    done = reached(REPLICAS, outcome.consumers_started)
    _wait(
        lambda: reached(REPLICAS, outcome.consumers_started) > done,
        2 * LIFETIME + 10,
        "one more refresh served by both replicas",
    )
    time.sleep(rng.uniform(0.2, 0.8))
    first.kill()
    outcome.killed = time.time()
    for consumer in pairs:
        if consumer.replica == first.name:
            consumer.halt()
    outcome.took_over = _wait(lambda: holder(kube) == second.name, 15, "the takeover")
    _wait(
        lambda: reached((second.name,), outcome.took_over or 0.0) >= after_takeover,
        after_takeover * LIFETIME + 20,
        f"{after_takeover} refreshes by the new leader",
    )
    time.sleep(SETTLE)  # the consumers use the last token a while


# ------------------------------------------------------------------------------ report


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def _row(label: str, spread: dict[str, float] | None) -> list[str]:
    if spread is None:
        return [label, "0", "-", "-", "-"]
    return [
        label,
        str(spread["count"]),
        _ms(spread["median"]),
        _ms(spread["p99"]),
        _ms(spread["max"]),
    ]


def report(figures: dict[str, Any]) -> str:
    leader, follower = REPLICAS
    role = {leader: "leader", follower: "follower"}
    windows, wakeups = figures["dead_token_window"], figures["wakeup_delay"]
    out = []
    rows = []
    for name, f in figures["load"].items():
        latency = f["latency"] or {}
        statuses = ", ".join(f"{k} x{v}" for k, v in sorted(f["statuses"].items()))
        rows.append(
            [
                f"{name} ({role[name]})",
                f["threads"],
                f["requests"],
                f"{f['per_second']:.0f}",
                _ms(latency.get("median")),
                _ms(latency.get("p99")),
                _ms(latency.get("max")),
                statuses,
            ]
        )
    if rows:
        out.append(
            table(
                "Token API: plain `GET /v1/tokens/predict`, closed loop, keep-alive sessions",
                ["replica", "threads", "requests", "per second", "p50", "p99", "max", "answers"],
                rows,
            )
        )
        out.append(
            "\nthe client is `requests` in the harness's process, which also hosts the IdP and "
            "the Kubernetes API: a floor for what the listener serves"
        )
    out.append(
        table(
            f"Token API: new tokens, {figures['refreshes_before_kill']} refreshes with both "
            f"replicas up (tokens live {LIFETIME:g} s, refreshed {MARGIN:g} s before expiry; "
            "times from the IdP's issue of the new token, which revokes the old one)",
            ["what", "count", "median", "p99", "max"],
            [
                _row(f"dead-token window, {leader} (leader)", windows["leader"]),
                _row(f"dead-token window, {follower} (follower)", windows["follower"]),
                _row(f"long-poll wake-up, {leader} (leader)", wakeups["leader"]),
                _row(f"long-poll wake-up, {follower} (follower)", wakeups["follower"]),
                _row("follower behind the leader", figures["follower_behind_leader"]),
                _row("a consumer behind its replica's first", figures["consumer_lag"]),
            ],
        )
    )
    after = [
        _row(f"dead-token window, {follower} (new leader)", windows["new_leader"]),
        _row(f"long-poll wake-up, {follower} (new leader)", wakeups["new_leader"]),
    ]
    calls = figures["calls"]
    out.append(
        f"\nconsumer calls to the protected API: {calls['total']}, accepted {calls['accepted']}, "
        f"rejected inside the windows {calls['rejected_inside']}, rejected outside them "
        f"{calls['rejected_outside']} (must be 0), other failures {calls['other']}"
    )
    answers = ", ".join(f"{k} x{v}" for k, v in sorted(figures["poll_answers"].items()))
    out.append(f"long-poll answers: {answers or 'none'}")
    issuers = ", ".join(f"{k} x{v}" for k, v in sorted(figures["issuers"].items()))
    out.append(f"IdP token requests: {figures['idp_token_requests']}; tokens issued by: {issuers}")
    takeover = figures["takeover"]
    if takeover is not None:
        out.append(
            table(
                f"kill -9 of the leader ({takeover['killed_replica']}); its consumers stop with "
                f"it (lease {LEASE['lease_duration']:g} s)",
                ["what", "value"],
                [
                    ["takeover after the kill", _ms(takeover["takeover_after_kill"])],
                    [
                        "survivor's refreshes while it followed (must be 0)",
                        takeover["survivor_refreshes_while_following"],
                    ],
                    [
                        "first refresh after the takeover",
                        _ms(takeover["first_refresh_after_takeover"])
                        + f" (by {takeover['first_refresh_by']})",
                    ],
                    [
                        "its dead-token window on the survivor",
                        _ms(takeover["first_refresh_window"]),
                    ],
                    [
                        "survivor's consumers: calls after the kill",
                        takeover["survivor_calls_after_kill"],
                    ],
                    ["  rejected", takeover["survivor_rejected_after_kill"]],
                    [
                        "  rejected outside the windows (must be 0)",
                        takeover["survivor_rejected_outside_windows"],
                    ],
                    ["  other failures", takeover["survivor_other_failures_after_kill"]],
                    [
                        "  token API 503s or no answer",
                        takeover["survivor_unavailable_answers_after_kill"],
                    ],
                    [
                        "  longest gap between accepted calls (from 1 s before the kill)",
                        _ms(takeover["survivor_longest_gap_between_accepted_calls"]),
                    ],
                ],
            )
        )
        out.append(
            table(
                "After the takeover: the new leader's refreshes, its consumers long-polling it",
                ["what", "count", "median", "p99", "max"],
                after,
            )
        )
    out += log_findings(figures)
    for call in figures["rejected_outside_windows"][:5]:
        out.append(f"  rejected outside: {call}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tokenapi")
    parser.add_argument(
        "--refreshes", type=int, default=20, help="refreshes watched with both replicas up"
    )
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="closed-loop GET load per replica"
    )
    parser.add_argument(
        "--consumers", type=int, default=6, help="consumers, half on each replica (even)"
    )
    parser.add_argument(
        "--after-takeover", type=int, default=2, help="refreshes watched after the takeover"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--logs", type=Path, help="keep the config and the refresher logs here (an empty folder)"
    )
    parser.add_argument(
        "--json", action="store_true", help="figures as JSON on stdout, the tables on stderr"
    )
    args = parser.parse_args()
    if args.refreshes < 1 or args.after_takeover < 1 or args.seconds <= 0:
        parser.error("--refreshes and --after-takeover must be at least 1, --seconds above 0")
    if args.consumers < 2 or args.consumers % 2:
        parser.error("--consumers must be even and at least 2")
    figures = run(
        args.refreshes, args.seconds, args.consumers, args.after_takeover, args.seed, args.logs
    )
    emit(figures, report(figures), as_json=args.json)


if __name__ == "__main__":
    main()
