"""GTS REST v1 on the peer listener over real sockets: the routes, their body checks, and the
signature gate in front of them (docs/signing.md). The sidecar runs its local coordinator on a
memory journal with a configured key (k1); branches are a real HTTP server that answers the
signed phase-two callbacks."""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from sidecar.config import CoordinatorConfig
from sidecar.coordinator.client import RemoteCoordinator
from sidecar.coordinator.states import BranchStatus, BranchType, GlobalStatus
from sidecar.errors import TransactionNotFound
from sidecar.metrics import Metrics
from tests.component.gts import (
    SECRET_K0,
    SECRET_K1,
    BranchServer,
    SignedClient,
    now_ms,
    ring,
    signing_config,
    xid_path,
)
from tests.component.servers import Client, sample

START = "/api/v1/transaction/start"
REGISTER = "/api/v1/branch/register"
REPORT = "/api/v1/branch/report"
FAILURES = "gts_sidecar_signature_failures_total"

# sidecar/coordinator/server.py stores the body under a str request key, which aiohttp 3.14
# warns about once per process: under filterwarnings=error that first request is a 500 (see
# test_the_first_signed_request_is_not_a_500 below); the other tests look past it.
pytestmark = pytest.mark.filterwarnings("ignore::aiohttp.web_exceptions.NotAppKeyWarning")


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def branches() -> AsyncIterator[BranchServer]:
    server = await BranchServer(keys=ring()).start()
    yield server
    await server.close()


@pytest.fixture
async def peer(sidecar_factory, tmp_path, session):
    sc = await sidecar_factory(signing_config(tmp_path))
    return sc, SignedClient(session, sc.ports["peer"], ring())


async def status_of(sc: Any, xid: str) -> GlobalStatus:
    return (await sc.control.engine.get(xid))[0].status


# --- happy paths ------------------------------------------------------------------------------


async def test_start_status_commit_without_branches(peer):
    sc, client = peer
    reply = await client.call("POST", START, {"name": "create-order", "timeoutMs": 30_000})
    assert reply.status == 200
    body = reply.json()
    xid = body["xid"]
    assert body == {"xid": xid, "status": "Begin", "timeoutMs": 30_000}
    assert xid.startswith(f"127.0.0.1:{sc.ports['peer']}:")
    assert sc.control.engine.active == 1

    reply = await client.call("GET", xid_path(xid))
    assert reply.status == 200
    got = reply.json()
    assert got["xid"] == xid and got["status"] == "Begin"
    assert (got["name"], got["timeoutMs"], got["branches"]) == ("create-order", 30_000, [])
    assert isinstance(got["beginTime"], int)

    reply = await client.call("POST", xid_path(xid, "/commit"))
    assert (reply.status, reply.json()) == (200, {"xid": xid, "status": "Committed"})
    reply = await client.call("GET", xid_path(xid))
    assert reply.json()["status"] == "Committed"
    # a repeated commit is answered with the outcome
    reply = await client.call("POST", xid_path(xid, "/commit"))
    assert (reply.status, reply.json()["status"]) == (200, "Committed")
    assert sc.control.engine.active == 0


async def test_an_xid_with_plain_colons_in_the_path_works_too(peer):
    sc, client = peer
    xid = await client.start()
    reply = await client.call("GET", f"/api/v1/transaction/{xid}")
    assert (reply.status, reply.json()["xid"]) == (200, xid)


async def test_start_without_timeout_uses_the_default(peer):
    _, client = peer
    xid = await client.start(timeout_ms=None)
    reply = await client.call("GET", xid_path(xid))
    assert reply.json()["timeoutMs"] == 60_000


