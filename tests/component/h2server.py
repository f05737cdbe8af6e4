"""The skeleton of the raw h2c servers component tests stand up as HTTP/2 upstreams: a
loopback listener whose `serve` (a subclass's) handles each connection, counted, and the
server side of an h2 connection opened on it. Each test's server says only what it does
with the requests."""

from __future__ import annotations

import asyncio

import h2.config
import h2.connection
import h2.settings


class H2TestServer:
    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        #: connections accepted
        self.connections = 0

    async def start(self) -> str:
        """Listen on a free loopback port; the upstream URL to give the sidecar."""
        self.server = await asyncio.start_server(self._accepted, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.serve(reader, writer)
        finally:
            writer.close()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def server_connection(
    writer: asyncio.StreamWriter,
    *,
    validate: bool = True,
    settings: dict[int, int] | None = None,
    hold: bool = False,
) -> h2.connection.H2Connection:
    """The server side of an HTTP/2 connection, its preface (SETTINGS, with `settings`)
    already written, or with `hold` left for the next write. With `validate=False` h2's
    outbound checks are off, so that a test can send any bytes."""
    config = h2.config.H2Configuration(
        client_side=False,
        header_encoding=None,
        validate_outbound_headers=validate,
        normalize_outbound_headers=validate,
    )
    conn = h2.connection.H2Connection(config)
    if settings:
        conn.local_settings = h2.settings.Settings(client=False, initial_values=settings)
    conn.initiate_connection()
    if not hold:
        writer.write(conn.data_to_send())
    return conn
