"""Tests of refresher.localidp (the shipped token server), testdoubles.idp (its fault
injector) and refresher.loopback (their base), driven over HTTP with requests, as the
refresher will drive them.

Each provider test follows the provider's public page (/work/shared/seeds). Time is an
injected clock unless a test is about the real clock, so nothing sleeps for long. The
servers are the fault-injecting double unless a test is about the shipped server itself.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import struct
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from http.client import HTTPResponse
from typing import Any, TypedDict
from urllib.parse import quote_plus

import jwt
import pytest
import requests

from refresher import localidp
from refresher.localidp import RESET, SHAPES, Reply, Request
from testdoubles.idp import Fault, LocalIdP
from tests.conftest import FakeClock

FORM = "application/x-www-form-urlencoded"
CLIENT, SECRET = "demo-client", "demo-secret"
AUDIENCE = "https://api.example.test"
T0 = 1_700_000_000.25  # a fractional start, so exp flooring is visible
INVALID_CLIENT = {"error": "invalid_client", "error_description": "Client authentication failed"}


class OAuthParams(TypedDict, total=False):
    scope: str
    audience: str


# A request each provider's page says is correct.
GOOD_PARAMS: dict[str, OAuthParams] = {
    "lucidworks": {"scope": "machinelearning.predict"},
    "fusion": {"scope": "connectedsearch.query datasource.push"},
    "lucidtech": {},
    "usage-engine": {"audience": AUDIENCE},
    "generic": {},
    "entra": {"scope": "api://demo/.default"},
    "okta": {},
    "keycloak": {},
    "auth0": {"audience": AUDIENCE},
}


MakeIdP = Callable[..., LocalIdP]


@pytest.fixture
def clock() -> FakeClock:
    """The server's clock, moved by hand."""
    return FakeClock(T0)


@pytest.fixture
def make_idp(clock: FakeClock) -> Iterator[MakeIdP]:
    """Start servers (on the fake clock unless told otherwise); stop them all afterwards.

    The fault-injecting double unless ``server=`` names another class (the shipped one).
    """
    started: list[localidp.LocalIdP] = []

    def make(shape: Any = "generic", *, server: type[Any] = LocalIdP, **kwargs: Any) -> LocalIdP:
        kwargs.setdefault("clock", clock)
        idp: LocalIdP = server(shape, **kwargs).start()
        started.append(idp)
        return idp

    yield make
    for idp in started:
        idp.stop()


def rfc_basic(client_id: str, secret: str) -> str:
    """RFC 6749 2.3.1: form-urlencode each half, then base64 the pair."""
    pair = f"{quote_plus(client_id)}:{quote_plus(secret)}"
    return "Basic " + base64.b64encode(pair.encode()).decode()


def raw_basic(client_id: str, secret: str) -> str:
    """What `echo -n id:secret | base64` (and requests' auth=(id, secret)) sends."""
    return "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()


def token_request(
    http: requests.Session,
    idp: LocalIdP,
    *,
    client_id: str = CLIENT,
    secret: str = SECRET,
    client_auth: str | None = None,
    scope: str | None = None,
    audience: str | None = None,
    timeout: float = 5,
) -> requests.Response:
    """A request made the way idp's shape wants it: what the refresher must send.

    ``client_auth`` sends the credentials in another style than the shape's.
    """
    shape = idp.shape
    oauth = {"grant_type": "client_credentials"}
    if scope is not None:
        oauth["scope"] = scope
    if audience is not None:
        oauth["audience"] = audience
    headers = {"Content-Type": FORM, "Accept": "application/json", "Cache-Control": "no-cache"}
    body: dict[str, str] = {}
    style = client_auth or shape.client_auth
    if style == "body":
        body.update(client_id=client_id, client_secret=secret)
    elif style == "basic":
        headers["Authorization"] = rfc_basic(client_id, secret)
    else:
        headers["Authorization"] = raw_basic(client_id, secret)
    query = oauth if shape.params_in == "query" else {}
    if shape.params_in == "body":
        body.update(oauth)
    return http.post(idp.token_url, params=query, data=body, headers=headers, timeout=timeout)


def get_token(http: requests.Session, idp: LocalIdP, **kwargs: Any) -> str:
    response = token_request(http, idp, **kwargs)
    assert response.status_code == 200, response.text
    token = response.json()["access_token"]
    assert isinstance(token, str)
    return token


def call_api(http: requests.Session, idp: LocalIdP, token: str, **headers: str) -> int:
    headers["Authorization"] = f"Bearer {token}"
    return http.get(idp.protected_url, headers=headers, timeout=5).status_code


def claims(token: str) -> dict[str, Any]:
    decoded: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return decoded


def raw_exchange(idp: LocalIdP, data: bytes) -> int:
    """Send raw bytes (for requests requests cannot make) and return the status code."""
    port = int(idp.base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1])


# ------------------------------------------------------------------ every shape


def test_shapes_are_the_seed_providers() -> None:
    seeds = {"lucidworks", "fusion", "lucidtech", "usage-engine", "generic"}
    assert set(SHAPES) == seeds | {"entra", "okta", "keycloak", "auth0"}
    assert all(shape.name == key for key, shape in SHAPES.items())
    assert SHAPES["lucidworks"].token_path == "/oauth2/ausao8uveaPmyhv0v357/v1/token"
    assert SHAPES["fusion"].token_path == SHAPES["lucidworks"].token_path


