"""The participant side: declared TCC/Saga resources, their phase two through the fence.

`BranchRules` (pure) finds the resource whose try (or Saga action) an inbound request is.
`Participant` keeps the fence and answers the coordinator's signed phase-two callbacks:
under a per-branch lock it decides with the fence, calls the app's confirm / cancel /
compensation with the phase-one request's journalled body, query and allowed headers (plus
`XID`, `x-gts-branch-id`, `x-gts-phase` and an `Idempotency-Key` stable for (xid, branch,
phase)), records the outcome durably, and only then answers. A failure of the app answers
`…_Retryable`, so the coordinator retries with backoff.

Phase two never overtakes phase one: a try is recorded TRYING (with its deadline) before it
is forwarded and TRIED when it ends (`begin_try` / `end_try`, called by the data plane's
branch filter); a confirm or cancel for a branch whose try is running waits for its end (up
to `wait_patience`, then answers `…_Retryable` and the coordinator comes back).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import orjson
from yarl import URL

from sidecar.config import Config, SagaResource, TccResource
from sidecar.coordinator.callbacks import idempotency_key
from sidecar.coordinator.protocol import id_value, json_object
from sidecar.coordinator.states import BranchType
from sidecar.errors import InvalidRequest, PayloadTooLarge, SidecarError
from sidecar.spans import tracer
from sidecar.tracing import TraceContext, current_trace
from sidecar.tracing import parse as parse_traceparent
from sidecar.txn.fence import Action, Decision, FenceState, Phase, decide
from sidecar.txn.fence_store import FenceRow, FenceStore, now_ms
from sidecar.txn.tries import Running, TriesInFlight, TryEnd
from sidecar.xid import parse as parse_xid

log = logging.getLogger("sidecar.branches")

BRANCH_HEADER: Final = "x-gts-branch-id"
PHASE_HEADER: Final = "x-gts-phase"
#: phase-two callbacks land here on the peer listener: {callbackUrl}/commit | /rollback
CALLBACK_PREFIX: Final = "/v1/resources"
#: seconds one phase-two call waits for a try still running before it answers `…_Retryable`
#: (the coordinator then retries with backoff): a few seconds, and below the coordinator's
#: callback timeout (see `wait_patience`)
WAIT_PATIENCE: Final = 2.0
#: seconds `Participant.close` lets the recording of ended tries finish
CLOSE_PATIENCE: Final = 1.0


class BranchSuspended(SidecarError):
    """A try that arrives after its branch was cancelled: never forwarded."""

    code = "BRANCH_SUSPENDED"
    status = 409


class XidRequired(SidecarError):
    code = "XID_REQUIRED"
    status = 400


class ResourceNotFound(SidecarError, LookupError):
    code = "RESOURCE_NOT_FOUND"
    status = 404


@dataclass(frozen=True, slots=True)
class BranchRule:
    resource: str
    branch_type: BranchType
    method: bytes
    path: bytes
    #: lower-cased names of phase-one headers kept for phase two
    forward_headers: frozenset[bytes]
    max_application_data: int
    #: (method, path) of the app's confirm (TCC) — None for Saga, whose action is final
    confirm: tuple[str, str] | None
    #: (method, path) of the app's cancel (TCC) or compensation (Saga)
    cancel: tuple[str, str]
    phase_two_headers: tuple[tuple[str, str], ...]


def _traceparent(trace: TraceContext | None) -> str | None:
    return None if trace is None else trace.traceparent


def _rule(r: TccResource | SagaResource) -> BranchRule:
    if isinstance(r, TccResource):
        first, confirm, cancel = r.try_, (r.confirm.method, r.confirm.path), r.cancel
        kind = BranchType.TCC
    else:
        first, confirm, cancel = r.action, None, r.compensation
        kind = BranchType.SAGA
    return BranchRule(
        resource=r.resource,
        branch_type=kind,
        method=first.method.encode(),
        path=first.path.encode(),
        forward_headers=frozenset(h.lower().encode("latin-1") for h in r.forward_headers),
        max_application_data=r.max_application_data,
        confirm=confirm,
        cancel=(cancel.method, cancel.path),
        phase_two_headers=tuple((h.name, h.value_file.reveal()) for h in r.phase_two_headers),
    )


class BranchRules:
    """Which inbound requests are a branch's phase one. Pure; compiled per config."""

    def __init__(self, config: Config) -> None:
        rules = [_rule(r) for r in config.tcc] + [_rule(r) for r in config.saga]
        self._by_route = {(r.method, r.path): r for r in rules}
        self.by_resource = {r.resource: r for r in rules}
        self.empty = not rules
        #: how long one phase-two call may wait for a try in flight: a few seconds, and
        #: half the coordinator call timeout (the coordinator's callback timeout, when it
        #: runs with this config), so that the coordinator gets an answer, not a timeout
        self.wait_patience = min(WAIT_PATIENCE, config.coordinator.timeouts.request / 2)

    def match(self, method: bytes, target: bytes) -> BranchRule | None:
        if self.empty:
            return None
        return self._by_route.get((method, target.partition(b"?")[0]))


