"""`Sidecar.close()` is the hard stop (what follows a drain that timed out, and what an
embedding program calls): it must end every client connection it accepted, not only stop
listening. Before it did, a keep-alive or HTTP/2 client that had not hung up yet kept its
connection to a sidecar that was gone, and the transport was left for the garbage
collector to find unclosed."""

from __future__ import annotations

from tests.component.h2client import H2Client
from tests.component.servers import Client, sample


async def test_close_ends_an_idle_keep_alive_connection(sidecar_factory, upstream):
    app = await upstream()
    sc = await sidecar_factory({"app": {"url": app.url}})
    async with await Client.connect(sc.ports["inbound"]) as client:
        await client.send(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        assert (await client.response()).status == 200
        assert sample(sc, "gts_sidecar_downstream_connections", listener="inbound") == 1
        await sc.close()
        await client.read_to_eof()
    assert sample(sc, "gts_sidecar_downstream_connections", listener="inbound") == 0


async def test_close_ends_an_idle_http2_connection(sidecar_factory, upstream):
    app = await upstream()
    sc = await sidecar_factory({"app": {"url": app.url}})
    client = await H2Client.connect(sc.ports["inbound"])
    try:
        assert (await client.get("/x")).status == 200
        assert sample(sc, "gts_sidecar_downstream_connections", listener="inbound") == 1
        await sc.close()
        while await client.pump():
            pass
        assert client.closed
    finally:
        client.close()
    assert sample(sc, "gts_sidecar_downstream_connections", listener="inbound") == 0
