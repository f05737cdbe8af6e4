"""An HTTP/2 upstream stream that ends while the sidecar holds its answer's bytes
unacknowledged (its client reads slowly, so the exchange paused the upstream) gives those bytes
back to the connection's flow-control window. That window is shared by every stream on the
pooled connection: before, a client that stopped reading and left took up to a window's worth
with it for good, and the connection's next large answers stalled."""

from __future__ import annotations

import asyncio
import socket

import h2.events
import h2.exceptions

from tests.component.h2server import H2TestServer, server_connection
from tests.component.servers import get, request, wait_until

#: the answer to /big: far more than a client that does not read, and the sockets between,
#: can hold, so the sidecar has to pause the upstream
BIG = 4_000_000
#: the answer to anything else: more than one flow-control window (65,535)
SMALL = 200_000


class FlowControlledAnswers(H2TestServer):
    """Answers each request with a body of BIG or SMALL bytes, sent as the client's
    flow-control windows allow (h2 enforces them); counts the streams the client reset."""

    def __init__(self) -> None:
        super().__init__()
        self.resets = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = server_connection(writer)
        left: dict[int, int] = {}
        try:
            while data := await reader.read(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        path = dict(event.headers)[b":path"]
                        size = BIG if path == b"/big" else SMALL
                        conn.send_headers(
                            event.stream_id,
                            [(b":status", b"200"), (b"content-length", b"%d" % size)],
                        )
                        left[event.stream_id] = size
                    elif isinstance(event, h2.events.StreamReset):
                        self.resets += 1
                        left.pop(event.stream_id, None)
                for stream_id, size in list(left.items()):
                    window = min(conn.local_flow_control_window(stream_id), size)
                    while window > 0:
                        piece = min(window, conn.max_outbound_frame_size)
                        size -= piece
                        window -= piece
                        conn.send_data(stream_id, b"x" * piece, end_stream=size == 0)
                    if size:
                        left[stream_id] = size
                    else:
                        del left[stream_id]
                writer.write(conn.data_to_send())
        except (ConnectionError, h2.exceptions.ProtocolError):
            pass


async def test_a_stream_abandoned_while_paused_gives_its_window_back(sidecar_factory):
    up = FlowControlledAnswers()
    try:
        sc = await sidecar_factory({"app": {"url": await up.start(), "protocol": "h2c"}})
        port = sc.ports["inbound"]
        # a client with a small receive buffer that asks for /big, reads nothing, and leaves
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(get("/big"))
        await writer.drain()

        # wait until the exchange has paused the upstream, answer bytes held unacknowledged
        def paused() -> bool:
            return any(
                stream.paused and stream.unacked
                for cluster in sc._clusters.values()
                for conn in getattr(cluster, "_conns", ())
                for stream in conn.streams.values()
            )

        await wait_until(paused, timeout=10)
        writer.transport.abort()  # it leaves
        await wait_until(lambda: up.resets == 1, timeout=10)
        # the same pooled connection carries answers larger than a window again
        for _ in range(3):
            resp = await request(port, get("/after"), timeout=10)
            assert resp.status == 200 and resp.body_size == SMALL
        assert up.connections == 1
    finally:
        await up.close()
