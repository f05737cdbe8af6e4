"""`gts-sidecar demo`: a whole transaction flow on loopback, with no cluster, as a timeline.

Theory of operation. Everything runs on loopback with ephemeral ports and one temp dir (each
sidecar's peer listener on an address of its own, 127.0.0.2-4, all on one port, as pods
share the peer port: a sidecar calls a peer only on its own peer port and only inside
`degraded.peer_networks`):
the standalone coordinator as a child process (`python -m sidecar coordinator`, on a fixed
free port so that it can come back on the same address), and three small aiohttp services in
this process, each behind its own in-process `Sidecar`: `order` (a declarative transaction on
POST /orders that calls the two others through its sidecar's outbound listener), `inventory`
(TCC: try reserves stock, confirm takes it, cancel puts it back) and `account` (TCC: try
freezes an amount, confirm debits it, cancel unfreezes it). Every process signs with one key
generated in the temp dir. The scenario: (1) a committed order; (2) a failed order that is
cancelled; (3) the coordinator SIGKILLed and orders still committing in degraded mode; (4) the
coordinator back on its address and new orders handed back to it. Then the checks: every
transaction terminal and agreeing with what its client was told, stock and balances adding
up, each branch's confirm or cancel applied exactly once. Exit 0 only when all pass.
Resources are released in reverse order on every exit path, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TextIO

import aiohttp
import orjson
import yaml
from aiohttp import web

import sidecar
from sidecar import logs
from sidecar.config import Config, parse
from sidecar.errors import ConfigError
from sidecar.metrics import Metrics
from sidecar.server import Sidecar

HOST: Final = "127.0.0.1"
KEY_ID: Final = "demo"
LISTENERS: Final = ("inbound", "outbound", "api", "peer", "admin")
FINAL: Final = frozenset({"Committed", "Rollbacked", "TimeoutRollbacked"})
#: bounds of the waits (seconds); a healthy run needs a fraction of each
START_TIMEOUT: Final = 30.0
HAND_BACK_TIMEOUT: Final = 10.0
SETTLE_TIMEOUT: Final = 15.0

INITIAL_STOCK: Final = {"widget": 100, "gadget": 50}
INITIAL_BALANCE: Final = {"alice": 50_000, "bob": 2_000}  # cents


class DemoError(Exception):
    """The demo could not run (a process did not start, a port could not be bound)."""


def money(cents: int) -> str:
    return f"{cents / 100:.2f}"


#: each service's sidecar advertises (and has its peer listener on) an address of its own
PEER_HOSTS: Final = {"inventory": "127.0.0.2", "account": "127.0.0.3", "order": "127.0.0.4"}


def free_port(*hosts: str) -> int:
    """A port nothing listens on now on every one of `hosts` (bound, then released)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = int(s.getsockname()[1])
        try:
            for host in hosts:
                with socket.socket() as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port
    raise DemoError("no loopback port is free on every peer address")


def owner_of(xid: str) -> str:
    return xid.rpartition(":")[0]


# --- the timeline ----------------------------------------------------------------------------