async def test_register_report_commit_calls_the_branch_signed(peer, branches):
    sc, client = peer
    xid = await client.start()
    bid = await client.register(xid, branches.url("stock"))
    assert isinstance(bid, str) and bid.isdigit()  # a 64-bit id travels as a string
    reply = await client.report(xid, bid)
    assert (reply.status, reply.json()) == (
        200,
        {"xid": xid, "branchId": bid, "status": "PhaseOne_Done"},
    )
    got = (await client.call("GET", xid_path(xid))).json()
    assert got["branches"] == [
        {
            "branchId": bid,
            "branchType": "TCC",
            "resourceId": "stock",
            "status": "PhaseOne_Done",
            "attempts": 0,
            "stuck": False,
            "lastError": None,
        }
    ]

    reply = await client.call("POST", xid_path(xid, "/commit"))
    assert (reply.status, reply.json()) == (200, {"xid": xid, "status": "Committed"})
    (cb,) = branches.calls
    assert cb.path == "/branches/stock/commit"
    assert cb.body == {
        "xid": xid,
        "branchId": bid,
        "resourceId": "stock",
        "applicationData": {"sku": "A-1", "n": 2},
    }
    assert cb.headers["XID"] == xid
    assert cb.headers["Idempotency-Key"] == f"{xid}:{bid}:commit"
    assert cb.signature_error is None
    got = (await client.call("GET", xid_path(xid))).json()
    assert got["status"] == "Committed"
    assert got["branches"][0]["status"] == "PhaseTwo_Committed"


async def test_rollback_compensates_in_reverse_registration_order(peer, branches):
    sc, client = peer
    xid = await client.start()
    for rid in ("first", "second", "third"):
        bid = await client.register(xid, branches.url(rid), rid, "SAGA")
        assert (await client.report(xid, bid)).status == 200
    reply = await client.call("POST", xid_path(xid, "/rollback"))
    assert (reply.status, reply.json()) == (200, {"xid": xid, "status": "Rollbacked"})
    assert branches.phases() == [
        ("third", "rollback"),
        ("second", "rollback"),
        ("first", "rollback"),
    ]


async def test_a_failed_phase_one_turns_commit_into_rollback(peer, branches):
    sc, client = peer
    xid = await client.start()
    ok = await client.register(xid, branches.url("ok"), "ok")
    bad = await client.register(xid, branches.url("bad"), "bad")
    await client.report(xid, ok)
    reply = await client.report(xid, bad, "PhaseOne_Failed")
    assert reply.json()["status"] == "PhaseOne_Failed"
    reply = await client.call("POST", xid_path(xid, "/commit"))
    assert reply.json()["status"] == "Rollbacked"
    assert branches.phases() == [("bad", "rollback"), ("ok", "rollback")]


async def test_register_after_the_decision_is_409(peer, branches):
    sc, client = peer
    xid = await client.start()
    await client.call("POST", xid_path(xid, "/commit"))
    reply = await client.call(
        "POST",
        REGISTER,
        {
            "xid": xid,
            "branchType": "TCC",
            "resourceId": "late",
            "callbackUrl": branches.url("late"),
        },
    )
    assert reply.status == 409
    assert reply.error["code"] == "TRANSACTION_NOT_ACTIVE"


async def test_remote_coordinator_talks_to_the_peer_listener(peer, branches):
    sc, _ = peer
    cfg = CoordinatorConfig(endpoints=[f"http://127.0.0.1:{sc.ports['peer']}"])
    metrics = Metrics()
    remote = RemoteCoordinator(cfg, ring(), metrics)
    try:
        state = await remote.begin("via-client", 20_000)
        assert state.status == "Begin"
        bid = await remote.register(
            state.xid, BranchType.TCC, "stock", branches.url("stock"), b'{"n":1}'
        )
        await remote.report(state.xid, bid, BranchStatus.PHASE_ONE_DONE)
        status = await remote.status(state.xid)
        assert [b["branchId"] for b in status["branches"]] == [str(bid)]
        done = await remote.commit(state.xid)
        assert (done.xid, done.status) == (state.xid, "Committed")
        with pytest.raises(TransactionNotFound):
            await remote.status(f"127.0.0.1:{sc.ports['peer']}:1")
    finally:
        await remote.close()
    assert branches.phases() == [("stock", "commit")]
    assert sample(sc, FAILURES, reason="mismatch") == 0


