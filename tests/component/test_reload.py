"""Config reload: Kubernetes ConfigMap layout (`..data` symlink swap), SIGHUP-style reload,
invalid files refused with the old config kept, in-flight requests on their old config."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from sidecar import config as configmod
from sidecar.metrics import Metrics
from sidecar.reload import file_digest
from sidecar.server import Sidecar
from tests.conftest import LOOPBACK_LISTENERS


class ConfigMapDir:
    """Mimics the kubelet's atomic writer: dir/sidecar.yaml → ..data/sidecar.yaml, with
    ..data → ..<version> swapped by rename."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.version = 0
        (root / "sidecar.yaml").symlink_to("..data/sidecar.yaml")

    @property
    def path(self) -> str:
        return str(self.root / "sidecar.yaml")

    def publish(self, text: str) -> None:
        self.version += 1
        vdir = self.root / f"..2026_11_25_{self.version:04d}"
        vdir.mkdir()
        (vdir / "sidecar.yaml").write_text(text)
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(vdir.name)
        os.replace(tmp, self.root / "..data")


def cfg_text(app_port: int, **extra: Any) -> str:
    data: dict[str, Any] = {
        "listeners": LOOPBACK_LISTENERS,
        "logging": {"level": "warning"},
        "app": {"url": f"http://127.0.0.1:{app_port}"},
        "local_coordinator": {"journal": "memory://"},
    }
    data.update(extra)
    return yaml.safe_dump(data)


async def named_app(aiohttp_server, name: str, gate: asyncio.Event | None = None):
    async def handler(request: web.Request) -> web.Response:
        if gate is not None and request.path == "/wait":
            await gate.wait()
        return web.Response(text=name)

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    return await aiohttp_server(app)


async def wait_for_metric(sc: Sidecar, result: str, value: float) -> None:
    async def poll() -> None:
        while (
            sc.metrics.registry.get_sample_value(
                "gts_sidecar_config_reloads_total", {"result": result}
            )
            or 0
        ) < value:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), 10)


async def start_from(path: str) -> Sidecar:
    sc = Sidecar(
        configmod.load(path),
        config_path=path,
        config_digest=file_digest(path),
        metrics=Metrics(),
        reload_interval=0.02,
    )
    await sc.start()
    return sc


async def test_configmap_symlink_swap_is_applied_and_in_flight_requests_keep_old_config(
    tmp_path: Path, aiohttp_server
) -> None:
    gate = asyncio.Event()
    old_app = await named_app(aiohttp_server, "old", gate)
    new_app = await named_app(aiohttp_server, "new")
    cm = ConfigMapDir(tmp_path)
    cm.publish(cfg_text(old_app.port))
    sc = await start_from(cm.path)
    base = f"http://127.0.0.1:{sc.ports['inbound']}"
    try:
        async with aiohttp.ClientSession() as s:
            in_flight = asyncio.ensure_future(s.get(base + "/wait"))
            async with s.get(base + "/") as r:
                assert await r.text() == "old"
            cm.publish(cfg_text(new_app.port))
            await wait_for_metric(sc, "applied", 1)
            async with s.get(base + "/") as r:
                assert await r.text() == "new"
            gate.set()
            resp = await asyncio.wait_for(in_flight, 10)
            assert await resp.text() == "old"  # started on the old config, finished on it
            resp.release()
            version = sc.metrics.registry.get_sample_value(
                "gts_sidecar_config_info", {"sha256": file_digest(cm.path)[:12]}
            )
            assert version == 1
    finally:
        gate.set()
        await sc.close()


async def test_invalid_new_config_is_refused_counted_and_old_config_stays(
    tmp_path: Path, aiohttp_server
) -> None:
    app = await named_app(aiohttp_server, "old")
    cm = ConfigMapDir(tmp_path)
    cm.publish(cfg_text(app.port))
    sc = await start_from(cm.path)
    digest_before = sc.config_digest
    try:
        cm.publish(cfg_text(app.port, drain_timeout="soon"))
        await wait_for_metric(sc, "invalid", 1)
        assert sc.config_digest == digest_before
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{sc.ports['inbound']}/") as r:
                assert await r.text() == "old"
        # a bind change cannot be applied without a restart: refused too
        text = yaml.safe_load(cfg_text(app.port))
        text["listeners"] = {**text["listeners"], "inbound": {"bind": "127.0.0.1:1"}}
        cm.publish(yaml.safe_dump(text))
        await wait_for_metric(sc, "invalid", 2)
        assert sc.config_digest == digest_before
    finally:
        await sc.close()


async def test_explicit_reload_reports_unchanged_and_applied(
    tmp_path: Path, aiohttp_server
) -> None:
    app = await named_app(aiohttp_server, "a")
    path = tmp_path / "sidecar.yaml"
    path.write_text(cfg_text(app.port))
    sc = Sidecar(
        configmod.load(path),
        config_path=str(path),
        config_digest=file_digest(path),
        metrics=Metrics(),
        reload_interval=3600,  # the watcher stays out of it: only the explicit reload acts
    )
    await sc.start()
    try:
        assert await sc.reload("SIGHUP") == "unchanged"
        path.write_text(cfg_text(app.port, drain_timeout="5s"))
        assert await sc.reload("SIGHUP") == "applied"
        assert sc.config.drain_timeout == 5.0
    finally:
        await sc.close()
