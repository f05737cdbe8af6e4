"""A client that goes away before its answer abandons the exchange; `100 Continue` only after
every filter accepted the request.

Real clients give up with a FIN, not a reset: Go's net/http when its Timeout fires or its
context is cancelled, curl at --max-time, Python's clients on a timeout. So each case is
tried with a FIN (shutdown of the write side, the socket still open for reading), with a
reset, and with real clients (curl; Go in tests/realclients/test_go_net_http.py).
"""

from __future__ import annotations

import asyncio
import shutil
import socket
from typing import Any

import pytest

from sidecar.coordinator.states import GlobalStatus
from tests.component.servers import (
    Client,
    Received,
    Reply,
    UpstreamFactory,
    get,
    sample,
    wait_until,
)

#: long enough that nothing in these tests can end by a timeout: what ends an exchange here
#: is the client leaving
PATIENT = {"timeouts": {"connect": "5s", "response_header": "50s", "total": "60s"}}
ORDERS = {
    "transactions": [
        {"match": {"method": "POST", "path": "/orders"}, "name": "create-order", "timeout": "90s"}
    ]
}
TCC = [
    {
        "resource": "inv",
        "try": {"method": "POST", "path": "/try"},
        "confirm": {"method": "POST", "path": "/confirm"},
        "cancel": {"method": "POST", "path": "/cancel"},
        "max_application_data": "1KiB",
    }
]


class WaitsForItsClient:
    """An app handler that never answers on its own: it records the request and waits until
    its connection ends (what a Go handler sees as its request context ending)."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.ended = asyncio.Event()
        self.xids: list[str | None] = []
        self.body_bytes = 0

    async def __call__(self, req: Received, reply: Reply) -> None:
        self.xids.append(req.get("XID"))
        self.started.set()
        try:
            while data := await reply.reader.read(1 << 16):
                self.body_bytes += len(data)
        except ConnectionError:
            pass
        self.ended.set()
        reply.close()


async def _setup(sidecar_factory: Any, upstream: UpstreamFactory, *, read_body: bool = True, **cfg):
    handler = WaitsForItsClient()
    app = await upstream(handler, read_body=read_body)
    sc = await sidecar_factory({"app": {"url": app.url, **PATIENT}, **cfg})
    return sc, app, handler


def _fin(client: Client) -> None:
    """Half-close: a FIN, the socket still open for reading (what net/http and curl do)."""
    sock = client.writer.get_extra_info("socket")
    sock.shutdown(socket.SHUT_WR)


def aborts(sc: Any, listener: str = "inbound") -> float:
    return sample(sc, "gts_sidecar_client_aborts_total", listener=listener)


async def rolled_back(sc: Any, xid: str, timeout: float = 5.0) -> None:
    """Wait until the local engine has `xid` Rollbacked (the abandoned request's rollback
    runs in the background)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (status := (await sc.control.engine.get(xid))[0].status) is not GlobalStatus.ROLLBACKED:
        assert status is not GlobalStatus.COMMITTED, "an abandoned transaction committed"
        assert loop.time() < deadline, f"{xid} is {status}, not Rollbacked"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("leave", ["fin", "reset"])
async def test_a_client_that_leaves_before_its_answer_ends_the_apps_request(
    sidecar_factory, upstream, connect, leave
):
    sc, app, handler = await _setup(sidecar_factory, upstream)
    client = await connect(sc.ports["inbound"])
    await client.send(get("/slow"))
    await asyncio.wait_for(handler.started.wait(), 5)
    _fin(client) if leave == "fin" else client.reset()
    # the app's connection ends now, not at the 60 s total timeout
    await asyncio.wait_for(handler.ended.wait(), 5)
    await wait_until(lambda: aborts(sc) == 1)
    if leave == "fin":
        assert await client.closed()
    assert len(app.requests) == 1


async def test_a_declarative_transaction_whose_caller_left_is_rolled_back(
    sidecar_factory, upstream, connect
):
    sc, app, handler = await _setup(sidecar_factory, upstream, **ORDERS)
    client = await connect(sc.ports["inbound"])
    await client.send(get("/orders", method="POST", body=b'{"sku":"A-1"}'))
    await asyncio.wait_for(handler.started.wait(), 5)
    (xid,) = handler.xids
    assert xid is not None
    _fin(client)
    await asyncio.wait_for(handler.ended.wait(), 5)
    await rolled_back(sc, xid)
    assert aborts(sc) == 1