async def test_the_first_signed_request_is_not_a_500(peer):
    sc, client = peer
    # make this request the process's first use of the key, whatever ran before
    seen = getattr(web.BaseRequest, "_seen_str_keys", set())
    seen.discard("body")
    with warnings.catch_warnings():
        warnings.simplefilter("error", web.NotAppKeyWarning)  # as pyproject's filterwarnings
        reply = await client.call("POST", START, {"name": "create-order"})
    assert reply.status == 200, reply.raw


# --- idempotency ----------------------------------------------------------------------------------


async def test_a_retried_start_with_the_same_key_returns_the_same_xid(peer):
    sc, client = peer
    body = {"name": "create-order", "timeoutMs": 30_000}
    first = await client.call("POST", START, body, idempotency_key="start-0001")
    again = await client.call("POST", START, body, idempotency_key="start-0001")  # new nonce
    assert first.status == again.status == 200
    assert again.json()["xid"] == first.json()["xid"]
    assert sc.control.engine.active == 1
    other = await client.call(
        "POST", START, {"name": "other", "timeoutMs": 30_000}, idempotency_key="start-0001"
    )
    assert other.status == 422
    assert other.error["code"] == "IDEMPOTENCY_KEY_REUSED"
    assert sc.control.engine.active == 1
    fresh = await client.call("POST", START, body, idempotency_key="start-0002")
    assert fresh.json()["xid"] != first.json()["xid"]


async def test_a_retried_register_with_the_same_key_returns_the_same_branch(peer, branches):
    sc, client = peer
    xid = await client.start()
    body = {
        "xid": xid,
        "branchType": "TCC",
        "resourceId": "stock",
        "callbackUrl": branches.url("stock"),
        "applicationData": {"n": 1},
    }
    first = await client.call("POST", REGISTER, body, idempotency_key="reg-1")
    again = await client.call("POST", REGISTER, body, idempotency_key="reg-1")
    assert first.status == again.status == 200
    assert first.json()["branchId"] == again.json()["branchId"]
    changed = await client.call(
        "POST", REGISTER, {**body, "resourceId": "other"}, idempotency_key="reg-1"
    )
    assert changed.status == 422
    assert len((await sc.control.engine.get(xid))[1]) == 1


# --- bodies -----------------------------------------------------------------------------------

XID_SLOT = "<xid>"


def _register(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "xid": XID_SLOT,
        "branchType": "TCC",
        "resourceId": "stock",
        "callbackUrl": "http://127.0.0.1:9/branches/stock",
        "applicationData": {"n": 1},
    }
    for key, value in over.items():
        if value is _DROP:
            body.pop(key)
        else:
            body[key] = value
    return body


_DROP = object()