class Timeline:
    """Lines on stdout, stamped with the seconds since the demo started."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.t0 = time.monotonic()
        #: app-level steps (tries, confirms, cancels) are shown while this is set
        self.details = True

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"[{self.elapsed():6.3f}s] {text}", flush=True)

    def detail(self, text: str) -> None:
        if self.details:
            self.say(f"  {text}")

    def heading(self, text: str) -> None:
        if not self.quiet:
            print(f"\n== {text} ==", flush=True)


# --- the TCC services ------------------------------------------------------------------------


@dataclass(frozen=True)
class Hold:
    """What a successful try set aside, by XID: a reservation or a frozen amount."""

    subject: str  # the SKU or the customer
    amount: int
    #: the try's request, which phase two must carry again
    body: bytes


@dataclass(frozen=True)
class PhaseTwoCall:
    phase: str  # confirm | cancel
    xid: str
    branch_id: str
    idempotency_key: str


class TccService:
    """A participant app with real state; records every phase-two call it receives."""

    name = "tcc"
    path = "/"

    def __init__(self, timeline: Timeline) -> None:
        self.timeline = timeline
        #: (xid, branch id) → did the try succeed
        self.tries: dict[tuple[str, str], bool] = {}
        self.holds: dict[str, Hold] = {}
        self.calls: list[PhaseTwoCall] = []
        #: anything a correct phase two would never do (a confirm of a failed try, a call
        #: without a try, a body that is not the try's)
        self.anomalies: list[str] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(self.path, self._try)
        app.router.add_post(f"{self.path}/confirm", self._confirm)
        app.router.add_post(f"{self.path}/cancel", self._cancel)
        return app

    async def _confirm(self, request: web.Request) -> web.Response:
        return await self._phase_two(request, "confirm")

    async def _cancel(self, request: web.Request) -> web.Response:
        return await self._phase_two(request, "cancel")

    # what each service does; each returns the line shown in the timeline
    def reserve(self, data: dict[str, Any], body: bytes) -> tuple[Hold | None, str]:
        raise NotImplementedError

    def confirm(self, hold: Hold) -> str:
        raise NotImplementedError

    def cancel(self, hold: Hold) -> str:
        raise NotImplementedError

    async def _try(self, request: web.Request) -> web.Response:
        xid = request.headers.get("XID", "")
        branch = request.headers.get("x-gts-branch-id", "")
        body = await request.read()
        data = orjson.loads(body)
        hold, line = self.reserve(data, body)
        self.tries[(xid, branch)] = hold is not None
        self.timeline.detail(f"{self.name}: try #{data.get('order', '?')}: {line}")
        if hold is None:
            return web.json_response({"error": f"{self.name}: {line}"}, status=409)
        self.holds[xid] = hold
        return web.json_response({"ok": True})

    async def _phase_two(self, request: web.Request, phase: str) -> web.Response:
        xid = request.headers.get("XID", "")
        branch = request.headers.get("x-gts-branch-id", "")
        key = request.headers.get("Idempotency-Key", "")
        body = await request.read()
        self.calls.append(PhaseTwoCall(phase, xid, branch, key))
        if request.headers.get("x-gts-phase") != phase:
            seen = request.headers.get("x-gts-phase")
            self.anomalies.append(f"{phase} of {xid} carried x-gts-phase {seen!r}")
        order = orjson.loads(body).get("order", "?") if body else "?"
        tried = self.tries.get((xid, branch))
        hold = self.holds.pop(xid, None)
        if hold is None:
            if tried is None:
                why = f"{phase} of {xid} branch {branch} without a try"
            elif tried:
                why = f"{phase} of {xid} branch {branch} repeated"
            elif phase == "confirm":
                why = f"confirm of {xid} branch {branch} whose try failed"
            else:
                why = ""  # a cancel after a failed try: nothing was set aside
            if why:
                self.anomalies.append(why)
            self.timeline.detail(
                f"{self.name}: {phase} #{order}: nothing to do ({why or 'the try failed'})"
            )
            return web.json_response({"ok": True})
        if body != hold.body:
            self.anomalies.append(f"{phase} of {xid} did not carry its try's body")
        line = self.confirm(hold) if phase == "confirm" else self.cancel(hold)
        self.timeline.detail(f"{self.name}: {phase} #{order}: {line}")
        return web.json_response({"ok": True})


class Inventory(TccService):
    name = "inventory"
    path = "/reserve"

    def __init__(self, timeline: Timeline) -> None:
        super().__init__(timeline)
        self.available = dict(INITIAL_STOCK)
        self.reserved = dict.fromkeys(INITIAL_STOCK, 0)

    def show(self, sku: str) -> str:
        return f"{sku}: {self.available[sku]} available, {self.reserved[sku]} reserved"

    def reserve(self, data: dict[str, Any], body: bytes) -> tuple[Hold | None, str]:
        sku, qty = str(data["sku"]), int(data["qty"])
        if self.available.get(sku, 0) < qty:
            return None, f"reserve {qty} {sku}: refused, only {self.available.get(sku, 0)} left"
        self.available[sku] -= qty
        self.reserved[sku] += qty
        return Hold(sku, qty, body), f"reserve {qty} {sku}: ok ({self.show(sku)})"

    def confirm(self, hold: Hold) -> str:
        self.reserved[hold.subject] -= hold.amount
        return f"take {hold.amount} {hold.subject} out of stock ({self.show(hold.subject)})"

    def cancel(self, hold: Hold) -> str:
        self.reserved[hold.subject] -= hold.amount
        self.available[hold.subject] += hold.amount
        return f"{hold.amount} {hold.subject} back in stock ({self.show(hold.subject)})"


class Account(TccService):
    name = "account"
    path = "/freeze"

    def __init__(self, timeline: Timeline) -> None:
        super().__init__(timeline)
        self.balance = dict(INITIAL_BALANCE)
        self.frozen = dict.fromkeys(INITIAL_BALANCE, 0)

    def show(self, who: str) -> str:
        return f"{who}: balance {money(self.balance[who])}, {money(self.frozen[who])} frozen"

    def reserve(self, data: dict[str, Any], body: bytes) -> tuple[Hold | None, str]:
        who, amount = str(data["customer"]), int(data["amount"])
        free = self.balance.get(who, 0) - self.frozen.get(who, 0)
        if free < amount:
            return None, (
                f"freeze {money(amount)} of {who}: refused, insufficient balance "
                f"({money(free)} available)"
            )
        self.frozen[who] += amount
        return Hold(who, amount, body), f"freeze {money(amount)} of {who}: ok ({self.show(who)})"

    def confirm(self, hold: Hold) -> str:
        self.frozen[hold.subject] -= hold.amount
        self.balance[hold.subject] -= hold.amount
        return f"debit {money(hold.amount)} from {hold.subject} ({self.show(hold.subject)})"

    def cancel(self, hold: Hold) -> str:
        self.frozen[hold.subject] -= hold.amount
        return f"unfreeze {money(hold.amount)} of {hold.subject} ({self.show(hold.subject)})"


class OrderService:
    """The initiator app: its sidecar begins the transaction; it calls both participants
    through that sidecar's outbound listener with the XID, and answers 201 or an error."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session
        self.outbound = 0  # the order sidecar's outbound port, known once it has started

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/orders", self._create)
        return app

    async def _create(self, request: web.Request) -> web.Response:
        xid = request.headers["XID"]
        order = await request.json()
        steps = (
            ("/inventory/reserve", {"sku": order["sku"], "qty": order["qty"]}),
            ("/account/freeze", {"customer": order["customer"], "amount": order["amount"]}),
        )
        for path, body in steps:
            url = f"http://{HOST}:{self.outbound}{path}"
            async with self.session.post(
                url, json={"order": order["order"], **body}, headers={"XID": xid}
            ) as resp:
                answer = await resp.read()
                if resp.status >= 300:
                    reason = _reason(answer) or f"HTTP {resp.status}"
                    # a participant's business refusal stays a 409; anything else is a 502
                    status = 409 if resp.status == 409 else 502
                    return web.json_response({"error": reason}, status=status)
        return web.json_response({"order": order["order"], "xid": xid}, status=201)


