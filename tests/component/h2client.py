"""A small HTTP/2 (prior knowledge) test client on the h2 state machine, for what curl and
grpcio cannot be told to do: send exact frames, reset a stream, hold a window at zero."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events


@dataclass
class H2Response:
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    reset: int | None = None
    ended: bool = False

    def get(self, name: str) -> str | None:
        key = name.lower().encode()
        for n, v in self.headers + self.trailers:
            if n == key:
                return v.decode()
        return None


class H2Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.conn = h2.connection.H2Connection(config=config)
        self.responses: dict[int, H2Response] = {}
        self.events: list[Any] = []
        self.terminated: h2.events.ConnectionTerminated | None = None
        self.closed = False

    @classmethod
    async def connect(cls, port: int) -> H2Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer)
        client.conn.initiate_connection()
        await client.flush()
        return client

    async def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.writer.write(data)
            await self.writer.drain()

    def close(self) -> None:
        self.writer.transport.abort()

    async def send_request(
        self,
        path: str = "/",
        *,
        method: str = "GET",
        headers: list[tuple[str, str]] = (),  # type: ignore[assignment]
        body: bytes | None = None,
        end: bool = True,
        authority: str = "app",
    ) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        fields = [
            (b":method", method.encode()),
            (b":path", path.encode()),
            (b":scheme", b"http"),
            (b":authority", authority.encode()),
        ] + [(n.lower().encode(), v.encode()) for n, v in headers]
        self.responses[stream_id] = H2Response()
        self.conn.send_headers(stream_id, fields, end_stream=body is None and end)
        if body is not None:
            self.conn.send_data(stream_id, body, end_stream=end)
        await self.flush()
        return stream_id

    async def send_data(self, stream_id: int, data: bytes, end: bool = False) -> None:
        self.conn.send_data(stream_id, data, end_stream=end)
        await self.flush()

    async def reset(self, stream_id: int) -> None:
        self.conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        await self.flush()

    async def pump(self, timeout: float = 5.0) -> bool:
        """Read once and handle the events; False once the server closed."""
        data = await asyncio.wait_for(self.reader.read(1 << 16), timeout)
        if not data:
            self.closed = True
            return False
        for event in self.conn.receive_data(data):
            self.events.append(event)
            self._handle(event)
        await self.flush()
        return True

    def _handle(self, event: Any) -> None:
        sid = getattr(event, "stream_id", None)
        resp = self.responses.get(sid) if sid else None
        if isinstance(event, h2.events.ResponseReceived) and resp is not None:
            for n, v in event.headers:
                if n == b":status":
                    resp.status = int(v)
                else:
                    resp.headers.append((bytes(n), bytes(v)))
        elif isinstance(event, h2.events.DataReceived) and resp is not None:
            resp.body += event.data
            self.conn.acknowledge_received_data(event.flow_controlled_length, sid)
        elif isinstance(event, h2.events.TrailersReceived) and resp is not None:
            resp.trailers += [(bytes(n), bytes(v)) for n, v in event.headers]
        elif isinstance(event, h2.events.StreamEnded) and resp is not None:
            resp.ended = True
        elif isinstance(event, h2.events.StreamReset) and resp is not None:
            resp.reset = event.error_code
            resp.ended = True
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.terminated = event

    async def response(self, stream_id: int, timeout: float = 5.0) -> H2Response:
        resp = self.responses[stream_id]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not resp.ended:
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(f"stream {stream_id} did not end: {resp}")
            if not await self.pump(left):
                raise ConnectionError(f"closed before stream {stream_id} ended: {resp}")
        return resp

    async def get(self, path: str = "/", *, timeout: float = 5.0, **kw: Any) -> H2Response:
        return await self.response(await self.send_request(path, **kw), timeout)
