"""Shared fixtures: an in-process sidecar on ephemeral loopback ports, and small servers."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from sidecar import config as configmod
from sidecar.metrics import Metrics
from sidecar.server import Sidecar

LOOPBACK_LISTENERS: dict[str, Any] = {
    name: {"bind": "127.0.0.1:0"} for name in ("inbound", "outbound", "api", "peer", "admin")
}


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


SidecarFactory = Callable[..., Awaitable[Sidecar]]


@pytest.fixture
async def sidecar_factory() -> AsyncIterator[SidecarFactory]:
    """`await sidecar_factory({...config overrides...})` → a started in-process Sidecar bound
    to 127.0.0.1 ephemeral ports; `sc.ports["inbound"]` etc. give the ports."""
    started: list[Sidecar] = []

    async def make(overrides: dict[str, Any] | None = None, **kw: Any) -> Sidecar:
        base = {
            "listeners": LOOPBACK_LISTENERS,
            "logging": {"level": "warning"},
            "local_coordinator": {"journal": "memory://"},
        }
        data = merge(base, overrides or {})
        cfg = configmod.parse(data, env={})
        sc = Sidecar(cfg, metrics=Metrics(), **kw)
        await sc.start()
        started.append(sc)
        return sc

    yield make
    for sc in started:
        await sc.close()


async def raw_request(
    port: int, data: bytes, *, read_until_close: bool = True, timeout: float = 10.0
) -> bytes:
    """Send raw bytes to 127.0.0.1:port and return everything read until the peer closes
    (or, with read_until_close=False, one response head + Content-Length body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        if read_until_close:
            return await asyncio.wait_for(reader.read(-1), timeout)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await asyncio.wait_for(reader.readexactly(length), timeout)
        return head + body
    finally:
        writer.close()