def _reason(body: bytes) -> str:
    """The error text of an app's answer or of a sidecar's own error body."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:200].decode("utf-8", "replace")
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        return f"{error.get('code')}: {error.get('message')}"
    return str(error) if error is not None else ""


# --- the coordinator process -----------------------------------------------------------------


class CoordinatorProcess:
    """`python -m sidecar coordinator` as a child: its log goes to a file in the temp dir
    (warnings and errors to stderr too); its start-up line gives its ports."""

    def __init__(self, config_path: Path, log_path: Path, port: int) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.port = port
        self.proc: asyncio.subprocess.Process | None = None
        self.resumed = 0
        self._pump: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    async def start(self) -> None:
        root = str(Path(sidecar.__file__).resolve().parent.parent)
        path = os.environ.get("PYTHONPATH")
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            # the same package as this process, wherever the demo was started from
            "PYTHONPATH": root + (os.pathsep + path if path else ""),
        }
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sidecar", "coordinator", "--config", str(self.config_path),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        log = self.log_path.open("a", encoding="utf-8")
        try:
            await asyncio.wait_for(self._until_started(log), START_TIMEOUT)
        except BaseException:
            log.close()
            await self.stop()
            raise
        self._pump = asyncio.get_running_loop().create_task(
            self._copy_rest(log), name="demo coordinator log"
        )

    async def _until_started(self, log: TextIO) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while True:
            raw = await self.proc.stderr.readline()
            if not raw:
                rc = await self.proc.wait()
                raise DemoError(f"the coordinator exited with {rc} before starting (see above)")
            record = self._copy(raw, log)
            if record.get("msg") == "gts-sidecar coordinator started":
                self.resumed = int(record.get("resumed", 0))
                return

    async def _copy_rest(self, log: TextIO) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        try:
            while raw := await self.proc.stderr.readline():
                self._copy(raw, log)
        finally:
            log.close()

    def _copy(self, raw: bytes, log: TextIO) -> dict[str, Any]:
        line = raw.decode("utf-8", "replace")
        log.write(line)
        log.flush()
        try:
            record = json.loads(line)
        except ValueError:
            record = {"level": "error", "msg": line.rstrip()}
        if not isinstance(record, dict):
            return {}
        if record.get("level") in ("warning", "error", "critical"):
            print(f"coordinator: {record.get('level')}: {record.get('msg')}", file=sys.stderr)
        return record

    async def kill(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        return await self._reap()

    async def _reap(self) -> int:
        assert self.proc is not None
        rc = await self.proc.wait()
        if self._pump is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pump, 5)
            self._pump = None
        return rc

    async def stop(self) -> None:
        """SIGTERM, a bounded wait for its drain, then SIGKILL."""
        if self.proc is None:
            return
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(signal.SIGKILL)
        await self._reap()

    def kill_now(self) -> None:
        """Last resort, outside the event loop: never leave the child behind."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)