BAD_BODIES: list[tuple[str, str, Any, str]] = [
    ("start-not-json", START, b'{"name": "x",', "not valid JSON"),
    ("start-empty", START, b"", "JSON object"),
    ("start-array", START, b'["create-order"]', "JSON object"),
    ("start-no-name", START, {"timeoutMs": 1000}, "name"),
    ("start-name-int", START, {"name": 5}, "name"),
    ("start-name-empty", START, {"name": ""}, "name"),
    ("start-name-long", START, {"name": "n" * 129}, "name"),
    ("start-name-ctl", START, {"name": "a\nb"}, "name"),
    ("start-timeout-str", START, {"name": "x", "timeoutMs": "30s"}, "timeoutMs"),
    ("start-timeout-bool", START, {"name": "x", "timeoutMs": True}, "timeoutMs"),
    ("start-timeout-float", START, {"name": "x", "timeoutMs": 1.5}, "timeoutMs"),
    ("start-timeout-zero", START, {"name": "x", "timeoutMs": 0}, "timeoutMs"),
    ("start-timeout-huge", START, {"name": "x", "timeoutMs": 10**12}, "timeoutMs"),
    ("reg-not-json", REGISTER, b"xid=1", "not valid JSON"),
    ("reg-no-resource", REGISTER, _register(resourceId=_DROP), "resourceId"),
    ("reg-resource-int", REGISTER, _register(resourceId=7), "resourceId"),
    ("reg-type-unknown", REGISTER, _register(branchType="XA"), "branchType"),
    ("reg-type-lower", REGISTER, _register(branchType="tcc"), "branchType"),
    ("reg-type-missing", REGISTER, _register(branchType=_DROP), "branchType"),
    ("reg-callback-ftp", REGISTER, _register(callbackUrl="ftp://h/x"), "callbackUrl"),
    ("reg-callback-relative", REGISTER, _register(callbackUrl="/branches/x"), "callbackUrl"),
    ("reg-callback-missing", REGISTER, _register(callbackUrl=_DROP), "callbackUrl"),
    ("reg-callback-int", REGISTER, _register(callbackUrl=80), "callbackUrl"),
    ("reg-callback-ctl", REGISTER, _register(callbackUrl="http://h/\r\nx"), "callbackUrl"),
    (
        "reg-app-data-too-big",
        REGISTER,
        _register(applicationData={"blob": "x" * (64 * 1024)}),
        "applicationData",
    ),
    ("reg-xid-int", REGISTER, _register(xid=42), "xid"),
    ("reg-xid-missing", REGISTER, _register(xid=_DROP), "xid"),
    (
        "rep-branch-not-digits",
        REPORT,
        {"xid": XID_SLOT, "branchId": "1e3", "status": "PhaseOne_Done"},
        "branchId",
    ),
    (
        "rep-branch-over-63-bits",
        REPORT,
        {"xid": XID_SLOT, "branchId": str(2**63), "status": "PhaseOne_Done"},
        "branchId",
    ),
    ("rep-branch-missing", REPORT, {"xid": XID_SLOT, "status": "PhaseOne_Done"}, "branchId"),
    (
        "rep-branch-bool",
        REPORT,
        {"xid": XID_SLOT, "branchId": True, "status": "PhaseOne_Done"},
        "branchId",
    ),
    (
        "rep-status-phase-two",
        REPORT,
        {"xid": XID_SLOT, "branchId": 1, "status": "PhaseTwo_Committed"},
        "status",
    ),
    ("rep-status-missing", REPORT, {"xid": XID_SLOT, "branchId": 1}, "status"),
]


def _fill(body: Any, xid: str) -> bytes:
    if isinstance(body, bytes):
        return body
    return orjson.dumps({k: (xid if v == XID_SLOT else v) for k, v in body.items()})


@pytest.mark.parametrize(
    ("path", "body", "field"), [b[1:] for b in BAD_BODIES], ids=[b[0] for b in BAD_BODIES]
)
async def test_a_bad_body_is_400_invalid_request_naming_the_field(peer, path, body, field):
    sc, client = peer
    xid = await client.start()
    before = await sc.control.engine.get(xid)
    active = sc.control.engine.active
    reply = await client.call("POST", path, _fill(body, xid))
    assert reply.status == 400, reply.raw
    err = reply.error
    assert err["code"] == "INVALID_REQUEST"
    assert field in err["message"]
    # nothing changed
    assert sc.control.engine.active == active
    assert await sc.control.engine.get(xid) == before


async def test_an_oversized_body_is_413_and_changes_nothing(peer):
    sc, client = peer
    body = orjson.dumps({"name": "x", "pad": "p" * (300 * 1024)})
    reply = await client.call("POST", START, body)
    assert reply.status == 413
    assert reply.error["code"] == "PAYLOAD_TOO_LARGE"
    assert sc.control.engine.active == 0


# --- XIDs -------------------------------------------------------------------------------------

BAD_XIDS = ["not-an-xid", "10.0.0.1:8091:", "10.0.0.1:70000:1", "10.0.0.1:8091:12a", "a:b:c:d"]


