"""Malformed JSON, wrong types, unknown ids and oversized bodies to every control-plane API.

One sidecar per test, over real loopback sockets: the TM API and the locks API (`api`
listener), GTS REST v1 and the phase-two callbacks of a declared TCC resource (`peer`
listener, every request properly signed so that the body checks are what is exercised), and
the admin listener with its token. Each bad request must get a clear 4xx in the JSON error
shape (`{"error": {"code", "message"}}` + `x-gts-sidecar-error`), never a 5xx, and change
nothing: no transaction, branch, lock or fence row appears, and the app is never called.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.coordinator.states import BranchType
from sidecar.txn.fence import FenceState
from sidecar.txn.fence_store import FenceRow, now_ms
from tests.component.gts import Reply, SignedClient, ring, signing_config
from tests.component.servers import Client, Upstream, UpstreamFactory, error_of

ADMIN_TOKEN = "admin-token-0123456789"
UNKNOWN_XID = "127.0.0.1:1:987654321"

TCC = {
    "resource": "inv",
    "try": {"method": "POST", "path": "/try"},
    "confirm": {"method": "POST", "path": "/confirm"},
    "cancel": {"method": "POST", "path": "/cancel"},
}


@dataclass
class Plane:
    """A started sidecar with one live transaction (`xid`) holding one registered branch
    (`branch_id`, resource `inv`, tried: its fence row is there), and clients for each
    control-plane listener."""

    sc: Any
    app: Upstream
    api: SignedClient
    peer: SignedClient
    admin: SignedClient
    xid: str = ""
    branch_id: int = 0
    auth: dict[str, str] = field(default_factory=lambda: {"Authorization": f"Bearer {ADMIN_TOKEN}"})

    def state(self) -> tuple[Any, ...]:
        """Everything a request could change. The memory journal, lock table and fence are
        read through their internals: a test needs the whole picture, not one key (on SQLite,
        only what the engine holds in memory)."""
        control = self.sc.control
        journal = control.journal
        if not hasattr(journal, "_globals"):
            return (control.engine.active, len(self.app.requests))
        return (
            control.engine.active,
            {x: r.status for x, r in journal._globals.items()},
            {b: (r.status, r.attempts) for b, r in journal._branches.items()},
            dict(control.locks._holders),
            dict(control.fence._rows),
            len(self.app.requests),
        )

    async def send(
        self, listener: str, method: str, path: str, body: bytes = b"", **headers: str
    ) -> Reply:
        """Unsigned on api and admin, signed on peer."""
        if listener == "peer":
            return await self.peer.call(method, path, body)
        client = self.api if listener == "api" else self.admin
        return await client.send(method, path, body, headers)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def upstream() -> AsyncIterator[UpstreamFactory]:
    factory = UpstreamFactory()
    yield factory
    await factory.close()


async def make_plane(
    sidecar_factory: Any,
    tmp_path: Path,
    session: aiohttp.ClientSession,
    upstream: UpstreamFactory,
    **over: Any,
) -> Plane:
    app = await upstream()
    token = tmp_path / "admin.token"
    token.write_text(ADMIN_TOKEN + "\n")
    cfg: dict[str, Any] = {
        **signing_config(tmp_path),
        # phase two calls the app: a call that hangs gives up within a second
        "app": {
            "url": app.url,
            "timeouts": {"connect": "200ms", "response_header": "500ms", "total": "1s"},
        },
        "admin": {"token_file": str(token)},
        "tcc": [TCC],
        **over,
    }
    sc = await sidecar_factory(cfg)
    keys = ring()
    plane = Plane(
        sc,
        app,
        SignedClient(session, sc.ports["api"], keys),
        SignedClient(session, sc.ports["peer"], keys),
        SignedClient(session, sc.ports["admin"], keys),
    )
    engine = sc.control.engine
    tx = await engine.begin("live", 60_000)
    branch = await engine.register(
        tx.xid, BranchType.TCC, "inv", "http://127.0.0.1:9/v1/resources/inv", b"{}"
    )
    await sc.control.fence.put(
        FenceRow(tx.xid, branch.branch_id, "inv", FenceState.TRIED, now_ms())
    )
    plane.xid, plane.branch_id = tx.xid, branch.branch_id
    return plane


@pytest.fixture
async def plane(sidecar_factory, tmp_path, session, upstream) -> Plane:
    return await make_plane(sidecar_factory, tmp_path, session, upstream)


def refused(reply: Reply, *codes: str, status: int | None = None) -> dict[str, Any]:
    """A clear 4xx in the JSON error shape, with one of `codes`."""
    assert 400 <= reply.status < 500, (reply.status, reply.raw)
    if status is not None:
        assert reply.status == status, reply.raw
    err = reply.error
    if codes:
        assert err["code"] in codes, err
    return err


# --- the JSON endpoints ---------------------------------------------------------------------------

LIVE = "<live xid>"
BRANCH = "<live branch>"


@dataclass(frozen=True)
class Endpoint:
    id: str
    listener: str
    path: str
    #: a valid body; LIVE / BRANCH stand for the plane's transaction and branch
    valid: dict[str, Any]
    #: field → values that must be refused (wrong types, empty, malformed)
    bad: dict[str, list[Any]]
    #: fields whose absence must be refused
    required: tuple[str, ...]


_NOT_STR: list[Any] = [None, True, 0, 1.5, [], {}, ["x"], {"a": "b"}]
_NOT_INT: list[Any] = [None, True, False, "1", 1.5, [], {}, [1]]
#: a 64-bit id may be a string of digits or an integer, 1..2^63-1: anything else is refused
_BAD_ID: list[Any] = [
    *[v for v in _NOT_INT if v != "1"], "", "1e3", " 1", "+1", "-1", "0", "\u0661",
    str(2**63), 0, 2**63,
]  # fmt: skip
_BAD_XID: list[Any] = [*_NOT_STR, "", "not-an-xid", "10.0.0.1:8091:", "a:b:c:d", "h:99999:1"]
_BAD_NAME: list[Any] = [*_NOT_STR, "", "n" * 129, "a\nb", "a\x00b"]
_BAD_DURATION: list[Any] = [True, 0, 30, 1.5, [], {}, "", "30", "0s", "-1s", "1e3s", "30 sec", "s"]

ENDPOINTS = [
    Endpoint(
        "tm-begin",
        "api",
        "/v1/transactions",
        {"name": "order", "timeout": "30s"},
        {"name": _BAD_NAME, "timeout": _BAD_DURATION},
        ("name",),
    ),
    Endpoint(
        "locks-acquire",
        "api",
        "/v1/locks",
        {"xid": LIVE, "keys": ["orders:1"], "timeout": "30s"},
        {
            "xid": _BAD_XID,
            "keys": [
                *_NOT_STR[:-2],
                "orders:1",
                [],
                [1],
                [None],
                ["orders"],
                ["orders:"],
                [":1"],
                ["orders:*"],
                ["orders:%"],
                ["or ders:1"],
                ["orders:1\n"],
                ["o" * 600 + ":1"],
                [f"orders:{i}" for i in range(1001)],
            ],
            "timeout": _BAD_DURATION,
        },
        ("xid", "keys"),
    ),
    Endpoint(
        "gts-start",
        "peer",
        "/api/v1/transaction/start",
        {"name": "order", "timeoutMs": 30_000},
        {"name": _BAD_NAME, "timeoutMs": [*_NOT_INT[1:], 0, -1, 10**12, 2**63, 2**64 - 1]},
        ("name",),
    ),
    Endpoint(
        "gts-register",
        "peer",
        "/api/v1/branch/register",
        {
            "xid": LIVE,
            "branchType": "TCC",
            "resourceId": "stock",
            "callbackUrl": "http://127.0.0.1:9/cb",
            "applicationData": {"n": 1},
        },
        {
            "xid": _BAD_XID,
            "branchType": [*_NOT_STR, "", "tcc", "AT", "XA"],
            "resourceId": [*_NOT_STR, "", "r" * 257, "a\rb"],
            "callbackUrl": [
                *_NOT_STR,
                "",
                "ftp://h/x",
                "/relative",
                "javascript:alert(1)",
                "http://h/\r\nx",
                "http://" + "h" * 1100,
            ],
            "applicationData": [{"blob": "x" * (64 * 1024)}],
        },
        ("xid", "branchType", "resourceId", "callbackUrl"),
    ),
    Endpoint(
        "gts-report",
        "peer",
        "/api/v1/branch/report",
        {"xid": LIVE, "branchId": BRANCH, "status": "PhaseOne_Done"},
        {
            "xid": _BAD_XID,
            "branchId": _BAD_ID,
            "status": [*_NOT_STR, "", "PhaseTwo_Committed", "Registered", "phaseone_done"],
        },
        ("xid", "branchId", "status"),
    ),
    *(
        Endpoint(
            f"phase-two-{phase}",
            "peer",
            f"/v1/resources/inv/{phase}",
            {"xid": LIVE, "branchId": BRANCH, "resourceId": "inv", "applicationData": {}},
            {
                "xid": _NOT_STR,
                "branchId": _BAD_ID,
                # decoded only once the fence says forward: the branch is tried
                "applicationData": [None, "x", 1, [], {"body": "!!not base64"}, {"body": 5}],
            },
            ("xid", "branchId"),
        )
        for phase in ("commit", "rollback")
    ),
]


def fill(plane: Plane, body: Any) -> Any:
    if body == LIVE:
        return plane.xid
    if body == BRANCH:
        return plane.branch_id
    if isinstance(body, dict):
        return {k: fill(plane, v) for k, v in body.items()}
    return body


def _dumps(value: Any) -> bytes:
    # the stdlib, not orjson: integers past 64 bits must reach the server as written
    return json.dumps(value, ensure_ascii=False).encode()


MALFORMED: list[tuple[str, bytes]] = [
    ("empty", b""),
    ("whitespace", b"  \r\n"),
    ("truncated", b'{"name": "x",'),
    ("unclosed-array", b"["),
    ("stray-brace", b"}"),
    ("single-quotes", b"{'name': 'x'}"),
    ("trailing-comma", b'{"name": "x",}'),
    ("two-documents", b'{"name": "a"}{"name": "b"}'),
    ("comment", b'{"name": "x" /* c */}'),
    ("nan", b'{"name": "x", "n": NaN}'),
    ("infinity-literal", b'{"name": "x", "n": Infinity}'),
    ("number-overflow", b'{"name": "x", "n": 1e400}'),
    ("bom", b'\xef\xbb\xbf{"name": "x"}'),
    ("latin-1", b'{"name": "caf\xe9"}'),
    ("utf-16", '{"name": "x"}'.encode("utf-16")),
    ("nul-byte", b'{"name": "x"}\x00'),
    ("lone-surrogate-escape", b'{"name": "\\ud800"}'),
    ("bad-escape", b'{"name": "\\q"}'),
    ("deep-array", b"[" * 5000 + b"]" * 5000),
    ("deep-object", b'{"a":' * 3000 + b"1" + b"}" * 3000),
    ("null", b"null"),
    ("true", b"true"),
    ("number", b"42"),
    ("string", b'"order"'),
    ("array", b'["order"]'),
    ("array-of-object", b'[{"name": "order"}]'),
    ("form-encoded", b"name=order&timeout=30s"),
]


@pytest.mark.parametrize("endpoint", [pytest.param(e, id=e.id) for e in ENDPOINTS])
@pytest.mark.parametrize(("kind", "body"), [pytest.param(k, b, id=k) for k, b in MALFORMED])
async def test_malformed_json_is_400_and_changes_nothing(
    plane: Plane, endpoint: Endpoint, kind: str, body: bytes
) -> None:
    before = plane.state()
    reply = await plane.send(endpoint.listener, "POST", endpoint.path, body)
    refused(reply, "INVALID_REQUEST", status=400)
    assert plane.state() == before


def wrong_field_params() -> list[Any]:
    params = []
    for e in ENDPOINTS:
        for name, values in e.bad.items():
            for i, value in enumerate(values):
                params.append(pytest.param(e, name, value, id=f"{e.id}-{name}-{i}"))
        for name in e.required:
            params.append(pytest.param(e, name, KeyError, id=f"{e.id}-{name}-missing"))
    return params


@pytest.mark.parametrize(("endpoint", "name", "value"), wrong_field_params())
async def test_a_wrong_field_is_4xx_and_changes_nothing(
    plane: Plane, endpoint: Endpoint, name: str, value: Any
) -> None:
    body = fill(plane, endpoint.valid)
    if value is KeyError:
        del body[name]
    else:
        body[name] = value
    before = plane.state()
    reply = await plane.send(endpoint.listener, "POST", endpoint.path, _dumps(body))
    refused(reply, "INVALID_REQUEST", "XID_INVALID")
    assert plane.state() == before


@pytest.mark.parametrize("endpoint", [pytest.param(e, id=e.id) for e in ENDPOINTS])
async def test_the_valid_body_of_each_table_row_is_accepted(plane: Plane, endpoint: Endpoint):
    """The control of the two tests above: the unmodified body is not refused, so every
    refusal there is the one field's doing."""
    reply = await plane.send(
        endpoint.listener, "POST", endpoint.path, _dumps(fill(plane, endpoint.valid))
    )
    assert reply.status == 200, reply.raw


