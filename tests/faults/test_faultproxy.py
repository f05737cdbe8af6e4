"""The fault proxy itself: each mode does what it says, on real loopback sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tests.faults.faultproxy import FaultProxy, Flapping, Mode
from tests.faults.util import wait_until


@pytest.fixture
async def echo() -> AsyncIterator[tuple[int, list[bytes]]]:
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                received.append(data)
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1], received
    server.close()


@pytest.fixture
async def proxy(echo: tuple[int, list[bytes]]) -> AsyncIterator[FaultProxy]:
    async with FaultProxy("127.0.0.1", echo[0]) as p:
        yield p


async def roundtrip(port: int, data: bytes = b"ping", timeout: float = 5.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(len(data)), timeout)
    finally:
        writer.close()


async def outcome(port: int, timeout: float = 1.0) -> str:
    """What one connection sees after sending b'ping': echo / eof / reset / silence."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"ping")
        await writer.drain()
        data = await asyncio.wait_for(reader.read(4), timeout)
        return "echo" if data == b"ping" else "eof"
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        return "silence"
    finally:
        writer.transport.abort()


async def test_pass_forwards_both_ways_and_counts(proxy: FaultProxy) -> None:
    assert await roundtrip(proxy.port, b"x" * 100_000) == b"x" * 100_000
    assert proxy.accepted == 1
    await wait_until(lambda: proxy.bytes_down == 100_000)
    assert proxy.bytes_up == 100_000
    assert proxy.by_mode == {"pass": 1}


async def test_latency_delays_each_direction(proxy: FaultProxy) -> None:
    proxy.set_mode(Mode.LATENCY, latency_up=0.3, latency_down=0.3)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert await roundtrip(proxy.port) == b"ping"
    assert loop.time() - t0 >= 0.6  # a lower bound: both delays were applied
    proxy.set_mode(Mode.PASS)
    assert await roundtrip(proxy.port) == b"ping"


async def test_drop_reset_and_blackhole(proxy: FaultProxy, echo: tuple[int, list[bytes]]) -> None:
    proxy.set_mode(Mode.DROP)
    assert await outcome(proxy.port) in ("eof", "reset")  # FIN; a late write may draw a RST
    proxy.set_mode(Mode.RESET)
    assert await outcome(proxy.port) == "reset"
    proxy.set_mode(Mode.BLACKHOLE)
    assert await outcome(proxy.port, timeout=0.5) == "silence"
    await wait_until(lambda: proxy.bytes_up == 4)  # read, never forwarded
    assert echo[1] == []
    assert proxy.by_mode == {"drop": 1, "reset": 1, "blackhole": 1}


async def test_lose_answer_delivers_the_request_then_resets(
    proxy: FaultProxy, echo: tuple[int, list[bytes]]
) -> None:
    proxy.set_mode(Mode.LOSE_ANSWER)
    assert await outcome(proxy.port) in ("reset", "eof")
    await wait_until(lambda: echo[1] == [b"ping"])  # the target got it
    assert proxy.bytes_down == 0  # its answer never came back
    assert proxy.answers_lost == 1


async def test_lose_answer_applies_to_an_open_connection_when_not_cut(
    proxy: FaultProxy, echo: tuple[int, list[bytes]]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"a")
    assert await reader.readexactly(1) == b"a"
    proxy.set_mode(Mode.LOSE_ANSWER, cut_existing=False)
    writer.write(b"b")
    with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
        await asyncio.wait_for(reader.readexactly(1), 5)
    writer.transport.abort()
    assert echo[1] == [b"a", b"b"] and proxy.answers_lost == 1


async def test_mode_switch_cuts_open_connections(proxy: FaultProxy) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"a")
    assert await reader.readexactly(1) == b"a"
    proxy.set_mode(Mode.BLACKHOLE)
    with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
        await asyncio.wait_for(reader.readexactly(1), 5)
    writer.transport.abort()
    await wait_until(lambda: proxy.open == 0)


async def test_flapping_per_connection_count(proxy: FaultProxy) -> None:
    proxy.set_mode(Flapping(Mode.RESET, every=2))
    seen = [await outcome(proxy.port) for _ in range(8)]
    assert seen == ["echo", "echo", "reset", "reset"] * 2
    assert proxy.by_mode == {"pass": 4, "reset": 4}


async def test_flapping_on_a_schedule(proxy: FaultProxy) -> None:
    proxy.set_mode(Flapping(Mode.RESET, period=0.2))
    seen: set[str] = set()

    async def both() -> None:
        while seen != {"echo", "reset"}:
            seen.add(await outcome(proxy.port))
            await asyncio.sleep(0.02)

    await asyncio.wait_for(both(), 10)
    proxy.set_mode(Mode.PASS)
    assert await outcome(proxy.port) == "echo"


def test_flapping_needs_one_schedule() -> None:
    with pytest.raises(ValueError):
        Flapping(Mode.DROP)
    with pytest.raises(ValueError):
        Flapping(Mode.DROP, every=1, period=1.0)


async def test_stop_and_resume_listening_on_the_same_port(proxy: FaultProxy) -> None:
    port = proxy.port
    await proxy.stop_listening()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)
    await proxy.resume_listening()
    assert proxy.port == port
    assert await roundtrip(port) == b"ping"
