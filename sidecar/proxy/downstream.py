"""What an exchange needs from "the client side", whatever framing carries it.

An HTTP/1.1 connection (listener.ClientConnection) and an HTTP/2 stream
(h2_downstream.H2Stream) both offer this, so the exchange, its filters, routing, pools and
XID code exist once (Envoy says the same with its codecs' stream encoder/decoder pair). The
exchange calls these; it never writes bytes of a framing itself. Typing only: no I/O here.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Final, Protocol

if TYPE_CHECKING:
    from sidecar.errors import SidecarError
    from sidecar.proxy.exchange import Exchange
    from sidecar.proxy.listener import ProxyListener


#: the first bytes of an HTTP/2 connection with prior knowledge (RFC 9113 §3.4)
H2_PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class Downstream(Protocol):
    loop: asyncio.AbstractEventLoop
    listener: ProxyListener
    #: the client's address (for routing's X-Forwarded-For and per-client limits)
    peer_ip: bytes
    #: no further request will be read from this client (the exchange's answer says so)
    closing: bool
    #: the request is a stream both sides talk on (a gRPC call: client-streaming and bidi
    #: calls wait for answers before sending more), so its body is never held back whole
    streaming: bool

    @property
    def write_paused(self) -> bool:
        """The client is not taking what is written as fast as it comes (back-pressure)."""
        ...

    # the response
    def send_continue(self) -> None: ...
    def response_head(
        self,
        exchange: Exchange,
        status: int,
        headers: list[tuple[bytes, bytes]],
        content_length: bytes | None,
    ) -> None: ...
    def response_data(self, exchange: Exchange, data: bytes) -> None: ...
    def response_end(
        self, exchange: Exchange, trailers: list[tuple[bytes, bytes]] | None
    ) -> None: ...
    def flush(self) -> None: ...
    def write_error(
        self, err: SidecarError, close: bool, extra: list[tuple[bytes, bytes]] | None = None
    ) -> None: ...
    def abort_exchange(self, exchange: Exchange) -> None: ...
    def exchange_finished(self, exchange: Exchange, keep_alive: bool) -> None: ...

    # the request body's flow (reasons are the PAUSE_* bits of exchange.py)
    def pause(self, reason: int) -> None: ...
    def resume(self, reason: int) -> None: ...
    def upstream_full(self) -> bool: ...
