"""The token API (`GET /v1/tokens/{name}`, refresher/api.py) and its doorkeeper
(refresher/consumers.py) on a running daemon, over real HTTP.

The daemon refreshes against the local token server; consumers read the token from the API
instead of a sink: with ETags and long polls, anonymously on a loopback listener, with a
bearer key, or with a projected service-account token checked by a TokenReview (below, once
the Kubernetes API double answers them).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests

from refresher.config import validate
from refresher.daemon import Daemon
from refresher.errors import ConfigError
from refresher.tokens import fingerprint
from testdoubles.idp import LocalIdP
from tests.conftest import CLIENT_SECRET, LogCapture, config_of, job_for, running, wait_for

LOOPBACK = {"enabled": True, "listen": "127.0.0.1:0"}


def _get(daemon: Daemon, name: str, **kwargs: Any) -> requests.Response:
    assert daemon.api is not None
    kwargs.setdefault("timeout", 90)
    return requests.get(f"http://127.0.0.1:{daemon.api.port}/v1/tokens/{name}", **kwargs)


@contextmanager
def _serving(
    idp: LocalIdP, secret_file: Path, tmp_path: Path, api: dict[str, Any] = LOOPBACK, **job: Any
) -> Iterator[tuple[Daemon, Path]]:
    sink = tmp_path / "token"
    config = config_of(job_for(idp, secret_file, sink, **job), api=api)
    with running(config) as daemon:
        wait_for(lambda: sink.exists() and daemon.runners[0].snapshot().ready)
        yield daemon, sink


@pytest.fixture
def idp(make_idp: Any) -> LocalIdP:
    return make_idp("lucidtech", lifetime=600, api_key="lt-key")


def test_the_token_is_served_with_the_json_sinks_keys_an_etag_and_no_caching(
    idp: LocalIdP, secret_file: Path, tmp_path: Path, all_logs: LogCapture
) -> None:
    with _serving(idp, secret_file, tmp_path) as (daemon, sink):
        answer = _get(daemon, "lucidtech-job")
        assert answer.status_code == 200
        body = answer.json()
        held = sink.read_text()
        assert body["access_token"] == held
        assert set(body) >= {
            "access_token",
            "token_type",
            "expires_at",
            "expires_at_epoch",
            "issued_at_epoch",
            "scope",
            "fingerprint",
        }
        assert body["fingerprint"] == fingerprint(held)
        assert answer.headers["ETag"] == f'"{fingerprint(held)}"'
        assert answer.headers["Cache-Control"] == "no-store"
        assert idp.token_status(body["access_token"]) == "valid"
    served = [line for line in all_logs.lines if "token served" in line]
    assert served and "anonymous (loopback)" in served[0] and fingerprint(held) in served[0]
    assert held not in all_logs.text and CLIENT_SECRET not in all_logs.text


def test_if_none_match_gives_304_at_once_and_a_long_poll_wakes_on_the_new_token(
    idp: LocalIdP, secret_file: Path, tmp_path: Path
) -> None:
    with _serving(idp, secret_file, tmp_path) as (daemon, sink):
        first = _get(daemon, "lucidtech-job")
        etag = first.headers["ETag"]
        for header in (etag, f"W/{etag}", f'"other", {etag}', "*"):
            assert (
                _get(daemon, "lucidtech-job", headers={"If-None-Match": header}).status_code == 304
            )
        assert (
            _get(daemon, "lucidtech-job", headers={"If-None-Match": '"other"'}).status_code == 200
        )
        # A long poll that times out: 304.
        started = time.monotonic()
        timed_out = _get(
            daemon, "lucidtech-job", params={"timeout": "0.5"}, headers={"If-None-Match": etag}
        )
        assert timed_out.status_code == 304 and time.monotonic() - started >= 0.4
        # A long poll answered by the refresh.
        answers: list[requests.Response] = []
        poll = threading.Thread(
            target=lambda: answers.append(
                _get(
                    daemon,
                    "lucidtech-job",
                    params={"timeout": "30"},
                    headers={"If-None-Match": etag},
                )
            )
        )
        poll.start()
        time.sleep(0.3)
        daemon.runners[0].refresh_now()
        poll.join(timeout=20)
        (answer,) = answers
        assert answer.status_code == 200
        assert answer.json()["access_token"] == sink.read_text()
        assert answer.headers["ETag"] != etag


@pytest.mark.parametrize("timeout", ["0", "-1", "61", "soon", "nan"])
def test_a_bad_timeout_is_400(
    timeout: str, idp: LocalIdP, secret_file: Path, tmp_path: Path
) -> None:
    with _serving(idp, secret_file, tmp_path) as (daemon, _):
        answer = _get(daemon, "lucidtech-job", params={"timeout": timeout})
        assert answer.status_code == 400


def test_stopping_answers_waiting_long_polls_at_once(
    idp: LocalIdP, secret_file: Path, tmp_path: Path
) -> None:
    answers: list[int] = []
    with _serving(idp, secret_file, tmp_path) as (daemon, _):
        etag = _get(daemon, "lucidtech-job").headers["ETag"]

        def poll() -> None:
            answers.append(
                _get(
                    daemon,
                    "lucidtech-job",
                    params={"timeout": "60"},
                    headers={"If-None-Match": etag},
                ).status_code
            )

        threads = [threading.Thread(target=poll) for _ in range(5)]
        for thread in threads:
            thread.start()
        time.sleep(0.3)
        stopping = time.monotonic()
    for thread in threads:
        thread.join(timeout=10)
    # Answered at once, and told to go elsewhere (503, Retry-After): not the 60 s asked for.
    assert answers == [503] * 5
    assert time.monotonic() - stopping < 10


def test_a_follower_answers_503_rather_than_a_token_it_cannot_vouch_for(
    idp: LocalIdP, secret_file: Path, tmp_path: Path
) -> None:
    with _serving(idp, secret_file, tmp_path) as (daemon, _):
        daemon._follow()  # what the elector calls when the Lease is lost
        answer = _get(daemon, "lucidtech-job")
        assert answer.status_code == 503
        assert "follows" in answer.json()["error"]
        assert "access_token" not in answer.text


def _keyed(tmp_path: Path, key: str = "k3y-0f-the-consumers-9d2e") -> tuple[Path, dict[str, Any]]:
    path = tmp_path / "consumer-key"
    path.write_text(key + "\n")
    return path, {"bearer_key_file": str(path)}


def test_a_bearer_key_opens_its_job_and_nothing_else(
    idp: LocalIdP, secret_file: Path, tmp_path: Path, all_logs: LogCapture
) -> None:
    key_file, consumers = _keyed(tmp_path)
    key = key_file.read_text().strip()
    api = {"enabled": True, "listen": "0.0.0.0:0"}
    with _serving(idp, secret_file, tmp_path, api=api, consumers=consumers) as (daemon, sink):
        held = sink.read_text()
        ok = _get(daemon, "lucidtech-job", headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200 and ok.json()["access_token"] == held
        for header in (
            None,
            f"Bearer {key[:-1]}",
            f"Bearer {key[:-1]}{chr(ord(key[-1]) ^ 1)}",  # the same length, one byte off
            f"Bearer {key}x",
            f"Basic {key}",
            "Bearer",
            f"Bearer {'x' * 20000}",
        ):
            headers = {} if header is None else {"Authorization": header}
            refused = _get(daemon, "lucidtech-job", headers=headers)
            assert refused.status_code in (400, 401), header
            assert held not in refused.text
        # A good key for an unknown name: 404, as for a name it may not read.
        unknown = _get(daemon, "nobody", headers={"Authorization": f"Bearer {key}"})
        assert unknown.status_code == 404
        # No credential for an unknown name: 401, like for a known one.
        assert _get(daemon, "nobody").status_code == 401
        # The key rotates: the old one stops working, the new one works, no restart.
        key_file.write_text("the-new-key-7a1b\n")
        wait_for(
            lambda: (
                _get(
                    daemon, "lucidtech-job", headers={"Authorization": "Bearer the-new-key-7a1b"}
                ).status_code
                == 200
            )
        )
        old = _get(daemon, "lucidtech-job", headers={"Authorization": f"Bearer {key}"})
        assert old.status_code == 401
        metrics = daemon.api_stats
        assert metrics._auth_failures["invalid"] >= 4
        assert metrics._auth_failures["missing"] >= 2
    text = all_logs.text
    assert "consumer refused" in text
    for secret in (key, "the-new-key-7a1b", held, CLIENT_SECRET):
        assert secret not in text


def test_a_non_loopback_listener_needs_consumers_on_every_job(tmp_path: Path) -> None:
    from tests.conftest import offline_job

    for listen in ("0.0.0.0:9465", "[::]:9465", "10.1.2.3:80"):
        with pytest.raises(ConfigError) as caught:
            validate(
                {"tokens": [offline_job(tmp_path)], "api": {"enabled": True, "listen": listen}}
            )
        (problem,) = caught.value.problems
        assert problem.startswith("tokens[0].consumers: required"), problem
    _, consumers = _keyed(tmp_path)
    job = offline_job(tmp_path, consumers=consumers)
    config = validate({"tokens": [job], "api": {"enabled": True, "listen": "0.0.0.0:9465"}})
    assert not config.settings.api.loopback
    for bad, where in (
        ({"audience": "refresher"}, "consumers"),
        ({"service_accounts": ["apps/web"]}, "consumers"),
        ({"service_accounts": ["no-namespace"], "audience": "a"}, "consumers.service_accounts[0]"),
        ({"bearer_key_file": str(tmp_path / "missing")}, "consumers.bearer_key_file"),
        ({}, "consumers"),
    ):
        with pytest.raises(ConfigError) as caught:
            validate(
                {
                    "tokens": [offline_job(tmp_path, consumers=bad)],
                    "api": {"enabled": True, "listen": "0.0.0.0:9465"},
                }
            )
        assert any(p.startswith(f"tokens[0].{where}") for p in caught.value.problems), (
            bad,
            caught.value.problems,
        )


def test_with_leader_election_and_the_api_every_job_needs_a_secret_sink(tmp_path: Path) -> None:
    from tests.conftest import offline_job

    with pytest.raises(ConfigError) as caught:
        validate(
            {
                "tokens": [offline_job(tmp_path)],
                "api": {"enabled": True},
                "leader_election": {"enabled": True},
            }
        )
    assert any(p.startswith("tokens[0].sinks: with leader election") for p in caught.value.problems)


# ------------------------------------------------- service accounts, checked by TokenReview


@pytest.fixture
def kube_api() -> Iterator[Any]:
    from testdoubles.kubeapi import FakeKubeAPI

    with FakeKubeAPI() as api:
        yield api


def test_projected_service_account_tokens_are_reviewed_and_allowed_by_name_or_namespace(
    idp: LocalIdP, secret_file: Path, tmp_path: Path, kube_api: Any, all_logs: LogCapture
) -> None:
    kubeconfig = kube_api.write_kubeconfig(tmp_path / "kubeconfig", namespace="tokens")
    consumers = {
        "service_accounts": ["apps/web"],
        "namespaces": ["batch"],
        "audience": "refresher",
    }
    sink = tmp_path / "token"
    job = job_for(idp, secret_file, sink, consumers=consumers)
    config = config_of(
        job,
        api={"enabled": True, "listen": "0.0.0.0:0"},
        kubernetes={"kubeconfig": str(kubeconfig), "request_timeout": 2},
    )
    issue = kube_api.issue_service_account_token
    web = issue("apps", "web", audiences=["refresher"])
    batch_job = issue("batch", "nightly", audiences=["refresher"])
    other = issue("apps", "worker", audiences=["refresher"])  # not allowed
    default_token = issue("apps", "web")  # the pod's default API token: the API server's audience
    wrong_audience = issue("apps", "web", audiences=["someone-else"])
    expired = issue("apps", "web", audiences=["refresher"], expires_in=0)
    revoked = issue("apps", "web", audiences=["refresher"])
    kube_api.revoke_token(revoked)

    def get(token: str, name: str = "lucidtech-job") -> requests.Response:
        return _get(daemon, name, headers={"Authorization": f"Bearer {token}"})

    with running(config) as daemon:
        wait_for(lambda: sink.exists() and daemon.runners[0].snapshot().ready)
        held = sink.read_text()
        for allowed in (web, batch_job):
            answer = get(allowed)
            assert answer.status_code == 200 and answer.json()["access_token"] == held
        for refused in (default_token, wrong_audience, expired, revoked, "not-a-token"):
            answer = get(refused)
            assert answer.status_code == 401, answer.text
            assert held not in answer.text
        # Authenticated, but not allowed for this job (or no such job): the same 404.
        assert get(other).status_code == 404
        assert get(web, name="nobody").status_code == 404
        assert get(other, name="nobody").status_code == 404
        # Reviews are cached: asking again costs the API server nothing.
        reviews = kube_api.token_reviews
        # Strings that are no projected token for our audience are never sent to review.
        for junk in ("not-a-token", default_token, wrong_audience, "a.b.c"):
            assert get(junk).status_code == 401
        assert kube_api.token_reviews == reviews
        for _ in range(5):
            assert get(web).status_code == 200
        assert kube_api.token_reviews == reviews
        failures = daemon.api_stats._auth_failures
        assert failures["invalid"] >= 5 and failures["not_allowed"] >= 3
    served = [line for line in all_logs.lines if "token served" in line]
    assert any("system:serviceaccount:apps:web" in line for line in served)
    assert any("system:serviceaccount:batch:nightly" in line for line in served)
    refused_lines = [line for line in all_logs.lines if "consumer refused" in line]
    assert any("system:serviceaccount:apps:worker" in line for line in refused_lines)
    for secret in (held, web, batch_job, other, default_token, wrong_audience, CLIENT_SECRET):
        assert secret not in all_logs.text


def test_when_the_api_server_cannot_review_the_caller_gets_503_not_a_token(
    idp: LocalIdP, secret_file: Path, tmp_path: Path, kube_api: Any
) -> None:
    kubeconfig = kube_api.write_kubeconfig(tmp_path / "kubeconfig", namespace="tokens")
    consumers = {"service_accounts": ["apps/web"], "audience": "refresher"}
    sink = tmp_path / "token"
    config = config_of(
        job_for(idp, secret_file, sink, consumers=consumers),
        api={"enabled": True, "listen": "0.0.0.0:0"},
        kubernetes={"kubeconfig": str(kubeconfig), "request_timeout": 2},
    )
    web = kube_api.issue_service_account_token("apps", "web", audiences=["refresher"])
    with running(config) as daemon:
        wait_for(lambda: sink.exists() and daemon.runners[0].snapshot().ready)
        kube_api.inject_errors(1, status=500)
        answer = _get(daemon, "lucidtech-job", headers={"Authorization": f"Bearer {web}"})
        assert answer.status_code == 503 and "Retry-After" in answer.headers
        assert "access_token" not in answer.text
        answer = _get(daemon, "lucidtech-job", headers={"Authorization": f"Bearer {web}"})
        assert answer.status_code == 200


# --------------------------------------------------------------------------------- TLS


def _serial(port: int, ca_file: Path) -> int:
    import socket
    import ssl

    context = ssl.create_default_context(cafile=str(ca_file))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    from cryptography import x509

    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_the_api_listener_speaks_tls_and_picks_up_a_rotated_certificate(
    idp: LocalIdP, secret_file: Path, tmp_path: Path
) -> None:
    trustme = pytest.importorskip("trustme")
    authority = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(ca_file))
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"

    def issue() -> None:
        leaf = authority.issue_cert("127.0.0.1")
        leaf.private_key_pem.write_to_path(str(key_file))
        leaf.cert_chain_pems[0].write_to_path(str(cert_file))

    issue()
    key_file_consumers, consumers = _keyed(tmp_path)
    key = key_file_consumers.read_text().strip()
    api = {
        "enabled": True,
        "listen": "0.0.0.0:0",
        "max_connections": 8,
        "tls": {"cert_file": str(cert_file), "key_file": str(key_file)},
    }
    with _serving(idp, secret_file, tmp_path, api=api, consumers=consumers) as (daemon, sink):
        assert daemon.api is not None and daemon.api.tls is not None
        url = f"https://127.0.0.1:{daemon.api.port}/v1/tokens/lucidtech-job"
        answer = requests.get(
            url, headers={"Authorization": f"Bearer {key}"}, verify=str(ca_file), timeout=10
        )
        assert answer.status_code == 200 and answer.json()["access_token"] == sink.read_text()
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(url.replace("https", "http"), timeout=5)
        before = _serial(daemon.api.port, ca_file)
        issue()  # cert-manager rotates the pair in place
        daemon.api.tls.check()  # what the listener does every TLS_CHECK_SECONDS
        assert _serial(daemon.api.port, ca_file) != before
        # A broken pair is refused; the current one stays in use.
        cert_file.write_text("not a certificate")
        current = _serial(daemon.api.port, ca_file)
        daemon.api.tls.check()
        assert _serial(daemon.api.port, ca_file) == current
        # Handshakes in progress are counted connections like any other: silent clients
        # beyond the cap are closed at once, never holding descriptors uncounted.
        import socket

        silent = [
            socket.create_connection(("127.0.0.1", daemon.api.port), timeout=5)
            for _ in range(daemon.api.max_connections + 5)
        ]
        try:
            wait_for(lambda: daemon.api is not None and daemon.api.shed >= 5)
            assert daemon.api.connections <= daemon.api.max_connections
        finally:
            for sock in silent:
                sock.close()


def test_an_unloadable_certificate_is_a_clear_start_error(tmp_path: Path) -> None:
    from refresher.http import ListenError, TlsFiles

    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_text("garbage")
    key.write_text("garbage")
    with pytest.raises(ListenError) as caught:
        TlsFiles(cert, key)
    assert str(cert) in caught.value.strerror


def test_an_oversized_credential_is_refused_without_being_echoed(
    idp: LocalIdP, secret_file: Path, tmp_path: Path
) -> None:
    import socket

    credential = "SECRETCREDENTIAL" + "d" * 6000
    with _serving(idp, secret_file, tmp_path) as (daemon, _):
        assert daemon.api is not None
        with socket.create_connection(("127.0.0.1", daemon.api.port), timeout=5) as sock:
            sock.sendall(
                b"GET /v1/tokens/lucidtech-job HTTP/1.1\r\nHost: x\r\n"
                + f"Authorization: Bearer {credential}\r\n\r\n".encode()
            )
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
    assert answer.split(b"\r\n")[0].endswith(b" 400 Bad Request")
    assert b"SECRETCREDENTIAL" not in answer and b"dddd" not in answer


def test_refusals_close_the_connection_and_one_address_cannot_take_every_slot(
    idp: LocalIdP, secret_file: Path, tmp_path: Path
) -> None:
    import socket

    _, consumers = _keyed(tmp_path)
    api = {"enabled": True, "listen": "0.0.0.0:0", "max_connections_per_address": 2}
    with _serving(idp, secret_file, tmp_path, api=api, consumers=consumers) as (daemon, _):
        assert daemon.api is not None
        port = daemon.api.port
        refused = _get(daemon, "lucidtech-job")
        assert refused.status_code == 401 and refused.headers["Connection"] == "close"

        def connect(source: str) -> socket.socket:
            sock = socket.create_connection(
                ("127.0.0.1", port), timeout=5, source_address=(source, 0)
            )
            return sock

        held = [connect("127.0.0.1"), connect("127.0.0.1")]
        try:
            wait_for(lambda: daemon.api is not None and daemon.api.connections == 2)
            third = connect("127.0.0.1")  # closed at once: its address holds two already
            third.settimeout(5)
            assert third.recv(1) == b""
            third.close()
            other = connect("127.0.0.2")  # another address still gets in
            other.sendall(b"GET /v1/tokens/lucidtech-job HTTP/1.1\r\nHost: x\r\n\r\n")
            other.settimeout(5)
            assert other.recv(64).startswith(b"HTTP/1.1 401")
            other.close()
        finally:
            for sock in held:
                sock.close()