# --- unknown XIDs, branches, resources, routes ----------------------------------------------------


@pytest.mark.parametrize(
    ("listener", "method", "path", "body", "status", "code"),
    [
        ("api", "GET", f"/v1/transactions/{UNKNOWN_XID}", None, 404, "TRANSACTION_NOT_FOUND"),
        (
            "api",
            "POST",
            f"/v1/transactions/{UNKNOWN_XID}/commit",
            None,
            404,
            "TRANSACTION_NOT_FOUND",
        ),
        (
            "api",
            "POST",
            f"/v1/transactions/{UNKNOWN_XID}/rollback",
            None,
            404,
            "TRANSACTION_NOT_FOUND",
        ),
        ("api", "GET", "/v1/transactions/not-an-xid", None, 400, "XID_INVALID"),
        ("api", "POST", "/v1/transactions/%00:1:1/commit", None, 400, "XID_INVALID"),
        ("api", "DELETE", "/v1/locks/not-an-xid", None, 400, "XID_INVALID"),
        ("api", "GET", "/v1/locks/no-colon", None, 400, "INVALID_REQUEST"),
        ("api", "GET", "/v1/nope", None, 404, "NOT_FOUND"),
        ("api", "PUT", "/v1/transactions", None, 405, "METHOD_NOT_ALLOWED"),
        ("peer", "GET", f"/api/v1/transaction/{UNKNOWN_XID}", None, 404, "TRANSACTION_NOT_FOUND"),
        (
            "peer",
            "POST",
            f"/api/v1/transaction/{UNKNOWN_XID}/commit",
            None,
            404,
            "TRANSACTION_NOT_FOUND",
        ),
        (
            "peer",
            "POST",
            f"/api/v1/transaction/{UNKNOWN_XID}/rollback",
            None,
            404,
            "TRANSACTION_NOT_FOUND",
        ),
        (
            "peer",
            "POST",
            "/api/v1/branch/register",
            {
                "xid": UNKNOWN_XID,
                "branchType": "TCC",
                "resourceId": "r",
                "callbackUrl": "http://h/c",
            },
            404,
            "TRANSACTION_NOT_FOUND",
        ),
        (
            "peer",
            "POST",
            "/api/v1/branch/report",
            {"xid": UNKNOWN_XID, "branchId": 1, "status": "PhaseOne_Done"},
            404,
            "TRANSACTION_NOT_FOUND",
        ),
        (
            "peer",
            "POST",
            "/api/v1/branch/report",
            {"xid": LIVE, "branchId": 987654321, "status": "PhaseOne_Done"},
            404,
            "BRANCH_NOT_FOUND",
        ),
        (
            "peer",
            "POST",
            "/v1/resources/undeclared/commit",
            {"xid": LIVE, "branchId": BRANCH},
            404,
            "RESOURCE_NOT_FOUND",
        ),
        ("peer", "GET", "/v1/nope", None, 404, "NOT_FOUND"),
        ("admin", "POST", "/admin/branches/987654321/retry", None, 404, "BRANCH_NOT_FOUND"),
        ("admin", "POST", "/admin/branches/987654321/skip", None, 404, "BRANCH_NOT_FOUND"),
        ("admin", "POST", "/admin/branches/abc/retry", None, 400, "INVALID_REQUEST"),
        ("admin", "POST", "/admin/branches/1.5/skip", None, 400, "INVALID_REQUEST"),
        ("admin", "POST", "/admin/branches/" + "9" * 5000 + "/retry", None, 400, "INVALID_REQUEST"),
        ("admin", "GET", "/admin/branches?state=all", None, 400, "INVALID_REQUEST"),
    ],
)
async def test_unknown_ids_get_the_right_4xx_and_change_nothing(
    plane: Plane, listener, method, path, body, status, code
) -> None:
    before = plane.state()
    raw = b"" if body is None else _dumps(fill(plane, body))
    headers = plane.auth if listener == "admin" else {}
    reply = await plane.send(listener, method, path, raw, **headers)
    refused(reply, code, status=status)
    assert plane.state() == before


