"""Talking to a coordinator: the cluster over signed HTTP, or this process's own engine.

`RemoteCoordinator` is the sidecar's client of GTS REST v1: every call is signed, carries a
bearer JWT when configured, and an Idempotency-Key on writes that stays the same across
failover; calls about an XID go first to the endpoint the XID names (affinity); connect
errors, timeouts and 5xx fail over to the next endpoint within one deadline (the request
timeout, checked at config load to be below every transaction timeout); consecutive failures
open the circuit breaker. A call made for a transaction never outlives it once its deadline
is known (this client began it, or a register answer said how long it has left): begin,
register and report get min(the request timeout, the transaction's time left)
(`deadlines.py`), and register/report are not made at all once its time is up (but for a
failed try's report, which can only make the outcome safer).
`LocalCoordinator` offers the same calls on the local engine.
Foreign errors are translated here; callers see only the sidecar's own errors.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol
from urllib.parse import quote, urlsplit

import aiohttp
import orjson
from yarl import URL

from sidecar.config import CoordinatorConfig
from sidecar.coordinator import protocol
from sidecar.coordinator.auth import TokenSource
from sidecar.coordinator.breaker import Breaker, BreakerState
from sidecar.coordinator.deadlines import Deadlines, call_timeout, time_left
from sidecar.coordinator.engine import Engine
from sidecar.coordinator.signing import KeyRing, sign_headers
from sidecar.coordinator.states import BranchStatus, BranchType
from sidecar.errors import (
    BranchNotFound,
    CoordinatorAuthFailed,
    CoordinatorUnavailable,
    IdempotencyConflict,
    InvalidRequest,
    LockConflict,
    SidecarError,
    TransactionNotActive,
    TransactionNotFound,
    XidInvalid,
)
from sidecar.metrics import Metrics
from sidecar.spans import tracer
from sidecar.tracing import TraceContext, current_trace
from sidecar.xid import parse as parse_xid

log = logging.getLogger("sidecar.coordinator.client")


@dataclass(frozen=True, slots=True)
class TxState:
    xid: str
    status: str


class Coordinator(Protocol):
    """The calls a transaction manager (the TM API, declarative rules) needs."""

    async def begin(
        self, name: str, timeout_ms: int | None, idempotency_key: str | None = None
    ) -> TxState: ...
    async def commit(self, xid: str) -> TxState: ...
    async def rollback(self, xid: str) -> TxState: ...
    async def status(self, xid: str) -> dict[str, Any]: ...
    async def register(
        self,
        xid: str,
        branch_type: BranchType,
        resource_id: str,
        callback_url: str,
        application_data: bytes,
        idempotency_key: str | None = None,
    ) -> int: ...
    async def report(self, xid: str, branch_id: int, status: BranchStatus) -> None: ...


class LocalCoordinator:
    """This process's engine, behind the same calls."""

    def __init__(self, engine: Engine, decision_wait: float = 1.0) -> None:
        self.engine = engine
        self.decision_wait = decision_wait
        #: deadlines (loop time) of the transactions begun through this object: no call is
        #: made over the network here, but the data plane clamps its upstream calls by them
        self.deadlines = Deadlines()

    def deadline_of(self, xid: str) -> float | None:
        """The transaction's deadline on the event loop's clock, when it was begun or a branch
        registered through this object."""
        return self.deadlines.get(xid)

    async def begin(
        self, name: str, timeout_ms: int | None, idempotency_key: str | None = None
    ) -> TxState:
        # the hash tells a retry from a different request under one key: no key, no hash
        request_hash = (
            None
            if idempotency_key is None
            else protocol.body_hash(orjson.dumps([name, timeout_ms]))
        )
        trace = current_trace()  # the request's that begins it (the engine stores it)
        rec = await self.engine.begin(
            name, timeout_ms, idempotency_key=idempotency_key, request_hash=request_hash,
            traceparent=None if trace is None else trace.traceparent,
        )  # fmt: skip
        # the engine's own deadline (wall clock, this process), on the loop's clock
        left_ms = rec.deadline_ms - _now_ms()
        now = asyncio.get_running_loop().time()
        self.deadlines.remember(rec.xid, now + left_ms / 1000, now)
        return TxState(rec.xid, rec.status.value)

    async def commit(self, xid: str) -> TxState:
        rec = await self.engine.commit(xid, wait=self.decision_wait)
        self.deadlines.forget(xid)
        return TxState(rec.xid, rec.status.value)

    async def rollback(self, xid: str) -> TxState:
        rec = await self.engine.rollback(xid, wait=self.decision_wait)
        self.deadlines.forget(xid)
        return TxState(rec.xid, rec.status.value)

    async def status(self, xid: str) -> dict[str, Any]:
        record, branches = await self.engine.get(xid)
        data: dict[str, Any] = orjson.loads(protocol.render_global(record, branches))
        return data

    async def register(
        self,
        xid: str,
        branch_type: BranchType,
        resource_id: str,
        callback_url: str,
        application_data: bytes,
        idempotency_key: str | None = None,
    ) -> int:
        request_hash = None
        if idempotency_key is not None:
            request = orjson.dumps([branch_type.value, resource_id, callback_url])
            request_hash = protocol.body_hash(request + application_data)
        trace = current_trace()
        branch = await self.engine.register(
            xid, branch_type, resource_id, callback_url, application_data,
            idempotency_key=idempotency_key, request_hash=request_hash,
            traceparent=None if trace is None else trace.traceparent,
        )  # fmt: skip
        deadline_ms = self.engine.deadline_ms(xid)
        if deadline_ms is not None and self.deadlines.get(xid) is None:
            left_ms = deadline_ms - _now_ms()
            now = asyncio.get_running_loop().time()
            self.deadlines.remember(xid, now + left_ms / 1000, now)
        return branch.branch_id

    async def report(self, xid: str, branch_id: int, status: BranchStatus) -> None:
        await self.engine.report(xid, branch_id, status)


