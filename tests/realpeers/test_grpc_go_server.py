"""A grpc-go server behind the sidecar (grpcgoserver.go, built against Debian's
golang-google-grpc-dev), run as Go services run in Kubernetes: `MaxConnectionAge` rolls its
connections and SIGTERM calls `GracefulStop`. Either way grpc-go sends a GOAWAY with last
stream id 2^31-1 and a PING, takes the streams that arrive before the PING's ack, then sends
the GOAWAY with the real last id, and waits for the client to close the connection once its
calls are done (with the default `MaxConnectionAgeGrace`, forever; `GracefulStop` returns
only then). So every call must succeed, none reach the server twice, and the sidecar must
close each connection grpc-go ended, or they pile up and a rolling update never finishes.

The server counts the connections it accepted, the XIDs its Echo saw and, per connection,
the calls running and the GOAWAY and REFUSED_STREAM frames it wrote (the Stats method); Echo
answers with the XID it saw and the caller's address, one per connection from the sidecar.
Which connections the sidecar still holds is read from the kernel (/proc/net/tcp)."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import socket
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.realclients.conftest import build_grpc_go

HERE = Path(__file__).parent

#: short enough that a few hundred calls span several connection lifetimes; no
#: MaxConnectionAgeGrace, as usual: grpc-go never cuts a rolled connection off itself
ROLLING = ("-max-age", "150ms")


@pytest.fixture(scope="session")
def grpc_go_server_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_grpc_go(tmp_path_factory, str(HERE / "grpcgoserver.go"))


class GoServer:
    """One grpcgoserver process, listening on 127.0.0.1:`port`."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int, stderr: Path) -> None:
        self.proc = proc
        self.port = port
        self.stderr = stderr

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    async def stopped(self, timeout: float = 30.0) -> None:
        """Wait for GracefulStop to return (its `{"stopped":true}` line) and the exit."""
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        assert json.loads(line or b"null") == {"stopped": True}, self.stderr.read_text()
        assert await asyncio.wait_for(self.proc.wait(), timeout) == 0


GoServerFactory = Callable[..., Awaitable[GoServer]]


@pytest.fixture
async def go_server(grpc_go_server_binary: Path, tmp_path: Path) -> AsyncIterator[GoServerFactory]:
    """`await go_server(*flags, port=0)` → a started grpcgoserver; each is killed at the end."""
    started: list[GoServer] = []

    async def make(*flags: str, port: int = 0) -> GoServer:
        stderr = tmp_path / f"grpcgoserver{len(started)}.err"
        with stderr.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                str(grpc_go_server_binary), "-port", str(port), *flags,
                stdout=asyncio.subprocess.PIPE, stderr=err,
            )  # fmt: skip
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        if not line:
            await proc.wait()
            raise RuntimeError(f"grpcgoserver exited ({proc.returncode}): {stderr.read_text()}")
        server = GoServer(proc, json.loads(line)["port"], stderr)
        started.append(server)
        return server

    yield make
    for server in started:
        if server.proc.returncode is None:
            server.proc.kill()
            await server.proc.wait()


