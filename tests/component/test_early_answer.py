"""An app that answers before it has read the request's body (a 401 or 413 to a large upload,
as many do) and a client still sending that body:

- HTTP/1.1: the answer says `Connection: close` (where the next request would begin in the
  unread bytes is unknown), and the connection ends with a lingering close: a FIN, then the
  rest of the client's bytes read and dropped for a while, so that no reset destroys the
  answer before the client reads it (as nginx and Envoy close).
- HTTP/2: the stream is reset with NO_ERROR once the answer is out, which asks the client to
  stop sending without error (RFC 9113 §8.1; grpc-go and nginx do the same). The connection
  serves on.
- HTTP/2: request bytes a stream held unacknowledged when it ended (its exchange had paused
  them) are acknowledged, or they would be lost to the connection's flow-control window and
  a few such streams would stall the whole connection.
- An HTTP/2 app: the upstream stream whose body can no longer be sent is reset, not left
  half-open against the app's concurrent streams.
"""

from __future__ import annotations

import asyncio

import h2.events
import h2.exceptions
import pytest

from tests.component.h2client import H2Client, H2Response
from tests.component.h2server import H2TestServer, server_connection
from tests.component.servers import read_response, wait_until

DENIED = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 6\r\n\r\ndenied"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
BODY_SIZE = 16_000_000
#: bodies past this many bytes stream to the app as they come (clients.request_buffer)
REQUEST_BUFFER = 8192


class AnswersAtTheHead:
    """An HTTP/1.1 app that answers each request as soon as its head is in: 401 to a POST,
    200 to anything else; then it reads and drops the body (its Content-Length) and serves
    the connection's next request."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                writer.write(DENIED if head.startswith(b"POST") else OK)
                await writer.drain()
                for line in head.lower().split(b"\r\n"):
                    if line.startswith(b"content-length:"):
                        await reader.readexactly(int(line.split(b":")[1]))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def app():
    server = AnswersAtTheHead()
    yield server
    await server.close()


def early_config(url: str) -> dict:
    return {
        "app": {"url": url},
        "listeners": {"inbound": {"clients": {"request_buffer": REQUEST_BUFFER}}},
    }


async def test_http1_an_answer_before_the_body_says_close_and_lingers(sidecar_factory, app):
    """The client writes its whole 16 MB body before it reads anything, as h2load does: the
    answer came early, and the lingering close reads and drops the rest of the body. (It
    stopped after a first MiB with a reset, which failed the client's writes.)"""
    sc = await sidecar_factory(early_config(await app.start()))
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.ports["inbound"])
    try:
        writer.write(
            b"POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: %d\r\n\r\n" % BODY_SIZE
        )
        piece = b"x" * 1_000_000
        for _ in range(BODY_SIZE // len(piece)):
            writer.write(piece)
            await writer.drain()  # (more than the sockets between hold: the sidecar reads)
        resp = await asyncio.wait_for(read_response(reader, "POST"), 10)
        assert resp.status == 401 and resp.body == b"denied"
        assert resp.get("connection") == "close"
        # then a FIN, not a reset
        assert await asyncio.wait_for(reader.read(), 10) == b""
    finally:
        writer.close()


async def test_http1_a_request_whose_body_came_whole_keeps_the_connection(sidecar_factory, app):
    """The control: a body that is all in before the answer leaves the connection open."""
    sc = await sidecar_factory(early_config(await app.start()))
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.ports["inbound"])
    try:
        for _ in range(2):
            writer.write(b"POST /small HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\n\r\nhello")
            resp = await asyncio.wait_for(read_response(reader, "POST"), 10)
            assert resp.status == 401 and resp.get("connection") is None
    finally:
        writer.close()


async def send_body(client: H2Client, stream_id: int, data: bytes) -> None:
    """Send `data` on the stream as the flow-control windows allow, waiting for the server's
    WINDOW_UPDATEs (TimeoutError when none comes); stop early once the server has reset the
    stream (it answered, and asks for no more)."""
    while data and client.responses[stream_id].reset is None:
        window = min(
            client.conn.local_flow_control_window(stream_id), client.conn.max_outbound_frame_size
        )
        if window <= 0:
            await client.pump(timeout=5)
            continue
        await client.send_data(stream_id, data[:window])
        data = data[window:]


