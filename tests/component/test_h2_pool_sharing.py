"""Requests to an HTTP/2 upstream that find no connection with room wait for the connection
being opened instead of each opening one: a burst of first requests shares one connection.
When that connection cannot be opened, every request waiting for it gets its failure at
once (not a connection attempt each, one after another)."""

from __future__ import annotations

import asyncio

import h2.connection
import h2.events
import h2.exceptions
from h2.settings import SettingCodes

from tests.component.h2server import H2TestServer, server_connection
from tests.component.servers import Client, closed_port, error_of, get, request, sample, wait_until
from tests.component.test_h2_upstream_fields import RawH2Upstream

MAX_CONCURRENT_STREAMS = SettingCodes.MAX_CONCURRENT_STREAMS


async def burst(port: int, n: int) -> list[int]:
    """`n` clients send a request each before any reads its answer."""
    clients = [await Client.connect(port) for _ in range(n)]
    try:
        for i, client in enumerate(clients):
            await client.send(get(f"/r{i}"))
        return [(await client.response()).status for client in clients]
    finally:
        for client in clients:
            client.close()


async def test_a_burst_of_first_requests_shares_one_new_connection(sidecar_factory):
    up = RawH2Upstream(lambda path: [])
    try:
        sc = await sidecar_factory({"app": {"url": await up.start(), "protocol": "h2c"}})
        assert await burst(sc.ports["inbound"], 12) == [200] * 12
        assert sorted(up.paths) == sorted(f"/r{i}" for i in range(12))
        assert up.connections == 1
    finally:
        await up.close()


async def test_requests_waiting_for_a_refused_connection_all_get_its_502(sidecar_factory):
    port = closed_port()
    sc = await sidecar_factory(
        {"app": {"url": f"http://127.0.0.1:{port}", "protocol": "h2c", "retries": {"attempts": 0}}}
    )
    clients = [await Client.connect(sc.ports["inbound"]) for _ in range(6)]
    try:
        for client in clients:
            await client.send(get("/x"))
        answers = [await client.response() for client in clients]
    finally:
        for client in clients:
            client.close()
    assert [resp.status for resp in answers] == [502] * 6
    assert all("cannot connect" in error_of(resp)["message"] for resp in answers)


async def test_requests_waiting_for_a_hung_connect_all_get_its_connect_timeout(
    sidecar_factory, unaccepting_port
):
    """The connect hangs (a full accept backlog) until its 300 ms timeout: every request
    waiting for that connection is told of that timeout then. Had each waited for the failure
    and then tried a connection of its own, one after another, the later ones would reach
    their 700 ms total timeout first."""
    timeouts = {"connect": "300ms", "response_header": "600ms", "total": "700ms"}
    sc = await sidecar_factory(
        {
            "app": {
                "url": f"http://127.0.0.1:{unaccepting_port}",
                "protocol": "h2c",
                "timeouts": timeouts,
                "retries": {"attempts": 0},
            }
        }
    )
    clients = [await Client.connect(sc.ports["inbound"]) for _ in range(5)]
    try:
        for client in clients:
            await client.send(get("/x"))
        answers = [await client.response(timeout=10) for client in clients]
    finally:
        for client in clients:
            client.close()
    assert [resp.status for resp in answers] == [504] * 5
    assert all("connect timeout" in error_of(resp)["message"] for resp in answers)