async def poll(condition: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> None:
    """Wait until `condition()` holds, asking again every 10 ms (as wait_until does)."""
    async with asyncio.timeout(timeout):
        while not await condition():
            await asyncio.sleep(0.01)


def stats(ch: grpc.Channel) -> dict[str, Any]:
    """The server's Stats, asked through the sidecar like every other call."""
    result: dict[str, Any] = json.loads(ch.unary_unary("/pkg.Go/Stats")(b"", timeout=30))
    return result


def established_to(port: int) -> set[int]:
    """The local ports of the IPv4 TCP connections to 127.0.0.1:`port` that are established,
    as the kernel sees them from the client side (the sidecar's: no test client connects
    there)."""
    with open("/proc/net/tcp") as table:
        next(table)
        rows = [line.split() for line in table]
    target = f"0100007F:{port:04X}"
    return {int(row[1].split(":")[1], 16) for row in rows if row[2] == target and row[3] == "01"}


async def rolled_connections_closed(port: int) -> None:
    """Wait, making no call, until the sidecar holds no connection to the server: each is
    rolled within MaxConnectionAge and must then be closed by the sidecar once its calls are
    done, since grpc-go never closes it."""

    async def none_left() -> bool:
        return not established_to(port)

    await poll(none_left, timeout=10)


def xid_of(n: int) -> str:
    return f"10.0.0.1:8091:{n}"


@dataclass
class Load:
    """What a load of calls from several threads saw."""

    calls: int = 0
    peers: set[str] = field(default_factory=set)
    xids: list[str] = field(default_factory=list)
    failures: list[Any] = field(default_factory=list)


def call_until_rolled(
    ch: grpc.Channel,
    call: Callable[[int], tuple[str, str]],
    *,
    threads: int = 8,
    calls: int = 300,
    peers: int = 3,
    cap: int = 5000,
) -> Load:
    """`call(n)` → (the XID the app saw, the connection it came on) from `threads` threads,
    until at least `calls` calls are done and they came on at least `peers` connections to the
    server (or `cap` calls were made: the caller's assertions then say what is missing). A
    failed call is recorded, not raised, so that the test reports them all."""
    load = Load()
    lock = threading.Lock()
    numbers = itertools.count()
    enough = threading.Event()

    def worker() -> None:
        while not enough.is_set():
            with lock:
                n = next(numbers)
            if n >= cap:
                return
            try:
                xid, peer = call(n)
            except grpc.RpcError as e:
                with lock:
                    load.failures.append((n, e.code(), e.details()))
                continue
            except AssertionError as e:
                with lock:
                    load.failures.append((n, str(e)))
                continue
            with lock:
                load.calls += 1
                if xid:
                    load.xids.append(xid)
                if peer:
                    load.peers.add(peer)
                if load.calls >= calls and len(load.peers) >= peers:
                    enough.set()

    with futures.ThreadPoolExecutor(threads) as pool:
        for done in [pool.submit(worker) for _ in range(threads)]:
            done.result()
    return load


async def test_unary_calls_across_max_connection_age_rolls_all_succeed_with_their_xid(
    sidecar_factory: Any, go_server: GoServerFactory, channel: Any
) -> None:
    """A grpcio client, 8 threads, through the inbound listener to a grpc-go app rolling its
    connections every 150 ms: hundreds of unary calls (and a server stream every tenth call)
    over at least three of the app's connections, every one answered with its own XID, each
    XID seen by the app exactly once; the rolled connections closed by the sidecar (before it
    closed a connection ended by GOAWAY once its streams were done, they all stayed open)."""
    server = await go_server(*ROLLING)
    sc = await sidecar_factory({"app": {"url": server.url, "protocol": "h2c"}})
    ch = channel(sc.ports["inbound"])
    echo = ch.unary_unary("/pkg.Go/Echo")
    count = ch.unary_stream("/pkg.Go/Count")

    def call(n: int) -> tuple[str, str]:
        xid = xid_of(1000 + n)
        if n % 10 == 9:
            replies = list(count(b"20", timeout=30, metadata=[("xid", xid)]))
            assert replies == [b"%d" % i for i in range(20)], replies
            return "", ""  # (Stats counts the XIDs of Echo calls only)
        reply = json.loads(echo(b"%d" % n, timeout=30, metadata=[("xid", xid)]))
        assert (reply["message"], reply["xid"]) == (str(n), xid), reply
        return xid, reply["peer"]

    load = await asyncio.to_thread(call_until_rolled, ch, call)
    assert load.failures == []
    assert load.calls >= 300
    assert len(load.peers) >= 3, load.peers
    seen = await asyncio.to_thread(stats, ch)
    assert seen["connections"] >= 3
    # every unary call reached the app once
    assert Counter(seen["xids"]) == Counter(load.xids)
    assert set(Counter(load.xids).values()) == {1}
    await rolled_connections_closed(server.port)


async def test_the_servers_max_concurrent_streams_is_honoured_across_rolls(
    sidecar_factory: Any, go_server: GoServerFactory, channel: Any
) -> None:
    """grpc-go with `MaxConcurrentStreams(4)` (and rolling): 8 threads of calls all succeed
    and grpc-go never had to refuse a stream (it resets the ones past its limit with
    REFUSED_STREAM): the sidecar keeps within the limit the server's SETTINGS announce, on
    each new connection too."""
    server = await go_server(*ROLLING, "-max-streams", "4")
    sc = await sidecar_factory({"app": {"url": server.url, "protocol": "h2c"}})
    ch = channel(sc.ports["inbound"])
    echo = ch.unary_unary("/pkg.Go/Echo")

    def call(n: int) -> tuple[str, str]:
        reply = json.loads(echo(b"%d" % n, timeout=30, metadata=[("xid", xid_of(n))]))
        assert reply["xid"] == xid_of(n), reply
        return reply["xid"], reply["peer"]

    load = await asyncio.to_thread(call_until_rolled, ch, call, calls=200)
    assert load.failures == []
    assert len(load.peers) >= 3, load.peers
    conns = (await asyncio.to_thread(stats, ch))["conns"]
    assert sum(c["refused"] for c in conns.values()) == 0, conns


async def test_a_grpc_go_client_through_the_outbound_listener_across_rolls(
    sidecar_factory: Any, go_server: GoServerFactory, grpc_go_server_binary: Path, channel: Any
) -> None:
    """grpc-go on both sides: a grpc-go client (grpcgoserver.go's client mode, 8 goroutines on
    one connection) pointed at the outbound listener with the upstream's name as authority,
    runs of 200 Echo calls until the app has served them on at least three connections."""
    server = await go_server(*ROLLING)
    sc = await sidecar_factory({"upstreams": {"inventory": {"url": server.url, "protocol": "h2c"}}})
    results: list[dict[str, Any]] = []
    peers: set[str] = set()
    for run in range(20):
        proc = await asyncio.create_subprocess_exec(
            str(grpc_go_server_binary), "-call", f"127.0.0.1:{sc.ports['outbound']}",
            "-authority", "inventory", "-calls", "200", "-workers", "8", "-first", str(200 * run),
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, out
        for result in json.loads(out):
            results.append(result)
            if result["code"] == 0:
                peers.add(json.loads(result["reply"])["peer"])
        if len(peers) >= 3:
            break
    failed = [r for r in results if r["code"] != 0]
    assert failed == []
    assert len(peers) >= 3, peers
    for result in results:
        reply = json.loads(result["reply"])
        assert reply["xid"] == result["xid"]
    stats_channel = channel(sc.ports["outbound"], authority="inventory")
    seen = await asyncio.to_thread(stats, stats_channel)
    assert Counter(seen["xids"]) == Counter(r["xid"] for r in results)
    assert set(seen["xids"].values()) == {1}
    await rolled_connections_closed(server.port)


async def test_a_connection_rolled_during_a_call_is_closed_once_the_call_ends(
    sidecar_factory: Any, go_server: GoServerFactory, channel: Any
) -> None:
    """A slow call on a connection grpc-go rolls (MaxConnectionAge, no grace: as usual) gets
    its answer, and the sidecar then closes that connection: grpc-go, having ended it while a
    call ran, waits for the client to close it (forever). Before, the sidecar kept such a
    connection open until its idle timeout (30 s)."""
    server = await go_server(*ROLLING)
    sc = await sidecar_factory(
        {
            "app": {
                "url": server.url,
                "protocol": "h2c",
                "timeouts": {"response_header": "50s", "total": "60s"},
            }
        }
    )
    ch = channel(sc.ports["inbound"])
    slow = ch.unary_unary("/pkg.Go/Sleep").future(b"60000", timeout=60)
    ended: list[str] = []

    async def ended_during_the_call() -> bool:
        # grpc-go has sent both GOAWAYs (the second with the real last stream id) on the
        # connection that carries the slow call, while the call runs
        conns = (await asyncio.to_thread(stats, ch))["conns"]
        ended[:] = [a for a, c in conns.items() if c["inflight"] == 1 and c["goaways"] >= 2]
        return bool(ended)

    await poll(ended_during_the_call)
    (address,) = ended
    sidecar_port = int(address.rsplit(":", 1)[1])
    assert sidecar_port in established_to(server.port)
    server.signal(signal.SIGUSR1)
    assert await asyncio.to_thread(slow.result, 30) == b"slept:60000"

    async def closed() -> bool:
        return sidecar_port not in established_to(server.port)

    # with no other call made: the sidecar closes it once the last call on it is done
    await poll(closed, timeout=10)


def refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def echo_until_unavailable(ch: grpc.Channel) -> list[Any]:
    """Echo calls until one is UNAVAILABLE: the ones before it were taken by the stopping
    server before its GOAWAY reached the sidecar (it closed its listener first). Each has a
    10 s deadline: a call that hangs ends as DEADLINE_EXCEEDED and the test fails."""
    outcomes: list[Any] = []
    for _ in range(50):
        try:
            ch.unary_unary("/pkg.Go/Echo")(b"down", timeout=10)
        except grpc.RpcError as e:
            trailers = dict(e.trailing_metadata() or ())
            outcomes.append((e.code(), trailers.get("x-gts-sidecar-error")))
            if e.code() is grpc.StatusCode.UNAVAILABLE:
                break
        else:
            outcomes.append("OK")
    return outcomes


async def test_graceful_stop_finishes_the_calls_in_flight_and_the_restarted_server_takes_over(
    sidecar_factory: Any, go_server: GoServerFactory, channel: Any
) -> None:
    """A rolling update of the app: SIGTERM while six slow calls run (grpc-go's GracefulStop:
    listener closed, GOAWAY, PING, GOAWAY), a call while it is down, the app started again on
    the same port, then the slow calls let finish. The calls in flight at the SIGTERM get
    their answers on the old connection, which the sidecar then closes so that GracefulStop
    returns (before, it kept the connection and the old process never exited); the call while
    it is down is a clean UNAVAILABLE (never a hang); the calls after the restart succeed on
    the new server."""
    first = await go_server()
    sc = await sidecar_factory(
        {
            "app": {
                "url": first.url,
                "protocol": "h2c",
                "timeouts": {"response_header": "50s", "total": "60s"},
            }
        }
    )
    ch = channel(sc.ports["inbound"])
    # 60 s sleeps, ended by SIGUSR1 once the test has seen what it wants (not on a timer)
    slow = [ch.unary_unary("/pkg.Go/Sleep").future(b"60000", timeout=60) for _ in range(6)]

    async def all_in_flight() -> bool:
        conns = (await asyncio.to_thread(stats, ch))["conns"]
        return sum(c["inflight"] for c in conns.values()) == 6

    await poll(all_in_flight)
    first.signal(signal.SIGTERM)
    await poll(lambda: asyncio.to_thread(refuses_connections, first.port))

    outcomes = await asyncio.to_thread(echo_until_unavailable, ch)
    assert outcomes[-1] == (grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE"), outcomes
    assert set(outcomes[:-1]) <= {"OK"}, outcomes
    assert not any(call.done() for call in slow)

    second = await go_server(port=first.port)
    echo = ch.unary_unary("/pkg.Go/Echo")
    for n in range(20):
        reply = json.loads(
            await asyncio.to_thread(echo, b"%d" % n, timeout=30, metadata=[("xid", xid_of(n))])
        )
        assert (reply["message"], reply["xid"]) == (str(n), xid_of(n))
    assert (await asyncio.to_thread(stats, ch))["calls"]["/pkg.Go/Echo"] == 20  # the new one

    first.signal(signal.SIGUSR1)
    for call in slow:
        assert await asyncio.to_thread(call.result, 30) == b"slept:60000"
    await first.stopped()
    assert second.proc.returncode is None


TXN_RULES = {
    "transactions": [
        {"match": {"method": "POST", "path": "/pkg.Go/Echo"}, "name": "echo", "timeout": "20s"},
        {"match": {"method": "POST", "path": "/pkg.Go/Fail"}, "name": "fail", "timeout": "20s"},
    ]
}


async def test_a_declared_grpc_method_commits_across_connection_rolls(
    sidecar_factory: Any, go_server: GoServerFactory, channel: Any
) -> None:
    """`/pkg.Go/Echo` and `/pkg.Go/Fail` declared as transactions, the grpc-go app rolling
    its connections every 150 ms: every call begins its own transaction; an Echo reaches the
    app once with that XID and commits, a Fail (FAILED_PRECONDITION) rolls back."""
    server = await go_server(*ROLLING)
    sc = await sidecar_factory({"app": {"url": server.url, "protocol": "h2c"}, **TXN_RULES})
    ch = channel(sc.ports["inbound"])
    echo = ch.unary_unary("/pkg.Go/Echo")
    fail = ch.unary_unary("/pkg.Go/Fail")
    rolled_back: list[str] = []

    def call(n: int) -> tuple[str, str]:
        if n % 5 == 4:
            try:
                fail(b"%d" % n, timeout=30)
            except grpc.RpcError as e:
                trailing = dict(e.trailing_metadata() or ())
                assert e.code() is grpc.StatusCode.FAILED_PRECONDITION, (e.code(), e.details())
                assert trailing["x-gts-transaction-status"] == "Rollbacked", trailing
                rolled_back.append(trailing["xid"])
                return "", ""
            raise AssertionError("Fail answered OK")
        answer, rpc = echo.with_call(b"%d" % n, timeout=30)
        reply = json.loads(answer)
        initial = dict(rpc.initial_metadata())
        assert reply["xid"] == initial["xid"], (reply, initial)
        assert initial["x-gts-transaction-status"] == "Committed", initial
        return reply["xid"], reply["peer"]

    load = await asyncio.to_thread(call_until_rolled, ch, call, threads=4, calls=120)
    assert load.failures == []
    assert len(load.peers) >= 3, load.peers
    assert set(Counter(load.xids).values()) == {1}
    seen = await asyncio.to_thread(stats, ch)
    assert Counter(seen["xids"]) == Counter(load.xids)
    assert seen["calls"]["/pkg.Go/Fail"] == len(rolled_back) > 0
    for xid in load.xids:
        assert (await sc.control.engine.get(xid))[0].status.value == "Committed"
    for xid in rolled_back:
        assert (await sc.control.engine.get(xid))[0].status.value == "Rollbacked"
    await rolled_connections_closed(server.port)
