"""A small fault-injecting TCP proxy of the tests' own (there is no toxiproxy or `tc netem`
here): listen on 127.0.0.1:0, forward to a target, and misbehave on demand.

Modes, switchable at runtime (`set_mode`); a connection takes the mode in force when it is
accepted, and a switch aborts the connections already open unless `cut_existing=False` (a
pooled keep-alive connection would otherwise go on in the old mode):

- PASS: forward both ways;
- LATENCY: forward, sleeping `latency_up` / `latency_down` seconds before each chunk
  (read at each chunk, so a change applies to open connections too);
- DROP: accept, then close at once (FIN);
- RESET: accept, then RST (SO_LINGER 0) at once;
- LOSE_ANSWER: forward the request; when the target's answer begins, RST the client and drop
  the answer (the request took effect, the caller never hears). It also applies to
  connections already open when it is set with `cut_existing=False` (a pooled keep-alive
  connection's next request is delivered, its answer lost); `answers_lost` counts them;
- BLACKHOLE: accept, read and discard, never answer.

`stop_listening()` / `resume_listening()` make connects be refused (the target "down"), on the
same port.

Flapping alternates PASS and a fault: per connection (`Flapping(fault, every=n)`: n
connections pass, n get the fault, ...) or on a schedule (`Flapping(fault, period=s)`: the mode
flips every s seconds, cutting open connections at each flip).

Counters (`accepted`, `by_mode`, `bytes_up` client→target, `bytes_down` target→client, `open`)
let tests assert what happened on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import struct
from collections import Counter
from dataclasses import dataclass


class Mode(enum.Enum):
    PASS = "pass"
    LATENCY = "latency"
    DROP = "drop"
    RESET = "reset"
    LOSE_ANSWER = "lose_answer"
    BLACKHOLE = "blackhole"


@dataclass(frozen=True)
class Flapping:
    fault: Mode
    every: int | None = None  # per connection count
    period: float | None = None  # seconds

    def __post_init__(self) -> None:
        if (self.every is None) == (self.period is None):
            raise ValueError("Flapping needs exactly one of every= or period=")
        if self.fault is Mode.PASS:
            raise ValueError("Flapping between PASS and PASS is not flapping")


_CHUNK = 65536


def _rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    def __init__(
        self, target_host: str, target_port: int, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.target = (target_host, target_port)
        self.listen = (host, port)
        self.mode: Mode | Flapping = Mode.PASS
        self.latency_up = 0.0
        self.latency_down = 0.0
        self.accepted = 0
        self.by_mode: Counter[str] = Counter()
        self.bytes_up = 0
        self.bytes_down = 0
        self.answers_lost = 0
        self.open = 0
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._flap_count = 0
        self._flap_fault_now = False
        self._flipper: asyncio.Task[None] | None = None

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(
            self._accept, *self.listen, backlog=4096, reuse_address=True
        )
        return self

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://{self.listen[0]}:{self.port}"

    async def stop_listening(self) -> None:
        """Close the listening socket (connects are refused) and cut what is open."""
        assert self._server is not None
        self.listen = (self.listen[0], self.port)  # come back on the same port
        self._server.close()
        self.cut()
        await self._server.wait_closed()

    async def resume_listening(self) -> None:
        await self.start()

    async def close(self) -> None:
        if self._flipper is not None:
            self._flipper.cancel()
        if self._server is not None:
            self._server.close()
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- control ----------------------------------------------------------------------------

    def set_mode(
        self,
        mode: Mode | Flapping,
        *,
        latency_up: float | None = None,
        latency_down: float | None = None,
        cut_existing: bool = True,
    ) -> None:
        if latency_up is not None:
            self.latency_up = latency_up
        if latency_down is not None:
            self.latency_down = latency_down
        self.mode = mode
        self._flap_count = 0
        self._flap_fault_now = False
        if self._flipper is not None:
            self._flipper.cancel()
            self._flipper = None
        if isinstance(mode, Flapping) and mode.period is not None:
            self._flipper = asyncio.get_running_loop().create_task(self._flip(mode.period))
        if cut_existing:
            self.cut()

    def cut(self) -> None:
        """RST every open connection."""
        for writer in list(self._conns):
            _rst(writer)

    async def _flip(self, period: float) -> None:
        while True:
            await asyncio.sleep(period)
            self._flap_fault_now = not self._flap_fault_now
            self.cut()

    def _mode_for_new_connection(self) -> Mode:
        mode = self.mode
        if isinstance(mode, Mode):
            return mode
        if mode.every is not None:
            n = self._flap_count
            self._flap_count += 1
            return mode.fault if (n // mode.every) % 2 == 1 else Mode.PASS
        return mode.fault if self._flap_fault_now else Mode.PASS

    # --- connections ------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._conns.add(writer)
        self.accepted += 1
        self.open += 1
        mode = self._mode_for_new_connection()
        self.by_mode[mode.value] += 1
        try:
            await self._serve(mode, reader, writer)
        except (OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # close(): end quietly (a cancelled handler task is logged by asyncio)
        finally:
            self.open -= 1
            self._conns.discard(writer)
            self._tasks.discard(task)
            writer.transport.abort()

    async def _serve(
        self, mode: Mode, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if mode is Mode.DROP:
            writer.close()
            return
        if mode is Mode.RESET:
            _rst(writer)
            return
        if mode is Mode.BLACKHOLE:
            while data := await reader.read(_CHUNK):
                self.bytes_up += len(data)
            return
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._conns.add(up_writer)
        try:
            await asyncio.gather(
                self._pump(reader, up_writer, up=True, mode=mode, client=writer),
                self._pump(up_reader, writer, up=False, mode=mode, client=writer),
            )
        finally:
            self._conns.discard(up_writer)
            up_writer.transport.abort()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        up: bool,
        mode: Mode,
        client: asyncio.StreamWriter,
    ) -> None:
        try:
            while data := await reader.read(_CHUNK):
                if not up and Mode.LOSE_ANSWER in (mode, self.mode):
                    self.answers_lost += 1
                    _rst(client)
                    return
                delay = self.latency_up if up else self.latency_down
                if self.mode is Mode.LATENCY and delay > 0:
                    await asyncio.sleep(delay)
                if up:
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except OSError:
            writer.transport.abort()
