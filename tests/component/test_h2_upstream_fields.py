"""What an HTTP/2 upstream answers is relayed only when it cannot be read as framing by an
HTTP/1.1 client: a response field with CR, LF or NUL, or a colon in its name, is a 502 with
nothing of the answer passed on; the same safe fields answered again (the connection
remembers them) keep being relayed. The upstream is a raw h2 server sending exactly the
fields each test gives it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import h2.config
import h2.connection
import h2.events
import pytest

from tests.component.servers import get, request

Fields = list[tuple[bytes, bytes]]


class RawH2Upstream:
    """An h2c server answering each request with `answer(path)`'s fields and a short body,
    h2's outbound checks off so that any bytes go out."""

    def __init__(self, answer: Callable[[str], Fields]) -> None:
        self.answer = answer
        self.server: asyncio.Server | None = None
        self.paths: list[str] = []

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        config = h2.config.H2Configuration(
            client_side=False, header_encoding=None, validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )  # fmt: skip
        conn = h2.connection.H2Connection(config)
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        try:
            while data := await reader.read(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        path = dict(event.headers)[b":path"].decode()
                        self.paths.append(path)
                        conn.send_headers(event.stream_id, [(b":status", b"200")]
                                          + self.answer(path))  # fmt: skip
                        conn.send_data(event.stream_id, b"ok", end_stream=True)
                writer.write(conn.data_to_send())
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[[Callable[[str], Fields]], RawH2Upstream]]:
    made: list[RawH2Upstream] = []

    def make(answer: Callable[[str], Fields]) -> RawH2Upstream:
        up = RawH2Upstream(answer)
        made.append(up)
        return up

    yield make
    for up in made:
        await up.close()


BAD: dict[str, Fields] = {
    "CR in a value": [(b"x-a", b"1\r\nset-cookie: stolen=1")],
    "LF in a value": [(b"x-a", b"1\nset-cookie: stolen=1")],
    "NUL in a value": [(b"x-a", b"1\x00")],
    "colon in a name": [(b"set-cookie:stolen", b"1")],
}


@pytest.mark.parametrize("case", list(BAD))
async def test_an_unsafe_response_field_is_a_502_after_safe_ones_were_remembered(
    sidecar_factory, raw_upstream, case
):
    safe = [(b"x-safe", b"yes"), (b"content-type", b"text/plain")]
    up = raw_upstream(lambda path: safe + BAD[case] if path == "/bad" else safe)
    sc = await sidecar_factory({"app": {"url": await up.start(), "protocol": "h2c"}})
    port = sc.ports["inbound"]
    for _ in range(2):  # the second answer's fields are all remembered as safe
        resp = await request(port, get("/good"))
        assert resp.status == 200
        assert resp.get("x-safe") == "yes"
    resp = await request(port, get("/bad"))
    assert resp.status == 502
    assert resp.get("x-safe") is None and resp.get("set-cookie") is None
    assert up.paths == ["/good", "/good", "/bad"]
