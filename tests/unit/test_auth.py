"""Unit tests for the server side of sidecar/coordinator/auth.py: `verify_bearer`."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import jwt
import pytest

from sidecar.coordinator.auth import TokenSource, verify_bearer
from sidecar.errors import Unauthorized

KEY = "unit-test-hmac-key-" + "0123456789abcdef" * 3  # 64 bytes: enough for HS512
OTHER_KEY = "another-hmac-key-" + "fedcba9876543210" * 3
AUD = "gts-coordinator"


def make(claims: dict[str, Any] | None = None, *, key: str = KEY, alg: str = "HS256") -> str:
    now = int(time.time())
    payload: dict[str, Any] = {"sub": "sidecar-a", "aud": AUD, "iat": now, "exp": now + 600}
    payload.update(claims or {})
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode(payload, key, algorithm=alg)


def unsigned(header: dict[str, Any], payload: dict[str, Any]) -> str:
    def b64(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{b64(header)}.{b64(payload)}."


def accept(token: str, **kw: Any) -> dict[str, Any]:
    kw.setdefault("algorithms", ["HS256"])
    kw.setdefault("audience", AUD)
    return verify_bearer(f"Bearer {token}", kw.pop("key", KEY), **kw)


def reject(header: str | None, reason: str, **kw: Any) -> Unauthorized:
    kw.setdefault("algorithms", ["HS256"])
    kw.setdefault("audience", AUD)
    with pytest.raises(Unauthorized) as info:
        verify_bearer(header, kw.pop("key", KEY), **kw)
    err = info.value
    assert err.status == 401 and err.code == "UNAUTHORIZED"
    assert reason in err.message, err.message
    return err


def test_valid_token_gives_its_claims() -> None:
    claims = accept(make({"scope": "tm"}))
    assert claims["sub"] == "sidecar-a" and claims["scope"] == "tm" and claims["aud"] == AUD


def test_scheme_is_case_insensitive_and_aud_may_be_a_list() -> None:
    assert verify_bearer(
        "bearer " + make({"aud": ["other", AUD]}), KEY, algorithms=["HS256"], audience=AUD
    )


def test_expired() -> None:
    now = int(time.time())
    reject("Bearer " + make({"iat": now - 700, "exp": now - 60}), "token expired")


def test_expiry_within_leeway_is_accepted() -> None:
    now = int(time.time())
    accept(make({"iat": now - 700, "exp": now - 2}))
    reject("Bearer " + make({"iat": now - 700, "exp": now - 2}), "expired", leeway_s=0)


def test_not_yet_valid() -> None:
    reject("Bearer " + make({"nbf": int(time.time()) + 120}), "not yet valid")


def test_wrong_audience() -> None:
    reject("Bearer " + make({"aud": "someone-else"}), "wrong audience")


def test_audience_required_when_configured() -> None:
    reject("Bearer " + make({"aud": None}), "missing required claim 'aud'")


def test_token_with_aud_refused_when_no_audience_is_configured() -> None:
    reject("Bearer " + make(), "wrong audience", audience=None)
    assert (
        verify_bearer("Bearer " + make({"aud": None}), KEY, algorithms=["HS256"], audience=None)[
            "sub"
        ]
        == "sidecar-a"
    )


def test_exp_is_required() -> None:
    reject("Bearer " + make({"exp": None}), "missing required claim 'exp'")


def test_claim_of_the_wrong_type() -> None:
    reject("Bearer " + make({"iat": "yesterday"}), "invalid token (InvalidIssuedAtError)")


def test_wrong_key() -> None:
    reject("Bearer " + make(key=OTHER_KEY), "bad signature")


def test_tampered_payload() -> None:
    head, _, sig = make().split(".")
    now = int(time.time())
    forged = unsigned({"alg": "HS256", "typ": "JWT"}, {"aud": AUD, "exp": now + 600}).split(".")
    reject(f"Bearer {head}.{forged[1]}.{sig}", "bad signature")


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_is_refused(alg: str) -> None:
    now = int(time.time())
    token = unsigned({"alg": alg, "typ": "JWT"}, {"aud": AUD, "iat": now, "exp": now + 600})
    reject(f"Bearer {token}", "algorithm not allowed")
    # even if someone put "none" in the allow-list
    reject(f"Bearer {token}", "algorithm not allowed", algorithms=["none", "HS256"])


def test_alg_not_in_the_allow_list() -> None:
    reject("Bearer " + make(alg="HS512"), "algorithm not allowed")
    accept(make(alg="HS512"), algorithms=["HS256", "HS512"])


def test_alg_confusion_rs256_header_with_hmac_key() -> None:
    # a token claiming RS256 but signed with HMAC over the "public key" must not pass
    now = int(time.time())
    token = unsigned({"alg": "RS256", "typ": "JWT"}, {"aud": AUD, "exp": now + 600})
    reject(f"Bearer {token}", "algorithm not allowed")


@pytest.mark.parametrize(
    "header", [None, "", "   ", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Token abc"]
)
def test_missing_bearer(header: str | None) -> None:
    reject(header, "missing bearer token")


@pytest.mark.parametrize("token", ["abc", "a.b.c", "e30.e30", "\u00e9.\u00e9.\u00e9"])
def test_malformed_token(token: str) -> None:
    reject(f"Bearer {token}", "malformed token")


def test_messages_never_echo_the_token() -> None:
    token = make(key=OTHER_KEY)
    err = reject(f"Bearer {token}", "bad signature")
    assert token not in err.message and token[-20:] not in err.message


def test_token_source_validates_its_arguments() -> None:
    def factory() -> Any:
        raise AssertionError("no session is made before the first token() call")

    with pytest.raises(ValueError):
        TokenSource(factory, "http://127.0.0.1:1/token", "ak", refresh_at=0)
    with pytest.raises(ValueError):
        TokenSource(factory, "http://127.0.0.1:1/token", "ak", refresh_at=1.5)
    with pytest.raises(ValueError):
        TokenSource(factory, "http://127.0.0.1:1/token", "")
    with pytest.raises(ValueError):
        TokenSource(factory, "http://127.0.0.1:1/token", "ak", algorithms=["none"])
    src = TokenSource(factory, "http://127.0.0.1:1/token", "secret-access-key")
    assert "secret-access-key" not in repr(src)
