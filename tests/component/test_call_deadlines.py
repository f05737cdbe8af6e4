"""Coordinator calls never outlive the transaction they serve (RemoteCoordinator, real sockets).

The last test runs a participant's client against a real sidecar's peer listener (the local
coordinator): the register answer's `timeLeftMs` gives it the deadline of a transaction it
did not begin.

A stand-in coordinator on loopback can hold any answer until the test lets it go. With
`coordinator.timeouts.request` at 30 s and a transaction of 0.5 s, a begin or a register the
coordinator does not answer gives up when the transaction's time is up, not after 30 s, and
that says nothing against the coordinator's health (the breaker stays closed); once the time
is up, register and report are not sent at all. Commit and rollback are not cut short: a
decision that reaches the coordinator is binding, and its answer is worth waiting for.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
from aiohttp import web

from sidecar.config import CoordinatorConfig
from sidecar.coordinator.breaker import BreakerState
from sidecar.coordinator.client import RemoteCoordinator
from sidecar.coordinator.states import BranchStatus, BranchType
from sidecar.errors import CoordinatorUnavailable, TransactionNotActive
from sidecar.metrics import Metrics
from sidecar.schema import validate
from tests.component.gts import SignedClient, ring, signing_config
from tests.component.servers import wait_until

TXID = 193705495666798593
#: far above every transaction timeout below: a call that waited for it would fail the test
REQUEST_TIMEOUT = "30s"
#: the bound the tests wait for a call that must end with its 0.5 s transaction
WITHIN = 10.0


class Coordinator:
    """Answers GTS REST v1 with canned bodies; `held` paths wait for their event first."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.held: dict[str, asyncio.Event] = {}
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def xid(self) -> str:
        return f"127.0.0.1:{self.port}:{TXID}"

    async def start(self) -> Coordinator:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def close(self) -> None:
        for event in self.held.values():
            event.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read() or b"{}")
        path = request.path
        self.seen.append(path)
        held = self.held.get(path.rsplit("/", 1)[-1])
        if held is not None:
            await held.wait()
        answer: dict[str, object]
        if path.endswith("/start"):
            answer = {"xid": self.xid, "status": "Begin", "timeoutMs": body.get("timeoutMs", 60000)}
        elif path.endswith("/register"):
            answer = {"xid": self.xid, "branchId": str(TXID + 1)}
        elif path.endswith("/report"):
            answer = {"xid": self.xid, "branchId": str(TXID + 1), "status": body["status"]}
        else:
            answer = {"xid": self.xid, "status": "TimeoutRollbacked"}
        return web.json_response(answer)


@pytest.fixture
async def coordinator() -> AsyncIterator[Coordinator]:
    server = await Coordinator().start()
    yield server
    await server.close()


@pytest.fixture
async def remote(coordinator: Coordinator) -> AsyncIterator[RemoteCoordinator]:
    cfg = validate(
        CoordinatorConfig,
        {
            "endpoints": [coordinator.url],
            "timeouts": {"request": REQUEST_TIMEOUT},
            # one failure would open it: a call cut short by the deadline must not count
            "breaker": {"failures": 1},
        },
    )
    client = RemoteCoordinator(cfg, ring(), Metrics())
    yield client
    await client.close()


def calls(client: RemoteCoordinator, call: str, result: str) -> float:
    value = client.metrics.registry.get_sample_value(
        "gts_sidecar_coordinator_calls_total", {"call": call, "result": result}
    )
    return 0.0 if value is None else value


async def test_a_register_gives_up_when_the_transaction_does(coordinator, remote):
    state = await remote.begin("order", 500)
    loop = asyncio.get_running_loop()
    deadline = remote.deadline_of(state.xid)
    assert deadline is not None and deadline <= loop.time() + 0.5
    coordinator.held["register"] = asyncio.Event()  # the coordinator never answers
    with pytest.raises(CoordinatorUnavailable, match="transaction's time left"):
        await asyncio.wait_for(
            remote.register(state.xid, BranchType.TCC, "stock", "http://cb", b"{}"), WITHIN
        )
    assert loop.time() >= deadline - 0.05  # it waited for the time left, no longer
    assert remote.breaker.state is BreakerState.CLOSED
    assert calls(remote, "register", "deadline") == 1


async def test_a_begin_gives_up_within_its_own_timeout(coordinator, remote):
    coordinator.held["start"] = asyncio.Event()
    with pytest.raises(CoordinatorUnavailable, match="transaction's time left"):
        await asyncio.wait_for(remote.begin("order", 500), WITHIN)
    assert remote.breaker.state is BreakerState.CLOSED


