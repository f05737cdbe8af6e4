"""One request and its response, driven by protocol callbacks.

Theory of operation. `start()` runs the filters (XID) and routing synchronously, takes an idle
pooled connection if there is one and writes the request: the common case creates no task,
no future and no timer. Only when a connection must be opened or waited for does the
exchange spawn a (named, referenced) task for that wait. From then on everything happens in
callbacks: request-body chunks from the client connection, the response head and body from
the upstream connection, and the deadline sweep of the listener (total and response-header
timeouts). Response bytes produced while one upstream read is parsed are written to the
client in one call. An exchange ends exactly once, in `_finish()`, which hands the client
connection its next request.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Final

from sidecar import tracing
from sidecar.config import format_duration
from sidecar.errors import (
    BadRequest,
    PayloadTooLarge,
    RequestTimeout,
    SidecarError,
    UpstreamTimeout,
    UpstreamUnavailable,
    XidInvalid,
)
from sidecar.proxy import access_log, grpc
from sidecar.proxy import headers as h
from sidecar.proxy.branch_filter import BranchFilter
from sidecar.proxy.txn_filter import TxnFilter
from sidecar.proxy.upstream import StreamRefused, is_idempotent
from sidecar.txn.branches import XidRequired

if TYPE_CHECKING:
    from sidecar.proxy.downstream import Downstream
    from sidecar.proxy.listener import ListenerRuntime
    from sidecar.proxy.route import Route
    from sidecar.proxy.upstream import Cluster, Upstream
    from sidecar.request_stats import RequestStats
    from sidecar.txn.branches import BranchRule
    from sidecar.xid import Xid

log = logging.getLogger("sidecar.proxy")


# reasons client reading is paused (a bitmask: reading resumes when none is left)
PAUSE_UPSTREAM_FULL: Final = 1
PAUSE_PREBUFFER: Final = 2
PAUSE_PIPELINE: Final = 4


class Exchange:
    """One request and its response (the `ResponseSink` of its upstream connection)."""

    __slots__ = (
        "conn", "head", "rt", "started", "task", "route", "cluster", "upstream", "xid",
        "request_head", "body_buf", "body_buffered", "body_done", "body_sent", "deadline",
        "header_deadline", "waiter_slot", "resp_started", "resp_close",
        "resp_status", "keep_client", "reused", "upstream_paused", "out", "finished",
        "attempts_left", "retrying", "error_code", "stats", "txn", "xid_extra", "held",
        "held_complete", "branch", "buffering", "held_body", "trailers", "grpc_call",
        "txn_clamped",
        "resp_bytes", "sent_body", "sent_size",
    )  # fmt: skip

    def __init__(self, conn: Downstream, head: h.RequestHead, rt: ListenerRuntime) -> None:
        self.conn = conn
        self.head = head
        self.rt = rt
        self.resp_bytes = 0  # response body bytes from the upstream (the access log's)
        self.started = conn.loop.time()
        self.task: asyncio.Task[None] | None = None
        self.route: Route | None = None
        self.cluster: Cluster | None = None
        self.upstream: Upstream | None = None
        self.xid: Xid | None = None
        self.request_head = b""
        self.body_buf: list[bytes] | None = None
        self.body_buffered = 0
        #: to an HTTP/2 upstream, the request body sent so far, kept until the answer begins
        #: so that a stream the upstream refused unprocessed can go again (None: not kept,
        #: or grown past clients.request_buffer), and its size
        self.sent_body: list[bytes] | None = None
        self.sent_size = 0
        self.body_done = not head.has_body
        self.body_sent = False
        self.deadline = 0.0
        self.header_deadline = 0.0
        self.waiter_slot: list[asyncio.Future[Any] | None] = [None]
        self.resp_started = False
        self.resp_close = False
        self.resp_status = 0
        self.keep_client = head.keep_alive
        self.reused = False
        self.upstream_paused = False
        self.finished = False
        self.attempts_left = 0
        self.retrying = False
        self.error_code: str | None = None
        self.stats: RequestStats | None = None
        #: the declarative-transaction filter, on requests that begin a transaction
        self.txn: TxnFilter | None = None
        self.xid_extra: list[tuple[bytes, bytes]] = []
        #: the response head (status, fields, Content-Length), held while a filter decides
        self.held: tuple[int, list[tuple[bytes, bytes]], bytes | None] | None = None
        #: response body bytes that arrived with a held head
        self.held_body: list[bytes] | None = None
        #: the upstream's trailers (HTTP/2 upstreams: gRPC's status travels in them)
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.held_complete = False
        #: the branch filter, on a declared TCC try / Saga action
        self.branch: BranchFilter | None = None
        #: routed and filtered, waiting for the body before taking an upstream connection
        self.buffering = False
        #: a gRPC call that begins a declarative transaction or is a try: its outcome is its
        #: grpc-status, known at its end
        self.grpc_call = False
        #: the total deadline is the transaction's (shorter than the upstream's timeout)
        self.txn_clamped = False

    # --- start: filters, routing, a connection --------------------------------------------

    def start(self) -> None:
        rt = self.rt
        head = self.head
        try:
            if head.xid_headers is not None:
                try:
                    self.xid = h.resolve_xid(head.xid_headers, rt.xid_max_length, rt.xid_cache)
                except XidInvalid as exc:
                    rt.count_xid_rejection(exc.reason)
                    raise
            if head.host_count > 1:
                raise BadRequest("request carries more than one Host header")
            if head.connection_tokens:
                head.strip_connection_listed()
            route = rt.router.route(head, self.xid, self.conn.peer_ip)
        except SidecarError as err:
            self._fail(err)
            return
        self.route = route
        cluster = self.cluster = route.cluster
        self.stats = rt.stats(cluster.name)
        cluster.active_requests += 1
        self.attempts_left = cluster.retry_attempts
        self.deadline = self.started + cluster.total_timeout
        if self.xid is not None:
            for table in rt.deadline_tables:
                txn_deadline = table.get(self.xid.raw)
                if txn_deadline is not None:
                    if txn_deadline < self.deadline:
                        self.deadline = txn_deadline
                        self.txn_clamped = True
                    break
        self.conn.listener.watch(self)
        if route.branch is not None and rt.participant is not None:
            if self.xid is None:
                self.fail_now(
                    XidRequired(
                        f"{route.branch.resource!r} is a branch of a global transaction: the "
                        f"request must carry an XID ({', '.join(rt.xid_aliases)})"
                    ),
                    [],
                )
                return
            assert rt.coordinator is not None
            self.grpc_call = grpc.request_is_grpc(head.headers)
            if (
                head.content_length is not None
                and int(head.content_length) > route.branch.max_application_data
            ):
                self.fail_now(_over_application_data(route.branch), [])
                return
            # the branch registers once the body is here: the client may send it now
            self._continue()
            self.branch = BranchFilter(
                self, route.branch, self.xid.raw, rt.coordinator, rt.participant,
                rt.callback_base,
            )  # fmt: skip
            if self.body_done:  # (register's tasks are about the request's trace and XID)
                tracing.about(tracing.from_headers(head.headers), self.xid.raw).run(
                    self.branch.register, b"".join(self.body_buf or ())
                )
            return  # else body_complete() registers once the whole body is here
        if route.txn is not None and rt.coordinator is not None:
            self.grpc_call = grpc.request_is_grpc(head.headers)
            self.txn = TxnFilter(self, route.txn, rt.coordinator, rt.metrics)
            # → proceed() once the transaction exists; its calls are in the request's trace
            tracing.about(tracing.from_headers(head.headers), None).run(self.txn.begin)
            return
        self._forward()

    def clamp_to_transaction(self, xid: str) -> None:
        """A call made for a transaction never outlives it: its total deadline is at most
        the transaction's (known here when this process began it or registered a branch)."""
        for table in self.rt.deadline_tables:
            deadline = table.get(xid)
            if deadline is not None:
                if deadline < self.deadline:
                    self.deadline = deadline
                    self.txn_clamped = True
                return

    def proceed_branch(self, extra: list[tuple[bytes, bytes]]) -> None:
        """The branch is registered and fenced: forward the request carrying its id."""
        if self.xid is not None:
            self.clamp_to_transaction(self.xid.raw)  # registering told us its time left
        self.xid_extra = extra
        self._forward()

    def proceed(self, xid: str) -> None:
        """The transaction filter began `xid`: forward the request carrying it."""
        self.clamp_to_transaction(xid)
        self.xid_extra = self.rt.router.xid_headers(xid.encode("ascii"))
        txn = self.txn
        if self.grpc_call and txn is not None:
            # the call must not outlive its transaction
            left = txn.rule.timeout_ms / 1000 - (self.conn.loop.time() - self.started)
            self.head.headers = grpc.clamp_timeout(self.head.headers or [], max(left, 0.001))
        self._forward()

    def _continue(self) -> None:
        """`100 Continue`, once every filter has accepted the request: a refused request
        never makes its client upload the body (and never to an HTTP/1.0 client, RFC 9110
        §10.1.1)."""
        head = self.head
        if head.expect_continue and not self.body_done and head.http_minor == 1:
            head.expect_continue = False
            self.conn.send_continue()

    def _forward(self) -> None:
        route = self.route
        cluster = self.cluster
        head = self.head
        assert route is not None and cluster is not None
        if head.expect_continue:
            self._continue()
        if not cluster.h2:
            self.request_head = h.render_request_head(
                head.method,
                route.target,
                route.host,
                head.headers or [],
                self.extra_headers(),
                head.content_length,
                head.chunked,
            )
        if (
            not self.body_done
            and not self.conn.streaming
            and self.body_buffered < self.rt.clients.request_buffer
        ):
            # no upstream connection until the body is in (or the buffer is full): a slow
            # client must not hold a pooled connection while it dribbles its body
            self.buffering = True
            return
        self._dispatch()

    def extra_headers(self) -> list[tuple[bytes, bytes]]:
        """What routing and the filters add to the request (XID under the upstream's names,
        the branch id, X-Forwarded-*)."""
        assert self.route is not None
        extra = self.route.extra
        return extra + self.xid_extra if self.xid_extra else extra

    def _dispatch(self) -> None:
        self.buffering = False
        cluster = self.cluster
        assert cluster is not None
        up = cluster.take_idle()
        if up is not None:
            self._send(up, True)
        else:
            self._acquire()

    def _acquire(self) -> None:
        self.task = self.conn.loop.create_task(self._acquire_and_send(), name="proxy-acquire")

    async def _acquire_and_send(self) -> None:
        cluster = self.cluster
        assert cluster is not None
        try:
            up, reused = await cluster.acquire(self.waiter_slot)
        except asyncio.CancelledError:
            return  # the client went away; client_gone() has cleaned up
        except UpstreamUnavailable as err:
            self.task = None
            if self._may_retry():
                self._retry()
            else:
                self._fail(err)
            return
        except SidecarError as err:
            self.task = None
            self._fail(err)
            return
        self.task = None
        if self.finished:
            cluster.release(up, True)
            return
        self._send(up, reused)

    def _send(self, up: Upstream, reused: bool) -> None:
        self.upstream = up
        self.reused = reused
        up.attach(self, self.head.method == b"HEAD")
        if self.conn.write_paused:
            self.pause_upstream_reading()
        buf = self.body_buf
        if up.cluster.h2:
            # kept for a replay (see on_upstream_lost); HTTP/1.1 upstreams never say that a
            # request went unprocessed
            kept = self.body_buffered <= self.rt.clients.request_buffer
            self.sent_body = None if not kept else buf if buf is not None else []
            self.sent_size = self.body_buffered
        if buf:
            self.body_buf = None
            self.body_buffered = 0
            up.send_request(self, buf)
            self.conn.resume(PAUSE_PREBUFFER)
        else:
            up.send_request(self, None)
        if self.body_done:
            self._finish_request()

    # --- retries ---------------------------------------------------------------------------

    def _may_retry(self) -> bool:
        cluster = self.cluster
        assert cluster is not None
        return (
            self.attempts_left > 0
            and is_idempotent(self.head.method)
            and not self.head.has_body
            and (self.retrying or cluster.may_retry())
        )

    def _retry(self, counted: bool = True) -> None:
        cluster = self.cluster
        assert cluster is not None
        if counted:
            self.attempts_left -= 1
        self._drop_upstream()
        if not self.retrying:
            self.retrying = True
            cluster.active_retries += 1
        cluster.m_retries.inc()
        self._acquire()

    # --- request body, from the client connection ------------------------------------------

    def feed_body(self, data: bytes) -> None:
        if self.finished:
            return
        up = self.upstream
        if up is not None:
            up.send_body(data, self.head.chunked)
            kept = self.sent_body
            if kept is not None:
                self.sent_size += len(data)
                if self.sent_size <= self.rt.clients.request_buffer:
                    kept.append(data)
                else:
                    self.sent_body = None
            return
        if self.body_buf is None:
            self.body_buf = []
        self.body_buf.append(data)
        self.body_buffered += len(data)
        branch = self.branch
        if branch is not None and branch.branch_id is None:
            # a branch's phase one is read whole (it becomes the journalled application
            # data), within its cap
            if self.body_buffered > branch.rule.max_application_data:
                self.abort_request(_over_application_data(branch.rule))
            return
        limit = self.rt.clients.request_buffer
        if self.body_buffered >= limit:
            if self.buffering:
                self._dispatch()
            if self.upstream is None and self.body_buffered > limit:
                self.conn.pause(PAUSE_PREBUFFER)  # until the upstream is connected

    def body_complete(self) -> None:
        self.body_done = True
        if self.finished:
            return
        branch = self.branch
        if branch is not None and branch.task is None and branch.branch_id is None:
            tracing.about(tracing.from_headers(self.head.headers), branch.xid).run(
                branch.register, b"".join(self.body_buf or ())
            )
            return
        if self.buffering:
            self._dispatch()
        elif self.upstream is not None:
            self._finish_request()

    def _finish_request(self) -> None:
        if self.body_sent:
            return
        self.body_sent = True
        if self.upstream is not None:
            self.upstream.end_body(self.head.chunked)
        if not self.resp_started:
            assert self.cluster is not None
            self.header_deadline = self.conn.loop.time() + self.cluster.response_header_timeout

    # --- upstream events (ResponseSink) ------------------------------------------------------

    def on_response_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> bool:
        self.header_deadline = 0.0
        self.sent_body = None
        self.resp_status = status
        self.resp_started = True
        branch = self.branch
        hold_for_branch = False
        if branch is not None and self.grpc_call:
            # a gRPC try's outcome is its status, in its trailers: held to the end
            kept, content_length, chunked = h.response_fields(headers)
            self.held = (status, kept, content_length)
            return content_length is not None or chunked
        if branch is not None:
            if 200 <= status < 300 or self.txn is not None:
                branch.report(200 <= status < 300)
            else:
                # a failed try: its caller may commit anyway, so the coordinator must know
                # the branch failed before the caller does (else the commit can win the race
                # and confirm a try that failed)
                hold_for_branch = True
        kept, content_length, chunked = h.response_fields(headers)
        if hold_for_branch:
            assert branch is not None
            self.held = (status, kept, content_length)
            self.deadline = float("inf")  # the report has the coordinator call's timeout
            self.pause_upstream_reading()
            branch.report_failure_then_release()
            return content_length is not None or chunked
        txn = self.txn
        if txn is not None and not txn.decided:
            self.held = (status, kept, content_length)
            if self.grpc_call:
                # a gRPC call's outcome is in its trailers: the whole answer is read (its
                # head and messages held), then the transaction decided
                return content_length is not None or chunked
            # hold the head until the transaction is decided; the total deadline stands aside
            # (the coordinator call has its own, shorter timeout)
            self.deadline = float("inf")
            self.pause_upstream_reading()
            txn.decide(200 <= status < 300)
            return content_length is not None or chunked
        self.conn.response_head(self, status, kept, content_length)
        return content_length is not None or chunked

    def on_response_body(self, data: bytes) -> None:
        self.resp_bytes += len(data)
        if self.held is None:
            self.conn.response_data(self, data)
        elif self.held_body is None:
            self.held_body = [data]
        else:
            self.held_body.append(data)

    def on_response_trailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        self.trailers = trailers

    def flush(self) -> None:
        if self.held is None:
            self.conn.flush()

    def on_response_complete(self) -> None:
        if self.finished:
            return
        held = self.held
        if held is not None:
            self.held_complete = True  # finished once the held head is released
            if self.grpc_call:
                self._grpc_outcome(grpc.call_status(self.trailers, held[1]) == grpc.OK)
            return
        self.conn.response_end(self, self.trailers)
        self.conn.flush()
        up = self.upstream
        self.upstream = None
        assert up is not None and self.cluster is not None
        if self.upstream_paused:
            self.upstream_paused = False
            up.resume_reading()
        # reuse only a connection whose request and response both ended cleanly
        self.cluster.release(up, self.body_sent and up.response_done)
        if not self.body_done:
            # the upstream answered before the client finished its body: the rest of the body
            # cannot be skipped reliably, so this client connection closes after the response
            self.resp_close = True
        self._finish()

    def _grpc_outcome(self, ok: bool) -> None:
        """A held gRPC call has ended: its transaction decides, or its try is reported (a
        failed one before the caller hears of it), then the held answer goes out."""
        txn = self.txn
        branch = self.branch
        if txn is not None and not txn.decided:
            self.deadline = float("inf")
            txn.decide(ok)
        elif branch is not None and ok:
            branch.report(True)
            self.release_held_response([])
        elif branch is not None:
            self.deadline = float("inf")  # the report has the coordinator call's timeout
            branch.report_failure_then_release()

    def release_held_response(self, extra: list[tuple[bytes, bytes]]) -> None:
        """The transaction decided in the app's favour: send its response, with `extra`."""
        held = self.held
        if held is None or self.finished:
            return
        self.held = None
        status, kept, content_length = held
        conn = self.conn
        conn.response_head(self, status, kept + extra if extra else kept, content_length)
        body, self.held_body = self.held_body, None
        for data in body or ():
            conn.response_data(self, data)
        self.resume_upstream_reading()
        if self.held_complete:
            self.on_response_complete()
        else:
            conn.flush()

    def replace_held_response(self, err: SidecarError, extra: list[tuple[bytes, bytes]]) -> None:
        """The app succeeded but its transaction did not commit: answer with `err` instead."""
        if self.finished:
            return
        self.held = None
        self.held_body = None
        self._drop_upstream()
        self.fail_now(err, extra)

    def on_upstream_lost(self, exc: Exception | None, got_bytes: bool) -> None:
        if self.finished:
            return
        self.flush()
        if isinstance(exc, SidecarError):
            self._fail(exc)
            return
        if isinstance(exc, StreamRefused) and not self.resp_started:
            # never processed upstream: it goes again whatever its method, with the body
            # sent so far (the rest follows as it comes). Outside the retry budget (the
            # upstream did no work for it); an attempt counts (retries.attempts) unless the
            # connection served others before refusing it (a per-connection limit, such as
            # nginx's keepalive_requests), so an upstream refusing everything is not asked
            # forever while one rolling its connections loses no request
            body = self.sent_body
            if body is not None and (exc.progress or self.attempts_left > 0):
                self.sent_body = None
                self.body_buf = body
                self.body_buffered = self.sent_size
                self._retry(counted=not exc.progress)
                return
            why = "its body is past clients.request_buffer" if body is None else "no attempt left"
            self._fail(UpstreamUnavailable(f"{exc}; not sent again: {why}"))
            return
        elif not got_bytes and not self.resp_started and not self.head.has_body:
            if self.reused and is_idempotent(self.head.method):
                # a pooled keep-alive connection the upstream had already closed: the request
                # never reached it, so try again on a fresh connection (not counted as an
                # attempt: each such retry uses up one stale idle connection)
                self._retry(counted=False)
                return
        detail = f": {exc}" if exc else ""
        when = "mid-response" if self.resp_started else "before responding"
        self._fail(
            UpstreamUnavailable(
                f"upstream {self._cluster_name()!r} closed the connection {when}{detail}"
            )
        )

    def on_upstream_pause_writing(self) -> None:
        self.conn.pause(PAUSE_UPSTREAM_FULL)

    def on_upstream_resume_writing(self) -> None:
        self.conn.resume(PAUSE_UPSTREAM_FULL)

    def pause_upstream_reading(self) -> None:
        if self.upstream is not None and not self.upstream_paused:
            self.upstream_paused = True
            self.upstream.pause_reading()

    def resume_upstream_reading(self) -> None:
        if self.upstream is not None and self.upstream_paused:
            self.upstream_paused = False
            self.upstream.resume_reading()

    # --- deadlines (called by the listener's sweep) ------------------------------------------

    def check_deadlines(self, now: float) -> None:
        cluster = self.cluster
        assert cluster is not None
        if now >= self.deadline and not self.body_done and not self.conn.upstream_full():
            # the client has not sent its whole body in all that time: its fault, not the
            # upstream's (a 408 counted as the client's, never UPSTREAM_TIMEOUT)
            self.conn.listener.client_error("body_timeout")
            self.abort_request(
                RequestTimeout(
                    "request body not received within the total timeout "
                    f"({format_duration(cluster.total_timeout)})"
                )
            )
        elif now >= self.deadline and self.txn_clamped:
            self._timeout(
                UpstreamTimeout(
                    f"total timeout: the transaction {self.xid.raw if self.xid else ''} ran "
                    f"out of time before upstream {cluster.name!r} answered (its time left "
                    f"was shorter than the {format_duration(cluster.total_timeout)} timeout)",
                    kind="total",
                )
            )
        elif now >= self.deadline:
            self._timeout(
                UpstreamTimeout(
                    f"total timeout ({format_duration(cluster.total_timeout)}): the exchange "
                    f"with upstream {cluster.name!r} did not finish in time",
                    kind="total",
                )
            )
        elif self.header_deadline and now >= self.header_deadline:
            self._timeout(
                UpstreamTimeout(
                    "response header timeout "
                    f"({format_duration(cluster.response_header_timeout)}): upstream "
                    f"{cluster.name!r} sent no response head in time",
                    kind="response_header",
                )
            )

    def _timeout(self, err: UpstreamTimeout) -> None:
        waiter = self.waiter_slot[0]
        if waiter is not None and not waiter.done():
            # in the pool queue or connecting: the acquiring task reports it
            waiter.set_exception(err)
        else:
            self._fail(err)

    # --- endings -----------------------------------------------------------------------------

    def _cluster_name(self) -> str:
        return self.cluster.name if self.cluster is not None else "-"

    def _drop_upstream(self) -> None:
        up, self.upstream = self.upstream, None
        if up is not None:
            up.abort()
            up.cluster.release(up, False)
        self.resp_started = False
        self.body_sent = False
        self.header_deadline = 0.0

    def _fail(self, err: SidecarError) -> None:
        if self.finished:
            return
        txn = self.txn
        if txn is not None and not txn.decided:
            # roll the transaction back first; the filter calls fail_now() with its headers
            self.held = None
            self._drop_upstream()
            txn.fail(err)
            return
        extra = txn.headers() if txn is not None else []
        if self.branch is not None:
            self.branch.cancel()
            self.branch.report(False)
            extra = extra + self.branch.headers()
        self.fail_now(err, extra)

    def fail_now(self, err: SidecarError, extra: list[tuple[bytes, bytes]]) -> None:
        """Answer with `err` (or cut the connection if a response is already under way)."""
        if self.finished:
            return
        resp_started = self.resp_started and self.held is None
        self._drop_upstream()
        self.error_code = err.code
        if isinstance(err, UpstreamTimeout):
            self.rt.count_timeout(self._cluster_name(), err.kind)
        conn = self.conn
        if resp_started:
            # the head is out: the only honest signal left is an aborted connection
            self.resp_close = True
            conn.abort_exchange(self)
        else:
            self.resp_status = err.status
            close = not self.body_done or not self.keep_client or conn.closing
            self.resp_close = self.resp_close or close
            log.debug("sidecar error %s: %s", err.code, err.message)
            conn.write_error(err, close=self.resp_close, extra=extra)
        self._finish()

    def abort_request(self, err: SidecarError) -> None:
        """The client's request broke mid-body (stalled or mis-framed): answer if no response
        has started, and close; the upstream attempt is abandoned."""
        if self.finished:
            return
        self.conn.closing = True
        if self.task is not None:
            self.task.cancel()
            self.task = None
        self._fail(err)

    def answer_started(self) -> bool:
        """Whether the response head has gone to the client (not held by a filter)."""
        return self.resp_started and self.held is None

    def client_gone(self) -> None:
        if self.finished:
            return
        if self.txn is not None:
            self.txn.abandon()
        if self.branch is not None:
            self.branch.cancel()
            self.branch.report(False)
        if self.task is not None:
            self.task.cancel()
            self.task = None
        self._drop_upstream()
        self.resp_close = True
        self._finish()

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        conn = self.conn
        cluster = self.cluster
        if cluster is not None:
            cluster.active_requests -= 1
            if self.retrying:
                cluster.active_retries -= 1
            conn.listener.unwatch(self)
        elapsed = conn.loop.time() - self.started
        if self.resp_status:
            stats = self.stats or self.rt.stats("-")
            stats.observe(self.resp_status, elapsed)
        if log.isEnabledFor(logging.DEBUG):
            self._log(elapsed)
        if access_log.writer is not None:
            access_log.writer.write(self, elapsed)
        conn.exchange_finished(self, self.keep_client and not self.resp_close)

    def _log(self, elapsed: float) -> None:
        head = self.head
        log.debug(
            "request",
            extra={
                "listener": self.rt.name,
                "method": head.method.decode("latin-1"),
                "target": head.url[:256].decode("latin-1"),
                "upstream": self._cluster_name(),
                "status": self.resp_status,
                "error": self.error_code,
                "xid": self.xid.raw if self.xid is not None else None,
                "ms": round(elapsed * 1000, 3),
            },
        )


def _over_application_data(rule: BranchRule) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"the {rule.resource!r} request body is over its max_application_data of "
        f"{rule.max_application_data} bytes"
    )


def body_timeout(limit: float) -> RequestTimeout:
    return RequestTimeout(f"request body stalled for {format_duration(limit)}")