@pytest.mark.parametrize("bad", BAD_XIDS)
@pytest.mark.parametrize(
    ("method", "suffix"), [("GET", ""), ("POST", "/commit"), ("POST", "/rollback")]
)
async def test_a_malformed_xid_in_the_path_is_400_xid_invalid(peer, bad, method, suffix):
    sc, client = peer
    reply = await client.call(method, xid_path(bad, suffix))
    assert reply.status == 400, reply.raw
    assert reply.error["code"] == "XID_INVALID"


@pytest.mark.parametrize("bad", BAD_XIDS)
async def test_a_malformed_xid_in_the_body_is_400_xid_invalid(peer, branches, bad):
    sc, client = peer
    reply = await client.call("POST", REGISTER, _fill(_register(xid=bad), bad))
    assert (reply.status, reply.error["code"]) == (400, "XID_INVALID")
    reply = await client.call(
        "POST", REPORT, {"xid": bad, "branchId": 1, "status": "PhaseOne_Done"}
    )
    assert (reply.status, reply.error["code"]) == (400, "XID_INVALID")


async def test_an_unknown_xid_is_404_transaction_not_found(peer, branches):
    sc, client = peer
    unknown = f"127.0.0.1:{sc.ports['peer']}:987654321"
    for method, suffix in (("GET", ""), ("POST", "/commit"), ("POST", "/rollback")):
        reply = await client.call(method, xid_path(unknown, suffix))
        assert reply.status == 404, (suffix, reply.raw)
        assert reply.error["code"] == "TRANSACTION_NOT_FOUND"
        assert unknown in reply.error["message"]
    reply = await client.call("POST", REGISTER, _fill(_register(), unknown))
    assert (reply.status, reply.error["code"]) == (404, "TRANSACTION_NOT_FOUND")
    reply = await client.report(unknown, 1)
    assert (reply.status, reply.error["code"]) == (404, "TRANSACTION_NOT_FOUND")
    assert sc.control.engine.active == 0


async def test_an_unknown_branch_is_404_branch_not_found(peer, branches):
    sc, client = peer
    xid = await client.start()
    bid = await client.register(xid, branches.url("stock"))
    reply = await client.report(xid, str(int(bid) + 1))
    assert reply.status == 404
    assert reply.error["code"] == "BRANCH_NOT_FOUND"
    assert str(int(bid) + 1) in reply.error["message"]
    _, stored = await sc.control.engine.get(xid)
    assert [b.status for b in stored] == [BranchStatus.REGISTERED]


# --- the signature gate -----------------------------------------------------------------------


def _forge(kind: str, client: SignedClient, method: str, path: str, body: bytes):
    """(headers, body actually sent) for one kind of bad signature."""
    if kind == "unsigned":
        return {}, body
    if kind == "forged":
        return client.sign(method, path, body, keys=ring("k1", "not-the-secret")), body
    if kind == "tampered":
        headers = client.sign(method, path, body)
        return headers, body.replace(b"}", b', "x": 1}') if body else b"{}"
    if kind == "stale-past":
        return client.sign(method, path, body, at_ms=now_ms() - 301_000), body
    if kind == "stale-future":
        return client.sign(method, path, body, at_ms=now_ms() + 301_000), body
    if kind == "unknown-key":
        return client.sign(method, path, body, keys=ring("k9", SECRET_K1)), body
    if kind == "idempotency-key-swapped":
        headers = client.sign(method, path, body, idempotency_key="key-a")
        headers["Idempotency-Key"] = "key-b"
        return headers, body
    if kind == "xid-header-added":
        headers = client.sign(method, path, body)
        headers["XID"] = "10.0.0.1:8091:1"
        return headers, body
    if kind == "bad-signature-format":
        headers = client.sign(method, path, body)
        headers["x-gts-signature"] = headers["x-gts-signature"].upper()
        return headers, body
    if kind == "short-nonce":
        headers = client.sign(method, path, body)
        headers["x-gts-nonce"] = "abc123"
        return headers, body
    raise AssertionError(kind)


