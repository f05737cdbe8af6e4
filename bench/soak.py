"""Soak: minutes of mixed traffic with the coordinator and the sidecars killed at random.

Theory of operation. Four real processes on loopback, each on fixed ports so that it comes
back on the same address after a SIGKILL, each with its journal in one work directory (the
sidecars' peer listeners on 127.0.0.2-4 sharing one port, with degraded.peer_networks
127.0.0.0/8, as pods have it; everything else on 127.0.0.1):

  coordinator   ``python -m sidecar coordinator``: the cluster
  order         ``python -m sidecar run`` in front of the order app: POST /orders is a
                declarative transaction; GET /catalog is plain proxying (the app calls the
                inventory app through its outbound listener, with no XID)
  inventory     ``python -m sidecar run`` in front of a TCC app: resources inventory-deduct
                (/deduct) and account-freeze (/freeze), each with confirm and cancel
  travel        ``python -m sidecar run`` in front of a Saga app: resources book-hotel and
                book-car, each an action and a compensation

The three apps run in this process (aiohttp), so everything they receive is recorded and
survives the sidecars' deaths. The order app follows a plan sent in each order: which steps
to call through its sidecar's outbound listener (carrying the XID), which one the
participant refuses (a business 409), and whether the app then fails (500) or ignores the
refusal (201, which the sidecar must turn into 409 TRANSACTION_ABORTED). A participant app
applies confirm / cancel / compensation once per Idempotency-Key, as docs/branches.md
documents, and records every delivery.

Meanwhile, at random intervals (a seeded RNG; each round of faults kills every process once,
in a random order), a process is SIGKILLed and restarted: the coordinator (down 0.2-3 s, so
the order sidecar degrades to its local coordinator and hands back), or one sidecar (down
0-0.5 s). At the end the faults and the traffic stop, every process is up, and the run waits
(with a deadline) until no journal holds an unfinished transaction. Then the invariants:

- every transaction is terminal: in every journal, and for every XID the order app saw,
  through the order sidecar's TM API (the transaction's owner answers);
- a Committed transaction: each branch's try reached the app and was not refused, each TCC
  branch confirmed, nothing cancelled or compensated; a rolled-back one: each TCC try and
  each Saga action that reached the app cancelled / compensated, nothing confirmed; every
  branch at the coordinator in the phase-two status of its outcome, none stuck;
- no phase two without its try (the fence's empty rollback), a well-formed Idempotency-Key
  and x-gts-phase on every delivery, Saga compensations in reverse order;
- no phase two while its try is still running at the app: some tries are slow, 3.5 s (past
  the order sidecar's upstream timeout, so their transaction rolls back while they run) or
  9 s (past the transaction's own timeout too), and go on after the participant's sidecar
  aborted their request (an app that ignores its request's end); a confirm or cancel that
  reaches the app before such a try has ended is a violation;
- no try's reservation outlives its transaction: the participant apps model it. A try that
  the app did not refuse reserves when it ends; the first delivery of each Idempotency-Key is
  what the app applies, and it releases the reservation (confirm or cancel) only if it comes
  after the try ended (an earlier one finds nothing to release). At the end every
  reservation must have been released by one applied confirm or cancel / compensation,
  except a Saga action of a Committed transaction (its booking is the outcome);
- no transaction commits after its caller left before the answer. A share of the order
  clients are raw sockets that give up the way real clients do: the whole request sent, then
  a close (FIN, as Go's http.Client{Timeout} does) or a reset (RST) once their client
  timeout passes with not one byte of the answer received; or a stall mid-body, then FIN or
  RST (a small body the sidecar buffers, or a 200 KiB one that streams to the app). The
  order app is slow for some of these orders (a delay after its steps, around the client's
  timeout), and answers some 0-4 ms before the client's deadline, so that the answer and
  the FIN reach the sidecar together. The rule checked: an abandoned order (nothing received
  when the client closed)
  is a violation if it is Committed and the order app had not answered it (not begun
  writing its answer) when the client's close() or reset returned. Both times are read on
  one monotonic clock in this one thread, so the FIN or RST was in the sidecar's socket
  before the app's answer could be in its upstream socket; the sidecar decides only once it
  has read that answer, and reads its sockets in the order the kernel made them ready (an
  eof or reset is handled as it is read). A commit the sidecar
  decided before the client left (the app answered before the close) is legitimate, and
  counted. Also: a Committed transaction must be one the order app answered 201 (a client
  that left during the begin or mid-body leaves a transaction the app never saw, which must
  roll back); and no Committed transaction was sent a rollback too (the coordinators log a
  refused decision; the order sidecar is the only one that sends decisions, so that is one
  request given two: its client's FIN read in the same poll as the app's answer);
- the fence's crash windows are counted (information), and anything outside them is a
  violation: a delivery repeated for one Idempotency-Key must have that participant's
  sidecar killed and restarted between the repeats (killed between calling the app and
  recording it); a cancel of a try the app never had must have it killed after the order
  app called that step and restarted before the cancel (killed between recording the try
  and forwarding it, so the fence cannot tell that it never arrived);
- what the caller was told agrees with the outcome: a 201 is Committed; a 409
  TRANSACTION_ABORTED, or the app's own error answer, is not;
- no request lost: every request got an answer or a connection error within the deadline
  (the sidecar's own timeouts plus a margin); a plain request's answer is its own;
- no process exits unless killed, and each restarts.

Usage (from the repo root)::

    .venv/bin/python bench/soak.py [--duration 3m] [--seed N] [--fault-interval 4s]
                                   [--concurrency 8] [--plans 55,15,15,15] [--no-faults]
                                   [--abandon-share 0.15]
                                   [--report FILE] [--json FILE] [--keep]

Violations are tagged by kind (``[committed-despite-refused-try] …``); --json writes the
figures, the violations and their counts by kind (tests/integration/test_soak.py reads it).

The markdown report goes to stdout and to bench/results/soak_latest.md (or --report).
Exit status: 0 with no violation, 1 with violations, 2 when the soak could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import math
import os
import platform
import random
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp
import yaml
from aiohttp import web
from benchkit import BenchError, die_with_parent, parse_seconds, positive_int, venv_python

BENCH_DIR: Final = Path(__file__).resolve().parent
REPO_DIR: Final = BENCH_DIR.parent
RESULTS_FILE: Final = BENCH_DIR / "results" / "soak_latest.md"

HOST: Final = "127.0.0.1"
#: each sidecar's peer listener (and advertised address) on an address of its own, all on one
#: port, as pods share the peer port: a sidecar calls a peer (the owner of an XID begun in
#: degraded mode) only on its own peer port and only inside degraded.peer_networks
PEER_HOSTS: Final = {"order": "127.0.0.2", "inventory": "127.0.0.3", "travel": "127.0.0.4"}
KEY_ID: Final = "soak"
LISTENERS: Final = ("inbound", "outbound", "api", "peer", "admin")
FINAL: Final = frozenset({"Committed", "Rollbacked", "TimeoutRollbacked"})
ROLLED_BACK: Final = frozenset({"Rollbacked", "TimeoutRollbacked"})
COMMIT_SEEN: Final = frozenset({"Committed", "Committing", "CommitRetrying"})
START_TIMEOUT: Final = 30.0
#: status queries in flight while settling
STATUS_QUERIES: Final = 8
STOP_TIMEOUT: Final = 15.0

# the sidecars' timeouts (config), and the deadline a caller may wait, derived from them
TX_TIMEOUT: Final = "8s"
#: coordinator.timeouts.request: above the coordinator's wait for phase two before it answers
#: a commit or rollback (1 s): at 1 s, every decision whose phase two runs longer (a cancel
#: held for a slow try) timed out, opened the breaker and went to the outbox
COORDINATOR_REQUEST: Final = 2.0
ORDER_APP_TOTAL: Final = 6.0  # the order sidecar's app.timeouts.total
UPSTREAM_TOTAL: Final = 2.5  # the order sidecar's upstreams' timeouts.total
PHASE_TWO_WAIT: Final = 1.0  # a commit with branches waits this long for phase two
#: begin + the app + the decision + the phase-two wait, plus a margin for a loaded machine
ANSWER_DEADLINE: Final = COORDINATOR_REQUEST + ORDER_APP_TOTAL + COORDINATOR_REQUEST
ANSWER_DEADLINE_MARGIN: Final = PHASE_TWO_WAIT + 4.0

#: order steps: the upstream path the order app calls, the resource, TCC or SAGA
STEPS: Final = {
    "deduct": ("/inventory/deduct", "inventory-deduct", "TCC"),
    "freeze": ("/inventory/freeze", "account-freeze", "TCC"),
    "hotel": ("/travel/hotel/book", "book-hotel", "SAGA"),
    "car": ("/travel/car/book", "book-car", "SAGA"),
}
#: a traffic loop's pause after a connection error
CONNECT_BACKOFF: Final = 0.1
#: share of the orders with a slow try, and how long it runs at the app: past the order
#: sidecar's upstream timeout (its transaction rolls back meanwhile), within the participant
#: sidecar's app timeout (the try's deadline, after which phase two no longer waits for it)
SLOW_SHARE: Final = 0.1
SLOW_TRY: Final = UPSTREAM_TOTAL + 1.0
#: a share of the slow tries run past the transaction's timeout (TX_TIMEOUT) too, within the
#: participants' app timeout (their deadline, until which phase two waits for them)
SLOWER_SHARE: Final = 0.3
SLOWER_TRY: Final = 9.0
PARTICIPANT_APP_TOTAL: Final = 12.0  # the participant sidecars' app.timeouts.total
#: the order number on every order request, so that the order app can tie the orders whose
#: client left (and never learnt its XID) to their transactions
ORDER_HEADER: Final = "x-soak-order"
#: how an abandoning client leaves (relative weights): the whole request sent, then a FIN or
#: a RST once its timeout passes; or a stall mid-body, then FIN or RST: with a body the
#: sidecar buffers (the app never sees the request), or one past its request buffer that
#: streams to the app
ABANDON_MODES: Final = {"fin": 0.45, "rst": 0.25, "mid-body": 0.15, "mid-body-large": 0.15}
#: an abandoning client's timeout: log-uniform in this range (most orders take 10-100 ms)
CLIENT_TIMEOUT_RANGE: Final = (0.02, 3.0)
#: a stalled body is given up after this long
MID_BODY_STALL: Final = (0.01, 0.3)
LARGE_BODY: Final = 200 * 1024  # past the sidecar's clients.request_buffer (64 KiB)
#: the order app's delay (after its steps) for an abandoning client's order: none, or around
#: the client's timeout (capped), so that the client leaves before, during and after it
ABANDON_DELAY_SHARE: Final = 0.6
#: a share of those answer just before the client leaves (0-4 ms before, on the clock they
#: share in this process): the answer and the FIN reach the sidecar together
ABANDON_TIGHT_SHARE: Final = 0.4
ABANDON_TIGHT: Final = 0.004
ABANDON_DELAY_MAX: Final = 3.0
STEP_OF: Final = {resource: step for step, (_, resource, _) in STEPS.items()}
FAULT_KINDS: Final = ("coordinator", "order", "inventory", "travel")


# --- command line --------------------------------------------------------------------------


DEFAULT_PLANS: Final = "55,15,15,15"


def parse_weights(text: str) -> tuple[float, float, float, float]:
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 4 or min(values) < 0 or sum(values) <= 0:
        raise argparse.ArgumentTypeError(f"four non-negative weights, e.g. {DEFAULT_PLANS}")
    return values[0], values[1], values[2], values[3]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="mixed traffic through gts-sidecars with the coordinator and the sidecars "
        "SIGKILLed at random; exit 0 only when every invariant holds"
    )
    p.add_argument("--duration", type=parse_seconds, default=180.0, help="traffic time (3m)")
    p.add_argument("--seed", type=int, help="the RNG seed (default: random, printed)")
    p.add_argument(
        "--fault-interval",
        type=parse_seconds,
        default=4.0,
        help="mean time between faults, each 0.5-1.5 times it (4s)",
    )
    p.add_argument("--concurrency", type=positive_int, default=8, help="requests in flight (8)")
    p.add_argument(
        "--plain-share",
        type=float,
        default=0.3,
        help="share of the requests that are plain proxying (0.3)",
    )
    p.add_argument(
        "--abandon-share",
        type=float,
        default=0.15,
        help="share of the orders whose client gives up before its answer (0.15)",
    )
    p.add_argument(
        "--settle-timeout",
        type=parse_seconds,
        default=90.0,
        help="after the traffic, how long every transaction may take to finish (90s)",
    )
    p.add_argument(
        "--plans",
        type=parse_weights,
        default=DEFAULT_PLANS,
        metavar="none,after,try,ignore",
        help="relative weights of the order plans: all steps succeed; the app fails after "
        "them; a participant refuses and the app fails; a participant refuses and the app "
        "answers 201 anyway (%(default)s)",
    )
    p.add_argument("--no-faults", action="store_true", help="traffic only (a control run)")
    p.add_argument("--report", help=f"the markdown report's file ({RESULTS_FILE})")
    p.add_argument("--json", help="also write the figures and violations as JSON here")
    p.add_argument("--dir", help="parent directory of the temporary work directory")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    if not 0.0 <= args.plain_share <= 1.0:
        p.error("--plain-share must be between 0 and 1")
    if not 0.0 <= args.abandon_share <= 1.0:
        p.error("--abandon-share must be between 0 and 1")
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1, 2**31)
    return args


# --- processes -----------------------------------------------------------------------------


def free_port(*hosts: str) -> int:
    """A loopback port nothing listens on now, on HOST and on every one of `hosts` (bound,
    then released)."""
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
    raise BenchError("no loopback port is free on every peer address")


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class Proc:
    """One gts-sidecar process on fixed ports; SIGKILLed and restarted on the same ones."""

    def __init__(self, name: str, role: str, config: Path, log: Path) -> None:
        self.name = name
        self.role = role  # "run" | "coordinator"
        self.config = config
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0
        #: (SIGKILLed, respawned, seen up again), monotonic
        self.kills: list[tuple[float, float, float]] = []
        self.spawned = 0.0
        self.crashes: list[str] = []
        self._expected_exit = False
        self._watch: asyncio.Task[None] | None = None

    @property
    def marker(self) -> str:
        return f"gts-sidecar {'coordinator ' if self.role == 'coordinator' else ''}started"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self) -> None:
        offset = self.log.stat().st_size if self.log.exists() else 0
        self.spawned = time.monotonic()
        with open(self.log, "ab") as err:
            self.proc = await asyncio.create_subprocess_exec(
                venv_python(), "-m", "sidecar", self.role, "--config", str(self.config),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                cwd=REPO_DIR, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                preexec_fn=die_with_parent,
            )  # fmt: skip
        self.starts += 1
        self._expected_exit = False
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            with open(self.log, "rb") as f:
                f.seek(offset)
                if self.marker.encode() in f.read():
                    break
            if self.proc.returncode is not None:
                raise BenchError(
                    f"{self.name} exited {self.proc.returncode} while starting",
                    log_tail(self.log),
                )
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{self.name} did not start in {START_TIMEOUT:g}s", log_tail(self.log)
                )
            await asyncio.sleep(0.05)
        self._watch = asyncio.ensure_future(self._watch_exit(self.proc))

    async def _watch_exit(self, proc: asyncio.subprocess.Process) -> None:
        rc = await proc.wait()
        if not self._expected_exit:
            self.crashes.append(
                f"[crash] {self.name} exited {rc} without being killed; log tail:\n"
                + log_tail(self.log)
            )

    async def kill(self) -> None:
        assert self.proc is not None
        self._expected_exit = True
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def stop(self) -> int | None:
        """SIGTERM (a graceful drain), SIGKILL past STOP_TIMEOUT; the exit status."""
        if self.proc is None:
            return None
        self._expected_exit = True
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(signal.SIGKILL)
                await self.proc.wait()
        if self._watch is not None:
            await self._watch
        return self.proc.returncode


# --- configuration -------------------------------------------------------------------------


@dataclass
class Layout:
    work: Path
    key_file: Path
    coordinator: dict[str, int]
    sidecars: dict[str, dict[str, int]]  # name → listener → port
    apps: dict[str, int]  # name → app port

    def journal(self, name: str) -> Path:
        return self.work / f"{name}.db"

    @property
    def coordinator_url(self) -> str:
        return f"http://{HOST}:{self.coordinator['peer']}"

    def url(self, sidecar: str, listener: str) -> str:
        return f"http://{HOST}:{self.sidecars[sidecar][listener]}"


def _phase_two() -> dict[str, Any]:
    return {"initial": "100ms", "max": "1s", "max_attempts": 1000}


def coordinator_config(layout: Layout) -> dict[str, Any]:
    binds = {n: {"bind": f"{HOST}:0"} for n in LISTENERS}
    binds["peer"] = {"bind": f"{HOST}:{layout.coordinator['peer']}"}
    binds["admin"] = {"bind": f"{HOST}:{layout.coordinator['admin']}"}
    return {
        "node": {"advertise_address": HOST},
        "listeners": binds,
        "logging": {"level": "info", "format": "json"},
        "drain_timeout": "2s",
        "coordinator": {"signing": {"key_id": KEY_ID, "secret_file": str(layout.key_file)}},
        # /admin/* is off without a token; the soak reads stuck branches with this one
        "admin": {"token_file": str(layout.key_file)},
        "local_coordinator": {
            "journal": f"sqlite:///{layout.journal('coordinator')}",
            "default_timeout": TX_TIMEOUT,
            "phase_two": _phase_two(),
        },
    }


def sidecar_config(layout: Layout, name: str) -> dict[str, Any]:
    ports = layout.sidecars[name]
    # a participant's try may run PARTICIPANT_APP_TOTAL: phase two waits for it that long
    app_total = ORDER_APP_TOTAL if name == "order" else PARTICIPANT_APP_TOTAL
    cfg: dict[str, Any] = {
        "node": {"advertise_address": PEER_HOSTS[name]},
        "listeners": {
            n: {"bind": f"{PEER_HOSTS[name] if n == 'peer' else HOST}:{ports[n]}"}
            for n in LISTENERS
        },
        "degraded": {"peer_networks": ["127.0.0.0/8"]},
        "app": {
            "url": f"http://{HOST}:{layout.apps[name]}",
            "timeouts": {
                "connect": "500ms",
                "response_header": f"{app_total - 1:g}s",
                "total": f"{app_total:g}s",
            },
        },
        "coordinator": {
            "endpoints": [layout.coordinator_url],
            "signing": {"key_id": KEY_ID, "secret_file": str(layout.key_file)},
            "timeouts": {"connect": "300ms", "request": f"{COORDINATOR_REQUEST:g}s"},
            "breaker": {"failures": 2, "reset": "1s"},
        },
        "admin": {"token_file": str(layout.key_file)},
        "local_coordinator": {
            "journal": f"sqlite:///{layout.journal(name)}",
            "default_timeout": TX_TIMEOUT,
            "phase_two": _phase_two(),
        },
        "logging": {"level": "info", "format": "json"},
        "drain_timeout": "2s",
    }
    if name == "order":
        upstream_timeouts = {
            "connect": "500ms",
            "response_header": f"{UPSTREAM_TOTAL - 0.5:g}s",
            "total": f"{UPSTREAM_TOTAL:g}s",
        }
        cfg["upstreams"] = {
            up: {"url": layout.url(up, "inbound"), "timeouts": upstream_timeouts}
            for up in ("inventory", "travel")
        }
        cfg["transactions"] = [
            {"match": {"method": "POST", "path": "/orders"}, "name": "order", "timeout": TX_TIMEOUT}
        ]
    elif name == "inventory":
        cfg["tcc"] = [
            {
                "resource": resource,
                "try": {"method": "POST", "path": f"/{step}"},
                "confirm": {"method": "POST", "path": f"/{step}/confirm"},
                "cancel": {"method": "POST", "path": f"/{step}/cancel"},
                "forward_headers": ["Content-Type"],
            }
            for step, (_, resource, kind) in STEPS.items()
            if kind == "TCC"
        ]
    else:
        cfg["saga"] = [
            {
                "resource": resource,
                "action": {"method": "POST", "path": f"/{step}/book"},
                "compensation": {"method": "POST", "path": f"/{step}/cancel"},
                "forward_headers": ["Content-Type"],
            }
            for step, (_, resource, kind) in STEPS.items()
            if kind == "SAGA"
        ]
    return cfg


# --- the apps ------------------------------------------------------------------------------


@dataclass
class Delivery:
    """One phase-two call that reached a participant app."""

    resource: str
    phase: str  # confirm | cancel (a Saga compensation is a cancel)
    xid: str
    branch: str
    key: str
    header_phase: str
    at: float


class Participant:
    """A TCC or Saga app: tries / actions recorded, phase two applied once per key."""

    def __init__(self, name: str, kind: str) -> None:
        self.name = name
        self.kind = kind
        self.steps = {step: res for step, (_, res, k) in STEPS.items() if k == kind}
        #: (xid, branch) → (resource, arrived at, refused)
        self.tries: dict[tuple[str, str], tuple[str, float, bool]] = {}
        #: (xid, branch) → when the app finished the try; the slow tries → their length
        self.try_ends: dict[tuple[str, str], float] = {}
        self.slow: dict[tuple[str, str], float] = {}
        self._working: set[asyncio.Task[None]] = set()
        self.deliveries: list[Delivery] = []
        self.applied: dict[str, Delivery] = {}
        self.anomalies: list[str] = []
        self.plain = 0

    def app(self) -> web.Application:
        app = web.Application()
        for step in self.steps:
            first = f"/{step}" if self.kind == "TCC" else f"/{step}/book"
            app.router.add_post(first, self._try)
            if self.kind == "TCC":
                app.router.add_post(f"/{step}/confirm", self._phase_two)
            app.router.add_post(f"/{step}/cancel", self._phase_two)
        app.router.add_get("/stock", self._stock)
        return app

    def _resource(self, path: str) -> str:
        return self.steps[path.strip("/").split("/")[0]]

    async def _stock(self, request: web.Request) -> web.Response:
        self.plain += 1
        return web.json_response({"n": request.query.get("n", "")})

    async def _try(self, request: web.Request) -> web.Response:
        await request.read()
        xid = request.headers.get("XID", "")
        branch = request.headers.get("x-gts-branch-id", "")
        if not xid or not branch:
            self.anomalies.append(
                f"[app-anomaly] {self.name}: a try without XID/branch: {request.path}"
            )
            return web.json_response({"error": "no xid"}, status=400)
        refused = request.query.get("refuse") == "1"
        key = (xid, branch)
        if key in self.tries:
            self.anomalies.append(
                f"[duplicate-try] {self.name}: try of {xid} branch {branch} delivered twice"
            )
        self.tries[key] = (self._resource(request.path), time.monotonic(), refused)
        slow = request.query.get("slow")
        if slow is not None:
            # the try's work goes on even when its request is aborted (an app that ignores
            # its request's cancellation), so the sidecar cannot know when it ends
            seconds = self.slow[key] = float(slow)
            work = asyncio.get_running_loop().create_task(
                asyncio.sleep(seconds), name=f"slow-try {branch}"
            )
            self._working.add(work)
            work.add_done_callback(self._working.discard)
            await asyncio.shield(work)
        self.try_ends[key] = time.monotonic()
        if refused:
            return web.json_response({"refused": True}, status=409)
        return web.json_response({"ok": True})

    async def _phase_two(self, request: web.Request) -> web.Response:
        await request.read()
        phase = "confirm" if request.path.endswith("/confirm") else "cancel"
        d = Delivery(
            resource=self._resource(request.path),
            phase=phase,
            xid=request.headers.get("XID", ""),
            branch=request.headers.get("x-gts-branch-id", ""),
            key=request.headers.get("Idempotency-Key", ""),
            header_phase=request.headers.get("x-gts-phase", ""),
            at=time.monotonic(),
        )
        self.deliveries.append(d)
        self.applied.setdefault(d.key, d)  # applied once per Idempotency-Key
        return web.json_response({"ok": True})


@dataclass
class OrderRecord:
    xid: str
    plan: dict[str, Any]
    steps: list[tuple[str, str]] = field(default_factory=list)  # (step, outcome)
    called: dict[str, float] = field(default_factory=dict)  # step → when its call began
    answer: int | None = None
    #: when the app answered (before its answer is written), and whether the sidecar had
    #: already cut its request then (it abandons the exchange when the client leaves)
    answered_at: float | None = None
    cut_before_answer: bool = False
    #: when the request's body broke off (its client left mid-body; the sidecar cut it)
    body_cut_at: float | None = None


class OrderApp:
    """The initiator app: POST /orders follows the plan in the body; GET /catalog is plain."""

    def __init__(self, outbound: str) -> None:
        self.outbound = outbound
        self.orders: dict[str, OrderRecord] = {}
        self.by_n: dict[int, str] = {}  # order number (ORDER_HEADER) → XID
        self.anomalies: list[str] = []
        self.session: aiohttp.ClientSession | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/orders", self._order)
        app.router.add_get("/catalog", self._catalog)
        return app

    async def open(self) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=UPSTREAM_TOTAL + 1.5),
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def _order(self, request: web.Request) -> web.Response:
        n = int(request.headers.get(ORDER_HEADER, "0"))
        xid = request.headers.get("XID", "")
        if not xid:
            self.anomalies.append(f"[app-anomaly] order #{n} reached the app without an XID")
            return web.json_response({"error": "no xid"}, status=400)
        if xid in self.orders:
            self.anomalies.append(f"[app-anomaly] order XID {xid} reached the app twice")
        self.by_n[n] = xid
        rec = self.orders[xid] = OrderRecord(xid, {"n": n})
        try:
            rec.plan = plan = await request.json()
        except (OSError, ValueError, aiohttp.ClientError):
            # its client left mid-body and the sidecar ended the request
            rec.body_cut_at = time.monotonic()
            return web.json_response({"error": "body cut"}, status=400)
        answer = await self._run(rec, plan)
        rec.answer = answer.status
        rec.answered_at = time.monotonic()
        rec.cut_before_answer = request.transport is None
        return answer

    async def _run(self, rec: OrderRecord, plan: dict[str, Any]) -> web.Response:
        """The order's steps, then its delay; the answer."""
        xid = rec.xid
        assert self.session is not None
        for step in plan["steps"]:
            query = [q for q, on in (("refuse=1", plan["refuse"] == step),
                                     (f"slow={plan.get('slow_s', 0):g}",
                                      plan.get("slow") == step)) if on]  # fmt: skip
            path = STEPS[step][0] + ("?" + "&".join(query) if query else "")
            body = json.dumps({"order": plan["n"], "step": step}).encode()
            headers = {"XID": xid, "Content-Type": "application/json"}
            rec.called[step] = time.monotonic()
            try:
                async with self.session.post(self.outbound + path, data=body, headers=headers) as r:
                    await r.read()
                    status, code = r.status, r.headers.get("x-gts-sidecar-error")
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                rec.steps.append((step, f"connection error {type(exc).__name__}"))
                break
            if 200 <= status < 300:
                rec.steps.append((step, "ok"))
                continue
            rec.steps.append((step, f"{status} {code or 'app'}"))
            # a business refusal (the participant app's own 409) the plan says to ignore: the
            # sidecar must then roll back and tell the caller TRANSACTION_ABORTED
            if status == 409 and code is None and plan["fail"] == "ignore":
                continue
            break
        else:
            if plan["fail"] != "after":
                await self._delay(plan)
                return web.json_response({"order": plan["n"]}, status=201)
        await self._delay(plan)
        return web.json_response({"order": plan["n"], "failed": rec.steps}, status=500)

    async def _delay(self, plan: dict[str, Any]) -> None:
        """The app's own work after its steps (some abandoning clients' orders): it goes on
        even when the sidecar has ended the request (the app ignores that, as many do)."""
        if plan.get("delay"):
            await asyncio.sleep(plan["delay"])
        elif plan.get("answer_at"):
            await asyncio.sleep(max(0.0, plan["answer_at"] - time.monotonic()))

    async def _catalog(self, request: web.Request) -> web.Response:
        n = request.query.get("n", "")
        assert self.session is not None
        try:
            async with self.session.get(f"{self.outbound}/inventory/stock?n={n}") as r:
                body = await r.read()
                if r.status == 200:
                    return web.Response(body=body, content_type="application/json")
                return web.json_response({"upstream": r.status}, status=502)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return web.json_response({"upstream": type(exc).__name__}, status=502)


