"""The header-injecting proxy under a soak: `python -m bench.proxysoak [--seconds 60] [--json]`.

It prints tables (with `--json`, the figures as JSON on stdout and the tables on stderr);
tests/test_proxy_processes.py runs it with small numbers and checks the figures.

Two `refresher run` child processes elect a leader through a Lease on a local Kubernetes API
(FakeKubeAPI, in this process). Their one job has a Secret sink, a JSON file sink of each
replica's own (as a pod's emptyDir would be) and a proxy on a loopback port whose upstream
is the Lucidworks-shaped LocalIdP, also in this process: a new token for a client and scope
revokes the previous one at once, and its protected API accepts only the live token. Tokens
live 6 s and are refreshed 2 s before expiry, so a refresh lands every 2.4-4 s. The job has
no probe: what the proxy sees the API reject counts as the verdict (refresh.py).

Traffic, for `--seconds`:
- **proxy consumers**: `--consumers` threads (6), half on each replica's proxy, each with
  keep-alive sessions, in a closed loop (20 ms apart) alternating `GET /api/protected` and
  `POST /api/protected/items` with a JSON body of a few KB of random bytes (base64), every
  other POST chunked. They send no `Authorization`: the proxy adds it. A POST's answer must
  carry the sha256 of the body sent (a replayed POST must carry the same body). A connection
  error (the killed replica) is counted apart and the request retried once on the other
  replica's proxy, where the consumer stays, as it would once its Service drops the dead
  endpoint; the retry's answer counts like any other.
- **the file consumer**: the same traffic straight to the IdP's protected API with the token
  it reads, before each call, from the *newest* of the replicas' token files (by mtime). A
  follower writes no sink, so that is the current leader's file without asking the Lease
  (which no file reader would), and right after the kill the dead leader's file still holds
  the token the survivor adopts and copies to its own file at the takeover: the freshest
  token any file holds, the best a file reader can do, so its 401s are a floor. It reports
  nothing. Its 401s are what the proxy spared its consumers.

Events:
- scheduled refreshes, by themselves;
- `--reissues` rogue reissues (bench/heal.py `rogue_reissue`: a token request with the job's
  client and scope, as another deployment would send; the job is bench/heal.py's, so the
  client is the same) at seeded random moments, half before the kill and the rest after
  the takeover, at least `REISSUE_GAP` apart (closer ones would trip the contest rule,
  schedule.py, by design);
- in the middle, right after a refresh has landed, a kill -9 of the leader; the follower
  takes the Lease over and refreshes by itself. No reissue falls in the takeover window
  (from the kill until the new leader's first own token): while no replica leads, nobody
  can refresh, so a 401 then would measure having no leader, not the proxy.

Figures: per replica and in total, the proxy consumers' requests, answers and 401s (must
be 0), their connection errors and how the retries ended, body-integrity failures (must be
0); each replica's replays by outcome and upstream errors from its /metrics (the killed
leader's: its last scrape before the kill) and from its log; the file consumer's requests
and 401s; the IdP's tokens (rogue, refreshes by replica); and whether any refresher's log
holds the client secret or a token. `--logs DIR` keeps every config and log there.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import hashlib
import json
import random
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from bench.__main__ import secret_file
from bench.heal import (
    CLIENT_ID,
    CLIENT_SECRET,
    LEASE,
    LIFETIME,
    MARGIN,
    NAMESPACE,
    REJECTED_REFRESHING,
    SECRET,
    Refresher,
    _config,
    _job,
    emit,
    holder,
    log_findings,
    log_time,
    loopback_session,
    read_sink,
    rogue_reissue,
    scrape,
    secret_token,
    table,
)
from bench.tokenapi import _leaks, _spread, _wait
from refresher.localidp import PROTECTED_PATH, LocalIdP
from refresher.schedule import CONTEST_LIMIT
from refresher.tokens import fingerprint
from testdoubles.kubeapi import FakeKubeAPI

REPLICAS = ("proxysoak-1", "proxysoak-2")  # the first leads until it is killed
FILE_CONSUMER = "file"
REPLAY_WAIT = 2.0  # the proxy's `replay_wait`
PAUSE = 0.02  # a consumer's pause between calls
BODY_BYTES = (1536, 3072)  # random bytes in a POST body, before base64
POST_PATH = PROTECTED_PATH + "/items"
REQUEST_TIMEOUT = 10.0  # above replay_wait plus the upstream's answer
# Rejection-driven refreshes: CONTEST_LIMIT of them within a lifetime make the next
# rejection contested. A gap above LIFETIME / CONTEST_LIMIT never gets there.
REISSUE_GAP = LIFETIME / CONTEST_LIMIT + 0.5
SETTLE = REPLAY_WAIT + 1.0  # traffic goes on after the last reissue: its replays finish
SCRAPE_EVERY = 0.5
PROXY_SERIES = frozenset(
    {
        "refresher_proxy_requests_total",
        "refresher_proxy_replays_total",
        "refresher_proxy_upstream_errors_total",
        "refresher_token_rejections_total",
    }
)
REPLAYED = "proxy: rejected request"  # both "... replayed" and "... not replayed"
BECAME_LEADER = "became leader"


# --------------------------------------------------------------------------- traffic


@dataclass(frozen=True)
class Outgoing:
    """One request a consumer sends (the same whether through a proxy or straight)."""

    method: str
    path: str
    body: bytes | None = None
    chunked: bool = False

    @property
    def sha256(self) -> str | None:
        return None if self.body is None else hashlib.sha256(self.body).hexdigest()

    def data(self) -> bytes | Iterator[bytes] | None:
        """What `requests` sends: a generator makes it chunked."""
        if self.body is None or not self.chunked:
            return self.body
        half = len(self.body) // 2
        return iter((self.body[:half], self.body[half:]))


class Traffic:
    """A consumer's requests: GET and POST with a fresh random body, alternately."""

    def __init__(self, name: str, seed: int) -> None:
        self.name = name
        self.rng = random.Random(f"{seed}-{name}")
        self.sent = 0

    def next(self) -> Outgoing:
        self.sent += 1
        if self.sent % 2:
            return Outgoing("GET", PROTECTED_PATH)
        raw = self.rng.randbytes(self.rng.randint(*BODY_BYTES))
        document = {"consumer": self.name, "n": self.sent, "data": base64.b64encode(raw).decode()}
        return Outgoing("POST", POST_PATH, json.dumps(document).encode(), self.sent % 4 == 0)