async def test_a_known_but_finished_transaction_refuses_new_branches(plane: Plane) -> None:
    reply = await plane.send("api", "POST", "/v1/transactions", b'{"name": "short"}')
    xid = reply.json()["xid"]
    reply = await plane.send("api", "POST", f"/v1/transactions/{xid}/rollback")
    assert reply.json()["status"] == "Rollbacked"
    before = plane.state()
    body = {"xid": xid, "branchType": "TCC", "resourceId": "r", "callbackUrl": "http://h/c"}
    reply = await plane.send("peer", "POST", "/api/v1/branch/register", _dumps(body))
    refused(reply, "TRANSACTION_NOT_ACTIVE", status=409)
    assert plane.state() == before


# --- oversized bodies -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listener", "path", "size"),
    [
        ("api", "/v1/transactions", 64 * 1024 + 1),
        ("api", "/v1/locks", 64 * 1024 + 1),
        ("peer", "/api/v1/transaction/start", 256 * 1024 + 1),
        ("peer", "/api/v1/branch/register", 256 * 1024 + 1),
        ("peer", "/api/v1/branch/report", 256 * 1024 + 1),
        ("peer", "/v1/resources/inv/commit", 256 * 1024 + 1),
        ("peer", "/api/v1/transaction/start", 1024 * 1024),
    ],
)
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_an_oversized_body_is_413_and_changes_nothing(
    plane: Plane, listener: str, path: str, size: int, framing: str
) -> None:
    """Refused by size alone: unsigned on the peer listener too (the size cap comes before
    the signature gate, which would have to hash the whole body)."""
    before = plane.state()
    port = plane.sc.ports[listener]
    pad = b'{"name": "x", "pad": "' + b"p" * (size - 24) + b'"}'
    head = f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n".encode()
    if framing == "content-length":
        data = head + b"Content-Length: %d\r\n\r\n" % len(pad) + pad
    else:
        chunks = b"".join(
            b"%x\r\n%s\r\n" % (len(pad[i : i + 65536]), pad[i : i + 65536])
            for i in range(0, len(pad), 65536)
        )
        data = head + b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
    async with await Client.connect(port) as client:
        # the sidecar may answer (and close) before it has read everything: send what it
        # takes, then read the answer
        try:
            await client.send(data)
        except ConnectionError:
            pass
        resp = await client.response(timeout=10.0)
    assert resp.status == 413, resp.body
    assert error_of(resp)["code"] == "PAYLOAD_TOO_LARGE"
    assert plane.state() == before