async def serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    return runner, int(runner.addresses[0][1])


# --- the traffic ---------------------------------------------------------------------------


@dataclass
class Request:
    kind: str  # plain | order | abandon (a client that may give up before its answer)
    n: int
    plan: dict[str, Any] | None
    outcome: str
    seconds: float
    xid: str | None = None
    tx_status: str | None = None
    #: an abandoning client: how it leaves (ABANDON_MODES), its timeout, and when its close
    #: or reset returned, if it left with nothing of the answer received
    how: str | None = None
    timeout: float | None = None
    left_at: float | None = None


class Traffic:
    def __init__(
        self,
        rng: random.Random,
        inbound: str,
        plain_share: float,
        plans: tuple[float, float, float, float],
        abandon_share: float = 0.0,
    ) -> None:
        self.rng = rng
        self.plans = plans
        self.inbound = inbound
        host, _, port = inbound.removeprefix("http://").partition(":")
        self.address = (host, int(port))
        self.plain_share = plain_share
        self.abandon_share = abandon_share
        self.requests: list[Request] = []
        self.violations: list[str] = []
        self._n = 0
        self.client_timeout = ANSWER_DEADLINE + ANSWER_DEADLINE_MARGIN + 5.0

    def plan(self, n: int) -> dict[str, Any]:
        steps = [s for s in STEPS if self.rng.random() < 0.6] or [self.rng.choice(list(STEPS))]
        fail = self.rng.choices(("none", "after", "try", "ignore"), self.plans)[0]
        refuse = self.rng.choice(steps) if fail in ("try", "ignore") else None
        plan = {"n": n, "steps": steps, "fail": fail, "refuse": refuse, "slow": None}
        if self.rng.random() < SLOW_SHARE:
            plan["slow"] = self.rng.choice(steps)
            plan["slow_s"] = SLOWER_TRY if self.rng.random() < SLOWER_SHARE else SLOW_TRY
        return plan

    async def loop(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._n += 1
            n = self._n
            if self.rng.random() < self.plain_share:
                await self._send(session, "plain", n, None)
            elif self.rng.random() < self.abandon_share:
                await self._abandon(n, self.plan(n))
            else:
                await self._send(session, "order", n, self.plan(n))

    async def _abandon(self, n: int, plan: dict[str, Any]) -> None:
        """An order from a client that gives up: a raw socket, so that it leaves exactly
        the way it means to (FIN or RST, after the whole request or mid-body)."""
        rng = self.rng
        how = rng.choices(list(ABANDON_MODES), list(ABANDON_MODES.values()))[0]
        mid_body = how.startswith("mid-body")
        if mid_body:
            timeout = rng.uniform(*MID_BODY_STALL)
            reset = rng.random() < 0.5
        else:
            lo, hi = CLIENT_TIMEOUT_RANGE
            timeout = math.exp(rng.uniform(math.log(lo), math.log(hi)))
            reset = how == "rst"
            if rng.random() < ABANDON_DELAY_SHARE * (1 - ABANDON_TIGHT_SHARE):
                plan["delay"] = round(min(timeout * rng.uniform(0.5, 1.5), ABANDON_DELAY_MAX), 4)
            elif rng.random() < ABANDON_DELAY_SHARE * ABANDON_TIGHT_SHARE:
                plan["answer_at"] = time.monotonic() + timeout - rng.uniform(0, ABANDON_TIGHT)
        body = json.dumps(plan).encode()
        if how == "mid-body-large":
            body = body[:-1] + b', "pad": "' + b"x" * LARGE_BODY + b'"}'
        head = (
            f"POST /orders HTTP/1.1\r\nHost: {self.address[0]}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"{ORDER_HEADER}: {n}\r\n\r\n"
        ).encode()
        sent = head + (body[: len(body) // 2] if mid_body else body)
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        leave_at = t0 + timeout  # the client's timer runs from the start, as Go's does
        left_at = xid = tx_status = None
        sock = socket.socket()
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, self.address)
            await loop.sock_sendall(sock, sent)
            data = await receive_within(sock, leave_at - time.monotonic(), stall=mid_body)
            if data is None:
                if reset:  # SO_LINGER 0: close() sends a RST
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
                left_at = time.monotonic()
                outcome = f"left before the answer ({how}, {'RST' if reset else 'FIN'})"
            elif not data:
                outcome = "connection error (closed without an answer)"
            else:
                status, headers = await read_head(sock, data)
                xid, tx_status = headers.get("xid"), headers.get("x-gts-transaction-status")
                code = headers.get("x-gts-sidecar-error")
                outcome = self._classify("order", n, status, code, b"", tx_status)
        except (OSError, ValueError, TimeoutError) as exc:
            outcome = f"connection error ({type(exc).__name__})"
        finally:
            sock.close()
        req = Request("abandon", n, plan, outcome, time.monotonic() - t0, xid, tx_status)
        req.how, req.timeout, req.left_at = how, timeout, left_at
        await self._record(req)

    async def _send(
        self, session: aiohttp.ClientSession, kind: str, n: int, plan: dict[str, Any] | None
    ) -> None:
        t0 = time.monotonic()
        xid = tx_status = None
        try:
            if plan is None:
                req = session.get(f"{self.inbound}/catalog?n={n}")
            else:
                headers = {ORDER_HEADER: str(n)}
                req = session.post(f"{self.inbound}/orders", json=plan, headers=headers)
            async with req as r:
                body = await r.read()
                code = r.headers.get("x-gts-sidecar-error")
                xid = r.headers.get("XID")
                tx_status = r.headers.get("x-gts-transaction-status")
                outcome = self._classify(kind, n, r.status, code, body, tx_status)
        except TimeoutError:
            outcome = "no answer (client timeout)"
        except (aiohttp.ClientError, OSError) as exc:
            outcome = f"connection error ({type(exc).__name__})"
        seconds = time.monotonic() - t0
        await self._record(Request(kind, n, plan, outcome, seconds, xid, tx_status))

    async def _record(self, req: Request) -> None:
        self.requests.append(req)
        if req.seconds > ANSWER_DEADLINE + ANSWER_DEADLINE_MARGIN:
            self.violations.append(
                f"[lost-request] request lost: {req.kind} #{req.n} took {req.seconds:.1f}s "
                f"(deadline {ANSWER_DEADLINE + ANSWER_DEADLINE_MARGIN:g}s), outcome "
                f"{req.outcome}"
            )
        if req.outcome.startswith("connection error"):
            # a client backs off while the sidecar is down (instead of spinning on refusals)
            await asyncio.sleep(CONNECT_BACKOFF)

    def _classify(
        self, kind: str, n: int, status: int, code: str | None, body: bytes, tx: str | None
    ) -> str:
        if code is not None:
            return f"{status} {code}"
        if kind == "plain":
            if status == 200:
                try:
                    echoed = json.loads(body).get("n")
                except ValueError:
                    echoed = None
                if echoed != str(n):
                    self.violations.append(
                        f"[wrong-answer] plain #{n} got another request's answer: {body!r}"
                    )
                return "200"
            return f"{status} (app)"
        if status == 201:
            if tx not in COMMIT_SEEN:
                self.violations.append(
                    f"[caller-disagrees] order #{n}: 201 with x-gts-transaction-status {tx}"
                )
            return "201 committed"
        return f"{status} (app)"


async def receive_within(sock: socket.socket, timeout: float, stall: bool) -> bytes | None:
    """What the client has received when its timeout passes (b"" for a closed connection),
    or None if nothing: it then leaves. A stalled client sends nothing more meanwhile; the
    sidecar may still answer early (a refusal), which it then reads."""
    loop = asyncio.get_running_loop()
    if not stall:
        with contextlib.suppress(TimeoutError):
            return await asyncio.wait_for(loop.sock_recv(sock, 65536), timeout)
    else:
        await asyncio.sleep(timeout)  # the client's own stall, not a synchronisation
    # the timeout passed: an answer that reached the socket meanwhile was sent before the
    # client left
    try:
        return sock.recv(65536)
    except BlockingIOError:
        return None


async def read_head(sock: socket.socket, data: bytes) -> tuple[int, dict[str, str]]:
    """The status and the headers (lowercase names) of the response that `data` begins."""
    loop = asyncio.get_running_loop()
    while b"\r\n\r\n" not in data:
        more = await asyncio.wait_for(loop.sock_recv(sock, 65536), ANSWER_DEADLINE)
        if not more:
            raise ValueError("the connection closed inside a response head")
        data += more
    lines = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


# --- faults --------------------------------------------------------------------------------


@dataclass
class Fault:
    kind: str
    at: float  # seconds since the traffic started
    down: float  # seconds between the kill and the restart's start


class Faults:
    def __init__(self, rng: random.Random, procs: dict[str, Proc], interval: float) -> None:
        self.rng = rng
        self.procs = procs
        self.interval = interval
        self.done: list[Fault] = []
        self.violations: list[str] = []
        self._cycle: list[str] = []

    def next_kind(self) -> str:
        """Each round kills every process once, in a random order."""
        if not self._cycle:
            self._cycle = list(FAULT_KINDS)
            self.rng.shuffle(self._cycle)
        return self._cycle.pop()

    async def run(self, stop: asyncio.Event, t0: float, say: Any) -> None:
        while True:
            wait = self.interval * self.rng.uniform(0.5, 1.5)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)
            if stop.is_set():
                return
            kind = self.next_kind()
            proc = self.procs[kind]
            down = self.rng.uniform(0.2, 3.0) if kind == "coordinator" else self.rng.uniform(0, 0.5)
            killed = time.monotonic()
            await proc.kill()
            await asyncio.sleep(down)  # the outage itself, not a synchronisation
            try:
                await proc.start()
            except BenchError as err:
                self.violations.append(
                    f"[no-restart] {kind} did not come back after SIGKILL: {err.message}"
                )
                raise
            proc.kills.append((killed, proc.spawned, time.monotonic()))
            self.done.append(Fault(kind, killed - t0, down))
            say(f"fault {len(self.done)}: SIGKILL {kind}, down {down:.2f}s, restarted")


# --- settling and the invariants -----------------------------------------------------------


def journal_rows(path: Path) -> list[tuple[str, str]]:
    """(xid, status) of every transaction in a journal (read-only, beside its writer)."""
    if not path.exists():
        return []
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return [(str(x), str(s)) for x, s in conn.execute("SELECT xid, status FROM globals")]
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise
    finally:
        conn.close()


@dataclass
class Outcome:
    statuses: dict[str, str]  # xid → final status (all journals)
    owners: Counter[str]
    api: dict[str, dict[str, Any]]  # xid → the TM API's answer, for the XIDs the app saw
    unfinished: list[tuple[str, str]]
    settle_seconds: float
    #: decisions an engine refused as already decided otherwise: (xid, event, status then)
    refused: list[tuple[str, str, str]] = field(default_factory=list)


async def settle(
    layout: Layout, known: set[str], timeout: float, session: aiohttp.ClientSession
) -> Outcome:
    """Poll the journals and the TM API until every transaction is terminal (or time is up)."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    names = ("coordinator", "order", "inventory", "travel")
    api = f"{layout.url('order', 'api')}/v1/transactions"
    answers: dict[str, dict[str, Any]] = {}
    while True:
        rows: dict[str, str] = {}
        owners: Counter[str] = Counter()
        for name in names:
            for xid, status in await asyncio.to_thread(journal_rows, layout.journal(name)):
                rows[xid] = status
                owners[name] += 1
        unfinished = [(x, s) for x, s in rows.items() if s not in FINAL]
        pending = [x for x in known if answers.get(x, {}).get("status") not in FINAL]

        async def ask(xids: list[str]) -> None:
            for xid in xids:
                try:
                    async with session.get(f"{api}/{xid}") as r:
                        body = await r.json(content_type=None)
                        ok = r.status == 200
                        answers[xid] = body if ok else {"error": body, "http": r.status}
                except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                    answers[xid] = {"error": f"{type(exc).__name__} {exc}"}

        await asyncio.gather(*(ask(pending[i::STATUS_QUERIES]) for i in range(STATUS_QUERIES)))
        pending = [x for x in known if answers[x].get("status") not in FINAL]
        if not unfinished and not pending:
            return Outcome(rows, owners, answers, [], time.monotonic() - t0)
        if time.monotonic() > deadline:
            left = unfinished + [(x, str(answers[x])) for x in pending if x not in rows]
            return Outcome(rows, owners, answers, left, time.monotonic() - t0)
        await asyncio.sleep(0.25)


async def stuck_branches(layout: Layout, session: aiohttp.ClientSession) -> list[str]:
    """Every coordinating process's stuck branches (GET /admin/branches?state=stuck)."""
    found = []
    admins = {"coordinator": layout.coordinator["admin"]}
    admins.update({name: ports["admin"] for name, ports in layout.sidecars.items()})
    auth = {"Authorization": "Bearer " + layout.key_file.read_text().strip()}
    for name, port in admins.items():
        url = f"http://{HOST}:{port}/admin/branches?state=stuck"
        try:
            async with session.get(url, headers=auth) as r:
                body = await r.json(content_type=None)
                branches = body.get("branches") if r.status == 200 else None
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            branches, body = None, f"{type(exc).__name__} {exc}"
        if branches is None:
            found.append(f"[stuck] {name}: GET /admin/branches?state=stuck answered {body}")
        found.extend(f"[stuck] {name}: branch stuck: {b}" for b in branches or [])
    return found


def restarted_between(proc: Proc, first: float, last: float) -> bool:
    """Whether a restart of `proc` separates two deliveries at an app: the first arrived
    before the new process was up (the old one sent it, though the app may read it after
    the kill), the second after the new one was spawned."""
    return any(first <= up and spawned <= last for _, spawned, up in proc.kills)


def killed_and_restarted_between(proc: Proc, first: float, last: float) -> bool:
    """Whether `proc` was SIGKILLed after `first`, and respawned by `last`."""
    return any(first <= killed and spawned <= last for killed, spawned, _ in proc.kills)


def check(
    outcome: Outcome,
    order: OrderApp,
    participants: dict[str, Participant],
    procs: dict[str, Proc],
    traffic: Traffic,
) -> tuple[list[str], dict[str, Any]]:
    """The invariants over what the apps recorded and the coordinators answered."""
    v: list[str] = []
    info: dict[str, Any] = {}
    for xid, what in outcome.unfinished:
        v.append(f"[not-terminal] not terminal after the settle deadline: {xid} ({what})")
    final = outcome.statuses

    # every transaction the order app saw, as its owner answers through the TM API
    for xid in order.orders:
        answer = outcome.api.get(xid, {})
        status = answer.get("status")
        if status not in FINAL:
            v.append(f"[not-terminal] {xid}: the TM API answers {answer} (not terminal)")
            continue
        if final.get(xid) not in (None, status):
            v.append(f"[api-disagrees] {xid}: the TM API says {status}, the journal {final[xid]}")
        for b in answer.get("branches", []):
            want = "PhaseTwo_Committed" if status == "Committed" else "PhaseTwo_Rollbacked"
            if b.get("status") != want or b.get("stuck"):
                v.append(
                    f"[branch-status] {xid} {status}: branch {b.get('branchId')} "
                    f"{b.get('resourceId')} is "
                    f"{b.get('status')} (stuck: {b.get('stuck')})"
                )

    def status_of(xid: str) -> str | None:
        api = outcome.api.get(xid, {}).get("status")
        return str(api) if api is not None else final.get(xid)

    # each branch's phase two at the apps
    tried_total = 0
    for p in participants.values():
        without_try: set[tuple[str, str]] = set()
        by_key: dict[str, list[Delivery]] = defaultdict(list)
        for d in p.deliveries:
            by_key[d.key].append(d)
            word = "commit" if d.phase == "confirm" else "rollback"
            if d.key != f"{d.xid}:{d.branch}:{word}" or d.header_phase != d.phase:
                v.append(
                    f"[phase-two-headers] {p.name}: {d.phase} of {d.xid} branch {d.branch} carried "
                    f"Idempotency-Key {d.key!r} and x-gts-phase {d.header_phase!r}"
                )
            if (d.xid, d.branch) not in p.tries:
                # the crash window of the fence: the try recorded, then the sidecar killed
                # before the app had it; on rollback the fence cannot tell, so it cancels
                rec = order.orders.get(d.xid)
                called = rec.called.get(STEP_OF[d.resource]) if rec is not None else None
                if (
                    d.phase == "cancel"
                    and called is not None
                    and killed_and_restarted_between(procs[p.name], called, d.at)
                ):
                    without_try.add((d.xid, d.branch))
                    continue
                v.append(
                    f"[phase-two-without-try] {p.name}: {d.phase} of {d.xid} branch "
                    f"{d.branch} ({d.resource}) reached the app but its try never did"
                )
            elif p.tries[(d.xid, d.branch)][1] > d.at:
                v.append(
                    f"[phase-two-before-try] {p.name}: {d.phase} of {d.xid} branch "
                    f"{d.branch} reached the app before its try"
                )
            elif p.try_ends.get((d.xid, d.branch), float("inf")) > d.at:
                v.append(
                    f"[phase-two-during-try] {p.name}: {d.phase} of {d.xid} branch "
                    f"{d.branch} reached the app while its try was still running"
                )
        for (xid, branch), (resource, _, refused) in p.tries.items():
            tried_total += 1
            status = status_of(xid)
            commit = by_key.get(f"{xid}:{branch}:commit", [])
            rollback = by_key.get(f"{xid}:{branch}:rollback", [])
            what = f"{p.name} {resource} {xid} branch {branch}"
            if status is None:
                v.append(
                    f"[unknown-transaction] {what}: tried, but no coordinator knows the transaction"
                )
            elif status == "Committed":
                if refused:
                    v.append(
                        f"[committed-despite-refused-try] {what}: Committed although the app "
                        "refused the try"
                    )
                if p.kind == "TCC" and not commit:
                    v.append(f"[committed-not-confirmed] {what}: Committed but never confirmed")
                if rollback:
                    v.append(
                        f"[committed-but-cancelled] {what}: Committed but cancelled "
                        f"{len(rollback)}x"
                    )
            elif status in ROLLED_BACK:
                if commit:
                    v.append(
                        f"[rolled-back-but-confirmed] {what}: {status} but confirmed {len(commit)}x"
                    )
                if not rollback:
                    v.append(
                        f"[rolled-back-not-cancelled] {what}: {status} but never cancelled / "
                        "compensated"
                    )
        duplicates = 0
        for key, ds in by_key.items():
            if len(ds) > 1:
                duplicates += len(ds) - 1
                if not restarted_between(procs[p.name], ds[0].at, ds[-1].at):
                    v.append(
                        f"[unexplained-duplicate] {p.name}: {key} delivered {len(ds)}x with no "
                        "crash of its sidecar in between"
                    )
        info[f"{p.name}_deliveries"] = dict(Counter(d.phase for d in p.deliveries))
        info[f"{p.name}_applied"] = dict(Counter(d.phase for d in p.applied.values()))
        info[f"{p.name}_duplicates"] = duplicates
        info[f"{p.name}_cancels_without_try"] = len(without_try)
        info[f"{p.name}_tries"] = len(p.tries)
        info[f"{p.name}_slow_tries"] = len(p.slow)
        info[f"{p.name}_slower_tries"] = sum(1 for t in p.slow.values() if t >= SLOWER_TRY)
        # slow tries whose transaction rolled back, so that a cancel came while they ran
        info[f"{p.name}_slow_tries_cancelled"] = sum(
            1 for xid, branch in p.slow if by_key.get(f"{xid}:{branch}:rollback")
        )
        info[f"{p.name}_slower_tries_cancelled"] = sum(
            1
            for (xid, branch), t in p.slow.items()
            if t >= SLOWER_TRY and by_key.get(f"{xid}:{branch}:rollback")
        )
        leaks, reserved = reservations_left(p, by_key, status_of)
        v.extend(leaks)
        info[f"{p.name}_reservations"] = reserved
        v.extend(p.anomalies)
    info["tries"] = tried_total

    # Saga compensations in reverse order (car was booked after hotel)
    travel = participants["travel"]
    first_comp: dict[tuple[str, str], float] = {}
    for d in travel.deliveries:
        first_comp.setdefault((d.xid, d.resource), d.at)
    reversed_checked = 0
    car_tried = {x for (x, _), (r, _, _) in travel.tries.items() if r == "book-car"}
    for xid in {x for x, _ in first_comp}:
        hotel, car = first_comp.get((xid, "book-hotel")), first_comp.get((xid, "book-car"))
        if hotel is not None and xid in car_tried:
            reversed_checked += 1
            if car is None or car > hotel:
                v.append(
                    f"[saga-order] {xid}: book-hotel compensated before book-car (registered "
                    "after it)"
                )
    info["saga_order_checked"] = reversed_checked

    # what the callers were told agrees with the outcomes
    for rec in order.orders.values():
        if rec.answer is not None and rec.answer >= 300 and status_of(rec.xid) == "Committed":
            v.append(
                f"[caller-disagrees] {rec.xid}: the app answered {rec.answer}, yet it Committed"
            )
    for req in traffic.requests:
        if req.kind != "order" or req.xid is None:
            continue
        status = status_of(req.xid)
        if req.outcome == "201 committed" and status != "Committed":
            v.append(
                f"[caller-disagrees] order #{req.n} {req.xid}: the caller got 201, the "
                f"outcome is {status}"
            )
        if req.outcome.endswith("TRANSACTION_ABORTED") and status not in ROLLED_BACK:
            v.append(
                f"[caller-disagrees] order #{req.n} {req.xid}: the caller got 409 "
                f"TRANSACTION_ABORTED, the outcome is {status}"
            )
        if req.xid not in order.orders and req.outcome.startswith(("201", "409 TRANSACTION")):
            v.append(
                f"[caller-disagrees] order #{req.n}: answered {req.outcome} for {req.xid}, "
                "unknown to the app"
            )
    # nothing commits that the app did not answer 201 (its client left during the begin or
    # mid-body: the app never saw the order)
    for xid, status in final.items():
        rec = order.orders.get(xid)
        if status == "Committed" and (rec is None or rec.answer is None):
            v.append(
                f"[committed-unanswered] {xid}: Committed, but the order app never answered it"
                + (" (it never had it)" if rec is None else "")
            )
    v.extend(abandoned_orders(traffic, order, status_of, info))
    # the initiator's sidecar is the only one to send commits and rollbacks: a rollback of a
    # transaction that Committed means it sent both for one request (e.g. its client's FIN
    # read in the same poll as the app's answer, the commit not yet sent)
    for xid, event, then in outcome.refused:
        if event == "rollback" and status_of(xid) == "Committed":
            v.append(
                f"[contradicting-decisions] {xid}: Committed, yet a rollback was sent for it too "
                f"(refused: it was {then})"
            )
    info["refused_decisions"] = dict(Counter(event for _, event, _ in outcome.refused))
    v.extend(order.anomalies)
    v.extend(traffic.violations)
    for proc in procs.values():
        v.extend(proc.crashes)
    return v, info


def reservations_left(
    p: Participant, by_key: dict[str, list[Delivery]], status_of: Any
) -> tuple[list[str], int]:
    """[reservation-leaked]: what the participant app still holds at the end. A try it did
    not refuse reserves when it ends; the app applies the first delivery of each
    Idempotency-Key, which releases the reservation only if it came after the try ended.
    Every reservation must be released, except a Saga action of a Committed transaction."""
    leaks: list[str] = []
    reserved = 0
    for (xid, branch), (resource, _, refused) in p.tries.items():
        if refused:
            continue
        reserved += 1
        ended = p.try_ends.get((xid, branch))
        status = status_of(xid)
        if p.kind == "SAGA" and status == "Committed":
            continue
        applied = [
            ds[0] for word in ("commit", "rollback") if (ds := by_key.get(f"{xid}:{branch}:{word}"))
        ]
        if ended is not None and any(d.at > ended for d in applied):
            continue
        what = (
            "its try never ended"
            if ended is None
            else f"{len(applied)} applied confirm/cancel, none after the try ended"
        )
        leaks.append(
            f"[reservation-leaked] {p.name} {resource} {xid} branch {branch} ({status}): the "
            f"try's reservation was never released: {what}"
        )
    return leaks, reserved


def abandoned_orders(
    traffic: Traffic, order: OrderApp, status_of: Any, info: dict[str, Any]
) -> list[str]:
    """[committed-after-caller-left]: an order whose client left with nothing of the answer
    received is Committed, and the order app had not answered it when the client's close
    returned (see the module's docstring for why that is exact)."""
    v: list[str] = []
    counts: Counter[str] = Counter()
    cut_lags: list[float] = []  # client left → the app's request body ended (streaming)
    for req in traffic.requests:
        if req.kind != "abandon":
            continue
        counts["clients"] += 1
        if req.left_at is None:
            counts["answered" if req.outcome[0].isdigit() else "connection_error"] += 1
            continue
        counts[f"left_{req.how}"] += 1
        xid = order.by_n.get(req.n)
        rec = order.orders.get(xid) if xid is not None else None
        if rec is None:
            counts["left_never_at_app"] += 1
            continue
        counts["left_at_app"] += 1
        status = status_of(rec.xid)
        answered = rec.answered_at
        left_first = answered is None or req.left_at < answered
        if rec.body_cut_at is not None:
            counts["body_cut_at_app"] += 1
            cut_lags.append(rec.body_cut_at - req.left_at)
        if left_first and rec.cut_before_answer:
            counts["app_request_cut_before_answer"] += 1  # the sidecar ended it at once
        if status == "Committed":
            if left_first:
                when = (
                    "it never answered"
                    if answered is None
                    else f"it answered {answered - req.left_at:.3f}s after"
                )
                v.append(
                    f"[committed-after-caller-left] order #{req.n} {rec.xid}: its client left "
                    f"({req.how}, after {req.timeout:.3f}s) before the order app answered "
                    f"({when}), yet it Committed"
                )
            else:
                counts["committed_decided_before_left"] += 1
        elif status in ROLLED_BACK:
            counts["rolled_back"] += 1
            if left_first and rec.answer == 201:
                # the app succeeded after its caller had gone: committed without the fix
                counts["rolled_back_app_succeeded"] += 1
    info["abandoned"] = dict(counts)
    cut_lags.sort()
    info["body_cut_ms"] = (
        {
            "median": round(cut_lags[len(cut_lags) // 2] * 1000, 1),
            "max": round(cut_lags[-1] * 1000, 1),
        }
        if cut_lags
        else {}
    )
    return v


def refused_decisions(logs: list[Path]) -> list[tuple[str, str, str]]:
    """(xid, event, status) of each commit or rollback an engine refused because the
    transaction was already decided otherwise (its info log line)."""
    found = []
    for log in logs:
        try:
            lines = log.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            if "already decided otherwise" not in line:
                continue
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                found.append((str(rec.get("xid")), str(rec.get("event")), str(rec.get("status"))))
    return found


def errors_logged(log: Path) -> tuple[int, list[str]]:
    """Log lines at error level or above (information: a kill cuts connections)."""
    count, first = 0, list[str]()
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return 0, []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            if line.startswith("Traceback"):
                count += 1
            continue
        if isinstance(rec, dict) and rec.get("level") in ("error", "critical"):
            count += 1
            if len(first) < 3:
                first.append(str(rec.get("msg", ""))[:160])
    return count, first


# --- the run -------------------------------------------------------------------------------


def machine_facts() -> list[tuple[str, str]]:
    def out(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip()
        except OSError:
            return "?"

    return [
        ("date", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")),
        ("nproc", f"{os.cpu_count()} ({len(os.sched_getaffinity(0))} usable)"),
        ("kernel", f"{platform.system()} {platform.release()}"),
        ("python", out([venv_python(), "-VV"])),
        (
            "repo commit",
            out(["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"])
            + " (plus any uncommitted changes)",
        ),
    ]


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    def say(text: str) -> None:
        if not args.quiet:
            print(f"[{time.monotonic() - started:7.1f}s] {text}", file=sys.stderr, flush=True)

    started = time.monotonic()
    rng = random.Random(args.seed)
    say(f"seed {args.seed}")
    work = Path(tempfile.mkdtemp(prefix="gts-soak-", dir=args.dir)).resolve()
    participants = {
        "inventory": Participant("inventory", "TCC"),
        "travel": Participant("travel", "SAGA"),
    }
    runners: list[web.AppRunner] = []
    procs: dict[str, Proc] = {}
    order: OrderApp | None = None
    try:
        key_file = work / "signing.key"
        key_file.write_text(os.urandom(32).hex() + "\n")
        peer_port = free_port(*PEER_HOSTS.values())
        sidecar_ports = {
            n: {ln: peer_port if ln == "peer" else free_port() for ln in LISTENERS}
            for n in PEER_HOSTS
        }
        order = OrderApp(f"http://{HOST}:{sidecar_ports['order']['outbound']}")
        await order.open()
        apps: dict[str, int] = {}
        for name, app in (("order", order.app()), *((n, p.app()) for n, p in participants.items())):
            runner, apps[name] = await serve(app)
            runners.append(runner)
        layout = Layout(
            work, key_file, {"peer": free_port(), "admin": free_port()}, sidecar_ports, apps
        )
        configs = {"coordinator": coordinator_config(layout)}
        configs.update({n: sidecar_config(layout, n) for n in ("order", "inventory", "travel")})
        for name, cfg in configs.items():
            path = work / f"{name}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            role = "coordinator" if name == "coordinator" else "run"
            procs[name] = Proc(name, role, path, work / f"{name}.log")
        for proc in procs.values():
            await proc.start()
        say(
            f"coordinator and 3 sidecars up (work dir {work}); traffic for {args.duration:g}s, "
            f"{args.concurrency} in flight, a fault every ~{args.fault_interval:g}s"
        )

        traffic = Traffic(
            rng, layout.url("order", "inbound"), args.plain_share, args.plans, args.abandon_share
        )
        faults = Faults(rng, procs, args.fault_interval)
        stop_traffic, stop_faults = asyncio.Event(), asyncio.Event()
        t0 = time.monotonic()
        timeout = aiohttp.ClientTimeout(total=traffic.client_timeout)
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=timeout
        ) as session:
            loops = [
                asyncio.ensure_future(traffic.loop(session, stop_traffic))
                for _ in range(args.concurrency)
            ]
            if args.no_faults:
                stop_faults.set()
            injector = asyncio.ensure_future(faults.run(stop_faults, t0, say))
            # the traffic runs its duration, or until a process fails to come back
            clock = asyncio.ensure_future(asyncio.sleep(args.duration))
            await asyncio.wait(
                {clock} if args.no_faults else {clock, injector},
                return_when=asyncio.FIRST_COMPLETED,
            )
            clock.cancel()
            stop_faults.set()
            fault_error = None
            try:
                await injector
            except BenchError as err:
                fault_error = err
            # every process up again (a crash the watchdog saw is restarted for the settle)
            for proc in procs.values():
                if not proc.alive:
                    await proc.start()
            stop_traffic.set()
            await asyncio.gather(*loops)
            traffic_seconds = time.monotonic() - t0
            say(
                f"traffic stopped: {len(traffic.requests)} requests, {len(faults.done)} faults; "
                "settling"
            )
            known = set(order.orders) | {r.xid for r in traffic.requests if r.xid}
            for p in participants.values():
                known |= {x for x, _ in p.tries}
            async with aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=10)
            ) as api_session:
                outcome = await settle(layout, known, args.settle_timeout, api_session)
                stuck = await stuck_branches(layout, api_session)
        outcome.refused = refused_decisions([procs["coordinator"].log, procs["order"].log])
        say(f"settled in {outcome.settle_seconds:.1f}s; checking")
        violations, info = check(outcome, order, participants, procs, traffic)
        violations = faults.violations + violations + stuck
        if fault_error is not None and not faults.violations:
            violations.append(f"[no-restart] {fault_error.message}")
        codes = await asyncio.gather(*(proc.stop() for proc in procs.values()))
        exits = dict(zip(procs, codes, strict=True))
        logs = {name: errors_logged(proc.log) for name, proc in procs.items()}
        return summarise(
            args, traffic, faults, outcome, violations, info, exits, logs, traffic_seconds,
            time.monotonic() - started, len(order.orders),
        )  # fmt: skip
    finally:
        for proc in procs.values():
            if proc.alive:
                await proc.kill()
        if order is not None:
            await order.close()
        for runner in reversed(runners):
            await runner.cleanup()
        if args.keep:
            print(f"work directory kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def summarise(
    args: argparse.Namespace,
    traffic: Traffic,
    faults: Faults,
    outcome: Outcome,
    violations: list[str],
    info: dict[str, Any],
    exits: dict[str, int | None],
    logs: dict[str, tuple[int, list[str]]],
    traffic_seconds: float,
    wall_seconds: float,
    orders_at_app: int,
) -> dict[str, Any]:
    by_kind: dict[str, Counter[str]] = defaultdict(Counter)
    for r in traffic.requests:
        by_kind[r.kind][r.outcome] += 1
    return {
        "seed": args.seed,
        "duration_s": args.duration,
        "traffic_s": round(traffic_seconds, 1),
        "wall_s": round(wall_seconds, 1),
        "settle_s": round(outcome.settle_seconds, 1),
        "concurrency": args.concurrency,
        "plans": ",".join(f"{w:g}" for w in args.plans),
        "plain_share": args.plain_share,
        "abandon_share": args.abandon_share,
        "no_faults": args.no_faults,
        "fault_interval_s": args.fault_interval,
        "requests": len(traffic.requests),
        "requests_by_kind": {k: dict(c.most_common()) for k, c in sorted(by_kind.items())},
        "transactions": len(outcome.statuses),
        "transactions_by_status": dict(Counter(outcome.statuses.values()).most_common()),
        "transactions_by_owner": dict(outcome.owners),
        "orders_at_app": orders_at_app,
        "faults": len(faults.done),
        "faults_by_kind": dict(Counter(f.kind for f in faults.done)),
        "info": info,
        "exit_status_on_sigterm": exits,
        "errors_logged": {n: {"count": c, "first": f} for n, (c, f) in logs.items()},
        "violations_by_kind": dict(Counter(violation_kind(x) for x in violations).most_common()),
        "violations": violations,
    }


def violation_kind(text: str) -> str:
    m = re.match(r"\[([a-z-]+)\]", text)
    return m.group(1) if m else "other"


def render(s: dict[str, Any], facts: list[tuple[str, str]]) -> str:
    v = s["violations"]
    verdict = "**0 violations**" if not v else f"**{len(v)} VIOLATION(S)**"
    info = s["info"]
    lines = [
        "# Soak: mixed traffic with the coordinator and the sidecars SIGKILLed at random",
        "",
        f"{s['traffic_s']:g} s of traffic (seed {s['seed']}, {s['concurrency']} requests in "
        f"flight, {s['plain_share']:.0%} of them plain, order plans none/after/try/ignore "
        f"{s['plans']}, {s['abandon_share']:.0%} of the orders from clients that may give up, "
        + ("no faults" if s["no_faults"] else f"a fault every ~{s['fault_interval_s']:g} s")
        + f"): {s['requests']:,} requests, "
        f"{s['transactions']:,} transactions, {s['faults']} faults injected, {verdict}. "
        f"Everything settled {s['settle_s']:g} s after the traffic stopped.",
        "",
        "| requests | outcome | count |",
        "|---|---|--:|",
    ]
    for kind, outcomes in s["requests_by_kind"].items():
        lines += [f"| {kind} | {o} | {c:,} |" for o, c in outcomes.items()]
    lines += ["", "| transactions (every journal) | count |", "|---|--:|"]
    lines += [f"| {st} | {c:,} |" for st, c in s["transactions_by_status"].items()]
    owners = ", ".join(f"{n} {c:,}" for n, c in s["transactions_by_owner"].items())
    lines += [
        f"| coordinated by | {owners} |",
        f"| reached the order app (checked through the TM API) | {s['orders_at_app']:,} |",
        "| decisions refused as already decided otherwise (information; a rollback of a "
        "Committed one is a violation) | "
        + (", ".join(f"{e} {c}" for e, c in info["refused_decisions"].items()) or "0")
        + " |",
        "",
        "| faults injected (SIGKILL, then restart on the same ports) | count |",
        "|---|--:|",
    ]
    lines += [f"| {k} | {c} |" for k, c in sorted(s["faults_by_kind"].items())]
    lines += ["", *render_abandoned(info.get("abandoned", {}), info.get("body_cut_ms", {}))]
    lines += ["", "| branches at the apps | inventory (TCC) | travel (Saga) |", "|---|--:|--:|"]
    inv, tra = "inventory", "travel"
    lines += [
        f"| tries / actions that reached the app | {info[inv + '_tries']:,} | "
        f"{info[tra + '_tries']:,} |",
        f"| confirms applied (once per Idempotency-Key) | "
        f"{info[inv + '_applied'].get('confirm', 0):,} | - |",
        f"| cancels / compensations applied | {info[inv + '_applied'].get('cancel', 0):,} | "
        f"{info[tra + '_applied'].get('cancel', 0):,} |",
        f"| duplicate deliveries (information: the crash window) | {info[inv + '_duplicates']} "
        f"| {info[tra + '_duplicates']} |",
        f"| cancels / compensations of a try the app never had (information: the crash "
        f"window) | {info[inv + '_cancels_without_try']} | {info[tra + '_cancels_without_try']} |",
        f"| Saga compensation order checked (both steps tried) | - | "
        f"{info['saga_order_checked']:,} |",
        f"| reservations (tries not refused), each released after its try ended | "
        f"{info[inv + '_reservations']:,} | {info[tra + '_reservations']:,} |",
        f"| slow tries ({SLOW_TRY:g} s, past the initiator's upstream timeout) / of them "
        f"cancelled | {info[inv + '_slow_tries'] - info[inv + '_slower_tries']:,} / "
        f"{info[inv + '_slow_tries_cancelled'] - info[inv + '_slower_tries_cancelled']:,} | "
        f"{info[tra + '_slow_tries'] - info[tra + '_slower_tries']:,} / "
        f"{info[tra + '_slow_tries_cancelled'] - info[tra + '_slower_tries_cancelled']:,} |",
        f"| slow tries ({SLOWER_TRY:g} s, past the transaction's timeout too) / of them "
        f"cancelled | {info[inv + '_slower_tries']:,} / {info[inv + '_slower_tries_cancelled']:,}"
        f" | {info[tra + '_slower_tries']:,} / {info[tra + '_slower_tries_cancelled']:,} |",
        "",
        "| process | errors logged (information) | exit status on SIGTERM at the end |",
        "|---|--:|--:|",
    ]
    for name, logged in s["errors_logged"].items():
        first = "; ".join(logged["first"])
        lines.append(
            f"| {name} | {logged['count']}{': ' + first if first else ''} "
            f"| {s['exit_status_on_sigterm'].get(name)} |"
        )
    lines += ["", f"## Violations: {len(v)}", ""]
    if v:
        lines += ["| kind | count |", "|---|--:|"]
        lines += [f"| {k} | {c} |" for k, c in s["violations_by_kind"].items()]
        lines.append("")
    lines += [f"- {x}" for x in v[:50]] or ["none"]
    if len(v) > 50:
        lines.append(f"- … and {len(v) - 50} more")
    lines += ["", "| machine | |", "|---|---|"]
    lines += [f"| {k} | {val} |" for k, val in facts]
    cmd = shlex.join(
        [".venv/bin/python", "bench/soak.py", "--duration", f"{s['duration_s']:g}s"]
        + ["--seed", str(s["seed"]), "--fault-interval", f"{s['fault_interval_s']:g}s"]
        + ["--concurrency", str(s["concurrency"])]
        + ([] if s["plans"] == DEFAULT_PLANS else ["--plans", s["plans"]])
        + ([] if s["plain_share"] == 0.3 else ["--plain-share", f"{s['plain_share']:g}"])
        + ([] if s["abandon_share"] == 0.15 else ["--abandon-share", f"{s['abandon_share']:g}"])
        + (["--no-faults"] if s["no_faults"] else [])
    )
    lines += ["", f"Command: `{cmd}` (wall time {s['wall_s']:g} s)"]
    return "\n".join(lines)


ABANDONED_ROWS: Final = (
    ("clients", "clients that may give up (raw sockets)"),
    ("answered", "answered before their timeout"),
    ("connection_error", "connection errors (a sidecar down)"),
    ("left_fin", "left with nothing received: FIN after the whole request"),
    ("left_rst", "left with nothing received: RST after the whole request"),
    ("left_mid-body", "left mid-body (FIN or RST), a body the sidecar buffers"),
    ("left_mid-body-large", "left mid-body (FIN or RST), a 200 KiB body streaming to the app"),
    ("left_never_at_app", "left, and the order never reached the app"),
    ("left_at_app", "left, and the order reached the app"),
    ("body_cut_at_app", "of those, the app's request body cut off"),
    ("app_request_cut_before_answer", "of those, the app's request ended before it answered"),
    ("rolled_back", "of those, rolled back"),
    ("rolled_back_app_succeeded", "of those, rolled back though the app answered 201 (late)"),
    ("committed_decided_before_left", "of those, committed: the app answered before the close"),
)


def render_abandoned(counts: dict[str, int], cut_ms: dict[str, float]) -> list[str]:
    lines = ["| abandoning clients (a client timeout, then FIN or RST) | count |", "|---|--:|"]
    lines += [f"| {text} | {counts.get(key, 0):,} |" for key, text in ABANDONED_ROWS]
    if cut_ms:
        lines.append(
            "| the app saw its streaming body end after the client left (information) | "
            f"{cut_ms['median']:g} ms median, {cut_ms['max']:g} ms max |"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        summary = asyncio.run(soak(args))
    except BenchError as err:
        err.report()
        return 2
    except KeyboardInterrupt:
        return 2
    report = render(summary, machine_facts())
    print(report)
    target = Path(args.report) if args.report else RESULTS_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(report + "\n")
    print(f"report written to {target}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if not summary["violations"] else 1


if __name__ == "__main__":
    sys.exit(main())