async def until_reset(client: H2Client, stream_id: int) -> H2Response:
    resp = await client.response(stream_id, timeout=10)
    while resp.reset is None:
        await client.pump(timeout=5)
    return resp


async def test_http2_an_answer_before_the_body_resets_the_stream_without_error(
    sidecar_factory, app
):
    sc = await sidecar_factory(early_config(await app.start()))
    client = await H2Client.connect(sc.ports["inbound"])
    try:
        for _ in range(2):
            sid = await client.send_request(
                "/upload", method="POST", headers=[("content-length", str(BODY_SIZE))], end=False
            )
            await send_body(client, sid, b"x" * 20_000)
            resp = await until_reset(client, sid)
            assert resp.status == 401 and resp.body == b"denied"
            assert resp.reset == 0  # NO_ERROR: stop sending, the answer stands
        # the connection serves on
        assert (await client.get("/after")).status == 200
    finally:
        client.close()


async def test_http2_streams_ended_while_paused_give_their_window_back(
    sidecar_factory, unaccepting_port
):
    """The app's connect hangs, so a body past request_buffer is paused (its bytes held
    unacknowledged) until the 504. Three such requests on one connection, each sending
    60,000 bytes: the connection's window (65,535) has room for the second and third only if
    the first's held bytes were given back."""
    config = early_config(f"http://127.0.0.1:{unaccepting_port}")
    config["app"] |= {"timeouts": {"connect": "200ms"}, "retries": {"attempts": 0}}
    sc = await sidecar_factory(config)
    client = await H2Client.connect(sc.ports["inbound"])
    try:
        for _ in range(3):
            sid = await client.send_request(
                "/upload", method="POST", headers=[("content-length", "100000")], end=False
            )
            await send_body(client, sid, b"x" * 60_000)
            resp = await client.response(sid, timeout=10)
            assert resp.status == 504
    finally:
        client.close()


class H2AnswersAtTheHead(H2TestServer):
    """An HTTP/2 app that answers 401 at a request's HEADERS, END_STREAM and all, and then
    neither reads its body nor resets the stream (a server may leave that to the client);
    records the streams the client reset."""

    def __init__(self) -> None:
        super().__init__()
        self.answered: list[int] = []
        self.reset_by_client: list[int] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = server_connection(writer)
        try:
            while data := await reader.read(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        conn.send_headers(
                            event.stream_id, [(b":status", b"401"), (b"content-length", b"6")]
                        )
                        conn.send_data(event.stream_id, b"denied", end_stream=True)
                        self.answered.append(event.stream_id)
                    elif isinstance(event, h2.events.DataReceived):
                        conn.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                    elif isinstance(event, h2.events.StreamReset):
                        self.reset_by_client.append(event.stream_id)
                writer.write(conn.data_to_send())
        except (ConnectionError, h2.exceptions.ProtocolError):
            pass


async def test_an_h2_upstream_stream_answered_before_its_body_is_sent_is_reset(
    sidecar_factory,
):
    """The sidecar resets the upstream stream it can no longer finish sending: left
    half-open, it would count against the upstream's concurrent streams for good."""
    up = H2AnswersAtTheHead()
    try:
        config = early_config(await up.start())
        config["app"]["protocol"] = "h2c"
        sc = await sidecar_factory(config)
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.ports["inbound"])
        try:
            writer.write(
                b"POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: %d\r\n\r\n" % BODY_SIZE
            )
            writer.write(b"x" * 50_000)
            await writer.drain()
            resp = await asyncio.wait_for(read_response(reader, "POST"), 10)
            assert resp.status == 401 and resp.get("connection") == "close"
        finally:
            writer.close()
        await wait_until(lambda: up.reset_by_client == up.answered == [1])
    finally:
        await up.close()
