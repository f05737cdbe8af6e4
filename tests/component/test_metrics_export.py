"""What /metrics exports beside the request counters: transaction and phase-two duration
histograms, the stuck-now gauge, the renamed config info metric, the standard process_* and
python_* collectors, and gzip when the scraper accepts it (Prometheus does)."""

from __future__ import annotations

import gzip
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from sidecar.coordinator.states import BranchType
from tests.component.servers import closed_port, wait_until


async def scrape(port: int, *, accept_gzip: bool) -> tuple[dict[str, str], str]:
    headers = {"Accept-Encoding": "gzip" if accept_gzip else "identity"}
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        async with s.get(f"http://127.0.0.1:{port}/metrics", headers=headers) as r:
            assert r.status == 200
            raw = await r.read()
            got = dict(r.headers)
    text = gzip.decompress(raw) if got.get("Content-Encoding") == "gzip" else raw
    return got, text.decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_durations_stuck_gauge_standard_collectors_and_gzip(
    sidecar_factory, tmp_path: Path
) -> None:
    sc = await sidecar_factory(
        {"local_coordinator": {"phase_two": {"initial": "10ms", "max": "20ms", "max_attempts": 1}}}
    )
    engine = sc.control.engine
    done = await engine.begin("order", 60_000)
    await engine.commit(done.xid)
    stuck = await engine.begin("order", 60_000)
    branch = await engine.register(
        stuck.xid, BranchType.TCC, "stock", f"http://127.0.0.1:{closed_port()}/cb", b"{}"
    )
    await engine.commit(stuck.xid)
    await wait_until(lambda: bool(engine.stuck()))  # one failed confirm: stuck at once
    assert [b.branch_id for b in engine.stuck()] == [branch.branch_id]

    headers, text = await scrape(sc.ports["admin"], accept_gzip=True)
    assert headers["Content-Encoding"] == "gzip"
    found = samples(text)
    names = {name for name, _ in found}
    assert found[("gts_sidecar_stuck_branches", ())] == 1
    committed = (("outcome", "Committed"),)
    assert found[("gts_sidecar_transaction_duration_seconds_count", committed)] == 1
    assert found[("gts_sidecar_phase_two_duration_seconds_count", (("phase", "commit"),))] >= 1
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes", "python_info"} <= names
    assert any(n.startswith("python_gc_") for n in names)
    assert "gts_sidecar_config_info" in names and "gts_sidecar_config_version" not in names
    assert "gts_sidecar_build_info" in names

    await engine.skip_branch(stuck.xid, branch.branch_id)  # settled: the gauge says so
    headers, text = await scrape(sc.ports["admin"], accept_gzip=False)
    assert "Content-Encoding" not in headers
    assert samples(text)[("gts_sidecar_stuck_branches", ())] == 0