REFUSALS = [
    # kind, metric reason, words the message must carry
    ("unsigned", "malformed", "missing signed header"),
    ("forged", "mismatch", "does not match"),
    ("tampered", "mismatch", "does not match"),
    ("stale-past", "stale", "in the past"),
    ("stale-future", "stale", "in the future"),
    ("unknown-key", "unknown_key", "unknown signing key id 'k9'"),
    ("idempotency-key-swapped", "mismatch", "does not match"),
    ("xid-header-added", "mismatch", "does not match"),
    ("bad-signature-format", "malformed", "x-gts-signature"),
    ("short-nonce", "malformed", "x-gts-nonce"),
]


@pytest.mark.parametrize(("kind", "reason", "words"), REFUSALS, ids=[r[0] for r in REFUSALS])
async def test_a_refused_start_is_401_counted_and_creates_nothing(peer, kind, reason, words):
    sc, client = peer
    body = orjson.dumps({"name": "create-order", "timeoutMs": 30_000})
    headers, sent = _forge(kind, client, "POST", START, body)
    reply = await client.send("POST", START, sent, headers)
    assert reply.status == 401, reply.raw
    err = reply.error
    assert err["code"] == "SIGNATURE_INVALID"
    assert words in err["message"]
    assert sample(sc, FAILURES, reason=reason) == 1
    assert sc.control.engine.active == 0
    assert await sc.control.journal.unfinished() == []


@pytest.mark.parametrize(("kind", "reason", "words"), REFUSALS, ids=[r[0] for r in REFUSALS])
async def test_a_refused_commit_leaves_the_transaction_begin(peer, kind, reason, words):
    sc, client = peer
    xid = await client.start()
    path = xid_path(xid, "/commit")
    headers, sent = _forge(kind, client, "POST", path, b"")
    reply = await client.send("POST", path, sent, headers)
    assert reply.status == 401, reply.raw
    assert reply.error["code"] == "SIGNATURE_INVALID"
    assert words in reply.error["message"]
    assert sample(sc, FAILURES, reason=reason) == 1
    assert await status_of(sc, xid) is GlobalStatus.BEGIN


async def test_a_request_signed_for_another_path_is_refused(peer):
    sc, client = peer
    xid = await client.start()
    headers = client.sign("POST", xid_path(xid, "/rollback"))
    reply = await client.send("POST", xid_path(xid, "/commit"), b"", headers)
    assert (reply.status, reply.error["code"]) == (401, "SIGNATURE_INVALID")
    headers = client.sign("GET", xid_path(xid, "/commit"))
    reply = await client.send("POST", xid_path(xid, "/commit"), b"", headers)
    assert reply.status == 401
    assert sample(sc, FAILURES, reason="mismatch") == 2
    assert await status_of(sc, xid) is GlobalStatus.BEGIN


async def test_a_replayed_request_is_refused_the_second_time(peer):
    sc, client = peer
    body = orjson.dumps({"name": "create-order", "timeoutMs": 30_000})
    headers = client.sign("POST", START, body)
    first = await client.send("POST", START, body, headers)
    assert first.status == 200
    second = await client.send("POST", START, body, headers)
    assert second.status == 401
    assert second.error["code"] == "SIGNATURE_INVALID"
    assert "replay" in second.error["message"]
    assert sample(sc, FAILURES, reason="replay") == 1
    assert sc.control.engine.active == 1

    xid = first.json()["xid"]
    path = xid_path(xid, "/rollback")
    headers = client.sign("POST", path)
    # the replay arrives before the original is answered: still exactly one of them passes
    replies = await asyncio.gather(
        client.send("POST", path, b"", headers), client.send("POST", path, b"", headers)
    )
    assert sorted(r.status for r in replies) == [200, 401]
    assert sample(sc, FAILURES, reason="replay") == 2
    assert await status_of(sc, xid) is GlobalStatus.ROLLBACKED