@dataclass(frozen=True)
class Call:
    sent: float  # wall time
    took: float  # seconds until the answer (or the error)
    replica: str  # whose proxy, or FILE_CONSUMER
    method: str
    status: int  # 0: no answer
    error: str | None = None  # without an answer: connection, timeout or other
    retry: bool = False  # the retry of a connection error, on the other replica
    intact: bool = True  # a 200 whose body says it got what was sent
    detail: str | None = None  # without an answer: the exception's class

    @property
    def outcome(self) -> str:
        return str(self.status) if self.error is None else self.error


def _intact(item: Outgoing, answer: requests.Response) -> bool:
    """Whether a 200 says the upstream got this request: its method, path and body."""
    try:
        said = answer.json()
    except ValueError:
        return False
    if not isinstance(said, dict) or said.get("ok") is not True:
        return False
    if item.body is None:
        return True
    return (
        said.get("method") == item.method
        and said.get("path") == item.path
        and said.get("body_bytes") == len(item.body)
        and said.get("body_sha256") == item.sha256
    )


def send(
    session: requests.Session,
    base_url: str,
    item: Outgoing,
    replica: str,
    *,
    token: str | None = None,
    retry: bool = False,
) -> Call:
    """Send `item` (with `token` as the bearer, if any) and judge the answer."""
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    if item.body is not None:
        headers["Content-Type"] = "application/json"
    sent, began = time.time(), time.perf_counter()

    def failed(kind: str, err: Exception) -> Call:
        took = time.perf_counter() - began
        return Call(sent, took, replica, item.method, 0, kind, retry, detail=type(err).__name__)

    try:
        answer = session.request(
            item.method,
            base_url + item.path,
            data=item.data(),
            headers=headers,
            timeout=REQUEST_TIMEOUT,
        )
    except requests.Timeout as err:  # before ConnectionError: a connect timeout is both
        return failed("timeout", err)
    except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as err:
        # Refused, reset, or cut in the middle of the answer (IncompleteRead): the
        # connection broke, as a killed replica's do.
        return failed("connection", err)
    except requests.RequestException as err:
        return failed("other", err)
    took = time.perf_counter() - began
    intact = answer.status_code != 200 or _intact(item, answer)
    return Call(sent, took, replica, item.method, answer.status_code, None, retry, intact)


