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
import logging
from typing import TYPE_CHECKING, Final

from sidecar.coordinator.states import is_final
from sidecar.errors import CoordinatorUnavailable, SidecarError, TransactionNotActive

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

    # --- begin -------------------------------------------------------------------------------

    def begin(self) -> None:
        self.task = asyncio.get_running_loop().create_task(
            self._begin(), name=f"txn-begin {self.rule.name}"
        )

    async def _begin(self) -> None:
        ex = self.exchange
        # a client retrying its request with the same Idempotency-Key gets the same
        # transaction, not a second one
        key = next(
            (
                f"{self.rule.name}:{v.decode('latin-1')}"
                for n, v in ex.head.headers or ()
                if n.lower() == b"idempotency-key"
            ),
            None,
        )
        try:
            state = await self.coordinator.begin(self.rule.name, self.rule.timeout_ms, key)
        except SidecarError as err:
            self.decided = True  # nothing to decide: no transaction exists
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
        if ex.finished:
            # the client left (or a timeout fired) while we were beginning
            self._rollback_in_background()
            return
        ex.proceed(self.xid)

    # --- the decision ----------------------------------------------------------------------

    def decide(self, app_status: int) -> None:
        """The app's response head is held; commit or roll back, then release it."""
        self.task = asyncio.get_running_loop().create_task(
            self._decide(200 <= app_status < 300), name=f"txn-decide {self.xid}"
        )

    async def _decide(self, success: bool) -> None:
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
                await self.coordinator.rollback(xid)
            except SidecarError as exc:
                log.warning(
                    "rollback of an abandoned transaction failed; its timeout will roll it back",
                    extra={"xid": xid, "error": exc.message},
                )

        task = asyncio.get_running_loop().create_task(rollback(), name=f"txn-abandon {xid}")
        _background.add(task)
        task.add_done_callback(_background.discard)