async def test_a_repeated_signed_header_is_refused(peer):
    sc, client = peer
    body = orjson.dumps({"name": "x"})
    headers = client.sign("POST", START, body)
    pairs = list(headers.items()) + [("x-gts-nonce", "0" * 32)]
    reply = await client.send("POST", START, body, pairs)
    assert reply.status == 401
    assert "more than once" in reply.error["message"]
    assert sample(sc, FAILURES, reason="malformed") == 1
    assert sc.control.engine.active == 0


@pytest.mark.parametrize(
    "header",
    [
        b"x-gts-nonce: 00112233445566778899aabbccddeeff\rx\r\n",
        b"Idempotency-Key: a\rb\r\n",
        b"XID: 10.0.0.1:8091:1\x00\r\n",
        b"x-gts-key-id: k1\n",
        b"Idempotency-Key: a\r\n b\r\n",
    ],
    ids=["bare-cr-nonce", "bare-cr-idempotency", "nul-in-xid", "bare-lf", "obs-fold"],
)
async def test_header_values_with_cr_lf_or_nul_are_refused(peer, header):
    sc, client = peer
    body = b'{"name":"x"}'
    signed = client.sign("POST", START, body)
    lines = [b"POST " + START.encode() + b" HTTP/1.1", b"Host: 127.0.0.1"]
    lines += [
        f"{k}: {v}".encode()
        for k, v in signed.items()
        if k.lower() not in header.lower().decode("latin-1")
    ]
    raw = b"\r\n".join(lines) + b"\r\n" + header
    raw += b"Content-Length: %d\r\n\r\n" % len(body) + body
    async with await Client.connect(sc.ports["peer"]) as conn:
        await conn.send(raw)
        try:
            resp = await conn.response("POST")
            status = resp.status
        except (asyncio.IncompleteReadError, ConnectionError):
            status = None  # the connection was closed without an answer: refused too
    # the strict C parser refuses these before the gate sees them
    assert status == 400, status
    assert sc.control.engine.active == 0


async def test_healthz_needs_no_signature(peer):
    sc, client = peer
    reply = await client.send("GET", "/healthz")
    assert (reply.status, reply.json()) == (200, {"status": "ok"})
    # but every other path does, even one that does not exist
    reply = await client.send("GET", "/api/v1/nothing-here")
    assert reply.status == 401
    assert (
        sum(
            sample(sc, FAILURES, reason=r)
            for r in ("malformed", "unknown_key", "stale", "mismatch", "replay")
        )
        == 1
    )


# --- key rotation -----------------------------------------------------------------------------


async def test_a_previous_key_verifies_during_a_rotation_and_not_after(
    sidecar_factory, tmp_path, session
):
    during = tmp_path / "during"
    after = tmp_path / "after"
    during.mkdir()
    after.mkdir()
    old = ring("k0", SECRET_K0)

    sc = await sidecar_factory(signing_config(during, previous={"k0": SECRET_K0}))
    client = SignedClient(session, sc.ports["peer"], old)
    xid = await client.start()  # signed with k0: accepted
    reply = await client.call("POST", xid_path(xid, "/commit"))
    assert (reply.status, reply.json()["status"]) == (200, "Committed")
    # k1 still works, and a k0 id with the k1 secret does not
    assert (await client.call("POST", START, {"name": "x"}, keys=ring())).status == 200
    forged = await client.call("POST", START, {"name": "x"}, keys=ring("k0", SECRET_K1))
    assert (forged.status, sample(sc, FAILURES, reason="mismatch")) == (401, 1)

    # the rotation is over: k0 removed from the config
    sc2 = await sidecar_factory(signing_config(after))
    client2 = SignedClient(session, sc2.ports["peer"], old)
    reply = await client2.call("POST", START, {"name": "x"})
    assert reply.status == 401
    assert reply.error["code"] == "SIGNATURE_INVALID"
    assert "unknown signing key id 'k0'" in reply.error["message"]
    assert sample(sc2, FAILURES, reason="unknown_key") == 1
    assert sc2.control.engine.active == 0
    assert (await client2.call("POST", START, {"name": "x"}, keys=ring())).status == 200