async def test_a_fin_read_with_the_apps_answer_still_rolls_back(sidecar_factory, upstream, connect):
    """The app's answer and the client's FIN arrive in one poll, the answer first: the commit
    had not been sent yet, so the transaction rolls back (found by the soak)."""
    got = asyncio.Event()
    held: dict[str, Any] = {}

    async def answers_when_told(req: Received, reply: Reply) -> None:
        held["reply"], held["xid"] = reply, req.get("XID")
        got.set()
        while await reply.reader.read(1 << 16):
            pass

    app = await upstream(answers_when_told)
    sc = await sidecar_factory({"app": {"url": app.url, **PATIENT}, **ORDERS})
    client = await connect(sc.ports["inbound"])
    await client.send(get("/orders", method="POST", body=b"{}"))
    await asyncio.wait_for(got.wait(), 5)
    # no await in between: the sidecar (on this loop) reads both in its next poll
    held["reply"].write(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")
    _fin(client)
    await rolled_back(sc, held["xid"])
    assert aborts(sc) == 1


async def test_a_client_that_leaves_mid_body_ends_the_upstream_body_at_once(
    sidecar_factory, upstream, connect
):
    sc, app, handler = await _setup(
        sidecar_factory, upstream, read_body=False, listeners={"inbound": {"timeouts": {}}}
    )
    client = await connect(sc.ports["inbound"])
    # larger than the request buffer: it streams to the app as it comes
    head = b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\n"
    await client.send(head + b"x" * 100_000)
    await asyncio.wait_for(handler.started.wait(), 5)
    _fin(client)
    # not after body_idle or the total timeout: at once
    await asyncio.wait_for(handler.ended.wait(), 5)
    assert handler.body_bytes < 1_000_000
    await wait_until(lambda: aborts(sc) == 1)


async def test_a_fin_after_the_answer_began_lets_the_answer_finish(
    sidecar_factory, upstream, connect
):
    release = asyncio.Event()

    async def streams(req: Received, reply: Reply) -> None:
        reply.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        await reply.drain()
        await release.wait()
        reply.write(b"world")
        await reply.drain()

    app = await upstream(streams)
    sc = await sidecar_factory({"app": {"url": app.url, **PATIENT}})
    client = await connect(sc.ports["inbound"])
    await client.send(get("/stream"))
    head = await client.reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    _fin(client)
    await client.reader.readexactly(5)
    release.set()
    assert await client.reader.readexactly(5) == b"world"
    assert await client.read_to_eof() == b""
    assert aborts(sc) == 0


async def test_an_idle_keep_alive_client_that_closes_is_not_an_abort(
    sidecar_factory, upstream, connect
):
    app = await upstream()
    sc = await sidecar_factory({"app": {"url": app.url}})
    client = await connect(sc.ports["inbound"])
    await client.send(get("/one"))
    resp = await client.response()
    assert resp.status == 200
    _fin(client)
    assert await client.closed()
    assert aborts(sc) == 0


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_giving_up_at_max_time_ends_the_apps_request(sidecar_factory, upstream):
    sc, app, handler = await _setup(sidecar_factory, upstream, **ORDERS)
    proc = await asyncio.create_subprocess_exec(
        "curl", "-s", "-o", "/dev/null", "--max-time", "1", "-X", "POST", "-d", "{}",
        f"http://127.0.0.1:{sc.ports['inbound']}/orders",
    )  # fmt: skip
    assert await proc.wait() == 28  # curl: operation timed out
    await asyncio.wait_for(handler.ended.wait(), 5)
    (xid,) = handler.xids
    assert xid is not None
    await wait_until(lambda: aborts(sc) == 1)
    await rolled_back(sc, xid)


# --- Expect: 100-continue ------------------------------------------------------------------------


async def _interim_then_final(client: Client) -> tuple[list[int], Any]:
    statuses = []
    while True:
        resp = await client.response(interim=True)
        statuses.append(resp.status)
        if resp.status >= 200:
            return statuses, resp


async def test_100_continue_is_not_sent_before_a_missing_xid_is_refused(
    sidecar_factory, upstream, connect
):
    app = await upstream()
    sc = await sidecar_factory({"app": {"url": app.url}, "tcc": TCC})
    client = await connect(sc.ports["inbound"])
    await client.send(
        b"POST /try HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
    )
    statuses, resp = await _interim_then_final(client)
    assert statuses == [400]
    assert resp.get("x-gts-sidecar-error") == "XID_REQUIRED"
    assert app.requests == []


async def test_100_continue_is_not_sent_before_an_oversized_try_is_refused(
    sidecar_factory, upstream, connect
):
    app = await upstream()
    sc = await sidecar_factory({"app": {"url": app.url}, "tcc": TCC})
    tx = await sc.control.engine.begin("t", 60_000)
    client = await connect(sc.ports["inbound"])
    await client.send(
        b"POST /try HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
        b"XID: " + tx.xid.encode() + b"\r\nContent-Length: 4096\r\n\r\n"
    )
    statuses, resp = await _interim_then_final(client)
    assert statuses == [413]
    assert resp.get("x-gts-sidecar-error") == "PAYLOAD_TOO_LARGE"
    assert app.requests == []


async def test_100_continue_comes_once_a_try_is_accepted(sidecar_factory, upstream, connect):
    app = await upstream()
    sc = await sidecar_factory({"app": {"url": app.url}, "tcc": TCC})
    tx = await sc.control.engine.begin("t", 60_000)
    client = await connect(sc.ports["inbound"])
    await client.send(
        b"POST /try HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
        b"XID: " + tx.xid.encode() + b"\r\nContent-Length: 2\r\n\r\n"
    )
    resp = await client.response(interim=True)
    assert resp.status == 100
    await client.send(b"{}")
    resp = await client.response()
    assert resp.status == 200
    assert len(app.requests) == 1


async def test_100_continue_comes_after_a_declarative_begin(sidecar_factory, upstream, connect):
    """On a transaction route the 100 is sent once the transaction exists, and the body
    then reaches the app with the new XID."""
    app = await upstream()
    sc = await sidecar_factory({"app": {"url": app.url}, **ORDERS})
    client = await connect(sc.ports["inbound"])
    await client.send(
        b"POST /orders HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
    )
    resp = await client.response(interim=True)
    assert resp.status == 100
    await client.send(b"{}")
    resp = await client.response()
    assert resp.status == 200
    (seen,) = app.requests
    assert seen.get("XID") == resp.get("XID")