# --- random JSON: never a 5xx ---------------------------------------------------------------------

_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
json_values = st.recursive(
    _json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
_FIELDS = sorted({name for e in ENDPOINTS for name in e.valid} | {"status", "keys"})
#: objects that use the endpoints' own field names, so values meet the type checks
field_objects = st.dictionaries(st.sampled_from(_FIELDS) | st.text(max_size=6), json_values)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(value=json_values | field_objects)
@pytest.mark.parametrize("endpoint", [pytest.param(e, id=e.id) for e in ENDPOINTS])
async def test_random_json_never_gets_a_5xx(plane: Plane, endpoint: Endpoint, value: Any) -> None:
    reply = await plane.send(endpoint.listener, "POST", endpoint.path, _dumps(value))
    assert reply.status < 500, reply.raw
    if reply.status >= 400:
        reply.error  # noqa: B018 - the JSON error shape, checked by the property


# --- admin ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Bearer wrong",
        f"bearer {ADMIN_TOKEN}",
        f"Bearer  {ADMIN_TOKEN}",
        f"Basic {ADMIN_TOKEN}",
        f"Bearer {ADMIN_TOKEN[:-1]}",
        f"Bearer {ADMIN_TOKEN}x",
    ],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/admin/config"), ("GET", "/admin/branches"), ("POST", "/admin/branches/1/skip")],
)
async def test_admin_without_the_exact_token_is_401(plane, authorization, method, path) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    reply = await plane.send("admin", method, path, **headers)
    refused(reply, "UNAUTHORIZED", status=401)
    assert ADMIN_TOKEN not in reply.raw.decode()


