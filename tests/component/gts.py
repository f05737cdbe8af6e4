"""Test peers for the control-plane component tests: a signing GTS REST v1 client (aiohttp +
`signing.sign_headers`) and a branch server that answers phase-two callbacks.

Both talk to the sidecar over real loopback sockets. The client signs exactly what it sends
(the path percent-encoded as given, the raw body bytes), and can sign with any ring, at any
clock, or send whatever headers a test wants instead.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from sidecar.coordinator.signing import KeyRing, sign_headers, verify
from sidecar.errors import SignatureInvalid

SECRET_K1 = "k1-secret-0123456789abcdef0123456789"
SECRET_K0 = "k0-secret-fedcba9876543210fedcba9876"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def key_file(directory: Path, name: str, secret: str) -> str:
    path = directory / f"{name}.key"
    path.write_text(secret + "\n", encoding="utf-8")
    return str(path)


def signing_config(
    directory: Path,
    key_id: str = "k1",
    secret: str = SECRET_K1,
    previous: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """`coordinator.signing` with secrets in files under `directory`."""
    cfg: dict[str, Any] = {"key_id": key_id, "secret_file": key_file(directory, key_id, secret)}
    if previous:
        cfg["previous"] = [
            {"key_id": k, "secret_file": key_file(directory, k, s)} for k, s in previous.items()
        ]
    return {"coordinator": {"signing": cfg}}


def ring(key_id: str = "k1", secret: str = SECRET_K1) -> KeyRing:
    return KeyRing((key_id, secret.encode()))


def xid_path(xid: str, suffix: str = "") -> str:
    """/api/v1/transaction/{xid}{suffix}, the XID percent-encoded as RemoteCoordinator does."""
    return f"/api/v1/transaction/{quote(xid, safe='')}{suffix}"


@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    raw: bytes

    def json(self) -> Any:
        return orjson.loads(self.raw)

    @property
    def error(self) -> dict[str, Any]:
        """The sidecar's own error: the JSON error shape and the marker header, checked."""
        assert self.headers.get("Content-Type", "").startswith("application/json"), self.raw
        body = self.json()
        assert set(body) == {"error"}, body
        err = body["error"]
        assert isinstance(err["code"], str) and err["code"].isupper(), body
        assert isinstance(err["message"], str) and err["message"], body
        assert self.headers.get("x-gts-sidecar-error") == err["code"], dict(self.headers)
        return dict(err)


class SignedClient:
    """Calls a GTS REST v1 listener, signing each request unless told otherwise."""

    def __init__(self, session: aiohttp.ClientSession, port: int, keys: KeyRing) -> None:
        self.session = session
        self.base = f"http://127.0.0.1:{port}"
        self.keys = keys

    def sign(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        *,
        idempotency_key: str | None = None,
        xid: str | None = None,
        at_ms: int | None = None,
        keys: KeyRing | None = None,
    ) -> dict[str, str]:
        raw_path, _, raw_query = path.partition("?")
        headers = sign_headers(
            keys or self.keys,
            method,
            raw_path,
            raw_query,
            body,
            now_ms=now_ms() if at_ms is None else at_ms,
            idempotency_key=idempotency_key,
            xid=xid,
        )
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        if xid is not None:
            headers["XID"] = xid
        return headers

    async def send(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: Mapping[str, str] | list[tuple[str, str]] | None = None,
    ) -> Reply:
        """Send as given: no signing."""
        hdrs: CIMultiDict[str] = CIMultiDict(
            headers if isinstance(headers, list) else (headers or {})
        )
        hdrs.setdefault("Content-Type", "application/json")
        async with self.session.request(
            method,
            URL(self.base + path, encoded=True),
            data=body or None,
            headers=hdrs,
            allow_redirects=False,
        ) as resp:
            return Reply(resp.status, resp.headers, await resp.read())

    async def call(
        self,
        method: str,
        path: str,
        body: bytes | dict[str, Any] = b"",
        *,
        idempotency_key: str | None = None,
        xid: str | None = None,
        at_ms: int | None = None,
        keys: KeyRing | None = None,
    ) -> Reply:
        raw = body if isinstance(body, bytes) else orjson.dumps(body)
        headers = self.sign(
            method, path, raw, idempotency_key=idempotency_key, xid=xid, at_ms=at_ms, keys=keys
        )
        return await self.send(method, path, raw, headers)

    # --- the calls, happy path ----------------------------------------------------------------

    async def start(self, name: str = "create-order", timeout_ms: int | None = 60_000) -> str:
        body: dict[str, Any] = {"name": name}
        if timeout_ms is not None:
            body["timeoutMs"] = timeout_ms
        reply = await self.call("POST", "/api/v1/transaction/start", body)
        assert reply.status == 200, reply.raw
        xid: str = reply.json()["xid"]
        return xid

    async def register(
        self, xid: str, callback_url: str, resource_id: str = "stock", branch_type: str = "TCC"
    ) -> str:
        reply = await self.call(
            "POST",
            "/api/v1/branch/register",
            {
                "xid": xid,
                "branchType": branch_type,
                "resourceId": resource_id,
                "callbackUrl": callback_url,
                "applicationData": {"sku": "A-1", "n": 2},
            },
        )
        assert reply.status == 200, reply.raw
        branch_id: str = reply.json()["branchId"]
        return branch_id

    async def report(self, xid: str, branch_id: str | int, status: str = "PhaseOne_Done") -> Reply:
        return await self.call(
            "POST", "/api/v1/branch/report", {"xid": xid, "branchId": branch_id, "status": status}
        )


@dataclass
class Callback:
    """One phase-two callback as the branch server received it."""

    path: str
    headers: CIMultiDictProxy[str]
    body: dict[str, Any]
    #: None when the signature verified against the server's ring, else the reason
    signature_error: str | None


@dataclass
class BranchServer:
    """Answers `POST {callbackUrl}/commit|/rollback` with the matching PhaseTwo status; records
    every callback and checks its signature with `keys` when given."""

    keys: KeyRing | None = None
    calls: list[Callback] = field(default_factory=list)
    #: resource id → HTTP statuses to answer with next (then 200)
    fail: dict[str, list[int]] = field(default_factory=dict)
    _runner: web.AppRunner | None = None
    port: int = 0

    def url(self, resource_id: str) -> str:
        return f"http://127.0.0.1:{self.port}/branches/{resource_id}"

    async def start(self) -> BranchServer:
        app = web.Application()
        app.router.add_post("/branches/{resource}/{phase}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        problem = None
        if self.keys is not None:
            path, _, query = request.raw_path.partition("?")
            try:
                verify(
                    self.keys,
                    request.method,
                    path,
                    query,
                    [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers],
                    raw,
                    now_ms=now_ms(),
                )
            except SignatureInvalid as exc:
                problem = exc.reason
        self.calls.append(Callback(request.path, request.headers, orjson.loads(raw), problem))
        resource, phase = request.match_info["resource"], request.match_info["phase"]
        pending = self.fail.get(resource)
        if pending:
            return web.Response(status=pending.pop(0), text="try later")
        status = "PhaseTwo_Committed" if phase == "commit" else "PhaseTwo_Rollbacked"
        return web.json_response({"status": status})

    def phases(self) -> list[tuple[str, str]]:
        """(resource id, commit|rollback) of each callback, in arrival order."""
        out = []
        for c in self.calls:
            _, _, resource, phase = c.path.split("/")
            out.append((resource, phase))
        return out
