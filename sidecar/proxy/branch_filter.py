"""The branch filter of the inbound listener: a declared TCC try or Saga action.

The request must carry an XID (else 400 XID_REQUIRED). Its body is read whole (up to the
resource's `max_application_data`, else 413), the branch is registered with the XID's
coordinator with the request as its application data and a callback URL on this sidecar's
peer listener, the try is recorded in the fence as running, with its deadline (a try whose
branch was already cancelled is refused with 409 and never forwarded), and only then does the
request go to the app, with `x-gts-branch-id`. The try ends (for the participant, whose phase
two waits for it) when the app's response head arrives or the exchange fails; a try that
reached the app and got no answer keeps counting as running until its deadline. The app's
answer is reported as the branch's phase-one result: a PhaseOne_Done (2xx) in the
background; a PhaseOne_Failed before the response is passed on, so that the coordinator
knows the branch failed before the caller can act on the failure (a caller that commits
anyway must not find the failed try confirmed). If the registration
fails, the request is not forwarded and the caller gets 503.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from sidecar.coordinator.states import BranchStatus
from sidecar.errors import CoordinatorUnavailable, SidecarError
from sidecar.txn.branches import BRANCH_HEADER, application_data
from sidecar.txn.tries import TryEnd

if TYPE_CHECKING:
    from sidecar.coordinator.client import Coordinator
    from sidecar.proxy.exchange import Exchange
    from sidecar.txn.branches import BranchRule, Participant

log = logging.getLogger("sidecar.branches")

_background: set[asyncio.Task[None]] = set()
#: seconds a failed try's answer waits for its PhaseOne_Failed to reach an unreachable
#: coordinator (retried with backoff) before it is passed on anyway
FAILED_REPORT_PATIENCE = 5.0


class BranchFilter:
    def __init__(
        self,
        exchange: Exchange,
        rule: BranchRule,
        xid: str,
        coordinator: Coordinator,
        participant: Participant,
        callback_base: str,
    ) -> None:
        self.exchange = exchange
        self.rule = rule
        self.xid = xid
        self.coordinator = coordinator
        self.participant = participant
        self.callback_url = f"{callback_base}/{rule.resource}"
        self.branch_id: int | None = None
        self.reported = False
        self.task: asyncio.Task[None] | None = None
        #: the try is recorded running in the participant and not yet ended
        self.try_open = False

    def register(self, body: bytes) -> None:
        """The whole phase-one body is here: register, fence, then forward."""
        head = self.exchange.head
        try:
            data = application_data(self.rule, head.method, head.url, head.headers or [], body)
        except SidecarError as err:
            self.exchange.fail_now(err, [])
            return
        self.task = asyncio.get_running_loop().create_task(
            self._register(data), name=f"branch-register {self.rule.resource}"
        )

    async def _register(self, data: bytes) -> None:
        ex = self.exchange
        try:
            branch_id = await self.coordinator.register(
                self.xid, self.rule.branch_type, self.rule.resource, self.callback_url, data
            )
            self.branch_id = branch_id
            # the try is recorded as running (durably) before it can reach the app; the
            # record is let finish even if the exchange ends meanwhile, and then ended
            cluster = self.exchange.cluster
            begin = asyncio.get_running_loop().create_task(
                self.participant.begin_try(
                    self.xid, branch_id, self.rule.resource,
                    cluster.total_timeout if cluster is not None else None,
                ),
                name=f"branch-begin-try {branch_id}",
            )  # fmt: skip
            try:
                await asyncio.shield(begin)
            except asyncio.CancelledError:
                _background.add(begin)
                begin.add_done_callback(_background.discard)
                begin.add_done_callback(self._end_unforwarded)
                raise
            self.try_open = True
        except asyncio.CancelledError:
            return
        except SidecarError as err:
            extra = self.headers()
            if isinstance(err, CoordinatorUnavailable):
                retry_after = getattr(err, "retry_after", None)
                if retry_after is not None:
                    extra.append((b"retry-after", b"%d" % max(1, round(retry_after))))
                err = CoordinatorUnavailable(
                    f"branch {self.rule.resource!r} could not be registered with the "
                    f"coordinator of {self.xid}: {err.message}; the request was not forwarded"
                )
            ex.fail_now(err, extra)
            return
        self.task = None
        if ex.finished:
            self.report(False)  # never forwarded: ends the try at once
            return
        ex.proceed_branch([(BRANCH_HEADER.encode(), str(branch_id).encode())])

    def _end_unforwarded(self, begin: asyncio.Future[None]) -> None:
        if not begin.cancelled() and begin.exception() is None and self.branch_id is not None:
            self.participant.end_try(self.xid, self.branch_id, TryEnd.NOT_DELIVERED)

    def end_try(self) -> None:
        """The try's exchange is over (answered, failed, or abandoned by its client): tell
        the participant, once, how. Called before the exchange lets go of its upstream
        connection, which says whether the request was ever written to the app."""
        if not self.try_open or self.branch_id is None:
            return
        self.try_open = False
        ex = self.exchange
        if ex.resp_started:
            how = TryEnd.ANSWERED
        elif ex.upstream is not None:
            how = TryEnd.NO_ANSWER  # the app may still be working on it
        else:
            how = TryEnd.NOT_DELIVERED
        self.participant.end_try(self.xid, self.branch_id, how)

    def headers(self) -> list[tuple[bytes, bytes]]:
        if self.branch_id is None:
            return []
        return [(BRANCH_HEADER.encode(), str(self.branch_id).encode())]

    def report(self, ok: bool) -> None:
        """Phase one's outcome, to the coordinator, in the background (the caller's answer
        is not held: used for a try that succeeded, and where the exchange failed itself).
        The try has ended (the exchange calls this at the response head or when it fails)."""
        self.end_try()
        self._report(ok, release=False)

    def report_failure_then_release(self) -> None:
        """PhaseOne_Failed to the coordinator, then the app's (held) failure response to the
        caller. An unreachable coordinator is retried for FAILED_REPORT_PATIENCE seconds; if
        the report still cannot be delivered the response goes on anyway (logged), and a
        commit the caller sends regardless would confirm the unreported branch."""
        self.end_try()
        if not self._report(False, release=True):
            self.exchange.release_held_response([])

    def _report(self, ok: bool, *, release: bool) -> bool:
        if self.reported or self.branch_id is None:
            return False
        self.reported = True
        status = BranchStatus.PHASE_ONE_DONE if ok else BranchStatus.PHASE_ONE_FAILED
        branch_id = self.branch_id

        async def send() -> None:
            loop = asyncio.get_running_loop()
            # a failure held back from its caller is worth waiting for: through a
            # coordinator restart, the caller's commit would otherwise confirm a failed try
            give_up = loop.time() + (FAILED_REPORT_PATIENCE if release else 0.0)
            pause = 0.1
            try:
                while True:
                    try:
                        await self.coordinator.report(self.xid, branch_id, status)
                        return
                    except CoordinatorUnavailable as exc:
                        if loop.time() + pause > give_up:
                            raise
                        log.info(
                            "phase-one report not delivered yet; retrying",
                            extra={"xid": self.xid, "branch_id": branch_id, "error": exc.message},
                        )
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 1.0)
            except SidecarError as exc:
                log.warning(
                    "phase-one report not delivered",
                    extra={"xid": self.xid, "branch_id": branch_id, "error": exc.message},
                )
            finally:
                if release:
                    self.exchange.release_held_response([])

        task = asyncio.get_running_loop().create_task(send(), name=f"branch-report {branch_id}")
        _background.add(task)
        task.add_done_callback(_background.discard)
        return True

    def cancel(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