async def test_admin_token_with_non_utf8_bytes_is_401(plane: Plane) -> None:
    async with await Client.connect(plane.sc.ports["admin"]) as client:
        await client.send(
            b"GET /admin/config HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer \xff\r\n\r\n"
        )
        resp = await client.response()
    assert resp.status == 401
    assert error_of(resp)["code"] == "UNAUTHORIZED"


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/admin/nope", 404), ("GET", "/admin/branches/1/retry", 405)],
)
async def test_admin_routing_errors_have_the_design_shape(plane, method, path, status) -> None:
    reply = await plane.send("admin", method, path, **plane.auth)
    refused(reply, status=status)


# --- known bugs: accepted or 5xx where a 4xx is due -----------------------------------------------


async def test_tm_begin_with_an_infinite_timeout_is_400(plane: Plane) -> None:
    before = plane.state()
    body = _dumps({"name": "order", "timeout": "9" * 400 + "s"})
    reply = await plane.send("api", "POST", "/v1/transactions", body)
    refused(reply, "INVALID_REQUEST", status=400)
    assert plane.state() == before


@pytest.mark.parametrize("timeout", ["1000000h", "9" * 400 + "s"])
async def test_a_lock_ttl_past_the_safety_net_is_refused_or_capped(plane: Plane, timeout) -> None:
    locks = plane.sc.control.locks
    body = {"xid": UNKNOWN_XID, "keys": ["orders:1"], "timeout": timeout}
    reply = await plane.send("api", "POST", "/v1/locks", _dumps(body))
    if reply.status == 200:
        cap = plane.sc.config.local_coordinator.max_timeout
        assert locks._deadline[UNKNOWN_XID] - locks._clock() <= cap
    else:
        refused(reply, "INVALID_REQUEST", status=400)
        assert await locks.holder("orders:1") is None


