"""Phase-two callbacks: the coordinator calling a branch's sidecar, signed.

`POST {callbackUrl}/commit` or `/rollback` with `{xid, branchId, resourceId, applicationData}`,
headers `XID` and an `Idempotency-Key` stable for (xid, branch, phase). The branch answers
`{status: PhaseTwo_Committed | PhaseTwo_Rollbacked}` with a 2xx when done; anything else
(`…_Retryable`, another status, an error, a timeout) means "retry later".
"""

from __future__ import annotations

import time
from collections.abc import Callable

import aiohttp
import orjson
from yarl import URL

from sidecar.coordinator import protocol
from sidecar.coordinator.records import BranchRecord
from sidecar.coordinator.signing import KeyRing, sign_headers


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def idempotency_key(xid: str, branch_id: int, phase: str) -> str:
    return f"{xid}:{branch_id}:{phase}"


class HttpBranchCaller:
    def __init__(
        self,
        ring: KeyRing,
        *,
        timeout: float,
        connect_timeout: float,
        clock_ms: Callable[[], int] = _now_ms,
    ) -> None:
        self.ring = ring
        self.timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=connect_timeout)
        self._clock_ms = clock_ms
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def phase_two(self, branch: BranchRecord, commit: bool) -> str | None:
        suffix = protocol.COMMIT_SUFFIX if commit else protocol.ROLLBACK_SUFFIX
        phase = "commit" if commit else "rollback"
        url = branch.callback_url + suffix
        body = protocol.callback_body(branch)
        key = idempotency_key(branch.xid, branch.branch_id, phase)
        raw_path = url.split("://", 1)[1].partition("/")[2]
        raw_path, _, raw_query = ("/" + raw_path).partition("?")
        headers = sign_headers(
            self.ring, "POST", raw_path, raw_query, body,
            now_ms=self._clock_ms(), idempotency_key=key, xid=branch.xid,
        )  # fmt: skip
        headers.update(
            {"Content-Type": "application/json", "XID": branch.xid, "Idempotency-Key": key}
        )
        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            async with self._session.post(
                URL(url, encoded=True),
                data=body,
                headers=headers,
                timeout=self.timeout,
                allow_redirects=False,
            ) as resp:
                raw = await resp.read()
                status = resp.status
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return f"{phase} callback to {url} failed: {type(exc).__name__} {exc}".strip()
        want = "PhaseTwo_Committed" if commit else "PhaseTwo_Rollbacked"
        try:
            answer = orjson.loads(raw).get("status") if raw else None
        except (orjson.JSONDecodeError, AttributeError):
            answer = None
        if 200 <= status < 300 and answer == want:
            return None
        return f"{phase} callback to {url}: HTTP {status}, status {answer!r}"
