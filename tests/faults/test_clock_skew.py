"""Clock skew between signer and verifier: the sidecar (the signer) runs under `faketime`
against a coordinator with the real clock and a 10 s signing window (docs/signing.md).
Inside the window every call and the phase-two callbacks back verify; outside it the
coordinator refuses the calls as `stale` (401 SIGNATURE_INVALID) and the sidecar tells its
app so (502 COORDINATOR_AUTH_FAILED: the sidecar's clock, not the app's credentials), naming
the offset, without "failing over" (the cluster is reachable: coordinating
locally would split one service's transactions across two coordinators for a clock fault)."""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.faults.cluster import TCC, Ledger
from tests.faults.procs import Coordinator, signing, spawn, write_config
from tests.faults.util import metric, require_tool, scrape, wait_until

WINDOW = 10
LIBFAKETIMES = sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))


def faketime_env(skew: int) -> dict[str, str]:
    """What `faketime -f +Ns` sets, applied to the child itself: the `faketime` wrapper forks,
    so its pid would not be the sidecar's (and killing it would orphan the sidecar). Only the
    wall clock is skewed; the monotonic clock the event loop runs on is left alone."""
    require_tool("faketime", "faketime")
    assert LIBFAKETIMES, "libfaketime.so.1 missing: install the Debian package 'libfaketime'"
    return {
        "LD_PRELOAD": str(LIBFAKETIMES[0]),
        "FAKETIME": f"{skew:+d}s",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "FAKETIME_NO_CACHE": "1",
    }


async def test_faketime_moves_the_clock_of_a_uvloop_python_child() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c",
        "import time, uvloop, asyncio; asyncio.set_event_loop_policy(uvloop.EventLoopPolicy());"
        "print(asyncio.run(asyncio.sleep(0, time.time())), time.monotonic())",
        stdout=asyncio.subprocess.PIPE, env={**os.environ, **faketime_env(100)},
    )  # fmt: skip
    out, _ = await proc.communicate()
    wall, mono = map(float, out.split())
    assert 90 < wall - time.time() < 110  # time.time() in the child is 100 s ahead
    assert abs(mono - time.monotonic()) < 10  # its monotonic clock is not


@pytest.mark.parametrize(
    ("skew", "inside"),
    [
        pytest.param(4, True, id="+4s-inside"),
        pytest.param(-4, True, id="-4s-inside"),
        pytest.param(60, False, id="+60s-outside"),
        pytest.param(-60, False, id="-60s-outside"),
    ],
)
async def test_clock_skew_inside_and_outside_the_window(
    tmp_path: Path, aiohttp_server: Any, skew: int, inside: bool
) -> None:
    env = faketime_env(skew)
    ledger = Ledger()
    app = web.Application()
    app.router.add_post("/{tail:.*}", ledger.handle)
    server = await aiohttp_server(app)
    coordinator = await Coordinator(tmp_path / "coordinator", window=f"{WINDOW}s").start()
    cfg = {
        "app": {"url": f"http://127.0.0.1:{server.port}"},
        "coordinator": {
            "endpoints": [coordinator.url],
            "signing": signing(tmp_path, window=f"{WINDOW}s"),
            "timeouts": {"connect": "300ms", "request": "1s"},
        },
        "local_coordinator": {"journal": f"sqlite:///{tmp_path.resolve()}/sidecar.db"},
        "tcc": TCC,
    }
    try:
        sc, _ = await spawn(write_config(tmp_path / "sidecar.yaml", cfg), env=env)
    except BaseException:
        await coordinator.stop()
        raise
    api = f"http://127.0.0.1:{sc.ports['api']}/v1/transactions"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
            async with s.post(api, json={"name": "skewed"}) as r:
                status, headers, body = r.status, r.headers, await r.json()
            text = await scrape(s, sc.ports["admin"])
            assert metric(text, "gts_sidecar_degraded") == 0
            assert metric(text, "gts_sidecar_degraded_begins_total") == 0
            if inside:
                assert status == 200, body
                xid = body["xid"]
                assert xid.startswith(f"127.0.0.1:{coordinator.ports['peer']}:")
                inbound = f"http://127.0.0.1:{sc.ports['inbound']}/try"
                async with s.post(inbound, headers={"XID": xid}, data=b"{}") as r:
                    assert r.status == 200  # registered with the coordinator, signed
                async with s.post(f"{api}/{xid}/commit") as r:
                    assert r.status == 200
                # the coordinator's phase-two callback verifies at the skewed sidecar
                await wait_until(lambda: sum(ledger.calls.values()) == 1, timeout=15)
                assert list(ledger.calls) == [(xid, next(iter(ledger.tried))[1], "confirm")]
                return
            # the sidecar's own clock, not the app's credentials: 502, not 401
            assert status == 502, body
            code = body["error"]["code"]
            assert code == "COORDINATOR_AUTH_FAILED"
            assert headers["x-gts-sidecar-error"] == code
            message = body["error"]["message"]
            assert "coordinator.signing" in message  # says where to look
            direction = "future" if skew > 0 else "past"
            m = re.search(r"timestamp is ([\d.]+)s in the (future|past)", message)
            assert m, message
            assert m.group(2) == direction
            assert abs(float(m.group(1)) - abs(skew)) < 5  # the offset, as docs/signing.md says
            # no transaction was started anywhere, and none is coordinated locally
            assert not ledger.tried
    finally:
        await sc.stop()
        await coordinator.stop()
