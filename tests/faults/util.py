"""Helpers of the fault suite: polling with a deadline, required system tools, process RSS."""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp


async def wait_until(
    cond: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: object = ""
) -> Any:
    """Poll `cond` (sync or async) until it returns something truthy; fail after `timeout`
    (`what`, or what it returns if callable, goes in the failure message)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = cond()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            detail = what() if callable(what) else what
            raise AssertionError(f"condition not met within {timeout}s: {detail or cond}")
        await asyncio.sleep(interval)


def require_tool(command: str, package: str) -> str:
    """The path of `command`; fail (never skip) naming the Debian package if it is missing."""
    path = shutil.which(command)
    ci = os.environ.get("CI") == "true"
    assert path, (
        f"{command!r} is missing: install the Debian package {package!r} "
        f"(scripts/system-deps.sh does){' — CI=true: this is an error' if ci else ''}"
    )
    return path


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def hwm_kib(pid: int) -> int:
    """The peak RSS of the process so far (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for pid {pid}")


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` in a /metrics text."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric_name, _, rest = head.partition("{")
        if metric_name != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += float(value)
            found = True
    return total if found else 0.0


async def scrape(s: aiohttp.ClientSession, admin_port: int) -> str:
    async with s.get(f"http://127.0.0.1:{admin_port}/metrics") as r:
        return await r.text()