@pytest.mark.parametrize(
    ("xid", "branch_id"),
    [("junk", 5), ("10.0.0.1:8091:", 5), (UNKNOWN_XID, -1), (UNKNOWN_XID, 2**64 - 1)],
)
@pytest.mark.parametrize("journal", ["memory", "sqlite"])
async def test_phase_two_with_malformed_ids_is_400_and_records_nothing(
    sidecar_factory, tmp_path, session, upstream, xid, branch_id, journal
) -> None:
    url = "memory://" if journal == "memory" else f"sqlite:///{tmp_path}/journal.db"
    plane = await make_plane(
        sidecar_factory, tmp_path, session, upstream, local_coordinator={"journal": url}
    )
    fence = plane.sc.control.fence
    body = _dumps({"xid": xid, "branchId": branch_id, "resourceId": "inv"})
    reply = await plane.send("peer", "POST", "/v1/resources/inv/rollback", body)
    refused(reply, "XID_INVALID", "INVALID_REQUEST", status=400)
    if branch_id < 2**63:
        assert await fence.get(xid, branch_id) is None


@pytest.mark.parametrize(
    "app_data",
    [
        pytest.param({"headers": {"X-A": "a\nb"}}, id="crlf-in-value"),
        pytest.param({"headers": {"X A": "x"}}, id="space-in-name"),
        pytest.param({"headers": {"": "x"}}, id="empty-name"),
        pytest.param({"headers": {"Transfer-Encoding": "chunked"}, "body": "aGk="}, id="te"),
        pytest.param({"headers": {"Content-Length": "5"}}, id="content-length"),
        pytest.param({"headers": {"Host": "evil.example"}}, id="host"),
        pytest.param({"headers": {"X-Not-Allowed": "1"}}, id="not-in-forward-headers"),
        pytest.param({"query": "a b HTTP/1.1"}, id="space-in-query"),
    ],
)
@pytest.mark.parametrize("phase", ["commit", "rollback"])
async def test_phase_two_replays_only_clean_allowed_headers(plane: Plane, app_data, phase) -> None:
    """A tried branch's confirm/cancel: what the callback echoes back as applicationData is
    either refused (4xx) or reaches the app as one well-formed request carrying none of it."""
    fence = plane.sc.control.fence
    branch_id = plane.branch_id + 1000
    await fence.put(FenceRow(plane.xid, branch_id, "inv", FenceState.TRIED, now_ms()))
    body = {
        "xid": plane.xid,
        "branchId": branch_id,
        "resourceId": "inv",
        "applicationData": {"body": "", **app_data},
    }
    app = plane.app
    try:
        # the answer comes once the app was called (or refused to parse the call)
        reply = await plane.send("peer", "POST", f"/v1/resources/inv/{phase}", _dumps(body))
        await asyncio.sleep(0.05)  # the app records a cut-off request as the sidecar leaves
        assert reply.status < 500, reply.raw
        assert app.errors == [], "the app received malformed HTTP"
        if reply.status >= 400:
            refused(reply, "INVALID_REQUEST")
            assert app.requests == []
        else:
            (req,) = app.requests
            assert req.complete
            for name in ("x-a", "x a", "", "x-not-allowed", "transfer-encoding"):
                assert name not in req.names()
            assert req.get("host") != "evil.example"
            assert req.get_all("content-length") in ([], [str(req.body_size)])
            assert " " not in req.target
    finally:
        app.errors.clear()  # reported above; the fixture's teardown check stays quiet


async def test_a_non_ascii_idempotency_key_is_400(sidecar_factory, tmp_path, session, upstream):
    plane = await make_plane(
        sidecar_factory,
        tmp_path,
        session,
        upstream,
        local_coordinator={"journal": f"sqlite:///{tmp_path}/journal.db"},
    )
    before = plane.state()
    body = b'{"name": "order"}'
    data = (
        b"POST /v1/transactions HTTP/1.1\r\nHost: t\r\nIdempotency-Key: k\xff\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    async with await Client.connect(plane.sc.ports["api"]) as client:
        await client.send(data)
        resp = await client.response()
    assert resp.status == 400, resp.body
    assert error_of(resp)["code"] == "INVALID_REQUEST"
    assert plane.state() == before
