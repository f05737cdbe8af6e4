"""An HTTP/2 upstream that says it never processed a request (RST_STREAM REFUSED_STREAM, or a
GOAWAY whose last stream id is below the request's) gets the request again, whatever its
method and with its whole body (RFC 9113 section 8.7); one that refuses every stream is asked
a bounded number of times and the client gets a 502 saying why. The upstream is a raw h2c
server refusing as each test tells it and recording the bodies it did process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import h2.errors
import h2.events
import h2.exceptions
import pytest

from tests.component.h2client import H2Client
from tests.component.h2server import H2TestServer, server_connection
from tests.component.servers import error_of, get, request, sample

#: what the upstream does with the n-th request it receives (0-based): "serve",
#: "refuse" (RST_STREAM REFUSED_STREAM) or "goaway" (GOAWAY, last stream below it, then close)
Policy = Callable[[int], str]


class RefusingH2Upstream(H2TestServer):
    def __init__(self, policy: Policy) -> None:
        super().__init__()
        self.policy = policy
        self.received = 0
        #: bodies of the requests it processed (answered 200)
        self.served: list[bytes] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = server_connection(writer)
        bodies: dict[int, bytearray] = {}
        verdicts: dict[int, str] = {}
        try:
            while data := await reader.read(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        verdict = verdicts[event.stream_id] = self.policy(self.received)
                        self.received += 1
                        bodies[event.stream_id] = bytearray()
                        if verdict == "refuse":
                            conn.reset_stream(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                        elif verdict == "goaway":
                            conn.close_connection(last_stream_id=max(0, event.stream_id - 2))
                    elif isinstance(event, h2.events.DataReceived):
                        conn.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                        if event.stream_id in bodies:
                            bodies[event.stream_id] += event.data
                    elif isinstance(event, h2.events.StreamEnded):
                        if verdicts.get(event.stream_id) == "serve":
                            self.served.append(bytes(bodies.pop(event.stream_id)))
                            conn.send_headers(event.stream_id, [(b":status", b"200")])
                            conn.send_data(event.stream_id, b"done", end_stream=True)
                writer.write(conn.data_to_send())
                if "goaway" in verdicts.values():
                    break
        except (ConnectionError, h2.exceptions.ProtocolError):
            pass


@pytest.fixture
async def refusing() -> AsyncIterator[Callable[[Policy], RefusingH2Upstream]]:
    made: list[RefusingH2Upstream] = []

    def make(policy: Policy) -> RefusingH2Upstream:
        made.append(RefusingH2Upstream(policy))
        return made[-1]

    yield make
    for up in made:
        await up.close()


async def sidecar_to(sidecar_factory, up: RefusingH2Upstream, **app) -> object:
    return await sidecar_factory(
        {"app": {"url": await up.start(), "protocol": "h2c", **app}, "logging": {"level": "error"}}
    )


@pytest.mark.parametrize("refusal", ["refuse", "goaway"])
async def test_a_post_the_upstream_refused_unprocessed_goes_again_with_its_body(
    sidecar_factory, refusing, refusal
):
    up = refusing(lambda n: refusal if n == 0 else "serve")
    sc = await sidecar_to(sidecar_factory, up)
    body = b"order=42&" * 100
    resp = await request(sc.ports["inbound"], get("/orders", method="POST", body=body))
    assert resp.status == 200 and resp.body == b"done"
    assert up.served == [body]  # processed once, whole
    assert up.received == 2
    assert sample(sc, "gts_sidecar_upstream_retries_total", upstream="app") >= 1


async def test_a_body_still_arriving_when_refused_is_sent_again_whole(sidecar_factory, refusing):
    """A gRPC call's body goes on as it comes (a stream both sides talk on); refused after
    its first message went out, the new attempt gets that message and then the rest."""
    up = refusing(lambda n: "refuse" if n == 0 else "serve")
    sc = await sidecar_to(sidecar_factory, up)
    client = await H2Client.connect(sc.ports["inbound"])
    try:
        grpc = [("content-type", "application/grpc"), ("te", "trailers")]
        sid = await client.send_request(
            "/pkg.Svc/Upload", method="POST", headers=grpc, body=b"first", end=False
        )
        await asyncio.wait_for(_until(lambda: up.received >= 1), 10)
        await client.send_data(sid, b"-last!", end=True)
        resp = await client.response(sid)
    finally:
        client.close()
    assert resp.status == 200
    assert up.served == [b"first-last!"]


async def test_an_upstream_refusing_every_stream_is_asked_a_bounded_number_of_times(
    sidecar_factory, refusing
):
    up = refusing(lambda n: "refuse")
    sc = await sidecar_to(sidecar_factory, up, retries={"attempts": 2})
    resp = await request(sc.ports["inbound"], get("/x", method="POST", body=b"{}"))
    assert resp.status == 502
    assert "REFUSED_STREAM" in error_of(resp)["message"]
    assert "no attempt left" in error_of(resp)["message"]
    assert up.served == []
    assert 2 <= up.received <= 4


async def test_a_body_past_the_request_buffer_is_not_kept_and_is_a_502(sidecar_factory, refusing):
    up = refusing(lambda n: "refuse" if n == 0 else "serve")
    sc = await sidecar_factory(
        {
            "app": {"url": await up.start(), "protocol": "h2c"},
            "listeners": {"inbound": {"clients": {"request_buffer": "1KiB"}}},
        }
    )
    resp = await request(sc.ports["inbound"], get("/big", method="POST", body=b"x" * 4096))
    assert resp.status == 502
    assert "request_buffer" in error_of(resp)["message"]
    assert up.served == []


async def _until(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await asyncio.sleep(0.005)
