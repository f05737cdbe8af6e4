"""Go's net/http through the inbound listener: what a Go service's caller actually does.

`http.Client{Timeout}` gives up by closing its connection with a FIN. The app's request must
end then (its context cancelled, as it would be talking to the app directly), and a
declarative transaction the request began must roll back, never commit.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from tests.component.servers import Received, Reply, UpstreamFactory, sample, wait_until
from tests.component.test_abandon import ORDERS, PATIENT, WaitsForItsClient, rolled_back


async def go(client: Path, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(str(client), *args, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out
    return out.decode().strip()


async def test_a_go_client_that_times_out_rolls_its_order_back(
    sidecar_factory: Any, upstream: UpstreamFactory, go_client: Path
) -> None:
    handler = WaitsForItsClient()
    app = await upstream(handler)
    sc = await sidecar_factory({"app": {"url": app.url, **PATIENT}, **ORDERS})
    url = f"http://127.0.0.1:{sc.ports['inbound']}/orders"
    line = await go(go_client, "POST", url, "1s", '{"sku":"A-1"}')
    assert line.startswith("ERR") and "Client.Timeout exceeded" in line, line
    # the app's request ended with the caller's, not at the 60 s total timeout
    await asyncio.wait_for(handler.ended.wait(), 5)
    (xid,) = handler.xids
    assert xid is not None
    await rolled_back(sc, xid)
    await wait_until(lambda: sample(sc, "gts_sidecar_client_aborts_total", listener="inbound") == 1)


async def test_a_go_client_that_waits_gets_its_committed_order(
    sidecar_factory: Any, upstream: UpstreamFactory, go_client: Path
) -> None:
    async def created(req: Received, reply: Reply) -> None:
        await reply.send(201, b'{"id":"1"}', [("Content-Type", "application/json")])

    app = await upstream(created)
    sc = await sidecar_factory({"app": {"url": app.url, **PATIENT}, **ORDERS})
    url = f"http://127.0.0.1:{sc.ports['inbound']}/orders"
    status, code, xid, outcome = (await go(go_client, "POST", url, "10s", "{}")).split()
    assert (status, code, outcome) == ("STATUS", "201", "Committed")
    assert app.requests[0].get("XID") == xid
    assert sample(sc, "gts_sidecar_client_aborts_total", listener="inbound") == 0
