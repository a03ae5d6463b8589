"""Expiry is known, not guessed (rule 3 of docs/design.md)."""

from __future__ import annotations

import jwt
import pytest

from refresher.errors import Reason, RefreshError
from refresher.tokens import compute_expiry, fingerprint, jwt_claims, stored_times

NOW = 1_800_000_000.0


def make_jwt(**claims: object) -> str:
    return jwt.encode(claims, "k" * 32, algorithm="HS256")


def test_earlier_of_exp_and_expires_in_wins() -> None:
    token = make_jwt(exp=int(NOW) + 3600, iat=int(NOW))
    assert compute_expiry(token, 600.0, NOW, None) == (NOW, NOW + 600)
    assert compute_expiry(token, 7200.0, NOW, None) == (NOW, NOW + 3600)


def test_jwt_without_expires_in_uses_exp() -> None:
    token = make_jwt(exp=int(NOW) + 100)
    assert compute_expiry(token, None, NOW, None)[1] == NOW + 100


def test_host_clock_behind_the_idp_uses_the_safe_lifetime(caplog: pytest.LogCaptureFixture) -> None:
    # The IdP's clock is 10 minutes ahead: exp looks 70 minutes away to us, but the token
    # lives 60 minutes from the moment we received it.
    idp_now = int(NOW) + 600
    token = make_jwt(iat=idp_now, exp=idp_now + 3600)
    _, expires_at = compute_expiry(token, None, NOW, None)
    assert expires_at == NOW + 3600
    assert "clock skew" in caplog.text


def test_opaque_token_uses_expires_in_or_the_configured_lifetime() -> None:
    assert compute_expiry("opaque-abc", 300.0, NOW, None)[1] == NOW + 300
    assert compute_expiry("opaque-abc", None, NOW, 900.0)[1] == NOW + 900


def test_neither_exp_nor_expires_in_is_an_error_naming_the_fix() -> None:
    with pytest.raises(RefreshError) as caught:
        compute_expiry("opaque-abc", None, NOW, None)
    assert caught.value.reason is Reason.INVALID_RESPONSE
    assert "lifetime" in caught.value.message


def test_already_expired_token_is_rejected() -> None:
    with pytest.raises(RefreshError, match="already expired"):
        compute_expiry(make_jwt(exp=int(NOW) - 10), None, NOW, None)


@pytest.mark.parametrize("bad", ["a.b.c", "x.y", "", "...", "eyJhbGciOiJub25lIn0.e30."])
def test_malformed_jwts_are_treated_as_opaque(bad: str) -> None:
    assert jwt_claims(bad) is None or jwt_claims(bad) == {}


def test_nonsense_claims_are_ignored() -> None:
    token = make_jwt(exp="tomorrow", iat=True)
    assert compute_expiry(token, 60.0, NOW, None)[1] == NOW + 60


def test_stored_jwt_times() -> None:
    token = make_jwt(exp=int(NOW) + 100, iat=int(NOW) - 50)
    assert stored_times(token, NOW) == (NOW - 50, NOW + 100)
    assert stored_times(make_jwt(exp=int(NOW) + 100), NOW) == (NOW, NOW + 100)
    assert stored_times("opaque", NOW) is None


def test_fingerprint_is_short_and_stable() -> None:
    assert fingerprint("abc") == "ba7816bf"
    assert len(fingerprint("x" * 5000)) == 8