# --- the scenario ----------------------------------------------------------------------------


@dataclass
class Order:
    number: int
    phase: int
    customer: str
    sku: str
    qty: int
    amount: int
    #: what the client was told
    http_status: int = 0
    xid: str = ""
    tx_status: str = ""
    reason: str = ""
    #: the transaction's status at the end (TM API)
    final: str = ""

    @property
    def succeeded(self) -> bool:
        return 200 <= self.http_status < 300

    def describe(self) -> str:
        return f"{self.customer} buys {self.qty} {self.sku} for {money(self.amount)}"


@dataclass
class Check:
    ok: bool
    text: str
    details: list[str] = field(default_factory=list)


class Demo:
    def __init__(self, *, quiet: bool, keep: bool) -> None:
        self.quiet = quiet
        self.keep = keep
        self.tl = Timeline(quiet)
        self.tmp: Path | None = None
        self.coordinator: CoordinatorProcess | None = None
        self.session: aiohttp.ClientSession | None = None
        self.runners: list[web.AppRunner] = []
        self.sidecars: dict[str, Sidecar] = {}
        self.inventory = Inventory(self.tl)
        self.account = Account(self.tl)
        self.orders: list[Order] = []
        #: what the phases saw: the failed order's reservation released; the first order
        #: handed back to the coordinator
        self.released = False
        self.handed_back: int | None = None
        self.interrupted = False
        self.signing: dict[str, str] = {}
        #: host:port that the order sidecar's own XIDs name (its peer listener)
        self.order_owner = ""

    # --- setup -----------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def on_sigterm() -> None:
            self.interrupted = True
            task.cancel()

        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
        try:
            await self._start()
            await self._phase_one()
            await self._phase_two()
            await self._phase_three()
            await self._phase_four()
            checks = await self._checks()
        finally:
            loop.remove_signal_handler(signal.SIGTERM)
            await self._teardown()
        return self._report(checks)

    async def _start(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="gts-demo-"))
        self.tl.heading("setup")
        self.tl.say(f"demo: temp dir {self.tmp}")
        key = self.tmp / "signing.key"
        key.write_text(secrets.token_hex(32) + "\n", encoding="utf-8")
        key.chmod(0o600)
        self.signing = {"key_id": KEY_ID, "secret_file": str(key)}

        port = free_port()
        config_path = self.tmp / "coordinator.yaml"
        config_path.write_text(
            yaml.safe_dump(
                {
                    "listeners": {
                        **{name: {"bind": f"{HOST}:0"} for name in LISTENERS},
                        "peer": {"bind": f"{HOST}:{port}"},
                    },
                    "logging": {"level": "info", "format": "json"},
                    "drain_timeout": "2s",
                    "coordinator": {"signing": self.signing},
                    "local_coordinator": {
                        "journal": f"sqlite:///{self.tmp}/coordinator.db",
                        "phase_two": {"initial": "100ms", "max": "1s"},
                    },
                }
            ),
            encoding="utf-8",
        )
        self.coordinator = CoordinatorProcess(config_path, self.tmp / "coordinator.log", port)
        await self.coordinator.start()
        assert self.coordinator.proc is not None
        self.tl.say(
            f"coordinator: started (pid {self.coordinator.proc.pid}) on {HOST}:{port}, "
            "journal coordinator.db"
        )

        self.peer_port = free_port(*PEER_HOSTS.values())
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        orders = OrderService(self.session)
        inv_port = await self._serve(self.inventory.app())
        acc_port = await self._serve(self.account.app())
        order_port = await self._serve(orders.app())
        inventory = await self._sidecar("inventory", inv_port, tcc=[self._tcc(self.inventory)])
        account = await self._sidecar("account", acc_port, tcc=[self._tcc(self.account)])
        upstream_timeouts = {"connect": "300ms", "response_header": "3s", "total": "4s"}
        order = await self._sidecar(
            "order",
            order_port,
            upstreams={
                name: {"url": f"http://{HOST}:{sc.ports['inbound']}", "timeouts": upstream_timeouts}
                for name, sc in (("inventory", inventory), ("account", account))
            },
            transactions=[
                {
                    "match": {"method": "POST", "path": "/orders"},
                    "name": "create-order",
                    "timeout": "10s",
                }
            ],
        )
        orders.outbound = order.ports["outbound"]
        self.order_owner = f"{PEER_HOSTS['order']}:{order.ports['peer']}"
        self.tl.say(
            f"order service: sidecar inbound :{order.ports['inbound']}, outbound "
            f":{order.ports['outbound']}, peer :{order.ports['peer']}; declarative transaction "
            "on POST /orders"
        )
        for service, sc in ((self.inventory, inventory), (self.account, account)):
            self.tl.say(
                f"{service.name} service: sidecar inbound :{sc.ports['inbound']}, peer "
                f":{sc.ports['peer']}; TCC resource {service.name}-{service.path[1:]} "
                f"(try POST {service.path})"
            )
        stock = ", ".join(f"{sku} {n}" for sku, n in INITIAL_STOCK.items())
        balances = ", ".join(f"{who} {money(c)}" for who, c in INITIAL_BALANCE.items())
        self.tl.say(f"initial state: stock {stock}; balances {balances}")

    async def _serve(self, app: web.Application) -> int:
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        self.runners.append(runner)
        await web.TCPSite(runner, HOST, 0).start()
        return int(runner.addresses[0][1])

    @staticmethod
    def _tcc(service: TccService) -> dict[str, Any]:
        return {
            "resource": f"{service.name}-{service.path[1:]}",
            "try": {"method": "POST", "path": service.path},
            "confirm": {"method": "POST", "path": f"{service.path}/confirm"},
            "cancel": {"method": "POST", "path": f"{service.path}/cancel"},
            "forward_headers": ["Content-Type"],
        }

    async def _sidecar(self, name: str, app_port: int, **sections: Any) -> Sidecar:
        assert self.tmp is not None and self.coordinator is not None
        peer_host = PEER_HOSTS[name]
        data: dict[str, Any] = {
            "node": {"advertise_address": peer_host},
            "listeners": {
                **{listener: {"bind": f"{HOST}:0"} for listener in LISTENERS},
                "peer": {"bind": f"{peer_host}:{self.peer_port}"},
            },
            "degraded": {"peer_networks": ["127.0.0.0/8"]},
            "logging": {"level": "warning", "format": "text"},
            "drain_timeout": "2s",
            "app": {
                "url": f"http://{HOST}:{app_port}",
                "timeouts": {"connect": "300ms", "response_header": "3s", "total": "4s"},
            },
            "coordinator": {
                "endpoints": [self.coordinator.url],
                "signing": self.signing,
                "timeouts": {"connect": "300ms", "request": "1s"},
                "breaker": {"failures": 1, "reset": "500ms"},
            },
            "local_coordinator": {
                "journal": f"sqlite:///{self.tmp}/{name}-sidecar.db",
                "phase_two": {"initial": "100ms", "max": "1s"},
            },
            **sections,
        }
        try:
            config: Config = parse(data, env={})
        except ConfigError as exc:
            raise DemoError(f"{name} sidecar: invalid config: {'; '.join(exc.problems)}") from None
        sc = Sidecar(config, metrics=Metrics())
        try:
            await sc.start()
        except ConfigError as exc:
            await sc.close()
            raise DemoError(f"{name} sidecar: {'; '.join(exc.problems)}") from None
        self.sidecars[name] = sc
        return sc

    async def _teardown(self) -> None:
        """Reverse order of start; every step runs even if an earlier one failed."""
        steps: list[Callable[[], Awaitable[Any]]] = [
            sc.close for sc in reversed(list(self.sidecars.values()))
        ]
        steps += [runner.cleanup for runner in reversed(self.runners)]
        if self.session is not None:
            steps.append(self.session.close)
        if self.coordinator is not None:
            steps.append(self.coordinator.stop)
        for step in steps:
            try:
                await asyncio.wait_for(step(), 10)
            except Exception as exc:  # keep going: the rest must still be released
                print(f"demo: cleanup step failed: {exc!r}", file=sys.stderr)
        self.sidecars.clear()
        self.runners.clear()

    def cleanup(self) -> None:
        """Outside the event loop, last: the child and the temp dir never outlive the demo."""
        if self.coordinator is not None:
            self.coordinator.kill_now()
        if self.tmp is not None and self.tmp.exists():
            if self.keep:
                print(f"demo: kept the temp dir {self.tmp}", flush=True)
            else:
                shutil.rmtree(self.tmp, ignore_errors=True)

    # --- orders ------------------------------------------------------------------------------

    def _who(self, xid: str) -> str:
        assert self.coordinator is not None
        owner = owner_of(xid)
        if owner == f"{HOST}:{self.coordinator.port}":
            return "owned by the coordinator"
        if owner == self.order_owner:
            return "owned by the order sidecar"
        return f"owned by {owner}"

    async def _place(
        self, number: int, phase: int, customer: str, sku: str, qty: int, amount: int
    ) -> Order:
        assert self.session is not None
        order = Order(number, phase, customer, sku, qty, amount)
        self.orders.append(order)
        self.tl.say(f"order #{number}: {order.describe()}")
        body = {"order": number, "customer": customer, "sku": sku, "qty": qty, "amount": amount}
        url = f"http://{HOST}:{self.sidecars['order'].ports['inbound']}/orders"
        try:
            async with self.session.post(url, json=body) as resp:
                answer = await resp.read()
                order.http_status = resp.status
                order.xid = resp.headers.get("XID", "")
                order.tx_status = resp.headers.get("x-gts-transaction-status", "")
        except (aiohttp.ClientError, TimeoutError) as exc:
            answer = f"no answer: {type(exc).__name__} {exc}".encode()
        if order.succeeded:
            self.tl.say(
                f"order #{number}: {order.tx_status.lower() or 'succeeded'} (HTTP "
                f"{order.http_status}, xid {order.xid}, {self._who(order.xid)})"
            )
        else:
            order.reason = _reason(answer)
            self.tl.say(
                f"order #{number}: failed: HTTP {order.http_status} ({order.reason}); "
                f"transaction {order.tx_status or 'not begun'} (xid {order.xid or '-'})"
            )
        return order

    async def _status(self, xid: str) -> dict[str, Any]:
        assert self.session is not None
        api = f"http://{HOST}:{self.sidecars['order'].ports['api']}/v1/transactions/{xid}"
        try:
            async with self.session.get(api) as resp:
                raw = await resp.read()
                data = orjson.loads(raw) if resp.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
            return {"status": f"unknown ({type(exc).__name__} {exc})"}
        if not isinstance(data, dict):
            return {"status": f"unknown (HTTP {resp.status}: {_reason(raw)})"}
        return data

    async def _settle(self, orders: list[Order], timeout: float = SETTLE_TIMEOUT) -> None:
        """Wait (bounded) until every order's transaction has finished phase two."""
        deadline = time.monotonic() + timeout
        for order in orders:
            if not order.xid:
                order.final = "no transaction"
                continue
            while True:
                order.final = str((await self._status(order.xid)).get("status"))
                if order.final in FINAL or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)

    def _degraded_gauge(self) -> int:
        value = self.sidecars["order"].metrics.registry.get_sample_value("gts_sidecar_degraded")
        return int(value or 0)

    # --- the four phases ---------------------------------------------------------------------

    async def _phase_one(self) -> None:
        self.tl.heading("phase 1: a committed order")
        order = await self._place(1, 1, "alice", "widget", 2, 3_000)
        await self._settle([order])
        self.tl.say(f"state: {self.inventory.show('widget')}; {self.account.show('alice')}")

    async def _phase_two(self) -> None:
        self.tl.heading("phase 2: a failed order is cancelled")
        bob = self.account.balance["bob"] - self.account.frozen["bob"]
        self.tl.say(f"bob has {money(bob)}: this order must fail at the account's try")
        order = await self._place(2, 2, "bob", "gadget", 1, 4_500)
        await self._settle([order])
        self.released = self.inventory.reserved["gadget"] == 0 and not any(
            h.subject == "gadget" for h in self.inventory.holds.values()
        )
        self.tl.say(
            f"inventory: the reservation was {'released' if self.released else 'NOT released'} "
            f"({self.inventory.show('gadget')}); transaction {order.final}"
        )

    async def _phase_three(self) -> None:
        assert self.coordinator is not None and self.coordinator.proc is not None
        self.tl.heading("phase 3: the coordinator is killed (SIGKILL): degraded mode")
        pid = self.coordinator.proc.pid
        rc = await self.coordinator.kill()
        self.tl.say(f"coordinator: killed with SIGKILL (pid {pid}, exit status {rc})")
        # the first one in detail: the order sidecar drives its phase two now
        placed = [await self._place(3, 3, "alice", "widget", 1, 1_500)]
        self.tl.details = False
        placed += [
            await self._place(4, 3, "bob", "gadget", 1, 1_250),
            await self._place(5, 3, "alice", "gadget", 3, 4_500),
        ]
        mine = sum(1 for o in placed if o.succeeded and owner_of(o.xid) == self.order_owner)
        self.tl.say(
            f"degraded mode: {mine} of {len(placed)} orders committed with XIDs naming the order "
            f"sidecar ({self.order_owner}): it coordinated them itself, its peers registered "
            f"their branches with it (gts_sidecar_degraded = {self._degraded_gauge()})"
        )

    async def _phase_four(self) -> None:
        assert self.coordinator is not None and self.coordinator.proc is not None
        self.tl.heading("phase 4: the coordinator is back: hand-back")
        await self.coordinator.start()
        self.tl.say(
            f"coordinator: restarted (pid {self.coordinator.proc.pid}) on the same address "
            f"{HOST}:{self.coordinator.port}; {self.coordinator.resumed} unfinished "
            "transaction(s) resumed from its journal"
        )
        deadline = time.monotonic() + HAND_BACK_TIMEOUT
        number = len(self.orders)
        handed_back: Order | None = None
        noted = False
        while time.monotonic() < deadline:
            number += 1
            order = await self._place(number, 4, "alice", "widget", 1, 500)
            if order.succeeded and owner_of(order.xid) == f"{HOST}:{self.coordinator.port}":
                handed_back = order
                break
            if order.succeeded and not noted:
                noted = True
                self.tl.say(
                    "  (still degraded: the order sidecar's breaker lets one probe through "
                    "500ms after the last failure)"
                )
            await asyncio.sleep(0.2)
        if handed_back is None:
            self.tl.say(f"hand-back: no order went to the coordinator in {HAND_BACK_TIMEOUT:g}s")
            return
        self.handed_back = handed_back.number
        self.tl.say(
            f"hand-back: order #{handed_back.number}'s XID names the coordinator again "
            f"(gts_sidecar_degraded = {self._degraded_gauge()})"
        )
        self.tl.details = True
        await self._place(number + 1, 4, "bob", "widget", 1, 500)

    # --- the checks --------------------------------------------------------------------------

    async def _checks(self) -> list[Check]:
        assert self.coordinator is not None
        self.tl.heading("consistency checks")
        self.tl.details = True
        self.tl.say(f"waiting for phase two of {len(self.orders)} transaction(s) to finish")
        await self._settle(self.orders)
        coordinator = f"{HOST}:{self.coordinator.port}"
        by_phase = {p: [o for o in self.orders if o.phase == p] for p in (1, 2, 3, 4)}
        checks: list[Check] = []

        def expect(ok: bool, text: str, details: list[str] | None = None) -> None:
            checks.append(Check(ok, text, details or []))

        def line(o: Order) -> str:
            told = o.tx_status or "-"
            return (
                f"order #{o.number}: HTTP {o.http_status}, told {told}, now {o.final}, xid {o.xid}"
            )

        def ended(orders: list[Order], final: str, owner: str | None = None) -> bool:
            return bool(orders) and all(
                o.succeeded == (final == "Committed")
                and o.final == final
                and (owner is None or owner_of(o.xid) == owner)
                for o in orders
            )

        first, second, third, fourth = (by_phase[p] for p in (1, 2, 3, 4))
        expect(
            ended(first, "Committed", coordinator),
            "phase 1: order #1 committed, coordinated by the coordinator",
            [line(o) for o in first],
        )
        expect(
            ended(second, "Rollbacked") and self.released,
            "phase 2: order #2 refused and rolled back; its stock reservation released",
            [line(o) for o in second],
        )
        expect(
            ended(third, "Committed", self.order_owner),
            f"phase 3: {len(third)} orders committed in degraded mode, coordinated by the "
            "order sidecar",
            [line(o) for o in third],
        )
        back = self.handed_back
        expect(
            back is not None
            and ended(fourth, "Committed")
            and owner_of(fourth[-1].xid) == coordinator,
            f"phase 4: hand-back: order #{back} and later coordinated by the coordinator again",
            [line(o) for o in fourth],
        )

        disagree = [
            line(o)
            for o in self.orders
            if o.final not in FINAL or o.succeeded != (o.final == "Committed")
        ]
        outcomes = Counter(o.final for o in self.orders)
        expect(
            not disagree,
            f"every transaction is terminal and agrees with its client's answer "
            f"({', '.join(f'{n} {s}' for s, n in sorted(outcomes.items()))})",
            disagree,
        )

        committed = [o for o in self.orders if o.final == "Committed"]

        def tally(initial: int, used: int, actual: int, show: Callable[[int], str]) -> str:
            want = initial - used
            found = "" if actual == want else f" expected, found {show(actual)}"
            return f"{show(initial)} - {show(used)} = {show(want)}{found}"

        inv, acc = self.inventory, self.account
        stock = [
            (sku, initial, sum(o.qty for o in committed if o.sku == sku))
            for sku, initial in INITIAL_STOCK.items()
        ]
        expect(
            all(inv.available[k] == n - used and inv.reserved[k] == 0 for k, n, used in stock),
            "stock adds up: "
            + "; ".join(
                f"{k} {tally(n, used, inv.available[k], str)} available, {inv.reserved[k]} reserved"
                for k, n, used in stock
            ),
        )
        spent = [
            (who, initial, sum(o.amount for o in committed if o.customer == who))
            for who, initial in INITIAL_BALANCE.items()
        ]
        expect(
            all(acc.balance[w] == n - used and acc.frozen[w] == 0 for w, n, used in spent),
            "balances add up: "
            + "; ".join(
                f"{w} {tally(n, used, acc.balance[w], money)}, {money(acc.frozen[w])} frozen"
                for w, n, used in spent
            ),
        )

        checks.append(self._exactly_once())
        return checks

    def _exactly_once(self) -> Check:
        """Each branch that tried got exactly one phase-two call, of the transaction's
        outcome, with its own Idempotency-Key; nothing else reached the apps."""
        outcome = {o.xid: o.final for o in self.orders if o.xid}
        problems: list[str] = []
        total = branches = 0
        for service in (self.inventory, self.account):
            problems += [f"{service.name}: {a}" for a in service.anomalies]
            keys = Counter(c.idempotency_key for c in service.calls)
            problems += [
                f"{service.name}: Idempotency-Key {k} seen {n} times"
                for k, n in keys.items()
                if n != 1
            ]
            per_branch = Counter((c.xid, c.branch_id) for c in service.calls)
            for (xid, branch), tried_ok in service.tries.items():
                branches += 1
                calls = [c for c in service.calls if (c.xid, c.branch_id) == (xid, branch)]
                want = "confirm" if outcome.get(xid) == "Committed" else "cancel"
                if [c.phase for c in calls] != [want]:
                    problems.append(
                        f"{service.name}: branch {branch} of {xid} ({outcome.get(xid)}, try "
                        f"{'ok' if tried_ok else 'failed'}): phase two {[c.phase for c in calls]}"
                        f", expected [{want!r}]"
                    )
                for c in calls:
                    suffix = "commit" if c.phase == "confirm" else "rollback"
                    if c.idempotency_key != f"{xid}:{branch}:{suffix}":
                        problems.append(
                            f"{service.name}: {c.phase} of {xid} had Idempotency-Key "
                            f"{c.idempotency_key!r}"
                        )
            problems += [
                f"{service.name}: phase two for {xid} branch {b} without a try"
                for (xid, b) in per_branch
                if (xid, b) not in service.tries
            ]
            total += len(service.calls)
        return Check(
            not problems,
            f"exactly once: {total} confirm/cancel call(s) for {branches} branch(es), one "
            "each, each with its own Idempotency-Key",
            problems,
        )

    def _report(self, checks: list[Check]) -> int:
        if self.quiet:
            print("== gts-sidecar demo: consistency checks ==")
        for check in checks:
            print(f"{'PASS' if check.ok else 'FAIL'}  {check.text}")
            if not check.ok:
                for detail in check.details:
                    print(f"        {detail}")
        failed = [c for c in checks if not c.ok]
        took = self.tl.elapsed()
        if failed:
            print(f"{len(failed)} of {len(checks)} checks FAILED (run time {took:.1f}s)")
            return 1
        print(f"all {len(checks)} checks passed (run time {took:.1f}s)", flush=True)
        return 0


def main(args: argparse.Namespace) -> int:
    """`gts-sidecar demo [--quiet] [--keep]`: 0 when every check passes, 1 when one does not
    (or the demo could not run), 130 on Ctrl-C, 143 on SIGTERM."""
    quiet, keep = bool(getattr(args, "quiet", False)), bool(getattr(args, "keep", False))
    # the sidecars' own log lines stay out of the timeline's way: stderr, warnings and up
    logs.setup(getattr(args, "log_level", None) or ("error" if quiet else "warning"), "text")
    import uvloop

    demo = Demo(quiet=quiet, keep=keep)
    try:
        return uvloop.run(demo.run())
    except KeyboardInterrupt:
        print("\ndemo: interrupted; everything it started was stopped", file=sys.stderr)
        return 130
    except asyncio.CancelledError:
        if not demo.interrupted:
            raise
        print("demo: terminated; everything it started was stopped", file=sys.stderr)
        return 143
    except DemoError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    finally:
        demo.cleanup()