def application_data(
    rule: BranchRule,
    method: bytes,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
) -> bytes:
    """What phase two needs of phase one, as the branch's applicationData JSON."""
    path, _, query = target.partition(b"?")
    kept = {
        name.decode("latin-1"): value.decode("latin-1")
        for name, value in headers
        if name.lower() in rule.forward_headers
    }
    data = orjson.dumps(
        {
            "resource": rule.resource,
            "method": method.decode("ascii"),
            "path": path.decode("latin-1"),
            "query": query.decode("latin-1"),
            "headers": kept,
            "body": base64.b64encode(body).decode("ascii"),
        }
    )
    if len(data) > rule.max_application_data:
        raise PayloadTooLarge(
            f"the {rule.resource!r} phase-one request is {len(data)} bytes as application "
            f"data, over its max_application_data of {rule.max_application_data}"
        )
    return data


_TOKEN_RE: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_QUERY_RE: Final = re.compile(r"[!-~]*")  # visible ASCII: no space, no control character


def _decode_app_data(raw: Any, rule: BranchRule) -> tuple[str, dict[str, str], bytes]:
    """The phase-one request to replay, checked: only the resource's forward_headers (never
    framing, hop-by-hop or Host), one-line values, a visible-ASCII query."""
    if not isinstance(raw, dict):
        raise InvalidRequest("applicationData must be the object the sidecar registered")
    try:
        body = base64.b64decode(str(raw.get("body", "")), validate=True)
    except ValueError:
        raise InvalidRequest("applicationData.body is not base64") from None
    headers = raw.get("headers") or {}
    if not isinstance(headers, dict):
        raise InvalidRequest("applicationData.headers must be an object")
    kept: dict[str, str] = {}
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise InvalidRequest("applicationData.headers must map names to strings")
        if name.lower().encode("latin-1", "replace") not in rule.forward_headers:
            continue  # only what the resource forwards; never framing or Host
        if not _TOKEN_RE.fullmatch(name) or any(c in value for c in "\r\n\x00"):
            raise InvalidRequest(f"applicationData.headers: invalid header {name[:64]!r}")
        kept[name] = value
    query = raw.get("query", "")
    if not isinstance(query, str) or not _QUERY_RE.fullmatch(query):
        raise InvalidRequest("applicationData.query must be visible ASCII")
    return query, kept, body


#: a phase-two call to an HTTP/2 app: (method, path with query, headers, body, timeout) →
#: (status, response fields and trailers)
AppCall = Callable[
    [str, str, list[tuple[str, str]], bytes, float],
    Awaitable[tuple[int, list[tuple[bytes, bytes]]]],
]
#: a gRPC method's path (/package.Service/Method): its phase two is a gRPC call
_GRPC_PATH: Final = re.compile(r"/[A-Za-z_][\w.]*/[A-Za-z_]\w*")


