"""What an HTTP/2 upstream answers is relayed only when it cannot be read as framing by an
HTTP/1.1 client: a response field with CR, LF or NUL, or a colon in its name, is a 502 with
nothing of the answer passed on; the same safe fields answered again (the connection
remembers them) keep being relayed. The upstream is a raw h2 server sending exactly the
fields each test gives it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import h2.events
import pytest

from tests.component.h2server import H2TestServer, server_connection
from tests.component.servers import get, request

Fields = list[tuple[bytes, bytes]]


class RawH2Upstream(H2TestServer):
    """An h2c server answering each request with `answer(path)`'s fields and a short body,
    h2's outbound checks off so that any bytes go out."""

    def __init__(self, answer: Callable[[str], Fields]) -> None:
        super().__init__()
        self.answer = answer
        self.paths: list[str] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = server_connection(writer, validate=False)
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