async def test_once_the_time_is_up_register_and_report_are_not_sent(coordinator, remote):
    state = await remote.begin("order", 60_000)
    now = asyncio.get_running_loop().time()
    remote.deadlines.remember(state.xid, now - 0.25, now)
    with pytest.raises(TransactionNotActive, match="reached its timeout"):
        await remote.register(state.xid, BranchType.TCC, "stock", "http://cb", b"{}")
    with pytest.raises(TransactionNotActive, match="reached its timeout"):
        await remote.report(state.xid, TXID + 1, BranchStatus.PHASE_ONE_DONE)
    assert coordinator.seen == ["/api/v1/transaction/start"]  # nothing else went out
    # a failed try's report still goes: it can only turn a commit into a rollback, and the
    # coordinator's deadline may be a moment later than the one counted here
    await remote.report(state.xid, TXID + 1, BranchStatus.PHASE_ONE_FAILED)
    assert coordinator.seen[-1] == "/api/v1/branch/report"


async def test_a_decision_is_not_cut_short_and_forgets_the_deadline(coordinator, remote):
    state = await remote.begin("order", 500)
    # the answer comes only after the transaction's time is up: still awaited and returned
    deadline = remote.deadline_of(state.xid)
    assert deadline is not None
    coordinator.held["rollback"] = release = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.call_at(deadline + 0.2, release.set)
    done = await asyncio.wait_for(remote.rollback(state.xid), WITHIN)
    assert done.status == "TimeoutRollbacked"
    assert remote.deadline_of(state.xid) is None


async def test_the_applied_default_timeout_is_learnt_from_the_start_answer(remote):
    loop = asyncio.get_running_loop()
    before = loop.time()
    state = await remote.begin("order", None)  # the stand-in applies 60 s
    deadline = remote.deadline_of(state.xid)
    assert deadline is not None and before + 60 <= deadline <= loop.time() + 60


async def test_calls_about_transactions_begun_elsewhere_keep_the_configured_timeout(
    coordinator, remote
):
    # a participant's registration: the deadline is not known here, so the call is made
    # and answered as before
    xid = f"127.0.0.1:{coordinator.port}:{TXID + 7}"
    assert remote.deadline_of(xid) is None
    branch = await remote.register(xid, BranchType.TCC, "stock", "http://cb", b"{}")
    assert branch == TXID + 1


# --- a participant learns the deadline from the register answer (the real coordinator) ------


@pytest.fixture
async def peer(sidecar_factory, tmp_path):
    sc = await sidecar_factory(signing_config(tmp_path))
    async with aiohttp.ClientSession() as session:
        yield sc, SignedClient(session, sc.ports["peer"], ring())


async def test_a_participant_keeps_its_calls_within_a_transaction_begun_elsewhere(peer):
    sc, initiator = peer
    # the participant's client did not begin the transaction: the register answer tells it
    # how long the transaction has left (timeLeftMs), counted from when it sent the register
    cfg = validate(
        CoordinatorConfig,
        {"endpoints": [f"http://127.0.0.1:{sc.ports['peer']}"], "timeouts": {"request": "30s"}},
    )
    participant = RemoteCoordinator(cfg, ring(), Metrics())
    try:
        loop = asyncio.get_running_loop()
        xid = await initiator.start(timeout_ms=60_000)
        sent = loop.time()
        await participant.register(xid, BranchType.TCC, "stock", "http://127.0.0.1:9/b", b"{}")
        deadline = participant.deadline_of(xid)
        # (timeLeftMs is whole milliseconds, and the client notes its send a few µs after
        # `sent`: up to 1 ms over 60 s is the rounding, not a longer deadline)
        assert deadline is not None and sent + 59 <= deadline <= sent + 60.001

        short = await initiator.start(timeout_ms=300)
        branch = await participant.register(
            short, BranchType.TCC, "stock", "http://127.0.0.1:9/b", b"{}"
        )
        ends = participant.deadline_of(short)
        assert ends is not None and ends <= loop.time() + 0.3
        await wait_until(lambda: loop.time() > ends, timeout=WITHIN)
        # its time is up: the report is not sent (the coordinator is rolling it back)
        with pytest.raises(TransactionNotActive, match="reached its timeout"):
            await participant.report(short, branch, BranchStatus.PHASE_ONE_DONE)
        assert calls(participant, "report", "deadline") == 1
        assert calls(participant, "report", "ok") == 0
    finally:
        await participant.close()