class ProxyConsumer(threading.Thread):
    """Sends its traffic through its replica's proxy; a connection error is retried once on
    the other replica's, where it stays."""

    def __init__(
        self, name: str, home: str, proxies: dict[str, str], seed: int, stop: threading.Event
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.home, self.proxies, self.stop = home, proxies, stop
        self.traffic = Traffic(name, seed)
        self.calls: list[Call] = []

    def _other(self) -> str:
        return next(name for name in self.proxies if name != self.home)

    def run(self) -> None:
        sessions = {name: loopback_session() for name in self.proxies}
        try:
            while not self.stop.is_set():
                item = self.traffic.next()
                call = send(sessions[self.home], self.proxies[self.home], item, self.home)
                self.calls.append(call)
                if call.error == "connection":
                    sessions[self.home].close()  # its pooled connection is dead
                    sessions[self.home] = loopback_session()
                    self.home = self._other()
                    retried = send(
                        sessions[self.home], self.proxies[self.home], item, self.home, retry=True
                    )
                    self.calls.append(retried)
                self.stop.wait(PAUSE)
        finally:
            for session in sessions.values():
                session.close()


def newest_token(files: list[Path]) -> str | None:
    """The token in the most recently written of `files` (None while none holds one)."""
    written = []
    for path in files:
        with contextlib.suppress(FileNotFoundError):
            written.append((path.stat().st_mtime_ns, path))
    for _, path in sorted(written, reverse=True):
        with contextlib.suppress(FileNotFoundError, ValueError, KeyError):
            held = read_sink(path)
            if held is not None:
                return held[0]
    return None


class FileConsumer(threading.Thread):
    """The same traffic straight to the IdP with the token the newest file holds, re-read
    before each call; a 401 is not reported, only counted."""

    def __init__(self, files: list[Path], api_url: str, seed: int, stop: threading.Event) -> None:
        super().__init__(name="file-consumer", daemon=True)
        self.files, self.api_url, self.stop = files, api_url, stop
        self.traffic = Traffic(FILE_CONSUMER, seed)
        self.calls: list[Call] = []

    def run(self) -> None:
        with loopback_session() as session:
            while not self.stop.is_set():
                token = newest_token(self.files)
                if token is not None:
                    item = self.traffic.next()
                    self.calls.append(send(session, self.api_url, item, FILE_CONSUMER, token=token))
                self.stop.wait(PAUSE)


class Scraper(threading.Thread):
    """Keeps the last scrape of each replica's proxy series; a retired replica's last one
    (taken just before it is killed) is kept as it is."""

    def __init__(self, ports: dict[str, int], stop: threading.Event) -> None:
        super().__init__(name="scraper", daemon=True)
        self.ports, self.stop = ports, stop
        self.last: dict[str, dict[str, dict[str, float]]] = {}
        self._retired: set[str] = set()
        self._lock = threading.Lock()

    def _take(self, name: str) -> None:
        try:
            found = scrape(self.ports[name], PROXY_SERIES)
        except requests.RequestException:
            return
        with self._lock:
            if name not in self._retired:
                self.last[name] = found

    def final(self, name: str) -> None:
        """One last scrape of `name`, which no later one replaces."""
        with contextlib.suppress(requests.RequestException):
            found = scrape(self.ports[name], PROXY_SERIES)
            with self._lock:
                self.last[name] = found
        with self._lock:
            self._retired.add(name)

    def run(self) -> None:
        while not self.stop.wait(SCRAPE_EVERY):
            for name in self.ports:
                self._take(name)


# ---------------------------------------------------------------------------- the run


@dataclass
class Soak:
    """What the run leaves to analyse."""

    replicas: list[Refresher] = field(default_factory=list)
    consumers: list[ProxyConsumer] = field(default_factory=list)
    file_consumer: FileConsumer | None = None
    scraper: Scraper | None = None
    started: float = field(default_factory=time.time)  # traffic began (wall time)
    ended: float = 0.0  # traffic stopped
    reissues: list[float] = field(default_factory=list)  # wall times of the rogue requests
    rogue: set[str] = field(default_factory=set)  # the tokens they got
    killed: float | None = None
    took_over: float | None = None
    first_own_token: float | None = None  # the new leader's first token, issued at
    problems: list[str] = field(default_factory=list)


def _token_file(folder: Path, replica: str) -> Path:
    return folder / f"{replica}-token.json"


def _configs(folder: Path, idp: LocalIdP, kube: FakeKubeAPI) -> dict[str, Path]:
    """One config per replica: the same job, but each its own token file."""
    secret = secret_file(folder, CLIENT_SECRET)
    kubeconfig = kube.write_kubeconfig(folder / "kubeconfig", namespace=NAMESPACE)
    configs = {}
    for name in REPLICAS:
        sinks: list[dict[str, Any]] = [
            {"type": "kubernetes", "name": SECRET, "create": True},
            {"type": "file", "path": str(_token_file(folder, name)), "format": "json"},
        ]
        job = _job(idp, secret, sinks, None)
        del job["probe"]  # the proxy's own 401s are the verdict
        job["proxy"] = {
            "listen": "127.0.0.1:0",
            "upstream": idp.base_url,
            "replay_wait": REPLAY_WAIT,
        }
        configs[name] = _config(
            folder / f"{name}.yaml",
            job,
            kubernetes={"kubeconfig": str(kubeconfig), "request_timeout": 1},
            leader_election={"enabled": True, "namespace": NAMESPACE, **LEASE},
        )
    return configs


def _moments(rng: random.Random, count: int, since: float, until: float) -> list[float]:
    """`count` random moments in [since, until], at least REISSUE_GAP apart."""
    slack = max(0.0, until - since - (count - 1) * REISSUE_GAP)
    draws = sorted(rng.uniform(0, slack) for _ in range(count))
    return [since + draw + index * REISSUE_GAP for index, draw in enumerate(draws)]


def _reissue_at(soak: Soak, idp: LocalIdP, moments: list[float]) -> None:
    for moment in moments:
        time.sleep(max(0.0, moment - time.time()))
        soak.reissues.append(time.time())
        soak.rogue.add(rogue_reissue(idp))


def _serves(proxy_url: str) -> bool:
    try:
        with loopback_session() as session:
            return session.get(proxy_url + PROTECTED_PATH, timeout=5).status_code == 200
    except requests.RequestException:
        return False


def _start(soak: Soak, kube: FakeKubeAPI, configs: dict[str, Path], folder: Path) -> None:
    """The first replica leads with a token in the Secret; the second follows; both proxies
    pass a request."""
    for name in REPLICAS:
        replica = Refresher(name, configs[name], folder, POD_NAME=name)
        soak.replicas.append(replica)
        if name == REPLICAS[0]:
            _wait(lambda: holder(kube) == REPLICAS[0], 30, "the first replica leads")
            _wait(lambda: secret_token(kube) is not None, 30, "a token in the Secret")
    soak.replicas[1].wait_logged("leader election started")


def _own_token_after(soak: Soak, idp: LocalIdP, since: float) -> float | None:
    """When the first token not a rogue's was issued after `since`."""
    return next(
        (
            t.issued_at
            for t in idp.issued
            if t.issued_at > since and t.access_token not in soak.rogue
        ),
        None,
    )


def _kill_leader(soak: Soak, kube: FakeKubeAPI, idp: LocalIdP, rng: random.Random) -> None:
    """kill -9 of the leader just after a refresh landed (so the token has time to spare
    until the survivor's first refresh); then the takeover and that refresh."""
    leader, survivor = soak.replicas
    held = secret_token(kube)
    _wait(lambda: secret_token(kube) != held, LIFETIME + 10, "a refresh before the kill")
    time.sleep(rng.uniform(0.2, 0.6))  # the follower's watch has it by then
    assert soak.scraper is not None
    soak.scraper.final(leader.name)
    soak.killed = killed = time.time()  # from the signal on, its connections may fail
    leader.kill()
    soak.took_over = _wait(lambda: holder(kube) == survivor.name, 15, "the takeover")
    first = functools.partial(_own_token_after, soak, idp, killed)
    _wait(lambda: first() is not None, LIFETIME + 10, "the new leader's first token")
    soak.first_own_token = first()


def _exercise(
    soak: Soak,
    kube: FakeKubeAPI,
    idp: LocalIdP,
    configs: dict[str, Path],
    folder: Path,
    stop: threading.Event,
    settings: dict[str, Any],
) -> None:
    seconds, reissues, seed = settings["seconds"], settings["reissues"], settings["seed"]
    rng = random.Random(seed)
    _start(soak, kube, configs, folder)
    proxies = {r.name: f"http://127.0.0.1:{r.port('serving the proxy')}" for r in soak.replicas}
    ports = {r.name: r.port("serving metrics") for r in soak.replicas}
    for name, url in proxies.items():
        _wait(functools.partial(_serves, url), 30, f"{name}'s proxy passes a request")

    soak.consumers += [
        ProxyConsumer(f"consumer-{n + 1}", REPLICAS[n % 2], proxies, seed, stop)
        for n in range(settings["consumers"])
    ]
    files = [_token_file(folder, name) for name in REPLICAS]
    soak.file_consumer = FileConsumer(files, idp.base_url, seed, stop)
    soak.scraper = Scraper(ports, stop)
    soak.started = time.time()
    for thread in (*soak.consumers, soak.file_consumer, soak.scraper):
        thread.start()

    # Half the reissues before the kill, in the first half of the run.
    before = reissues - reissues // 2
    middle = soak.started + seconds / 2
    _reissue_at(soak, idp, _moments(rng, before, soak.started + 1.0, middle - 1.0))
    time.sleep(max(0.0, middle - time.time()))
    _kill_leader(soak, kube, idp, rng)
    # The rest after the takeover window: the new leader refreshes by itself by then.
    assert soak.first_own_token is not None
    since = max(soak.first_own_token, soak.took_over or 0.0) + 1.0
    after = reissues - before
    until = max(soak.started + seconds - SETTLE, since + (after - 1) * REISSUE_GAP)
    _reissue_at(soak, idp, _moments(rng, after, since, until))
    time.sleep(max(SETTLE, soak.started + seconds - time.time()))


def run(settings: dict[str, Any], logs: Path | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) if logs is None else logs
        folder.mkdir(parents=True, exist_ok=True)
        with (
            FakeKubeAPI() as kube,
            LocalIdP("lucidworks", lifetime=LIFETIME, clients={CLIENT_ID: CLIENT_SECRET}) as idp,
        ):
            soak = Soak()
            stop = threading.Event()
            try:
                _exercise(soak, kube, idp, _configs(folder, idp, kube), folder, stop, settings)
            except RuntimeError as err:
                soak.problems.append(str(err))
            finally:
                soak.ended = time.time()
                stop.set()
                for thread in _threads(soak):
                    thread.join(REQUEST_TIMEOUT + 5)
                for replica in soak.replicas:
                    if soak.scraper is not None and replica.process.poll() is None:
                        soak.scraper.final(replica.name)
                for replica in soak.replicas:
                    replica.stop()
            figures = analyse(soak, idp)
        secrets = {CLIENT_SECRET} | {t.access_token for t in idp.issued}
        lines, leaked, where = _leaks(soak.replicas, secrets)
        stray = sum(replica.stray_lines() for replica in soak.replicas)
    figures.update(
        settings={
            **settings,
            "lifetime": LIFETIME,
            "margin": MARGIN,
            "lease": LEASE,
            "replay_wait": REPLAY_WAIT,
            "pause": PAUSE,
            "reissue_gap": REISSUE_GAP,
        },
        log_lines=lines,
        secret_leaks=leaked,
        leaking_logs=where,
        stray_log_lines=stray,
    )
    if leaked:
        figures["problems"].append(f"{leaked} log lines hold a secret ({', '.join(where)})")
    return figures


def _threads(soak: Soak) -> list[threading.Thread]:
    found: list[threading.Thread] = [*soak.consumers]
    if soak.file_consumer is not None:
        found.append(soak.file_consumer)
    if soak.scraper is not None:
        found.append(soak.scraper)
    return [t for t in found if t.ident is not None]


# --------------------------------------------------------------------------- analysis


def _tally(calls: list[Call]) -> dict[str, Any]:
    """Requests, answers and failures of some calls."""
    return {
        "requests": len(calls),
        "get": sum(1 for c in calls if c.method == "GET"),
        "post": sum(1 for c in calls if c.method == "POST"),
        "statuses": dict(Counter(c.outcome for c in calls)),
        "unauthorized": sum(1 for c in calls if c.status == 401),
        "connection_errors": sum(1 for c in calls if c.error == "connection"),
        "integrity_failures": sum(1 for c in calls if not c.intact),
        # Neither a 200, a 401 nor a broken connection: a proxy's own error, a timeout.
        "other_failures": sum(
            1 for c in calls if c.status not in (200, 401) and c.error != "connection"
        ),
        "latency": _spread([c.took for c in calls if c.error is None]),
    }


def _connection_errors(soak: Soak, calls: list[Call]) -> dict[str, Any]:
    """The connection errors, when they came back (a request in flight when the leader was
    killed was sent before), and how their retries ended."""
    errors = [c for c in calls if c.error == "connection"]
    retries = [c for c in calls if c.retry]
    killed = soak.killed
    offsets = [c.sent + c.took - killed for c in errors] if killed is not None else []
    return {
        "count": len(errors),
        "before_kill": sum(1 for offset in offsets if offset < 0) if offsets else len(errors),
        "first_after_kill": min(offsets, default=None),
        "last_after_kill": max(offsets, default=None),
        "kinds": dict(Counter(str(c.detail) for c in errors)),
        "retries": dict(Counter(c.outcome for c in retries)),
        "retries_unauthorized": sum(1 for c in retries if c.status == 401),
    }


def _counts(series: dict[str, dict[str, float]], name: str) -> dict[str, int]:
    return {label: int(value) for label, value in series.get(name, {}).items()}


def _replays(soak: Soak) -> dict[str, dict[str, Any]]:
    """Per replica: what its /metrics said last, and what its log says."""
    last = soak.scraper.last if soak.scraper is not None else {}
    found = {}
    for replica in soak.replicas:
        series = last.get(replica.name, {})
        found[replica.name] = {
            "metrics": _counts(series, "refresher_proxy_replays_total"),
            "logged": dict(Counter(str(r.get("outcome")) for r in replica.logged(REPLAYED))),
            "proxy_requests": _counts(series, "refresher_proxy_requests_total"),
            "upstream_errors": _counts(series, "refresher_proxy_upstream_errors_total"),
            "proxy_rejections": _counts(series, "refresher_token_rejections_total").get("proxy", 0),
        }
    return found


def _refreshes(soak: Soak, idp: LocalIdP) -> dict[str, Any]:
    """The IdP's tokens: the rogue ones, and each replica's by its `token refreshed` lines."""
    issuers: Counter[str] = Counter()
    # The first to log a fingerprint fetched it: a new leader logs `token refreshed` again
    # when it copies the token it adopted to its own file (refresh.py, `_write_pending`).
    first: dict[str, tuple[float, str]] = {}
    for replica in soak.replicas:
        for record in replica.logged("token refreshed"):
            if key := str(record.get("fingerprint") or ""):
                seen = (log_time(record), replica.name)
                first[key] = min(first.get(key, seen), seen)
    by_fingerprint = {key: name for key, (_, name) in first.items()}
    for token in idp.issued:
        if token.access_token in soak.rogue:
            issuers["rogue"] += 1
        else:
            issuers[by_fingerprint.get(fingerprint(token.access_token), "?")] += 1
    survivor = soak.replicas[1] if len(soak.replicas) > 1 else None
    following = 0
    if survivor is not None:
        # Its refreshes before it logged that it leads: a follower that asked the IdP.
        led = survivor.logged(BECAME_LEADER)
        since = log_time(led[0]) if led else float("inf")
        following = sum(1 for r in survivor.logged("token refreshed") if log_time(r) < since)
    return {
        "issued": len(idp.issued),
        "token_requests": idp.token_requests,
        "rogue_reissues": len(soak.rogue),
        "refreshes": len(idp.issued) - len(soak.rogue),
        "issuers": dict(issuers),
        "on_rejection": {r.name: len(r.logged(REJECTED_REFRESHING)) for r in soak.replicas},
        "follower_refreshes_while_following": following,
        "protected_unauthorized": idp.protected_unauthorized,
    }


def _events(soak: Soak) -> dict[str, Any]:
    def rel(at: float | None) -> float | None:
        return None if at is None else at - soak.started

    return {
        "seconds": soak.ended - soak.started,
        "reissues_at": [rel(at) for at in soak.reissues],
        "reissues_before_kill": sum(1 for at in soak.reissues if soak.killed and at < soak.killed),
        "killed_at": rel(soak.killed),
        "takeover_after_kill": None
        if soak.killed is None or soak.took_over is None
        else soak.took_over - soak.killed,
        "first_own_token_after_kill": None
        if soak.killed is None or soak.first_own_token is None
        else soak.first_own_token - soak.killed,
        "no_reissue_window": [rel(soak.killed), rel(soak.first_own_token)],
    }


def _problems(soak: Soak, figures: dict[str, Any]) -> list[str]:
    """Whatever must not happen."""
    problems = list(soak.problems)
    total = figures["proxy"]["total"]
    if total["unauthorized"]:
        problems.append(f"proxy consumers were answered 401 {total['unauthorized']} times")
    if total["integrity_failures"]:
        problems.append(f"{total['integrity_failures']} answers did not match what was sent")
    if total["other_failures"]:
        problems.append(f"{total['other_failures']} requests failed otherwise (see the answers)")
    errors = figures["connection_errors"]
    if errors["before_kill"]:
        problems.append(f"{errors['before_kill']} connection errors before the kill")
    following = figures["idp"]["follower_refreshes_while_following"]
    if following:
        problems.append(f"the follower asked the IdP {following} times while it followed")
    return problems


def analyse(soak: Soak, idp: LocalIdP) -> dict[str, Any]:
    calls = [c for consumer in soak.consumers for c in consumer.calls]
    file_calls = soak.file_consumer.calls if soak.file_consumer is not None else []
    replays = _replays(soak)
    figures: dict[str, Any] = {
        "proxy": {
            "total": _tally(calls),
            "by_replica": {
                name: _tally([c for c in calls if c.replica == name]) for name in REPLICAS
            },
        },
        "connection_errors": _connection_errors(soak, calls),
        "replays": replays,
        "replays_total": dict(
            sum((Counter(r["metrics"]) for r in replays.values()), Counter[str]())
        ),
        "file_consumer": _tally(file_calls),
        "idp": _refreshes(soak, idp),
        "events": _events(soak),
    }
    # Every 401 the IdP sent to a proxy was one the proxy had to replay (or pass on).
    figures["idp"]["unauthorized_to_proxies"] = (
        figures["idp"]["protected_unauthorized"] - figures["file_consumer"]["unauthorized"]
    )
    figures["replays_logged"] = sum(sum(r["logged"].values()) for r in replays.values())
    figures["problems"] = _problems(soak, figures)
    return figures


# ----------------------------------------------------------------------------- report


def _statuses(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())) or "-"