class Participant:
    """Fence + phase-two calls to the app, for the resources this sidecar declares."""

    def __init__(
        self,
        rules: BranchRules,
        fence: FenceStore,
        app_url: str,
        *,
        timeout: float,
        connect_timeout: float,
        wait_patience: float | None = None,
        app_call: AppCall | None = None,
    ) -> None:
        self.rules = rules
        #: an HTTP/2 (h2c) app, a gRPC server: phase two goes over this instead of aiohttp
        self.app_call = app_call
        self.fence = fence
        self.app_url = app_url.rstrip("/")
        #: a try's deadline when its caller names none: the app's total timeout
        self.try_timeout = timeout
        self.timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=connect_timeout)
        #: how long one phase-two call waits for a try in flight before answering Retryable
        self.wait_patience = rules.wait_patience if wait_patience is None else wait_patience
        self.tries = TriesInFlight(self._record_try_end)
        self._locks: dict[tuple[str, int], asyncio.Lock] = {}
        self._session: aiohttp.ClientSession | None = None
        self._background: set[asyncio.Task[None]] = set()
        #: an https:// app: app.tls (sidecar/tls.py sets and rotates it), else the defaults
        self.ssl_context: ssl.SSLContext | bool = True
        self.server_name: str | None = None

    async def close(self) -> None:
        self.tries.close()
        if self._background:
            # ends of tries being recorded: short fence writes, worth letting finish (a row
            # left trying only makes a later phase two wait for its deadline)
            _, late = await asyncio.wait(set(self._background), timeout=CLOSE_PATIENCE)
            for task in late:
                task.cancel()
        if self._session is not None:
            await self._session.close()

    def _lock(self, xid: str, branch_id: int) -> asyncio.Lock:
        key = (xid, branch_id)
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    def _release_lock(self, xid: str, branch_id: int, lock: asyncio.Lock) -> None:
        if not lock.locked() and self._locks.get((xid, branch_id)) is lock:
            del self._locks[(xid, branch_id)]

    def _try_running(self, key: tuple[str, int], row: FenceRow | None) -> bool:
        """Is the branch's try still running at the app? This process knows for its own
        tries; a try recorded by an earlier process (before a restart) runs until its
        recorded deadline, as far as anyone can tell."""
        entry = self.tries.get(key)
        if entry is not None:
            return entry.running(asyncio.get_running_loop().time())
        return row is not None and row.state is FenceState.TRYING and now_ms() < row.try_deadline_ms

    # --- phase one ---------------------------------------------------------------------------

    async def begin_try(
        self, xid: str, branch_id: int, resource: str, timeout: float | None = None
    ) -> None:
        """Record the try as running (TRYING, with its deadline: `timeout` from now, the
        app's total timeout by default) before it is forwarded; refuse one whose branch was
        cancelled. Every begin_try that returns must be followed by `end_try`."""
        timeout = self.try_timeout if timeout is None else timeout
        key = (xid, branch_id)
        lock = self._lock(xid, branch_id)
        try:
            async with lock:
                row = await self.fence.get(xid, branch_id)
                running = self._try_running(key, row)
                decision = decide(Phase.TRY, row.state if row else None, running)
                if decision.action is Action.REFUSE:
                    raise BranchSuspended(
                        f"branch {branch_id} of {xid} was already ended ({decision.reason}): "
                        "the request is not forwarded"
                    )
                started = now_ms()
                deadline = started + int(timeout * 1000)
                if row is not None and running:
                    deadline = max(deadline, row.try_deadline_ms)
                # in memory first: from here a phase two finds the try running
                self.tries.begin(key, timeout)
                try:
                    await self.fence.put(
                        FenceRow(
                            xid, branch_id, resource, FenceState.TRYING, started, started,
                            deadline, _traceparent(current_trace()),
                        )
                    )  # fmt: skip
                except BaseException:
                    self.tries.end(key, TryEnd.NOT_DELIVERED)
                    raise
        finally:
            self._release_lock(xid, branch_id, lock)

    def end_try(
        self,
        xid: str,
        branch_id: int,
        how: TryEnd = TryEnd.ANSWERED,
        *,
        answered: bool | None = None,
    ) -> None:
        """The try's exchange ended: answered by the app, without an answer (the app may
        still be working on it: it goes on counting as running until its deadline), or
        without ever reaching the app (its cancel then has nothing to undo there).
        `answered=True/False` is a shorthand for ANSWERED / NO_ANSWER."""
        if answered is not None:
            how = TryEnd.ANSWERED if answered else TryEnd.NO_ANSWER
        self.tries.end((xid, branch_id), how)

    def _record_try_end(self, key: tuple[str, int], entry: Running) -> None:
        async def record() -> None:
            xid, branch_id = key
            lock = self._lock(xid, branch_id)
            try:
                async with lock:
                    if self.tries.get(key) is not entry:
                        return  # a newer try of the branch took its place: its row is its own
                    row = await self.fence.get(xid, branch_id)
                    phase = Phase.TRY_END if entry.delivered else Phase.TRY_UNDELIVERED
                    decision = decide(phase, row.state if row else None)
                    if row is not None and decision.action is Action.RECORD_ONLY:
                        assert decision.next_state is not None
                        # not fsync'd: lost only with the machine, and then the row says
                        # TRYING and its deadline ends the try instead
                        await self.fence.put(
                            FenceRow(
                                xid, branch_id, row.resource, decision.next_state, now_ms(),
                                row.try_started_ms, row.try_deadline_ms, row.traceparent,
                            ),
                            durable=False,
                        )  # fmt: skip
            except SidecarError as exc:
                # the row stays TRYING: after its deadline it is taken as ended anyway
                log.warning(
                    "the end of a try was not recorded in the fence",
                    extra={"xid": xid, "branch_id": branch_id, "error": exc.message},
                )
            finally:
                self._release_lock(xid, branch_id, lock)
                self.tries.forget(key, entry)

        task = asyncio.get_running_loop().create_task(record(), name=f"try-end {key[1]}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- phase two ---------------------------------------------------------------------------

    async def phase_two(
        self, resource: str, commit: bool, body: bytes, traceparent: str | None = None
    ) -> dict[str, str]:
        """Handle one callback; returns the answer body ({"status": …}). `traceparent` is
        the callback's (the transaction's trace): the call to the app continues it."""
        rule = self.rules.by_resource.get(resource)
        if rule is None:
            raise ResourceNotFound(f"no tcc/saga resource {resource!r} is declared here")
        data = json_object(body)
        xid = data.get("xid")
        if not isinstance(xid, str):
            raise InvalidRequest("xid (string) and branchId (string of digits) are required")
        # a string (what coordinators send) or an integer, 1..2^63-1
        branch_id = id_value(data.get("branchId"), "branchId")
        xid = parse_xid(xid).raw  # XidInvalid (400) for anything else
        # what will be replayed to the app is checked before anything is recorded
        _decode_app_data(data.get("applicationData"), rule)
        retry = "PhaseTwo_CommitFailed_Retryable" if commit else "PhaseTwo_RollbackFailed_Retryable"
        phase = Phase.CONFIRM if commit else Phase.CANCEL
        key = (xid, branch_id)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.wait_patience
        while True:
            lock = self._lock(xid, branch_id)
            try:
                async with lock:
                    row = await self.fence.get(xid, branch_id)
                    decision = decide(
                        phase, row.state if row else None, self._try_running(key, row)
                    )
                    if decision.action is not Action.WAIT:
                        return await self._act(rule, commit, key, data, row, decision, traceparent)
            finally:
                self._release_lock(xid, branch_id, lock)
            # the try is still running at the app: a cancel now would find nothing to cancel
            # (and the try's reservation would then never be released). Wait for its end,
            # outside the branch's lock (the end is recorded under it), for a while.
            entry = self.tries.get(key)
            if entry is not None:
                until = min(give_up, entry.deadline)
            else:
                assert row is not None
                until = min(give_up, loop.time() + (row.try_deadline_ms - now_ms() + 1) / 1000)
            left = until - loop.time()
            if left <= 0:
                return self._still_running(xid, branch_id, retry, row)
            if entry is not None:
                try:
                    await asyncio.wait_for(entry.ended.wait(), left)
                except TimeoutError:
                    pass
            else:
                await asyncio.sleep(left)  # a try of an earlier process: only its deadline

    def _still_running(
        self, xid: str, branch_id: int, retry: str, row: FenceRow | None
    ) -> dict[str, str]:
        left = max(0, (row.try_deadline_ms if row else 0) - now_ms()) / 1000
        reason = (
            f"the try of branch {branch_id} is still running at the app (it counts as "
            f"running for at most {left:.1f}s more); phase two waits for it"
        )
        log.info("phase two waits for a try in flight", extra={"xid": xid, "branch_id": branch_id})
        return {"status": retry, "reason": reason}

    async def _act(
        self,
        rule: BranchRule,
        commit: bool,
        key: tuple[str, int],
        data: dict[str, Any],
        row: FenceRow | None,
        decision: Decision,
        traceparent: str | None = None,
    ) -> dict[str, str]:
        """Carry out a fence decision (the branch's lock is held)."""
        xid, branch_id = key
        resource = rule.resource
        done = "PhaseTwo_Committed" if commit else "PhaseTwo_Rollbacked"
        retry = "PhaseTwo_CommitFailed_Retryable" if commit else "PhaseTwo_RollbackFailed_Retryable"
        if rule.branch_type is BranchType.SAGA and commit and decision.action is Action.FORWARD:
            # a Saga action is final: nothing to confirm at the app
            decision = Decision(Action.RECORD_ONLY, FenceState.CONFIRMED, "saga")
        if decision.action is Action.DONE:
            return {"status": done}
        if decision.action in (Action.REFUSE, Action.RETRY_LATER):
            log.error(
                "phase two refused by the fence",
                extra={"xid": xid, "branch_id": branch_id, "reason": decision.reason},
            )
            return {"status": retry, "reason": decision.reason}
        if decision.action is Action.FORWARD:
            # the callback's trace (the transaction's), else the try's, journalled with it
            parent = parse_traceparent(traceparent) or parse_traceparent(
                row.traceparent if row else None
            )
            error = await self._call_app(rule, commit, xid, branch_id, data, parent)
            if error is not None:
                log.warning(
                    "phase two at the app failed; the coordinator will retry",
                    extra={"xid": xid, "branch_id": branch_id, "error": error},
                )
                return {"status": retry, "reason": error}
        assert decision.next_state is not None
        await self.fence.put(
            FenceRow(
                xid, branch_id, resource, decision.next_state, now_ms(),
                row.try_started_ms if row else 0, row.try_deadline_ms if row else 0,
                row.traceparent if row else traceparent,
            )
        )  # fmt: skip
        return {"status": done}

    async def _call_h2_app(
        self, method: str, path: str, query: str, headers: dict[str, str], body: bytes
    ) -> str | None:
        """Phase two to an h2c app. On a gRPC method the try's message (its length-prefixed
        frame, as the app got it) is replayed, and the call succeeded when its grpc-status
        is 0; otherwise a 2xx."""
        assert self.app_call is not None
        grpc_call = _GRPC_PATH.fullmatch(path) is not None
        fields = [(k, v) for k, v in headers.items() if k.lower() not in ("host", "te")]
        if grpc_call:
            fields = [(k, v) for k, v in fields if k.lower() != "content-type"]
            fields += [("content-type", "application/grpc"), ("te", "trailers")]
        target = path + (f"?{query}" if query else "")
        try:
            status, answer = await self.app_call(method, target, fields, body, self.try_timeout)
        except SidecarError as exc:
            return f"{method} {path} failed: {exc.message}"
        if grpc_call:
            code = next((v for n, v in answer if n.lower() == b"grpc-status"), None)
            if status == 200 and code == b"0":
                return None
            shown = code.decode("latin-1") if code is not None else "none"
            return f"{method} {path} ended with grpc-status {shown}"
        if 200 <= status < 300:
            return None
        return f"{method} {path} answered HTTP {status}"

    async def _call_app(
        self,
        rule: BranchRule,
        commit: bool,
        xid: str,
        branch_id: int,
        data: dict[str, Any],
        parent: TraceContext | None = None,
    ) -> str | None:
        what = "confirm" if commit else ("compensate" if rule.confirm is None else "cancel")
        span = tracer().start(
            f"gts {what} {rule.resource}",
            parent,
            kind="client",
            attributes={"gts.xid": xid, "gts.branch_id": str(branch_id)},
        )
        error: str | None = "cancelled"
        try:
            error = await self._call_app_in(rule, commit, xid, branch_id, data, span.context)
            return error
        finally:
            span.end(error)

    async def _call_app_in(
        self,
        rule: BranchRule,
        commit: bool,
        xid: str,
        branch_id: int,
        data: dict[str, Any],
        trace: TraceContext,
    ) -> str | None:
        target = rule.confirm if commit else rule.cancel
        assert target is not None
        method, path = target
        query, headers, body = _decode_app_data(data.get("applicationData"), rule)
        phase = "commit" if commit else "rollback"
        headers.update(dict(rule.phase_two_headers))
        headers.update(
            {
                "XID": xid,
                BRANCH_HEADER: str(branch_id),
                PHASE_HEADER: "confirm" if commit else "cancel",
                "Idempotency-Key": idempotency_key(xid, branch_id, phase),
                # the transaction's trace, this call's span: the app's work on it joins
                "traceparent": trace.traceparent,
            }
        )
        url = self.app_url + path + (f"?{query}" if query else "")
        if self.app_call is not None:
            return await self._call_h2_app(method, path, query, headers, body)
        if self._session is None:
            self._session = aiohttp.ClientSession(auto_decompress=False)
        try:
            async with self._session.request(
                method, URL(url, encoded=True), data=body, headers=headers,
                timeout=self.timeout, allow_redirects=False,
                ssl=self.ssl_context, server_hostname=self.server_name,
            ) as resp:  # fmt: skip
                await resp.read()
                status = resp.status
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return f"{method} {path} failed: {type(exc).__name__} {exc}".strip()
        if 200 <= status < 300:
            return None
        return f"{method} {path} answered HTTP {status}"
