"""A Go service reading the sidecar's answers with map[string]any keeps every id's digits.

Go's encoding/json turns every JSON number into a float64 there, as JavaScript's JSON.parse
does: 193705495666798592 becomes 193705495666798600. The ids (branchId, the txid inside the
XID) are strings in every answer, so a Go client's decode and re-encode gives back exactly
what the sidecar sent. Real processes and sockets: the sidecar on loopback, the Go program
built from tests/realclients/godecode.go.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import subprocess
import threading
from pathlib import Path

from sidecar.coordinator.states import BranchStatus, BranchType

HERE = Path(__file__).parent


async def go_reads(decoder: Path, url: str) -> str:
    proc = await asyncio.create_subprocess_exec(str(decoder), url, stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, out
    return out.decode().strip()


def test_the_premise_go_rounds_a_numeric_id(go_decoder: Path, tmp_path: Path) -> None:
    # what this test guards against, shown with Go itself: a numeric id comes back rounded
    body = b'{"branchId": 193705495666798593}'

    class One(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), One)
    thread = threading.Thread(target=server.handle_request, daemon=True)
    thread.start()
    try:
        out = subprocess.run(
            [str(go_decoder), f"http://127.0.0.1:{server.server_address[1]}/"],
            capture_output=True, check=True, timeout=30, text=True,
        ).stdout  # fmt: skip
    finally:
        thread.join(10)
        server.server_close()
    assert json.loads(out)["branchId"] != 193705495666798593


async def test_tm_api_status_survives_a_go_map_string_any(sidecar_factory, go_decoder):
    sc = await sidecar_factory()
    engine = sc.control.engine
    tx = await engine.begin("order", 60_000)
    branch = await engine.register(tx.xid, BranchType.TCC, "stock", "http://127.0.0.1:9/b", b"{}")
    await engine.report(tx.xid, branch.branch_id, BranchStatus.PHASE_ONE_DONE)
    assert branch.branch_id > 2**53  # the kind of id a float64 rounds

    url = f"http://127.0.0.1:{sc.ports['api']}/v1/transactions/{tx.xid}"
    got = json.loads(await go_reads(go_decoder, url))
    assert got["xid"] == tx.xid
    assert [b["branchId"] for b in got["branches"]] == [str(branch.branch_id)]