#: the coordinator's error codes, back into the sidecar's own errors
_REMOTE_ERRORS: Final[dict[str, type[SidecarError]]] = {
    "TRANSACTION_NOT_FOUND": TransactionNotFound,
    "TRANSACTION_NOT_ACTIVE": TransactionNotActive,
    "BRANCH_NOT_FOUND": BranchNotFound,
    "IDEMPOTENCY_KEY_REUSED": IdempotencyConflict,
    "INVALID_REQUEST": InvalidRequest,
    "XID_INVALID": XidInvalid,
}


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


#: transactions whose trace this client remembers (begun here, not yet decided)
_MAX_TRACES: Final = 65_536


class RemoteCoordinator:
    def __init__(
        self,
        cfg: CoordinatorConfig,
        ring: KeyRing,
        metrics: Metrics,
        *,
        session: aiohttp.ClientSession | None = None,
        tokens: TokenSource | None = None,
        clock_ms: Callable[[], int] = _now_ms,
    ) -> None:
        if not cfg.endpoints:
            raise ValueError("RemoteCoordinator needs coordinator.endpoints")
        self.endpoints = [e.rstrip("/") for e in cfg.endpoints]
        self._authority = {urlsplit(e).netloc.lower(): e for e in self.endpoints}
        self.ring = ring
        self.metrics = metrics
        self.connect_timeout = cfg.timeouts.connect
        self.request_timeout = cfg.timeouts.request
        self.breaker = Breaker(cfg.breaker.failures, cfg.breaker.reset)
        #: endpoint → loop time until which it counts as down (it failed a call): some
        #: replicas down means trying the others first, not opening the breaker, which only
        #: counts calls that no endpoint answered (all down)
        self._down: dict[str, float] = {}
        self._down_for = cfg.breaker.reset
        self._session = session
        self._own_session = session is None
        self.tokens = tokens
        self._clock_ms = clock_ms
        #: deadlines (loop time) of the transactions this client began
        self.deadlines = Deadlines()
        #: https:// endpoints: the context of new connections (sidecar/tls.py swaps it when
        #: coordinator.tls files rotate) and the name verified (None: the endpoint's host)
        self.ssl_context: ssl.SSLContext | bool = True
        self.server_name: str | None = None
        #: the trace of each transaction this client began, until it is decided: the
        #: decision is made from a task that is not about the request any more
        self._traces: OrderedDict[str, TraceContext] = OrderedDict()

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=100, keepalive_timeout=30),
                auto_decompress=False,
            )
        return self._session

    # --- the calls ---------------------------------------------------------------------------

    async def begin(
        self, name: str, timeout_ms: int | None, idempotency_key: str | None = None
    ) -> TxState:
        body: dict[str, Any] = {"name": name}
        sent = asyncio.get_running_loop().time()
        if timeout_ms is not None:
            body["timeoutMs"] = timeout_ms
        started: list[TraceContext] = []
        data = await self._call(
            "start", "POST", f"{protocol.API}/transaction/start", orjson.dumps(body),
            idempotency_key=idempotency_key or uuid.uuid4().hex,
            # the begin itself must not outlive the transaction it makes
            deadline=None if timeout_ms is None else sent + timeout_ms / 1000,
            span_out=started,
        )  # fmt: skip
        xid = data["xid"]
        # the decision is made in the same trace: the request's, or (a begin made outside
        # any trace) the one the begin call's span started
        trace = current_trace() or (started[0] if started else None)
        if trace is not None:
            self._traces[xid] = trace
            if len(self._traces) > _MAX_TRACES:
                self._traces.popitem(last=False)
        # the coordinator says which timeout it applied (its default when none was asked)
        applied = data.get("timeoutMs", timeout_ms)
        if isinstance(applied, int) and not isinstance(applied, bool) and applied > 0:
            # counted from when the begin was sent: never later than the coordinator's own
            self.deadlines.remember(xid, sent + applied / 1000, sent)
        return TxState(xid, data.get("status", "Begin"))

    async def commit(self, xid: str) -> TxState:
        return await self._decide("commit", xid)

    async def rollback(self, xid: str) -> TxState:
        return await self._decide("rollback", xid)

    async def _decide(self, call: str, xid: str) -> TxState:
        # not cut short by the deadline: a decision that reaches the coordinator in time is
        # binding, and cutting its answer short would only turn a known outcome into Unknown
        # (a late one is answered at once with the timeout's status)
        path = f"{protocol.API}/transaction/{quote(xid, safe='')}/{call}"
        data = await self._call(call, "POST", path, b"", xid=xid)
        self.deadlines.forget(xid)  # decided: the deadline bounds nothing any more
        self._traces.pop(xid, None)
        return TxState(data["xid"], data["status"])

    def deadline_of(self, xid: str) -> float | None:
        """The transaction's deadline on the event loop's clock, when known here (this client
        began the transaction, or registered a branch and was told its time left)."""
        return self.deadlines.get(xid)

    def _phase_one_deadline(self, call: str, xid: str) -> float | None:
        """The deadline a register or report must keep; TransactionNotActive, without a
        call, once the transaction's time is up (the coordinator is rolling it back)."""
        deadline = self.deadlines.get(xid)
        left = time_left(deadline, asyncio.get_running_loop().time())
        if left is not None and left <= 0:
            self._count(call, "deadline")
            raise TransactionNotActive(
                f"transaction {xid} reached its timeout {-left * 1000:.0f} ms ago: the "
                f"{call} call is not made (the coordinator rolls the transaction back)"
            )
        return deadline

    async def status(self, xid: str) -> dict[str, Any]:
        path = f"{protocol.API}/transaction/{quote(xid, safe='')}"
        return await self._call("status", "GET", path, b"", xid=xid)

    async def register(
        self,
        xid: str,
        branch_type: BranchType,
        resource_id: str,
        callback_url: str,
        application_data: bytes,
        idempotency_key: str | None = None,
    ) -> int:
        body = (
            b'{"xid":' + orjson.dumps(xid)
            + b',"branchType":' + orjson.dumps(branch_type.value)
            + b',"resourceId":' + orjson.dumps(resource_id)
            + b',"callbackUrl":' + orjson.dumps(callback_url)
            + b',"applicationData":' + application_data + b"}"
        )  # fmt: skip
        sent = asyncio.get_running_loop().time()
        data = await self._call(
            "register", "POST", f"{protocol.API}/branch/register", body, xid=xid,
            idempotency_key=idempotency_key or uuid.uuid4().hex,
            deadline=self._phase_one_deadline("register", xid),
        )  # fmt: skip
        try:
            branch_id = protocol.id_value(data.get("branchId"), "branchId")
        except InvalidRequest as exc:
            # a 200 that names no usable branch: the coordinator's fault, not the caller's
            # (a plain ValueError: the router answers it as 502 COORDINATOR_INVALID_ANSWER)
            raise ValueError(exc.message) from None
        left_ms = data.get("timeLeftMs")
        if (
            isinstance(left_ms, int)
            and not isinstance(left_ms, bool)
            and left_ms >= 0
            and self.deadlines.get(xid) is None
        ):
            # a transaction begun elsewhere: the coordinator said how long it has left when it
            # answered; counted from when the register was sent, that is never too late
            self.deadlines.remember(xid, sent + left_ms / 1000, sent)
        return branch_id

    async def report(self, xid: str, branch_id: int, status: BranchStatus) -> None:
        body = orjson.dumps(
            {"xid": xid, "branchId": protocol.id_text(branch_id), "status": status.value}
        )
        # a failed try's report is sent whatever the time: it can only turn a commit into the
        # rollback it must be, and our deadline may run out a moment before the coordinator's
        failed = status is BranchStatus.PHASE_ONE_FAILED
        await self._call(
            "report", "POST", f"{protocol.API}/branch/report", body, xid=xid,
            deadline=None if failed else self._phase_one_deadline("report", xid),
        )  # fmt: skip

    # --- transport ---------------------------------------------------------------------------

    def _order(self, xid: str | None) -> list[str]:
        """XID affinity: the endpoint that owns the XID first, the others after; endpoints
        that failed lately go last (replicas answer for every XID: the owner's being down
        costs one failed attempt, not one per call)."""
        order = list(self.endpoints)
        if xid is not None:
            try:
                owner = parse_xid(xid).owner.lower()
            except XidInvalid:
                owner = ""
            first = self._authority.get(owner)
            if first is not None:
                order = [first] + [e for e in self.endpoints if e != first]
        if self._down:
            now = asyncio.get_running_loop().time()
            for endpoint, until in list(self._down.items()):
                if until <= now:
                    del self._down[endpoint]
            order.sort(key=lambda e: e in self._down)  # stable: affinity kept among equals
        return order

    async def call_json(
        self, call: str, method: str, path: str, body: bytes = b"", *, xid: str | None = None
    ) -> dict[str, Any]:
        """Another signed call of the cluster's API (its global locks: txn/locks_remote.py),
        with the same failover, breaker and error translation."""
        return await self._call(call, method, path, body, xid=xid)

    async def _call(
        self,
        call: str,
        method: str,
        path: str,
        body: bytes,
        *,
        xid: str | None = None,
        idempotency_key: str | None = None,
        deadline: float | None = None,
        span_out: list[TraceContext] | None = None,
    ) -> dict[str, Any]:
        """One call, failing over between endpoints within the request timeout, or within
        `deadline` (loop time: the transaction's) when that comes first. `span_out` is given
        the call's span position."""
        if not self.breaker.allow():
            self._count(call, "breaker_open")
            raise CoordinatorUnavailable(
                "coordinator cluster unavailable (circuit breaker open; next probe in "
                f"{self.breaker.seconds_until_probe():.1f}s)"
            )
        settled = False
        # a span per call, in the trace of the request (or transaction) it is made for; the
        # coordinator gets its position as the traceparent (and stores it with a begin)
        parent = current_trace()
        if parent is None and xid is not None:
            parent = self._traces.get(xid)
        span = tracer().start(
            f"gts {call}",
            parent,
            kind="client",
            attributes={"gts.call": call} if xid is None else {"gts.call": call, "gts.xid": xid},
        )
        if span_out is not None:
            span_out.append(span.context)
        error: str | None = "cancelled"
        try:
            result = await self._try_endpoints(
                call, method, path, body, xid, idempotency_key, deadline,
                traceparent=span.context.traceparent,
            )  # fmt: skip
            settled = True
            error = None
            return result
        except SidecarError as exc:
            settled = True  # every verdict path below has told the breaker
            error = f"{exc.code}: {exc.message}"
            raise
        finally:
            span.end(error)
            if not settled:
                self.breaker.abandon()  # cancelled mid-call: never leave the probe out

    async def _try_endpoints(
        self,
        call: str,
        method: str,
        path: str,
        body: bytes,
        xid: str | None,
        idempotency_key: str | None,
        tx_deadline: float | None = None,
        *,
        traceparent: str | None = None,
    ) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        now = loop.time()
        budget = call_timeout(self.request_timeout, tx_deadline, now)
        #: the transaction's deadline, not the request timeout, bounds this call
        cut_short = budget < self.request_timeout
        deadline = now + budget
        errors: list[str] = []
        refreshed = False
        out_of_time = False
        for endpoint in self._order(xid):
            remaining = deadline - loop.time()
            if remaining <= 0:
                errors.append("request timeout spent")
                out_of_time = True
                break
            try:
                status, data, token = await self._send(
                    endpoint, method, path, body, xid, idempotency_key, remaining, traceparent
                )
                if status == 401 and self.tokens is not None and not refreshed:
                    # one refresh and one retry on 401 (the token may have been revoked)
                    refreshed = True
                    await self.tokens.invalidate(token)
                    status, data, _ = await self._send(
                        endpoint, method, path, body, xid, idempotency_key,
                        max(0.001, deadline - loop.time()), traceparent,
                    )  # fmt: skip
            except SidecarError:
                # the token endpoint's answer: not this coordinator endpoint's fault
                self.breaker.abandon()
                raise
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                errors.append(f"{endpoint}: {type(exc).__name__} {exc}".strip())
                out_of_time = out_of_time or isinstance(exc, TimeoutError)
                self._down[endpoint] = loop.time() + self._down_for
                continue
            if status >= 500:
                errors.append(f"{endpoint}: HTTP {status}")
                self._down[endpoint] = loop.time() + self._down_for
                continue
            self._down.pop(endpoint, None)
            if status == 404 and errors and xid is not None:
                # the XID's owner failed and another node does not know it: the owner being
                # down is the news, not "not found"
                errors.append(f"{endpoint}: does not know {xid}")
                continue
            self.breaker.success()
            self._set_breaker_gauge()
            if status < 300:
                self._count(call, "ok")
                return data
            self._count(call, "refused")
            raise self._translate(status, data)
        if cut_short and out_of_time:
            # the transaction's time ran out, not the coordinator's: no verdict on its health
            self.breaker.abandon()
            self._count(call, "deadline")
            raise CoordinatorUnavailable(
                f"no answer to {call} within the transaction's time left ({budget * 1000:.0f} "
                f"ms, below coordinator.timeouts.request): " + "; ".join(errors)
            )
        self.breaker.failure()
        self._set_breaker_gauge()
        self._count(call, "unavailable")
        raise CoordinatorUnavailable(
            f"coordinator cluster unavailable for {call}: " + "; ".join(errors)
        )

    async def _send(
        self,
        endpoint: str,
        method: str,
        path: str,
        body: bytes,
        xid: str | None,
        idempotency_key: str | None,
        timeout: float,
        traceparent: str | None = None,
    ) -> tuple[int, dict[str, Any], str]:
        raw_path, _, raw_query = path.partition("?")
        headers = sign_headers(
            self.ring, method, raw_path, raw_query, body,
            now_ms=self._clock_ms(), idempotency_key=idempotency_key, xid=xid,
        )  # fmt: skip
        headers["Content-Type"] = "application/json"
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        if xid is not None:
            headers["XID"] = xid
        if traceparent is not None:
            headers["traceparent"] = traceparent
        token = ""
        if self.tokens is not None:
            token = await self.tokens.token()
            headers["Authorization"] = "Bearer " + token
        client_timeout = aiohttp.ClientTimeout(
            total=timeout, sock_connect=min(self.connect_timeout, timeout)
        )
        # encoded=True: the path goes out byte for byte as signed (yarl would otherwise
        # normalise %3A in an XID back to ':')
        async with self._get_session().request(
            method, URL(endpoint + path, encoded=True), data=body or None, headers=headers,
            timeout=client_timeout, allow_redirects=False,
            ssl=self.ssl_context, server_hostname=self.server_name,
        ) as resp:  # fmt: skip
            raw = await resp.read()
        try:
            data = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            data = {"error": {"code": "?", "message": raw[:200].decode("latin-1")}}
        if not isinstance(data, dict):
            data = {}
        return resp.status, data, token

    def _translate(self, status: int, data: dict[str, Any]) -> SidecarError:
        err = data.get("error") if isinstance(data.get("error"), dict) else {}
        assert isinstance(err, dict)
        code = str(err.get("code", ""))
        message = str(err.get("message", f"HTTP {status}"))
        cls = _REMOTE_ERRORS.get(code)
        if cls is not None:
            return cls(f"coordinator: {message}")
        if code == "LOCK_CONFLICT":  # the app is told the holder and the key, as locally
            return LockConflict(str(err.get("key", "")), str(err.get("holder", "")))
        if code in ("SIGNATURE_INVALID", "UNAUTHORIZED"):
            return CoordinatorAuthFailed(
                f"the coordinator refused this sidecar's credentials ({message}); check "
                "coordinator.signing and coordinator.auth"
            )
        return CoordinatorUnavailable(f"coordinator answered HTTP {status}: {message}")

    def _count(self, call: str, result: str) -> None:
        self.metrics.coordinator_calls.labels(call, result).inc()

    def _set_breaker_gauge(self) -> None:
        self.metrics.breaker_state.set(0 if self.breaker.state is BreakerState.CLOSED else 1)