def _ms(spread: dict[str, float] | None, key: str) -> str:
    return "-" if spread is None else f"{spread[key] * 1000:.0f} ms"


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def _traffic_rows(figures: dict[str, Any]) -> list[list[Any]]:
    role = {REPLICAS[0]: "leader, killed", REPLICAS[1]: "follower, then leader"}
    rows = []
    named = [(f"{n} ({role[n]})", t) for n, t in figures["proxy"]["by_replica"].items()]
    named += [("proxy consumers, total", figures["proxy"]["total"])]
    named += [("file consumer (token from the file, no proxy)", figures["file_consumer"])]
    for label, t in named:
        rows.append(
            [
                label,
                t["requests"],
                f"{t['get']} / {t['post']}",
                _statuses(t["statuses"]),
                t["unauthorized"],
                t["connection_errors"],
                t["integrity_failures"],
                _ms(t["latency"], "median"),
                _ms(t["latency"], "p99"),
                _ms(t["latency"], "max"),
            ]
        )
    return rows


def _replay_rows(figures: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for name, r in figures["replays"].items():
        rows.append(
            [
                name,
                _statuses(r["metrics"]),
                _statuses(r["logged"]),
                _statuses(r["proxy_requests"]),
                _statuses({k: v for k, v in r["upstream_errors"].items() if v}),
                r["proxy_rejections"],
                figures["idp"]["on_rejection"].get(name, 0),
            ]
        )
    rows.append(["total", _statuses(figures["replays_total"]), "", "", "", "", ""])
    return rows


def _event_rows(figures: dict[str, Any]) -> list[list[Any]]:
    events, idp = figures["events"], figures["idp"]
    return [
        ["IdP tokens issued", idp["issued"]],
        ["  rogue reissues", idp["rogue_reissues"]],
        ["  refreshes", f"{idp['refreshes']} ({_statuses(idp['issuers'])})"],
        [
            "reissues at (s into the run)",
            ", ".join(f"{t:.1f}" for t in events["reissues_at"]),
        ],
        ["  before the kill", events["reissues_before_kill"]],
        ["kill -9 of the leader at", _s(events["killed_at"])],
        ["takeover after the kill", _s(events["takeover_after_kill"])],
        [
            "new leader's first token after the kill",
            _s(events["first_own_token_after_kill"]),
        ],
        [
            "no reissue in (takeover window, s into the run)",
            " - ".join(_s(t) for t in events["no_reissue_window"]),
        ],
        [
            "follower's refreshes while it followed (must be 0)",
            idp["follower_refreshes_while_following"],
        ],
        [
            "IdP's protected API 401s: to the proxies + to the file consumer",
            f"{idp['unauthorized_to_proxies']} + {figures['file_consumer']['unauthorized']}"
            f" (replays logged: {figures['replays_logged']})",
        ],
    ]


def report(figures: dict[str, Any]) -> str:
    settings, events = figures["settings"], figures["events"]
    errors = figures["connection_errors"]
    out = [
        table(
            f"Proxy soak: {settings['consumers']} proxy consumers and one file consumer for "
            f"{events['seconds']:.0f} s (tokens live {LIFETIME:g} s, refreshed {MARGIN:g} s "
            f"before expiry; replay_wait {REPLAY_WAIT:g} s; GET and POST alternately)",
            [
                "consumers",
                "requests",
                "GET / POST",
                "answers",
                "401s",
                "connection errors",
                "body mismatches",
                "p50",
                "p99",
                "max",
            ],
            _traffic_rows(figures),
        ),
        f"\nproxy consumers' 401s: {figures['proxy']['total']['unauthorized']} (must be 0); "
        f"the file consumer's in the same run: {figures['file_consumer']['unauthorized']}",
        f"connection errors: {errors['count']} ({_statuses(errors['kinds'])}; "
        f"{errors['before_kill']} before the kill), "
        f"from {_s(errors['first_after_kill'])} to {_s(errors['last_after_kill'])} after it; "
        f"their retries on the other replica: {_statuses(errors['retries'])} "
        f"({errors['retries_unauthorized']} 401s)",
        table(
            "Replays (each replica's /metrics, the killed leader's last scrape before the kill; "
            "and its log, which outlives it)",
            [
                "replica",
                "replays (metrics)",
                "replays (log)",
                "proxy answers (metrics)",
                "upstream errors",
                "rejections acted on",
                "refreshes on rejection",
            ],
            _replay_rows(figures),
        ),
        table("Events", ["what", "value"], _event_rows(figures)),
    ]
    out += log_findings(figures)
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.proxysoak")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long traffic runs")
    parser.add_argument("--reissues", type=int, default=10, help="rogue reissues (2 or more)")
    parser.add_argument(
        "--consumers", type=int, default=6, help="proxy consumers, half on each replica"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--logs", type=Path, help="keep the configs and the refresher logs here (an empty folder)"
    )
    parser.add_argument(
        "--json", action="store_true", help="figures as JSON on stdout, the tables on stderr"
    )
    args = parser.parse_args()
    if args.reissues < 2 or args.consumers < 2:
        parser.error("--reissues and --consumers must be at least 2")
    before = args.reissues - args.reissues // 2
    if args.seconds / 2 - 2 < (before - 1) * REISSUE_GAP:
        parser.error(
            f"--seconds too short: {before} reissues before the kill, {REISSUE_GAP:g} s apart, "
            "within the first half less 2 s"
        )
    settings = {
        "seconds": args.seconds,
        "reissues": args.reissues,
        "consumers": args.consumers,
        "seed": args.seed,
    }
    figures = run(settings, args.logs)
    emit(figures, report(figures), as_json=args.json)


if __name__ == "__main__":
    main()
