"""64-bit ids are JSON strings in every answer of every API, read as a string or an integer.

A decoder that reads every JSON number as a double (JavaScript's JSON.parse, Go's
map[string]any) rounds an integer above 2^53: 193705495666798592 becomes 193705495666798600.
Branch ids and txids are 63-bit, so every answer here is decoded twice, exactly and with
`parse_int=float`, and must come out the same: no number a double cannot hold, and each id's
digits intact. Real sockets on loopback: the sidecar's listeners, a branch server that records
the raw phase-two bodies, and a stand-in coordinator that records what the client sends.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from sidecar.config import CoordinatorConfig
from sidecar.coordinator.client import RemoteCoordinator
from sidecar.coordinator.states import BranchStatus, BranchType
from sidecar.errors import SidecarError
from sidecar.metrics import Metrics
from tests.component.gts import SignedClient, ring, signing_config, xid_path
from tests.component.servers import closed_port, wait_until

# the GTS server stores the body under a str request key (see test_gts_server.py)
pytestmark = pytest.mark.filterwarnings("ignore::aiohttp.web_exceptions.NotAppKeyWarning")

DOUBLE_EXACT = 2**53
#: an id a double cannot hold (odd, above 2^53)
BIG = 193705495666798593


def read_as_doubles(raw: bytes) -> Any:
    """`raw` decoded as JavaScript would, after checking that nothing in it is rounded."""
    exact = json.loads(raw)
    doubles = json.loads(raw, parse_int=float)
    _same(exact, doubles, "$")
    return doubles


def _same(exact: Any, doubles: Any, where: str) -> None:
    if isinstance(exact, bool) or exact is None or isinstance(exact, str):
        assert exact == doubles, where
    elif isinstance(exact, int):
        # an integer a double holds exactly is fine (counts, ms); an id never is a number
        assert abs(exact) <= DOUBLE_EXACT, f"{where}: {exact} is a number a double rounds"
        assert float(exact) == doubles, where
    elif isinstance(exact, float):
        assert exact == doubles, where
    elif isinstance(exact, list):
        assert len(exact) == len(doubles), where
        for i, (a, b) in enumerate(zip(exact, doubles, strict=True)):
            _same(a, b, f"{where}[{i}]")
    else:
        assert isinstance(exact, dict) and set(exact) == set(doubles), where
        for key, value in exact.items():
            _same(value, doubles[key], f"{where}.{key}")


def test_the_checker_catches_a_rounded_id() -> None:
    # the premise: this id does not survive a double, and the checker says so
    assert int(json.loads(f'{{"branchId": {BIG}}}', parse_int=float)["branchId"]) != BIG
    with pytest.raises(AssertionError, match="double rounds"):
        read_as_doubles(orjson.dumps({"branchId": BIG}))
    assert read_as_doubles(orjson.dumps({"branchId": str(BIG)})) == {"branchId": str(BIG)}


class Recorder:
    """A real HTTP server answering every POST/GET with what `answers` says for its path
    (default: a PhaseTwo done status), recording each raw request body."""

    def __init__(self) -> None:
        self.bodies: list[tuple[str, bytes]] = []
        self.answers: dict[str, bytes] = {}
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> Recorder:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        self.bodies.append((request.path, await request.read()))
        answer = self.answers.get(request.path)
        if answer is None:
            done = (
                "PhaseTwo_Committed" if request.path.endswith("/commit") else "PhaseTwo_Rollbacked"
            )
            answer = orjson.dumps({"status": done})
        return web.Response(body=answer, content_type="application/json")


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    server = await Recorder().start()
    yield server
    await server.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def _raw(
    session: aiohttp.ClientSession, method: str, url: str, body: Any = None, **kw: Any
) -> tuple[int, bytes]:
    data = None if body is None else orjson.dumps(body)
    async with session.request(method, url, data=data, **kw) as resp:
        return resp.status, await resp.read()


# --- GTS REST v1 (peer listener) and the phase-two callback ------------------------------------


async def test_gts_rest_v1_answers_and_callbacks_carry_ids_as_strings(
    sidecar_factory, tmp_path: Path, session, recorder
):
    sc = await sidecar_factory(signing_config(tmp_path))
    client = SignedClient(session, sc.ports["peer"], ring())
    xid = await client.start()
    reply = await client.call(
        "POST",
        "/api/v1/branch/register",
        {"xid": xid, "branchType": "TCC", "resourceId": "stock",
         "callbackUrl": recorder.url + "/branches/stock", "applicationData": {"n": BIG}},
    )  # fmt: skip
    assert reply.status == 200, reply.raw
    registered = read_as_doubles(reply.raw)
    (branch,) = (await sc.control.engine.get(xid))[1]
    assert branch.branch_id > DOUBLE_EXACT  # the ids the engine makes are the risky kind
    assert registered["xid"] == xid and registered["branchId"] == str(branch.branch_id)

    # a report names the branch by the string it was given, or by the integer (inputs: either)
    for sent in (registered["branchId"], branch.branch_id):
        reply = await client.call(
            "POST", "/api/v1/branch/report",
            {"xid": xid, "branchId": sent, "status": "PhaseOne_Done"},
        )  # fmt: skip
        assert reply.status == 200, reply.raw
        assert read_as_doubles(reply.raw)["branchId"] == str(branch.branch_id)

    reply = await client.call("GET", xid_path(xid))
    status = read_as_doubles(reply.raw)
    assert [b["branchId"] for b in status["branches"]] == [str(branch.branch_id)]

    reply = await client.call("POST", xid_path(xid, "/commit"))
    assert read_as_doubles(reply.raw)["status"] == "Committed"
    ((path, body),) = recorder.bodies
    assert path == "/branches/stock/commit"
    # the callback the coordinator sends: branchId a string; applicationData as registered
    # (the app's own numbers are its business, relayed exactly)
    callback = json.loads(body)
    assert callback["branchId"] == str(branch.branch_id)
    assert json.loads(body, parse_int=float)["branchId"] == str(branch.branch_id)
    assert callback["applicationData"] == {"n": BIG}


# --- TM API and locks (api listener) ------------------------------------------------------------


async def test_tm_api_and_locks_answers_keep_every_digit(sidecar_factory, session, recorder):
    sc = await sidecar_factory()
    base = f"http://127.0.0.1:{sc.ports['api']}"
    status, raw = await _raw(session, "POST", base + "/v1/transactions", {"name": "order"})
    assert status == 200, raw
    xid = read_as_doubles(raw)["xid"]
    assert int(xid.rpartition(":")[2]) > DOUBLE_EXACT  # the txid travels inside a string
    engine = sc.control.engine
    branch = await engine.register(xid, BranchType.TCC, "stock", recorder.url + "/b", b"{}")
    await engine.report(xid, branch.branch_id, BranchStatus.PHASE_ONE_DONE)

    status, raw = await _raw(session, "GET", f"{base}/v1/transactions/{xid}")
    assert status == 200, raw
    got = read_as_doubles(raw)
    assert [b["branchId"] for b in got["branches"]] == [str(branch.branch_id)]

    status, raw = await _raw(session, "POST", base + "/v1/locks", {"xid": xid, "keys": ["k:1"]})
    assert status == 200, raw
    assert read_as_doubles(raw) == {"xid": xid, "keys": ["k:1"]}
    status, raw = await _raw(session, "GET", base + "/v1/locks/k:1")
    assert read_as_doubles(raw) == {"key": "k:1", "holder": xid}

    # a lock conflict names the holder (an XID: a string)
    other = read_as_doubles(
        (await _raw(session, "POST", base + "/v1/transactions", {"name": "o"}))[1]
    )
    status, raw = await _raw(
        session, "POST", base + "/v1/locks", {"xid": other["xid"], "keys": ["k:1"]}
    )
    assert status == 409, raw
    assert read_as_doubles(raw)["error"]["holder"] == xid

    status, raw = await _raw(session, "POST", f"{base}/v1/transactions/{xid}/commit")
    assert read_as_doubles(raw) == {"xid": xid, "status": "Committed"}
    status, raw = await _raw(session, "POST", f"{base}/v1/transactions/{other['xid']}/rollback")
    assert read_as_doubles(raw) == {"xid": other["xid"], "status": "Rollbacked"}
    status, raw = await _raw(session, "DELETE", f"{base}/v1/locks/{xid}")
    read_as_doubles(raw)


async def test_tm_api_relays_an_older_coordinators_numeric_ids_as_strings(
    sidecar_factory, session, recorder
):
    # a cluster that predates string ids answers branchId as a number: the app still gets a
    # string with every digit
    xid = f"127.0.0.1:{recorder.port}:{BIG}"
    recorder.answers["/api/v1/transaction/" + xid] = (
        b'{"xid":"' + xid.encode() + b'","status":"Begin","name":"n","timeoutMs":30000,'
        b'"beginTime":1732540800123,"branches":[{"branchId":' + str(BIG + 2).encode() + b","
        b'"branchType":"TCC","resourceId":"r","status":"Registered","attempts":0,'
        b'"stuck":false,"lastError":null}]}'
    )
    sc = await sidecar_factory({"coordinator": {"endpoints": [recorder.url]}})
    status, raw = await _raw(
        session, "GET", f"http://127.0.0.1:{sc.ports['api']}/v1/transactions/{xid}"
    )
    assert status == 200, raw
    assert read_as_doubles(raw)["branches"][0]["branchId"] == str(BIG + 2)


# --- admin ------------------------------------------------------------------------------------


async def test_admin_stuck_branches_and_settling_answers_keep_every_digit(
    sidecar_factory, tmp_path: Path, session
):
    token = tmp_path / "admin.token"
    token.write_text("admin-secret\n")
    sc = await sidecar_factory(
        {
            "admin": {"token_file": str(token)},
            "local_coordinator": {
                "phase_two": {"initial": "10ms", "max": "20ms", "max_attempts": 1}
            },
        }
    )
    engine = sc.control.engine
    tx = await engine.begin("t", 60_000)
    branch = await engine.register(
        tx.xid, BranchType.TCC, "r", f"http://127.0.0.1:{closed_port()}/cb", b"{}"
    )
    await engine.commit(tx.xid)
    await wait_until(lambda: any(b.branch_id == branch.branch_id for b in engine.stuck()))
    admin = f"http://127.0.0.1:{sc.ports['admin']}/admin/branches"
    auth = {"Authorization": "Bearer admin-secret"}
    status, raw = await _raw(session, "GET", admin + "?state=stuck", headers=auth)
    assert status == 200, raw
    listed = read_as_doubles(raw)["branches"]
    assert [b["branchId"] for b in listed] == [str(branch.branch_id)]
    status, raw = await _raw(session, "POST", f"{admin}/{branch.branch_id}/skip", headers=auth)
    assert status == 200, raw
    assert read_as_doubles(raw)["branchId"] == str(branch.branch_id)
    # the id in the path is held to the same rule as in bodies: digits only, in range
    for bad in ("+1", "1e3", "0", str(2**63), "%201"):
        status, raw = await _raw(session, "POST", f"{admin}/{bad}/retry", headers=auth)
        assert status == 400, (bad, raw)
        assert json.loads(raw)["error"]["code"] == "INVALID_REQUEST"
    # the admin listener's other answers hold no number a double would round either
    base = f"http://127.0.0.1:{sc.ports['admin']}"
    for path in ("/admin/config", "/admin/outbox", "/readyz", "/healthz"):
        status, raw = await _raw(session, "GET", base + path, headers=auth)
        assert status in (200, 503), (path, raw)  # /readyz: no app runs behind this sidecar
        read_as_doubles(raw)


# --- what the sidecar's coordinator client sends and reads ----------------------------------------


@pytest.mark.parametrize("answered", [str(BIG), BIG], ids=["string", "integer"])
async def test_the_client_sends_ids_as_strings_and_reads_either(recorder, answered):
    xid = f"127.0.0.1:{recorder.port}:{BIG}"
    recorder.answers["/api/v1/branch/register"] = orjson.dumps({"xid": xid, "branchId": answered})
    recorder.answers["/api/v1/branch/report"] = orjson.dumps(
        {"xid": xid, "branchId": str(BIG), "status": "PhaseOne_Done"}
    )
    remote = RemoteCoordinator(CoordinatorConfig(endpoints=[recorder.url]), ring(), Metrics())
    try:
        branch_id = await remote.register(xid, BranchType.TCC, "r", "http://cb", b"{}")
        assert branch_id == BIG
        await remote.report(xid, branch_id, BranchStatus.PHASE_ONE_DONE)
    finally:
        await remote.close()
    path, body = recorder.bodies[-1]
    assert path == "/api/v1/branch/report"
    assert read_as_doubles(body) == {"xid": xid, "branchId": str(BIG), "status": "PhaseOne_Done"}


@pytest.mark.parametrize("answered", [None, "12a", 0, True, str(2**63)])
async def test_a_register_answer_without_a_usable_branch_id_is_a_clear_error(recorder, answered):
    xid = f"127.0.0.1:{recorder.port}:{BIG}"
    recorder.answers["/api/v1/branch/register"] = orjson.dumps({"xid": xid, "branchId": answered})
    remote = RemoteCoordinator(CoordinatorConfig(endpoints=[recorder.url]), ring(), Metrics())
    try:
        # not our caller's error (an InvalidRequest would be a 400): the routing layer turns
        # it into 502 COORDINATOR_INVALID_ANSWER
        with pytest.raises(ValueError, match="branchId") as raised:
            await remote.register(xid, BranchType.TCC, "r", "http://cb", b"{}")
        assert not isinstance(raised.value, SidecarError)
    finally:
        await remote.close()


async def test_the_router_answers_an_unusable_branch_id_as_an_invalid_answer(
    sidecar_factory, recorder
):
    # behind the sidecar's routing coordinator (the normal path), the same answer is the
    # coordinator's fault: 502 COORDINATOR_INVALID_ANSWER naming the field, not a 400 or 503
    xid = f"127.0.0.1:{recorder.port}:{BIG}"
    recorder.answers["/api/v1/branch/register"] = orjson.dumps({"xid": xid, "branchId": "12a"})
    sc = await sidecar_factory({"coordinator": {"endpoints": [recorder.url]}})
    with pytest.raises(SidecarError) as raised:
        await sc.control.coordinator.register(xid, BranchType.TCC, "r", "http://cb", b"{}")
    assert (raised.value.code, raised.value.status) == ("COORDINATOR_INVALID_ANSWER", 502)
    assert "branchId" in raised.value.message