@pytest.mark.parametrize("server", [localidp.LocalIdP, LocalIdP], ids=["shipped", "double"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_correct_request_gets_a_jwt(
    shape: str,
    server: type[localidp.LocalIdP],
    make_idp: MakeIdP,
    http: requests.Session,
    clock: FakeClock,
) -> None:
    idp = make_idp(shape, server=server)
    response = token_request(http, idp, **GOOD_PARAMS[shape])

    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["Cache-Control"] == "no-store"
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 3600 and isinstance(body["expires_in"], int)
    assert body["scope"] == GOOD_PARAMS[shape].get("scope", "")

    jwt_claims = claims(body["access_token"])
    assert jwt_claims["sub"] == CLIENT
    assert jwt_claims["iss"] == idp.issuer
    assert jwt_claims["scope"] == body["scope"]
    assert jwt_claims["iat"] == int(T0)
    assert jwt_claims["exp"] == int(T0 + 3600)
    assert jwt_claims.get("aud") == GOOD_PARAMS[shape].get("audience")

    (issued,) = idp.issued
    assert issued.access_token == body["access_token"]
    assert issued.client_id == CLIENT
    assert issued.scopes == frozenset(body["scope"].split())
    assert (issued.issued_at, issued.expires_at) == (T0, jwt_claims["exp"])
    assert idp.token_status(body["access_token"]) == "valid"
    api_key = {"x-api-key": "demo-api-key"} if shape == "lucidtech" else {}
    assert call_api(http, idp, body["access_token"], **api_key) == 200
    assert idp.token_requests == 1


# Shapes that accept one secret style only (the seeds'): the other style is missing.
@pytest.mark.parametrize("shape", sorted(s for s in SHAPES if len(SHAPES[s].auth_methods) == 1))
def test_credentials_in_the_wrong_style_are_invalid_client(
    shape: str, make_idp: MakeIdP, http: requests.Session
) -> None:
    idp = make_idp(shape)
    wrong = "basic" if idp.shape.client_auth == "body" else "body"
    response = token_request(http, idp, client_auth=wrong, **GOOD_PARAMS[shape])

    assert response.status_code == 401
    assert response.json() == INVALID_CLIENT
    assert idp.issued == []


@pytest.mark.parametrize(
    "authorization",
    [
        rfc_basic(CLIENT, "wrong-secret"),
        rfc_basic("unknown-client", SECRET),
        "Bearer " + base64.b64encode(f"{CLIENT}:{SECRET}".encode()).decode(),
        "Basic",
        "Basic !!!not-base64!!!",
        "Basic " + base64.b64encode(b"no-colon-here").decode(),
        "Basic " + base64.b64encode(b"\xff\xfe:\xff").decode(),
        "Basic " + base64.b64encode(b"demo-client:%ff").decode(),
        "",
    ],
)
def test_bad_basic_credentials_are_invalid_client(
    authorization: str, make_idp: MakeIdP, http: requests.Session
) -> None:
    idp = make_idp("generic")
    response = http.post(
        idp.token_url,
        data={"grant_type": "client_credentials"},
        headers={"Authorization": authorization},
        timeout=5,
    )
    assert response.status_code == 401
    assert response.json() == INVALID_CLIENT
    assert response.headers["WWW-Authenticate"].startswith("Basic ")


def test_basic_auth_is_rfc6749_form_urlencoded(make_idp: MakeIdP, http: requests.Session) -> None:
    client_id, secret = "svc client", "p:a+s% s"
    idp = make_idp("generic", clients={client_id: secret})
    grant = {"grant_type": "client_credentials"}

    header = {"Authorization": rfc_basic(client_id, secret)}
    encoded = http.post(idp.token_url, data=grant, headers=header, timeout=5)
    # requests' auth=(id, secret) does not urlencode: the RFC server must refuse it.
    unencoded = http.post(idp.token_url, data=grant, auth=(client_id, secret), timeout=5)

    assert encoded.status_code == 200
    assert claims(encoded.json()["access_token"])["sub"] == client_id
    assert unencoded.status_code == 401


def test_basic_raw_shape_takes_the_pair_as_is(make_idp: MakeIdP, http: requests.Session) -> None:
    secret = "p:a+s% s"
    idp = make_idp(replace(SHAPES["generic"], client_auth="basic_raw"), clients={CLIENT: secret})
    grant = {"grant_type": "client_credentials"}

    unencoded = http.post(idp.token_url, data=grant, auth=(CLIENT, secret), timeout=5)
    header = {"Authorization": rfc_basic(CLIENT, secret)}
    encoded = http.post(idp.token_url, data=grant, headers=header, timeout=5)

    assert unencoded.status_code == 200
    assert encoded.status_code == 401


# ------------------------------------------------------------------- lucidworks


LUCIDWORKS_HEADERS = {
    "Authorization": rfc_basic(CLIENT, SECRET),
    "Accept": "application/json",
    "Content-Type": FORM,
}


GRANT = {"grant_type": "client_credentials"}
PREDICT = {"scope": "machinelearning.predict"}


@pytest.mark.parametrize(
    ("query", "body", "error"),
    [
        (GRANT, PREDICT, "invalid_scope"),
        (PREDICT, GRANT, "invalid_request"),
        (GRANT, {}, "invalid_scope"),
        ({**GRANT, "scope": "machinelearning.predict machinelearning.model"}, {}, "invalid_scope"),
        ({**GRANT, "scope": "datasource.push"}, {}, "invalid_scope"),
        ({"grant_type": "password", **PREDICT}, {}, "unsupported_grant_type"),
    ],
    ids=["scope-in-body", "grant-in-body", "no-scope", "two-scopes", "fusion-scope", "password"],
)
def test_lucidworks_rejects(
    query: dict[str, str],
    body: dict[str, str],
    error: str,
    make_idp: MakeIdP,
    http: requests.Session,
) -> None:
    idp = make_idp("lucidworks")
    response = http.post(
        idp.token_url, params=query, data=body, headers=LUCIDWORKS_HEADERS, timeout=5
    )
    assert response.status_code == 400
    assert response.json()["error"] == error
    assert idp.issued == []


@pytest.mark.parametrize(
    ("accept", "status"),
    [
        ("application/json", 200),
        ("*/*", 200),
        ("application/*;q=0.5", 200),
        ("text/html", 406),
        ("*/*, application/json;q=0", 406),
    ],
)
def test_lucidworks_answers_only_json(
    accept: str, status: int, make_idp: MakeIdP, http: requests.Session
) -> None:
    idp = make_idp("lucidworks")
    response = http.post(
        idp.token_url,
        params={"grant_type": "client_credentials", "scope": "machinelearning.model"},
        headers={**LUCIDWORKS_HEADERS, "Accept": accept},
        timeout=5,
    )
    assert response.status_code == status


def test_lucidworks_one_token_per_scope_and_reissue_revokes(
    make_idp: MakeIdP, http: requests.Session, clock: FakeClock
) -> None:
    idp = make_idp("lucidworks")
    predict_1 = get_token(http, idp, scope="machinelearning.predict")
    model = get_token(http, idp, scope="machinelearning.model")
    clock.now += 10
    predict_2 = get_token(http, idp, scope="machinelearning.predict")

    # "if you request a new token with that scope, it deletes the existing token"
    assert call_api(http, idp, predict_1) == 401
    assert call_api(http, idp, predict_2) == 200
    # "does not affect an existing Models API token"
    assert call_api(http, idp, model) == 200
    assert [idp.token_status(t) for t in (predict_1, model, predict_2)] == [
        "revoked",
        "valid",
        "valid",
    ]
    assert [t.revoked_at for t in idp.issued] == [T0 + 10, None, None]
    assert (idp.protected_ok, idp.protected_unauthorized) == (2, 1)


def test_reissue_revokes_only_the_same_client(make_idp: MakeIdP, http: requests.Session) -> None:
    idp = make_idp("lucidworks", clients={"a": "secret-a", "b": "secret-b"})
    first = get_token(http, idp, client_id="a", secret="secret-a", scope="machinelearning.model")
    get_token(http, idp, client_id="b", secret="secret-b", scope="machinelearning.model")
    assert idp.token_status(first) == "valid"


# ----------------------------------------------------------------------- fusion


def test_fusion_gives_one_token_for_both_scopes(make_idp: MakeIdP, http: requests.Session) -> None:
    idp = make_idp("fusion")
    response = token_request(http, idp, scope="connectedsearch.query datasource.push")

    assert response.json()["scope"] == "connectedsearch.query datasource.push"
    (issued,) = idp.issued
    assert issued.scopes == {"connectedsearch.query", "datasource.push"}
    assert claims(issued.access_token)["scope"] == "connectedsearch.query datasource.push"


def test_fusion_query_and_push_tokens_do_not_affect_each_other(
    make_idp: MakeIdP, http: requests.Session
) -> None:
    idp = make_idp("fusion")
    both = get_token(http, idp, scope="connectedsearch.query datasource.push")
    push = get_token(http, idp, scope="datasource.push")
    query_1 = get_token(http, idp, scope="connectedsearch.query")
    query_2 = get_token(http, idp, scope="connectedsearch.query")

    statuses = [idp.token_status(t) for t in (both, push, query_1, query_2)]
    assert statuses == ["valid", "valid", "revoked", "valid"]
    assert token_request(http, idp, scope="machinelearning.predict").status_code == 400


# -------------------------------------------------------------------- lucidtech


def test_lucidtech_wants_grant_type_in_the_query(make_idp: MakeIdP, http: requests.Session) -> None:
    idp = make_idp("lucidtech")
    response = http.post(
        idp.token_url,
        data={"grant_type": "client_credentials"},
        headers={"Authorization": rfc_basic(CLIENT, SECRET)},
        timeout=5,
    )
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"


def test_lucidtech_api_needs_token_and_api_key(make_idp: MakeIdP, http: requests.Session) -> None:
    idp = make_idp("lucidtech", api_key="key-123")
    token = get_token(http, idp)

    assert call_api(http, idp, token) == 403
    assert call_api(http, idp, token, **{"x-api-key": "wrong"}) == 403
    assert call_api(http, idp, token, **{"x-api-key": "key-123"}) == 200
    assert call_api(http, idp, "not-a-token", **{"x-api-key": "key-123"}) == 401
    assert (idp.protected_ok, idp.protected_unauthorized, idp.protected_forbidden) == (1, 1, 2)


# ----------------------------------------------------------------- usage engine


@pytest.mark.parametrize(
    ("where", "audience", "status", "error"),
    [
        ("body", None, 400, "invalid_request"),
        ("body", "", 400, "invalid_request"),
        ("query", AUDIENCE, 400, "invalid_request"),
        ("body", "https://other.example.test", 403, "access_denied"),
    ],
)
def test_usage_engine_requires_its_audience(
    where: str,
    audience: str | None,
    status: int,
    error: str,
    make_idp: MakeIdP,
    http: requests.Session,
) -> None:
    idp = make_idp("usage-engine")
    body = {"grant_type": "client_credentials", "client_id": CLIENT, "client_secret": SECRET}
    query: dict[str, str] = {}
    if audience is not None:
        (body if where == "body" else query)["audience"] = audience
    response = http.post(idp.token_url, params=query, data=body, timeout=5)
    assert response.status_code == status
    assert response.json()["error"] == error


def test_usage_engine_audience_is_configurable(make_idp: MakeIdP, http: requests.Session) -> None:
    idp = make_idp("usage-engine", audience="https://ue.example.test/api")
    token = get_token(http, idp, audience="https://ue.example.test/api")
    assert claims(token)["aud"] == "https://ue.example.test/api"


# ------------------------------------------------------- tokens, expiry, clock


def test_expiry_is_the_jwt_exp_judged_by_the_injected_clock(
    make_idp: MakeIdP, http: requests.Session, clock: FakeClock
) -> None:
    idp = make_idp("generic", lifetime=60)
    token = get_token(http, idp)
    exp = claims(token)["exp"]
    assert exp == int(T0 + 60)  # floored: the server enforces what the client can read

    clock.now = exp - 0.01
    assert call_api(http, idp, token) == 200
    clock.now = exp
    assert call_api(http, idp, token) == 401
    assert idp.token_status(token) == "expired"


def test_opaque_tokens_expire_server_side(
    make_idp: MakeIdP, http: requests.Session, clock: FakeClock
) -> None:
    idp = make_idp("generic", lifetime=60, token_format="opaque")
    token = get_token(http, idp)
    assert token.count(".") != 2  # not a JWT
    assert idp.issued[0].expires_at == T0 + 60

    clock.now = T0 + 59.9
    assert call_api(http, idp, token) == 200
    clock.now = T0 + 60
    assert call_api(http, idp, token) == 401


def test_real_clock_short_lifetime(make_idp: MakeIdP, http: requests.Session) -> None:
    # `exp` is whole seconds (int(now + lifetime)): with 2.5 s the token lives at least 1.5 s,
    # time enough for the first call on a loaded machine (1 s could leave it 0.01 s).
    idp = make_idp("generic", lifetime=2.5, clock=time.time)
    token = get_token(http, idp)
    assert call_api(http, idp, token) == 200
    time.sleep(max(0.0, claims(token)["exp"] - time.time()) + 0.01)
    assert call_api(http, idp, token) == 401


def test_lifetime_is_settable_and_expires_in_optional(
    make_idp: MakeIdP, http: requests.Session
) -> None:
    idp = make_idp("generic")
    idp.lifetime = 1.5
    body = token_request(http, idp).json()
    assert body["expires_in"] == 1.5
    assert claims(body["access_token"])["exp"] == int(T0 + 1.5)

    quiet = make_idp("generic", send_expires_in=False)
    assert "expires_in" not in token_request(http, quiet).json()


def test_generic_reissue_does_not_revoke(make_idp: MakeIdP, http: requests.Session) -> None:
    idp = make_idp("generic")
    first, second = get_token(http, idp), get_token(http, idp)
    assert first != second
    assert (call_api(http, idp, first), call_api(http, idp, second)) == (200, 200)


def test_tokens_from_another_server_are_refused(make_idp: MakeIdP, http: requests.Session) -> None:
    one, other = make_idp("generic"), make_idp("generic")
    token = get_token(http, other)
    assert call_api(http, one, token) == 401
    assert one.token_status(token) == "unknown"


# ----------------------------------------------------------------------- faults


# (fault, status, Content-Type prefix, check of the response) for faults that answer.
FAULT_CASES: list[tuple[Fault, int, str, Callable[[requests.Response], object]]] = [
    (Fault.SERVER_ERROR, 500, "application/json", lambda r: r.json()["error"]),
    (Fault.UNAVAILABLE, 503, "application/json", lambda r: r.headers["Retry-After"] == "1"),
    (Fault.RATE_LIMITED, 429, "application/json", lambda r: r.headers["Retry-After"] == "1"),
    (Fault.HTML, 200, "text/html", lambda r: r.text.startswith("<html>")),
    (Fault.NO_ACCESS_TOKEN, 200, "application/json", lambda r: "access_token" not in r.json()),
    (Fault.NOT_JSON, 200, "application/json", lambda r: r.text == "not json{"),
    (Fault.INVALID_CLIENT, 401, "application/json", lambda r: r.json() == INVALID_CLIENT),
    (
        Fault.NEGATIVE_EXPIRES_IN,
        200,
        "application/json",
        lambda r: r.json()["expires_in"] == -60 and claims(r.json()["access_token"]),
    ),
]


def test_every_fault_kind_is_tested() -> None:
    answered = {case[0] for case in FAULT_CASES}
    assert answered | {Fault.RESET, Fault.SLOW} == set(Fault)  # those two have their own tests


@pytest.mark.parametrize(
    ("fault", "status", "media", "check"),
    FAULT_CASES,
    ids=[case[0].name for case in FAULT_CASES],
)
def test_fault_is_seen_by_the_client_then_service_resumes(
    fault: Fault,
    status: int,
    media: str,
    check: Callable[[requests.Response], object],
    make_idp: MakeIdP,
    http: requests.Session,
) -> None:
    idp = make_idp("generic")
    idp.fail_next(fault)

    response = token_request(http, idp)
    assert response.status_code == status
    assert response.headers["Content-Type"].startswith(media)
    assert check(response)
    assert idp.issued == []

    assert token_request(http, idp).status_code == 200
    assert idp.token_requests == 2


def test_negative_expires_in_token_is_not_accepted(
    make_idp: MakeIdP, http: requests.Session
) -> None:
    idp = make_idp("generic")
    idp.fail_next(Fault.NEGATIVE_EXPIRES_IN)
    token = token_request(http, idp).json()["access_token"]
    assert claims(token)["exp"] < claims(token)["iat"]
    assert call_api(http, idp, token) == 401


def test_reset_closes_the_connection_without_a_response(
    make_idp: MakeIdP, http: requests.Session
) -> None:
    idp = make_idp("generic")
    idp.fail_next(Fault.RESET)
    with pytest.raises(requests.ConnectionError):
        token_request(http, idp)
    assert token_request(http, idp).status_code == 200


def test_slow_answers_normally_after_the_delay(make_idp: MakeIdP, http: requests.Session) -> None:
    idp = make_idp("generic")
    idp.fail_next(Fault.SLOW, slow_seconds=0.3)
    started = time.monotonic()
    assert token_request(http, idp).status_code == 200
    assert time.monotonic() - started >= 0.3


def test_slow_times_the_client_out_and_stop_is_still_prompt(
    make_idp: MakeIdP, http: requests.Session
) -> None:
    idp = make_idp("generic")
    idp.fail_next(Fault.SLOW, slow_seconds=30)
    with pytest.raises(requests.Timeout):
        token_request(http, idp, timeout=0.2)

    started = time.monotonic()
    idp.stop()
    assert time.monotonic() - started < 1.0


def test_retry_after_value(make_idp: MakeIdP, http: requests.Session) -> None:
    idp = make_idp("generic")
    idp.fail_next(Fault.RATE_LIMITED, retry_after=7)
    idp.fail_next(Fault.UNAVAILABLE, retry_after=0.5)
    assert token_request(http, idp).headers["Retry-After"] == "7"
    assert token_request(http, idp).headers["Retry-After"] == "0.5"


def test_fail_next_counts_then_set_fault_persists(
    make_idp: MakeIdP, http: requests.Session
) -> None:
    idp = make_idp("generic")
    idp.fail_next(Fault.SERVER_ERROR, 2)
    idp.fail_next(Fault.INVALID_CLIENT)
    assert [token_request(http, idp).status_code for _ in range(4)] == [500, 500, 401, 200]

    idp.set_fault(Fault.UNAVAILABLE)
    idp.fail_next(Fault.SERVER_ERROR)  # queued faults come first
    assert [token_request(http, idp).status_code for _ in range(3)] == [500, 503, 503]
    idp.set_fault(None)
    assert token_request(http, idp).status_code == 200
    assert idp.token_requests == 8
    assert len(idp.issued) == 2


# -------------------------------------------------------- the shipped server's hook


def test_the_shipped_server_has_no_fault_injector() -> None:
    assert issubclass(LocalIdP, localidp.LocalIdP)
    for name in ("fail_next", "set_fault"):
        assert hasattr(LocalIdP, name) and not hasattr(localidp.LocalIdP, name)
    assert not hasattr(localidp, "Fault")


class Gatekeeper(localidp.LocalIdP):
    """A subclass on the hook: refuses one scope, drops the connection for another."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[Request] = []

    def _before_grant(self, request: Request) -> Reply | None:
        self.seen.append(request)
        if b"scope=blocked" in request.body:
            return Reply.error(400, "invalid_scope", "Blocked here")
        return RESET if b"scope=drop" in request.body else None


def test_before_grant_intercepts_token_posts_before_validation(
    make_idp: MakeIdP, http: requests.Session
) -> None:
    idp = make_idp("generic", server=Gatekeeper)
    refused = token_request(http, idp, secret="wrong", scope="blocked")
    assert refused.status_code == 400  # not 401: the hook answered before authentication
    assert refused.json() == {"error": "invalid_scope", "error_description": "Blocked here"}
    with pytest.raises(requests.ConnectionError):
        token_request(http, idp, scope="drop")
    token = get_token(http, idp, scope="fine")

    assert call_api(http, idp, token) == 200  # the protected API is never intercepted
    assert http.get(idp.token_url, timeout=5).status_code == 405  # checked before the hook
    assert [(r.method, r.path) for r in idp.seen] == [("POST", "/oauth2/token")] * 3
    assert idp.token_requests == 4
    assert len(idp.issued) == 1


# ------------------------------------------------------------------ secrecy, logs


def test_client_secret_never_appears_in_a_response(
    make_idp: MakeIdP, http: requests.Session
) -> None:
    secret = "S3cret-never-echo:+% x"
    leaks = {secret, quote_plus(secret), base64.b64encode(secret.encode()).decode()}
    responses: list[requests.Response] = []
    for shape in sorted(SHAPES):
        idp = make_idp(shape, clients={CLIENT: secret})
        good = GOOD_PARAMS[shape]
        responses.append(token_request(http, idp, secret=secret, **good))
        responses.append(token_request(http, idp, secret=secret + "x", **good))
        responses.append(token_request(http, idp, client_id=secret, secret=secret, **good))
        responses.append(token_request(http, idp, secret=secret, audience=secret))
        for fault in set(Fault) - {Fault.RESET, Fault.SLOW}:
            idp.fail_next(fault)
            responses.append(token_request(http, idp, secret=secret, **good))

    assert {r.status_code for r in responses} >= {200, 400, 401, 403, 429, 500, 503}
    for response in responses:
        exposed = response.text + repr(dict(response.headers))
        assert not any(leak in exposed for leak in leaks)


def test_server_writes_nothing_to_stdout_or_stderr(
    make_idp: MakeIdP, http: requests.Session, capfd: pytest.CaptureFixture[str]
) -> None:
    idp = make_idp("lucidworks")
    token = get_token(http, idp, scope="machinelearning.predict")
    call_api(http, idp, token)
    http.get(idp.base_url + "/nowhere", timeout=5)
    token_request(http, idp)
    idp.fail_next(Fault.RESET)
    with pytest.raises(requests.ConnectionError):
        token_request(http, idp)
    raw_exchange(idp, b"NOT AN HTTP REQUEST\r\n\r\n")
    idp.stop()

    out, err = capfd.readouterr()
    assert (out, err) == ("", "")


# ------------------------------------------------------------------- robustness


@pytest.mark.parametrize(
    ("content_type", "body", "status", "error"),
    [
        (None, "grant_type=client_credentials", 400, "invalid_request"),
        ("application/json", '{"grant_type": "client_credentials"}', 400, "invalid_request"),
        (FORM, "", 400, "invalid_request"),
        (FORM, "grant_type=password", 400, "unsupported_grant_type"),
        (
            FORM,
            "grant_type=client_credentials&grant_type=client_credentials",
            400,
            "invalid_request",
        ),
        (FORM, "grant_type=%ff", 400, "invalid_request"),
        (FORM + "; charset=utf-8", "grant_type=client_credentials", 200, None),
    ],
)
def test_token_request_validation(
    content_type: str | None,
    body: str,
    status: int,
    error: str | None,
    make_idp: MakeIdP,
    http: requests.Session,
) -> None:
    idp = make_idp("generic")
    headers = {"Authorization": rfc_basic(CLIENT, SECRET), "Content-Type": content_type}
    response = http.post(idp.token_url, data=body.encode(), headers=headers, timeout=5)
    assert response.status_code == status
    assert response.json().get("error") == error


def test_non_ascii_body_is_a_bad_request(make_idp: MakeIdP, http: requests.Session) -> None:
    idp = make_idp("generic")
    headers = {"Authorization": rfc_basic(CLIENT, SECRET), "Content-Type": FORM}
    response = http.post(idp.token_url, data="grant_type=ç".encode(), headers=headers, timeout=5)
    assert response.status_code == 400


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/oauth2/token", 405),
        ("PUT", "/oauth2/token", 405),
        # The protected API takes every method with a body (and wants a token first).
        ("POST", "/api/protected", 401),
        ("DELETE", "/api/protected/items/7", 401),
        ("OPTIONS", "/api/protected", 405),
        ("POST", "/api/protected/bytes/10", 405),
        ("GET", "/api/protectedx", 404),
        ("GET", "/nowhere", 404),
        ("POST", "/oauth2/token/", 404),
        ("HEAD", "/nowhere", 404),
    ],
)
def test_routing(
    method: str, path: str, status: int, make_idp: MakeIdP, http: requests.Session
) -> None:
    idp = make_idp("generic")
    response = http.request(method, idp.base_url + path, timeout=5)
    assert response.status_code == status


@pytest.mark.parametrize(
    "authorization", [None, "Bearer", "Bearer ", "Basic abc", "Bearer not-issued-here"]
)
def test_protected_endpoint_refuses_bad_bearer(
    authorization: str | None, make_idp: MakeIdP, http: requests.Session
) -> None:
    idp = make_idp("generic")
    response = http.get(idp.protected_url, headers={"Authorization": authorization}, timeout=5)
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_token"
    assert idp.protected_unauthorized == 1


def _post(path: str, *headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", *headers, "", ""]
    return "\r\n".join(lines).encode()


@pytest.mark.parametrize(
    ("shape", "data", "status"),
    [
        ("generic", _post("/oauth2/token", "Content-Length: abc"), 400),
        ("generic", _post("/oauth2/token", "Content-Length: -1"), 400),
        ("generic", _post("/oauth2/token", "Content-Length: 999999999"), 413),
        ("generic", _post("/oauth2/token", "Transfer-Encoding: chunked"), 411),
        ("generic", b"NOT AN HTTP REQUEST\r\n\r\n", 400),
        # No Content-Length and no body, with Basic auth: grant_type is missing.
        ("generic", _post("/oauth2/token", "Authorization: " + rfc_basic(CLIENT, SECRET)), 400),
        # Lucidtech's own curl example sends no body at all: that must work.
        (
            "lucidtech",
            _post(
                "/oauth2/token?grant_type=client_credentials",
                "Authorization: " + raw_basic(CLIENT, SECRET),
                "Content-Type: " + FORM,
            ),
            200,
        ),
    ],
    ids=["length-abc", "length-negative", "too-large", "chunked", "garbage", "no-body", "curl"],
)
def test_malformed_http_gets_4xx(shape: str, data: bytes, status: int, make_idp: MakeIdP) -> None:
    assert raw_exchange(make_idp(shape), data) == status


# -------------------------------------------------------------------- lifecycle


def test_context_manager_and_restart_on_the_same_url(http: requests.Session) -> None:
    with localidp.LocalIdP("generic") as idp:
        assert idp.base_url.startswith("http://127.0.0.1:")
        assert idp.token_url == idp.base_url + "/oauth2/token"
        assert idp.protected_url == idp.base_url + "/api/protected"
        token = get_token(http, idp)
        url = idp.base_url
    with pytest.raises(requests.ConnectionError):
        token_request(http, idp)

    with idp:  # back up at the same address, remembering its tokens
        assert idp.base_url == url
        assert call_api(http, idp, token) == 200


def test_constructor_and_lifecycle_errors() -> None:
    with pytest.raises(ValueError, match="unknown provider shape"):
        localidp.LocalIdP("nonesuch")
    for host in ("0.0.0.0", "localhost", "::1", "192.168.1.1"):
        with pytest.raises(ValueError, match="loopback"):
            localidp.LocalIdP(host=host)
    idp = localidp.LocalIdP()
    with pytest.raises(RuntimeError):
        _ = idp.base_url
    idp.stop()  # stopping a server that never started is harmless
    with idp, pytest.raises(RuntimeError):
        idp.start()


def test_concurrent_requests_are_all_counted(make_idp: MakeIdP) -> None:
    idp = make_idp("generic")
    statuses: list[int] = []

    def fetch() -> None:
        with requests.Session() as session:
            session.trust_env = False
            statuses.append(token_request(session, idp).status_code)

    threads = [threading.Thread(target=fetch) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert statuses == [200] * 16
    assert idp.token_requests == 16
    assert len({token.access_token for token in idp.issued}) == 16


# ------------------------------------------------------------- the loopback base


def test_no_python_version_in_the_server_header(make_idp: MakeIdP, http: requests.Session) -> None:
    idp = make_idp("generic")
    for response in (token_request(http, idp), http.get(idp.base_url + "/nowhere", timeout=5)):
        assert response.headers["Server"] == "localidp"


def test_stop_is_prompt_and_cuts_off_a_client_stalled_mid_request(make_idp: MakeIdP) -> None:
    idp = make_idp("generic")
    port = int(idp.base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(_post("/oauth2/token", "Content-Length: 100") + b"half a body")
        time.sleep(0.1)  # the handler waits for the rest (for up to its 10 s timeout)
        started = time.monotonic()
        idp.stop()
        assert time.monotonic() - started < 1.0
        sock.settimeout(2)
        try:
            answer = sock.recv(1024)
        except ConnectionResetError:
            answer = b""
        assert answer == b""  # the connection ended at once, with no response


def test_a_client_that_hung_up_leaves_no_traceback(
    make_idp: MakeIdP, capfd: pytest.CaptureFixture[str]
) -> None:
    idp = make_idp("generic")
    idp.fail_next(Fault.SLOW, slow_seconds=0.2)
    port = int(idp.base_url.rsplit(":", 1)[1])
    headers = ["Authorization: " + rfc_basic(CLIENT, SECRET), "Content-Type: " + FORM]
    body = b"grant_type=client_credentials"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(_post("/oauth2/token", *headers, f"Content-Length: {len(body)}") + body)
        # Hang up with a reset while the server waits: its answer meets a dead connection.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    deadline = time.monotonic() + 5
    while not idp.issued and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)
    idp.stop()
    assert len(idp.issued) == 1  # the handler ran to the end
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")


# ------------------------------------------- the protected API, as a proxy's upstream


MIB = 1024 * 1024


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def connect(idp: LocalIdP, timeout: float = 5) -> socket.socket:
    return socket.create_connection(("127.0.0.1", idp.port), timeout=timeout)


def send(sock: socket.socket, method: str, target: str, *headers: str, body: bytes = b"") -> None:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", *headers, "", ""]
    sock.sendall("\r\n".join(lines).encode() + body)


def answer(sock: socket.socket, method: str = "GET") -> HTTPResponse:
    """Read one response off a raw socket (http.client decodes the framing)."""
    response = HTTPResponse(sock, method=method)
    response.begin()
    return response


def read_until_closed(sock: socket.socket) -> tuple[bytes, OSError | None]:
    """Everything the server sends until it closes, and the error (a reset) it ended with."""
    data = b""
    try:
        while chunk := sock.recv(MIB):
            data += chunk
    except OSError as error:
        return data, error
    return data, None


def sha256_of(chunks: Iterable[bytes]) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    for chunk in chunks:
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


@pytest.fixture
def api(make_idp: MakeIdP, http: requests.Session) -> tuple[LocalIdP, str]:
    """A generic server and a live token for its protected API."""
    idp = make_idp("generic")
    return idp, get_token(http, idp)


def test_pattern_helpers() -> None:
    assert list(localidp.pattern_bytes(600)) == [i % 256 for i in range(600)]
    for n in (0, 1, 255, 256, 65535, 65536, 65537, 300_000):
        expected = hashlib.sha256(localidp.pattern_bytes(n)).hexdigest()
        assert localidp.pattern_sha256(n) == expected
    with pytest.raises(ValueError):
        localidp.pattern_bytes(-1)


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"])
def test_every_method_with_a_body_on_any_sub_path(
    method: str, api: tuple[LocalIdP, str], http: requests.Session
) -> None:
    idp, token = api
    body = b"payload \x00\xff" * 1000
    url = idp.protected_url + "/v1/items%2F7?q=1&q=2"
    response = http.request(method, url, data=body, headers=bearer(token), timeout=5)

    assert response.status_code == 200
    expected = {
        "ok": True,
        "method": method,
        "path": "/api/protected/v1/items%2F7",  # as sent, not decoded
        "body_bytes": len(body),
        "body_sha256": hashlib.sha256(body).hexdigest(),
    }
    if method == "HEAD":
        assert response.content == b""
        assert int(response.headers["Content-Length"]) == len(
            json.dumps(expected, separators=(",", ":"))
        )
    else:
        assert response.json() == expected
    (record,) = idp.protected_requests
    assert (record.method, record.path, record.query) == (method, expected["path"], "q=1&q=2")
    assert (record.body_bytes, record.body_sha256) == (len(body), expected["body_sha256"])
    assert record.status == 200
    assert record.header("authorization") == f"Bearer {token}"
    assert idp.protected_ok == 1


def test_chunked_upload_is_read_as_it_streams(
    api: tuple[LocalIdP, str], http: requests.Session
) -> None:
    idp, token = api
    pieces = [bytes([n % 251]) * (n * 7919 % 200_000 + 1) for n in range(160)]  # ~16 MiB
    size, digest = sha256_of(pieces)

    tracemalloc.start()
    try:
        # A generator body: requests sends it with Transfer-Encoding: chunked.
        response = http.post(idp.protected_url, data=iter(pieces), headers=bearer(token), timeout=5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert response.json()["body_bytes"] == size
    assert response.json()["body_sha256"] == digest
    assert idp.protected_requests[0].header("Transfer-Encoding") == "chunked"
    assert peak < 4 * MIB  # the server never held the body


def test_chunked_framing_is_decoded_exactly(api: tuple[LocalIdP, str]) -> None:
    idp, token = api
    # Lower- and upper-case hex, a chunk extension, and a trailer field.
    chunked = b"5\r\nhello\r\na;ext=1\r\n, chunked!\r\nA\r\n0123456789\r\n0\r\nX-Trailer: 1\r\n\r\n"
    with connect(idp) as sock:
        send(
            sock,
            "PUT",
            "/api/protected/upload",
            f"Authorization: Bearer {token}",
            "Transfer-Encoding: chunked",
            body=chunked,
        )
        payload = json.loads(answer(sock).read())
    assert payload["body_bytes"] == 25
    assert payload["body_sha256"] == hashlib.sha256(b"hello, chunked!0123456789").hexdigest()


@pytest.mark.parametrize(
    ("headers", "body", "status"),
    [
        (["Transfer-Encoding: chunked"], b"zz\r\nhello\r\n0\r\n\r\n", 400),
        (["Transfer-Encoding: chunked"], b"3\r\nhello\r\n0\r\n\r\n", 400),
        (["Transfer-Encoding: chunked", "Content-Length: 5"], b"hello", 400),
        (["Transfer-Encoding: gzip, chunked"], b"0\r\n\r\n", 501),
        (["Content-Length: 5", "Content-Length: 6"], b"hello!", 400),
        (["Content-Length: +5"], b"hello", 400),
        (["Transfer-Encoding: chunked"], b"20000001\r\n", 413),  # 512 MiB + 1 in one chunk
        ([f"Content-Length: {512 * MIB + 1}"], b"", 413),
    ],
    ids=[
        "bad-size",
        "chunk-too-long",
        "both-framings",
        "unknown-coding",
        "two-lengths",
        "signed-length",
        "chunk-over-cap",
        "length-over-cap",
    ],
)
def test_bad_framing_is_refused_and_closes(
    headers: list[str], body: bytes, status: int, make_idp: MakeIdP
) -> None:
    idp = make_idp("generic")
    with connect(idp) as sock:
        send(sock, "POST", "/api/protected", *headers, body=body)
        data, _ = read_until_closed(sock)  # the server closes after answering
    assert data.startswith(f"HTTP/1.1 {status} ".encode())
    assert b"\r\nConnection: close\r\n" in data
    assert idp.protected_requests == []


def test_expect_100_continue_is_answered_once_the_framing_is_known(
    api: tuple[LocalIdP, str],
) -> None:
    idp, token = api
    with connect(idp) as sock:
        auth, expect = f"Authorization: Bearer {token}", "Expect: 100-continue"
        send(sock, "POST", "/api/protected", auth, expect, "Content-Length: 5")
        assert sock.recv(1024) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"hello")
        assert json.loads(answer(sock).read())["body_bytes"] == 5

        send(sock, "POST", "/api/protected", auth, expect, f"Content-Length: {600 * MIB}")
        data, _ = read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 413 ")  # refused at once: no 100, no body sent


@pytest.mark.parametrize("shape", ["generic", "lucidtech"])
def test_refusals_drain_the_body_and_keep_the_connection(
    shape: str, make_idp: MakeIdP, http: requests.Session
) -> None:
    idp = make_idp(shape)
    token = get_token(http, idp)
    body = bytes(3 * MIB)
    key = {"x-api-key": "demo-api-key"} if shape == "lucidtech" else {}
    # Lucidtech's API refuses a good token without its key; the others, no token at all.
    wrong = bearer(token) if shape == "lucidtech" else {}
    refused = http.post(idp.protected_url, data=body, headers=wrong, timeout=5)
    chunked = http.put(idp.protected_url, data=iter([body]), headers=wrong, timeout=5)
    fine = http.post(idp.protected_url, data=body, headers={**bearer(token), **key}, timeout=5)

    expected = 403 if shape == "lucidtech" else 401
    assert [refused.status_code, chunked.status_code, fine.status_code] == [expected] * 2 + [200]
    if expected == 401:
        assert refused.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
        assert refused.json()["error"] == "invalid_token"
    records = idp.protected_requests
    assert [r.status for r in records] == [expected, expected, 200]
    assert {r.body_bytes for r in records} == {len(body)}  # read in full before refusing
    assert len({r.connection for r in records}) == 1  # so the connection stayed usable
    counts = (idp.protected_ok, idp.protected_unauthorized, idp.protected_forbidden)
    assert counts == ((1, 0, 2) if shape == "lucidtech" else (1, 2, 0))


def test_large_download_is_streamed_with_a_content_length(
    api: tuple[LocalIdP, str], http: requests.Session
) -> None:
    idp, token = api
    size = 100 * MIB
    url = f"{idp.base_url}{localidp.PATTERN_PATH}/{size}"
    tracemalloc.start()
    try:
        with http.get(url, headers=bearer(token), stream=True, timeout=5) as response:
            assert response.status_code == 200
            assert response.headers["Content-Length"] == str(size)
            assert response.headers["Content-Type"] == "application/octet-stream"
            received = sha256_of(response.iter_content(MIB))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert received == (size, localidp.pattern_sha256(size))
    assert peak < 8 * MIB  # neither side built the body whole
    assert idp.protected_requests[0].status == 200


def test_chunked_download_is_http11_chunks(api: tuple[LocalIdP, str]) -> None:
    idp, token = api
    size = 5 * MIB + 123
    with connect(idp) as sock:
        target = f"{localidp.PATTERN_PATH}/{size}?chunked=1"
        send(sock, "GET", target, f"Authorization: Bearer {token}")
        response = answer(sock)
        assert response.version == 11
        assert response.getheader("Transfer-Encoding") == "chunked"
        assert response.getheader("Content-Length") is None
        assert sha256_of(iter(lambda: response.read(MIB), b"")) == (
            size,
            localidp.pattern_sha256(size),
        )

    with connect(idp) as sock:  # the framing itself, on the wire
        target = f"{localidp.PATTERN_PATH}/300?chunked=1"
        send(sock, "GET", target, f"Authorization: Bearer {token}", "Connection: close")
        data, _ = read_until_closed(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"\r\nTransfer-Encoding: chunked\r\n" in head + b"\r\n"
    assert body == b"12c\r\n" + localidp.pattern_bytes(300) + b"\r\n0\r\n\r\n"


def test_a_gib_download_starts_at_once_and_a_hang_up_is_quiet(
    api: tuple[LocalIdP, str], http: requests.Session, capfd: pytest.CaptureFixture[str]
) -> None:
    idp, token = api
    target = f"{localidp.PATTERN_PATH}/{1024 * MIB}"
    head = http.head(idp.base_url + target, headers=bearer(token), timeout=5)
    assert (head.status_code, head.headers["Content-Length"], head.content) == (
        200,
        str(1024 * MIB),
        b"",
    )
    started = time.monotonic()
    with connect(idp) as sock:
        send(sock, "GET", target, f"Authorization: Bearer {token}")
        response = answer(sock)
        assert response.getheader("Content-Length") == str(1024 * MIB)
        assert response.read(4 * MIB) == localidp.pattern_bytes(4 * MIB)
        assert time.monotonic() - started < 2  # the body is made as it is sent
        # Hang up mid-stream, with a reset: the server's next write fails.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    assert call_api(http, idp, token) == 200
    idp.stop()
    assert capfd.readouterr() == ("", "")


def test_delay_waits_then_judges_the_token(make_idp: MakeIdP, http: requests.Session) -> None:
    idp = make_idp("lucidworks")
    old = get_token(http, idp, scope="machinelearning.predict")
    statuses: dict[str, int] = {}

    def call(name: str, token: str) -> None:
        with requests.Session() as session:
            session.trust_env = False
            url = idp.protected_url + "?delay=0.3"
            statuses[name] = session.get(url, headers=bearer(token), timeout=5).status_code

    model = get_token(http, idp, scope="machinelearning.model")
    started = time.monotonic()
    threads = [
        threading.Thread(target=call, args=("revoked", old)),
        threading.Thread(target=call, args=("kept", model)),
    ]
    for thread in threads:
        thread.start()
    get_token(http, idp, scope="machinelearning.predict")  # revokes `old` during the delay
    for thread in threads:
        thread.join()
    assert time.monotonic() - started >= 0.3
    assert statuses == {"revoked": 401, "kept": 200}


def test_a_long_delay_times_the_client_out_and_stop_is_prompt(
    api: tuple[LocalIdP, str], http: requests.Session
) -> None:
    idp, token = api
    with pytest.raises(requests.Timeout):
        http.post(idp.protected_url + "?delay=30", data=b"x", headers=bearer(token), timeout=0.2)
    started = time.monotonic()
    idp.stop()
    assert time.monotonic() - started < 1.0


def test_delay_body_sends_the_head_and_first_chunk_then_waits(api: tuple[LocalIdP, str]) -> None:
    idp, token = api
    target = f"{localidp.PATTERN_PATH}/{MIB}"
    with connect(idp, timeout=5) as sock:
        send(sock, "GET", target + "?delay_body=0.3", f"Authorization: Bearer {token}")
        started = time.monotonic()
        response = answer(sock)
        assert response.read(65536) == localidp.pattern_bytes(65536)
        assert time.monotonic() - started < 0.3
        rest = response.read()
        assert time.monotonic() - started >= 0.3
    assert localidp.pattern_bytes(65536) + rest == localidp.pattern_bytes(MIB)

    with connect(idp, timeout=0.2) as sock:  # a client whose read timeout is shorter
        send(sock, "GET", target + "?delay_body=30", f"Authorization: Bearer {token}")
        response = answer(sock)
        assert response.getheader("Content-Length") == str(MIB)
        response.read(65536)
        with pytest.raises(TimeoutError):
            response.read(1)
        started = time.monotonic()
        idp.stop()
        assert time.monotonic() - started < 1.0


def test_reset_answers_nothing(api: tuple[LocalIdP, str], http: requests.Session) -> None:
    idp, token = api
    with pytest.raises(requests.ConnectionError):
        http.post(idp.protected_url + "/x?reset=1", data=b"body", headers=bearer(token), timeout=5)
    assert call_api(http, idp, token) == 200
    assert [r.status for r in idp.protected_requests] == [0, 200]
    assert idp.protected_requests[0].body_bytes == 4
    assert idp.protected_ok == 1  # a reset is not judged


@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
def test_reset_after_cuts_the_body_short(
    chunked: bool, api: tuple[LocalIdP, str], http: requests.Session
) -> None:
    idp, token = api
    query = "?reset_after=100000" + ("&chunked=1" if chunked else "")
    with connect(idp) as sock:
        send(sock, "GET", f"{localidp.PATTERN_PATH}/{MIB}{query}", f"Authorization: Bearer {token}")
        data, error = read_until_closed(sock)
    assert isinstance(error, ConnectionResetError)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    if chunked:  # chunk by chunk, and never the last chunk
        assert body == (
            _frame(localidp.pattern_bytes(65536)) + _frame(localidp.pattern_bytes(34464))
        )
    else:
        assert f"\r\nContent-Length: {MIB}\r\n".encode() in head + b"\r\n"
        assert body == localidp.pattern_bytes(100_000)  # every byte promised, then the reset

    url = f"{idp.base_url}{localidp.PATTERN_PATH}/{MIB}{query}"
    with (
        pytest.raises((requests.ConnectionError, requests.exceptions.ChunkedEncodingError)),
        http.get(url, headers=bearer(token), stream=True, timeout=5) as response,
    ):
        response.content  # noqa: B018


def _frame(piece: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(piece), piece)


def test_protected_api_keeps_connections_alive(
    api: tuple[LocalIdP, str], http: requests.Session
) -> None:
    idp, token = api
    first = http.get(idp.protected_url, headers=bearer(token), timeout=5)
    second = http.post(idp.protected_url + "/b", data=b"x", headers=bearer(token), timeout=5)
    assert (first.status_code, second.status_code) == (200, 200)
    assert first.raw.version == 11 and "Connection" not in first.headers
    records = idp.protected_requests
    assert len(records) == 2 and records[0].connection == records[1].connection

    # One raw socket: several answers, then `Connection: close` ends it.
    with connect(idp) as sock:
        send(sock, "GET", "/api/protected", f"Authorization: Bearer {token}")
        assert answer(sock).read()
        send(sock, "HEAD", f"{localidp.PATTERN_PATH}/10", f"Authorization: Bearer {token}")
        assert answer(sock, "HEAD").getheader("Content-Length") == "10"
        send(sock, "GET", "/api/protected", "Connection: close")
        closing = answer(sock)
        assert (closing.status, closing.getheader("Connection")) == (401, "close")
        closing.read()
        assert read_until_closed(sock) == (b"", None)
    assert len({r.connection for r in idp.protected_requests[2:]}) == 1


def test_token_endpoint_still_answers_http10_once_per_connection(
    api: tuple[LocalIdP, str],
) -> None:
    idp, token = api
    with connect(idp) as sock:
        send(sock, "GET", "/api/protected", f"Authorization: Bearer {token}")
        assert answer(sock).read()  # kept alive...
        send(sock, "GET", idp.shape.token_path)  # ...until a token endpoint request
        data, _ = read_until_closed(sock)
    assert data.startswith(b"HTTP/1.0 405 ")
    assert b"Connection:" not in data


def test_an_http10_client_gets_no_chunks_and_a_closed_connection(
    api: tuple[LocalIdP, str],
) -> None:
    idp, token = api
    with connect(idp) as sock:
        target = f"{localidp.PATTERN_PATH}/300?chunked=1"
        request = f"GET {target} HTTP/1.0\r\nAuthorization: Bearer {token}\r\n\r\n"
        sock.sendall(request.encode())
        data, _ = read_until_closed(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"Content-Length: 300" in head and b"chunked" not in head
    assert body == localidp.pattern_bytes(300)


def test_an_idle_kept_alive_connection_is_closed(api: tuple[LocalIdP, str]) -> None:
    idp, token = api
    idp.connection_timeout = 0.3
    with connect(idp) as sock:
        send(sock, "GET", "/api/protected", f"Authorization: Bearer {token}")
        assert answer(sock).read()
        started = time.monotonic()
        assert read_until_closed(sock) == (b"", None)
        assert 0.2 <= time.monotonic() - started < 3


def test_stop_ends_kept_alive_connections_at_once(
    api: tuple[LocalIdP, str], http: requests.Session
) -> None:
    idp, token = api
    with connect(idp) as sock:
        send(sock, "GET", "/api/protected", f"Authorization: Bearer {token}")
        assert answer(sock).read()
        started = time.monotonic()
        idp.stop()
        assert time.monotonic() - started < 1.0
        sock.settimeout(1)
        assert read_until_closed(sock)[0] == b""


@pytest.mark.parametrize(
    "target",
    [
        "/api/protected?delay=-1",
        "/api/protected?delay=soon",
        "/api/protected?delay=nan",
        "/api/protected?delay_body=99999",
        "/api/protected?reset=maybe",
        "/api/protected?chunked=2",
        f"{localidp.PATTERN_PATH}/10?reset_after=-5",
        "/api/protected?delay=0&delay=1",
        f"{localidp.PATTERN_PATH}/ten",
        f"{localidp.PATTERN_PATH}/",
        f"{localidp.PATTERN_PATH}/{17 * 1024**3}",
    ],
)
def test_bad_parameters_are_a_bad_request(target: str, api: tuple[LocalIdP, str]) -> None:
    idp, token = api
    with requests.Session() as session:
        session.trust_env = False
        response = session.get(idp.base_url + target, headers=bearer(token), timeout=5)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"


def test_the_apis_own_parameters_pass(api: tuple[LocalIdP, str], http: requests.Session) -> None:
    idp, token = api
    url = idp.protected_url + "/search?q=a&q=b&flag&delay_ms=5"
    assert http.get(url, headers=bearer(token), timeout=5).status_code == 200
    assert idp.protected_requests[0].query == "q=a&q=b&flag&delay_ms=5"


def test_the_record_keeps_headers_in_order_is_bounded_and_hides_secrets(
    make_idp: MakeIdP, http: requests.Session
) -> None:
    idp = make_idp("lucidtech", record_limit=3)
    token = get_token(http, idp)
    with connect(idp) as sock:
        headers = ["X-Zeta: 1", "X-Alpha: 2", "X-Zeta: 3", "x-api-key: demo-api-key"]
        send(sock, "PATCH", "/api/protected/p?x=1", *headers, f"Authorization: Bearer {token}")
        answer(sock).read()
    for n in range(3):
        call_api(http, idp, token, **{"x-api-key": "demo-api-key", "X-N": str(n)})

    records = idp.protected_requests
    assert [r.header("X-N") for r in records] == ["0", "1", "2"]  # the oldest fell out
    with connect(idp) as sock:
        send(sock, "PATCH", "/api/protected/p?x=1", *headers, f"Authorization: Bearer {token}")
        answer(sock).read()
    last = idp.protected_requests[-1]
    assert [name for name, _ in last.headers][:5] == ["Host", *(h.split(":")[0] for h in headers)]
    assert last.header_values("x-zeta") == ("1", "3")
    assert last.header("X-Missing") is None
    assert (last.method, last.path, last.query, last.status) == (
        "PATCH",
        "/api/protected/p",
        "x=1",
        200,
    )
    assert last.body_sha256 == hashlib.sha256(b"").hexdigest()
    assert token not in repr(last) and "demo-api-key" not in repr(last)
    assert "X-Alpha" in repr(last)