class GoawayAfterEachAnswer(H2TestServer):
    """Answers, then sends a graceful GOAWAY (NO_ERROR, last stream = the one answered) and
    leaves the connection open, as a server at its per-connection limit may do while other
    streams finish; records when the sidecar hangs up."""

    def __init__(self) -> None:
        super().__init__()
        self.paths: list[str] = []
        self.hung_up = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = server_connection(writer)
        try:
            while data := await reader.read(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        self.paths.append(dict(event.headers)[b":path"].decode())
                        conn.send_headers(event.stream_id, [(b":status", b"200")])
                        conn.send_data(event.stream_id, b"ok", end_stream=True)
                        conn.close_connection(last_stream_id=event.stream_id)
                writer.write(conn.data_to_send())
            self.hung_up += 1
        except (ConnectionError, h2.exceptions.ProtocolError):
            self.hung_up += 1


async def test_a_connection_ended_by_goaway_is_closed_once_its_streams_are_done(sidecar_factory):
    up = GoawayAfterEachAnswer()
    try:
        sc = await sidecar_factory({"app": {"url": await up.start(), "protocol": "h2c"}})
        port = sc.ports["inbound"]
        assert (await request(port, get("/one"))).status == 200
        await wait_until(lambda: up.hung_up == 1)
        assert sample(sc, "gts_sidecar_pool_connections_idle", upstream="app") == 0
        assert (await request(port, get("/two"))).status == 200
        assert up.connections == 2
    finally:
        await up.close()


class TwoStreamsAtATime(H2TestServer):
    """Announces MAX_CONCURRENT_STREAMS 2 and answers the requests of each read only once the
    whole read is parsed, counting (as grpc-go does, which refuses them) the streams opened
    past that limit: h2 itself would enforce it only once the client acknowledged it."""

    def __init__(self) -> None:
        super().__init__()
        self.served = 0
        self.violations = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = server_connection(writer, settings={MAX_CONCURRENT_STREAMS: 2})
        try:
            while data := await reader.read(65536):
                opened = [
                    event.stream_id
                    for event in conn.receive_data(data)
                    if isinstance(event, h2.events.RequestReceived)
                ]
                if len(opened) > 2:
                    self.violations += len(opened) - 2
                for stream_id in opened:
                    conn.send_headers(stream_id, [(b":status", b"200")])
                    conn.send_data(stream_id, b"ok", end_stream=True)
                    self.served += 1
                writer.write(conn.data_to_send())
        except (ConnectionError, h2.exceptions.ProtocolError):
            pass


async def test_a_burst_on_a_new_connection_keeps_within_the_servers_stream_limit(
    sidecar_factory,
):
    """Requests that waited for a connection take streams on it only once the server's
    SETTINGS say how many it allows, never past them (a burst of 8 against a limit of 2). The
    race this guards (streams taken as soon as the TCP connection was up, before the SETTINGS
    were read) showed once with grpc-go, which refused the excess; this server's SETTINGS
    come early enough that it did not show here."""
    up = TwoStreamsAtATime()
    try:
        sc = await sidecar_factory({"app": {"url": await up.start(), "protocol": "h2c"}})
        assert await burst(sc.ports["inbound"], 8) == [200] * 8
        assert up.violations == 0
        assert up.served == 8
    finally:
        await up.close()


def answer(conn: h2.connection.H2Connection, stream_id: int) -> None:
    conn.send_headers(stream_id, [(b":status", b"200")])
    conn.send_data(stream_id, b"ok", end_stream=True)


class SettingsWhenTold(H2TestServer):
    """Announces MAX_CONCURRENT_STREAMS 2, but writes nothing, its SETTINGS included, until
    the test sets `release`: the window between the TCP connection and the server's SETTINGS
    (microseconds with grpc-go) held open. Counts the streams opened in that window; answers
    every request once released. (Its h2 enforces the limit it will announce: a stream past
    it is a protocol error that ends the connection, `past_limit`.)"""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.opened_before_settings = 0
        self.past_limit = False
        self.served = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = server_connection(writer, settings={MAX_CONCURRENT_STREAMS: 2}, hold=True)
        held: list[int] = []
        released = asyncio.ensure_future(self.release.wait())
        read = asyncio.ensure_future(reader.read(65536))
        try:
            while True:
                await asyncio.wait({read, released}, return_when=asyncio.FIRST_COMPLETED)
                if not read.done():
                    break  # released (the read goes on below)
                if not (data := read.result()):
                    return
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        self.opened_before_settings += 1
                        held.append(event.stream_id)
                read = asyncio.ensure_future(reader.read(65536))
            for stream_id in held:
                answer(conn, stream_id)
            self.served += len(held)
            writer.write(conn.data_to_send())
            while data := await read:
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        answer(conn, event.stream_id)
                        self.served += 1
                writer.write(conn.data_to_send())
                read = asyncio.ensure_future(reader.read(65536))
        except h2.exceptions.TooManyStreamsError:
            self.past_limit = True
        except (ConnectionError, h2.exceptions.ProtocolError):
            pass
        finally:
            released.cancel()
            read.cancel()


async def test_requests_coming_before_the_servers_settings_wait_for_them(sidecar_factory):
    """A request that finds the new connection up but the server's SETTINGS not yet read
    waits for them, as those that came while it was opening do: the limit they announce (2)
    is never passed. Before, such a request opened a stream at once (h2 reads the limit as
    unbounded until then), and grpc-go refused the excess (a CI run saw it after a
    connection roll)."""
    up = SettingsWhenTold()
    clients = []
    try:
        sc = await sidecar_factory({"app": {"url": await up.start(), "protocol": "h2c"}})
        port = sc.ports["inbound"]
        first = await Client.connect(port)
        clients.append(first)
        await first.send(get("/first"))
        # the connection is up and its first stream sent: the server has it
        await wait_until(lambda: up.opened_before_settings == 1)
        for i in range(7):
            client = await Client.connect(port)
            clients.append(client)
            await client.send(get(f"/r{i}"))
        # each either opened a stream (the server counts it) or waits for the SETTINGS
        await wait_until(
            lambda: (
                up.past_limit
                or up.opened_before_settings
                + sample(sc, "gts_sidecar_pool_requests_waiting", upstream="app")
                == 8
            )
        )
        assert (up.past_limit, up.opened_before_settings) == (False, 1)
        up.release.set()
        assert [(await client.response()).status for client in clients] == [200] * 8
        assert up.served == 8
    finally:
        for client in clients:
            client.close()
        await up.close()
