"""The declarative-transaction filter of the inbound listener.

For a request that matches a `transactions:` rule and carries no XID: begin a global
transaction before forwarding (the app receives the new XID), hold the app's response head,
commit on a 2xx and roll back on anything else (the app unreachable or timed out included),
then release the head with `XID` and `x-gts-transaction-status` added. If the app answered
2xx but the transaction did not commit (a branch's try failed, or it timed out meanwhile),
the app's answer is replaced by 409 `TRANSACTION_ABORTED`: the caller must not believe an
effect that was rolled back. Each step runs in one named task per request; requests that
match no rule never reach this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Final

from sidecar.coordinator.states import is_final
from sidecar.errors import CoordinatorUnavailable, SidecarError, TransactionNotActive
from sidecar.txn.repeats import (
    DECIDED,
    RETRY_AFTER_SECONDS,
    Attempt,
    DuplicateRequest,
    Repeats,
    RequestInProgress,
    fingerprint,
)

if TYPE_CHECKING:
    from sidecar.coordinator.client import Coordinator
    from sidecar.metrics import Metrics
    from sidecar.proxy.exchange import Exchange
    from sidecar.txn.rules import TxnRule

log = logging.getLogger("sidecar.txn")

STATUS_HEADER: Final = b"x-gts-transaction-status"
#: outcomes under which the app's success may stand: committed, or committing for sure
_COMMITTED: Final = frozenset({"Committed", "Committing", "CommitRetrying"})

#: background rollbacks of abandoned requests, referenced until done
_background: set[asyncio.Task[None]] = set()


class TransactionAborted(SidecarError):
    code = "TRANSACTION_ABORTED"
    status = 409


class TxnFilter:
    def __init__(
        self, exchange: Exchange, rule: TxnRule, coordinator: Coordinator, metrics: Metrics
    ) -> None:
        self.exchange = exchange
        self.rule = rule
        self.coordinator = coordinator
        self.metrics = metrics
        self.xid: str | None = None
        self.status: str | None = None
        self.decided = False
        self.task: asyncio.Task[None] | None = None
        #: why the decision did not reach the coordinator (journalled for re-sending, if so)
        self.undelivered: SidecarError | None = None
        #: this request's claim on its Idempotency-Key: (store, key, the attempt so far)
        self.claim: tuple[Repeats, str, Attempt] | None = None

    # --- begin -------------------------------------------------------------------------------

    def begin(self) -> None:
        self.task = asyncio.get_running_loop().create_task(
            self._begin(), name=f"txn-begin {self.rule.name}"
        )

    async def _begin(self) -> None:
        ex = self.exchange
        # (recorded on the head: the inbound router strips the header itself)
        raw_key = ex.head.idempotency_key
        key = None
        if raw_key is not None:
            key = f"{self.rule.name}:{raw_key.decode('latin-1')}"
            repeats = ex.rt.repeats
            if repeats is not None and not await self._claim(repeats, key):
                return
        try:
            # a retry the claim did not catch (no store, or a restart of a memory store)
            # still gets the same transaction from the coordinator, not a second one
            state = await self.coordinator.begin(self.rule.name, self.rule.timeout_ms, key)
        except SidecarError as err:
            self.decided = True  # nothing to decide: no transaction exists
            await self._release_claim()
            ex.fail_now(err, [])
            return
        self.task = None
        self.xid = state.xid
        if state.status != "Begin":
            # a retried request (same Idempotency-Key) whose transaction already ended: the
            # app must not run it again under a finished XID
            self.decided = True
            self.status = state.status
            ex.fail_now(
                TransactionNotActive(
                    f"this request's transaction {state.xid} already ended {state.status} "
                    "(a retry with the same Idempotency-Key); it is not run again"
                ),
                self.headers(),
            )
            return
        if self.claim is not None:
            try:
                repeats, store_key, attempt = self.claim
                self.claim = (
                    repeats,
                    store_key,
                    await repeats.begun(store_key, attempt, state.xid),
                )
            except SidecarError as err:
                # a repeat could not be told this attempt began: it must not run at all
                self._rollback_in_background()
                ex.fail_now(err, self.headers())
                return
        if ex.finished:
            # the client left (or a timeout fired) while we were beginning
            self._rollback_in_background()
            return
        ex.proceed(self.xid)

    async def _claim(self, repeats: Repeats, key: str) -> bool:
        """Claim `key` for this request: True if it is the first, else it has been answered
        from the first attempt's record (it never reaches the app)."""
        ex = self.exchange
        store_key = repeats.key(self.rule.name, key)
        fp = fingerprint(ex.head.method, ex.head.url)
        try:
            first, attempt = await repeats.claim(store_key, fp, self.rule.timeout_ms)
        except SidecarError as err:
            self.decided = True
            ex.fail_now(err, [])
            return False
        if first:
            self.claim = (repeats, store_key, attempt)
            return True
        self.decided = True
        answer, self.xid, self.status = await self._repeat_answer(attempt)
        extra = self.headers()
        if isinstance(answer, RequestInProgress | CoordinatorUnavailable):
            extra.append((b"retry-after", b"%d" % RETRY_AFTER_SECONDS))
        ex.fail_now(answer, extra)
        return False

    async def _repeat_answer(self, earlier: Attempt) -> tuple[SidecarError, str | None, str | None]:
        """What a repeat of `earlier` is told: (error, XID, transaction status)."""
        xid, status = earlier.xid, earlier.status
        if xid is None:
            return (
                RequestInProgress("the first request with this Idempotency-Key is still running"),
                None,
                None,
            )
        if earlier.state != DECIDED:
            try:
                status = str((await self.coordinator.status(xid))["status"])
            except SidecarError:
                if status == "Unknown":
                    return (
                        CoordinatorUnavailable(
                            f"the first request with this Idempotency-Key ended with its "
                            f"transaction {xid} undecided at the coordinator, which cannot be "
                            "reached now; ask again later"
                        ),
                        xid,
                        status,
                    )
        if status in (None, "Begin", "Unknown"):
            return (
                RequestInProgress(
                    f"the first request with this Idempotency-Key is still running "
                    f"(transaction {xid})"
                ),
                xid,
                status,
            )
        return (
            DuplicateRequest(
                f"a request with this Idempotency-Key already ran: its transaction {xid} is "
                f"{status}; it is not run again (use a new key for a new request)"
            ),
            xid,
            status,
        )

    async def _release_claim(self) -> None:
        claim, self.claim = self.claim, None
        if claim is not None:
            with contextlib.suppress(SidecarError):
                await claim[0].release(claim[1])

    async def _record_outcome(self, status: str) -> None:
        claim = self.claim
        if claim is None:
            return
        try:
            await claim[0].decided(claim[1], claim[2], status)
        except SidecarError as exc:
            log.warning(
                "the outcome of a request with an Idempotency-Key was not recorded; its repeats "
                "will ask the coordinator",
                extra={"xid": self.xid, "error": exc.message},
            )

    # --- the decision ----------------------------------------------------------------------

    def decide(self, success: bool) -> None:
        """The app's response head is held; commit (the app succeeded: a 2xx, or gRPC's
        status OK) or roll back, then release it."""
        self.task = asyncio.get_running_loop().create_task(
            self._decide(success), name=f"txn-decide {self.xid}"
        )

    async def _decide(self, success: bool) -> None:
        if self.decided:
            # the client left between the app's answer and this task's first step (both read
            # in one poll): abandon() has rolled the transaction back; nothing was sent yet
            return
        ex = self.exchange
        status = await self._finish(success)
        if ex.finished:
            return
        headers = self.headers()
        if success and status not in _COMMITTED:
            if status == "Unknown":
                err: SidecarError = self.undelivered or CoordinatorUnavailable(
                    f"the app succeeded but transaction {self.xid} could not be committed: "
                    "the coordinator did not answer; its outcome is unknown"
                )
            else:
                err = TransactionAborted(
                    f"the app succeeded but transaction {self.xid} ended {status}: its "
                    "effects were rolled back"
                )
            ex.replace_held_response(err, headers)
        else:
            ex.release_held_response(headers)

    def fail(self, err: SidecarError) -> None:
        """The request failed before the app answered: roll back, then report the error."""
        if self.xid is None:
            # begin still in flight (a timeout fired): it is left to finish, and rolls its
            # transaction back when it finds the exchange over (cancelling it could leave a
            # transaction the coordinator began to its timeout)
            self.decided = True
            self.exchange.fail_now(err, [])
            return
        self.task = asyncio.get_running_loop().create_task(
            self._fail(err), name=f"txn-rollback {self.xid}"
        )

    async def _fail(self, err: SidecarError) -> None:
        await self._finish(False)
        self.exchange.fail_now(err, self.headers())

    def abandon(self) -> None:
        """The client went away before its answer: the transaction is rolled back, never
        committed, and never left to its timeout. A begin still in flight rolls back when it
        returns; a decision already sent to the coordinator stands (the app had answered)."""
        if self.xid is not None and not self.decided:
            self._rollback_in_background()

    # --- helpers -----------------------------------------------------------------------------

    async def _finish(self, commit: bool) -> str:
        assert self.xid is not None
        self.decided = True
        try:
            state = await (self.coordinator.commit if commit else self.coordinator.rollback)(
                self.xid
            )
            status = state.status
        except SidecarError as exc:
            log.warning(
                "transaction decision not delivered",
                extra={"xid": self.xid, "commit": commit, "error": exc.message},
            )
            self.undelivered = exc
            status = "Unknown"
        self.status = status
        await self._record_outcome(status)
        self.metrics.declarative.labels(self.rule.name, status).inc()
        on_finished = self.exchange.rt.on_finished
        if on_finished is not None and is_final(status):
            on_finished(self.xid)  # with a remote coordinator no engine event will say so
        return status

    def headers(self) -> list[tuple[bytes, bytes]]:
        out: list[tuple[bytes, bytes]] = []
        if self.xid is not None:
            out.append((b"XID", self.xid.encode("ascii")))
        if self.status is not None:
            out.append((STATUS_HEADER, self.status.encode("ascii")))
        return out

    def _rollback_in_background(self) -> None:
        self.decided = True
        xid = self.xid
        assert xid is not None

        async def rollback() -> None:
            try:
                state = await self.coordinator.rollback(xid)
                await self._record_outcome(state.status)
                self.metrics.declarative.labels(self.rule.name, state.status).inc()
            except SidecarError as exc:
                log.warning(
                    "rollback of an abandoned transaction failed; its timeout will roll it back",
                    extra={"xid": xid, "error": exc.message},
                )

        task = asyncio.get_running_loop().create_task(rollback(), name=f"txn-abandon {xid}")
        _background.add(task)
        task.add_done_callback(_background.discard)
