"""Config reload: watch the file, validate the new version whole, then swap.

Kubernetes mounts a ConfigMap as `dir/sidecar.yaml → ..data/sidecar.yaml`, with `..data` a
symlink that an update swaps atomically to a new timestamped directory; inotify on the file
itself misses that, so the watcher polls `stat()` through the symlinks and compares the
content hash. An invalid new file is refused, logged and counted; the old config stays.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from sidecar.config import Config, load
from sidecar.errors import ConfigError
from sidecar.metrics import Metrics

log = logging.getLogger("sidecar.reload")


def file_digest(path: str | os.PathLike[str]) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class ConfigWatcher:
    """Polls one config file; calls `apply(config, digest)` for each new valid version."""

    def __init__(
        self,
        path: str,
        digest: str,
        apply: Callable[[Config, str], None],
        metrics: Metrics,
        interval: float = 1.0,
    ) -> None:
        self.path = path
        self.digest = digest
        self._apply = apply
        self._metrics = metrics
        self.interval = interval
        self._stat = self._stat_key()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def _stat_key(self) -> tuple[int, int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._poll(), name="config-watcher")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            key = self._stat_key()
            if key != self._stat:
                self._stat = key
                await self.reload(reason="file changed")

    async def reload(self, reason: str) -> str:
        """Load, validate and apply; returns the result label."""
        async with self._lock:
            loop = asyncio.get_running_loop()
            try:
                digest = await loop.run_in_executor(None, file_digest, self.path)
            except OSError as exc:
                return self._count("invalid", f"cannot read {self.path}: {exc.strerror}")
            if digest == self.digest:
                return self._count("unchanged", None)
            try:
                config = await loop.run_in_executor(None, load, self.path)
            except Exception as exc:  # a bug in loading must not kill the watcher either
                if not isinstance(exc, ConfigError):
                    log.exception("config reload failed unexpectedly")
                    exc = ConfigError([f"<file>: {type(exc).__name__}"])
                log.error(
                    "config reload refused; the previous config stays in force",
                    extra={"reason": reason, "problems": exc.problems, "sha256": digest[:12]},
                )
                self._metrics.config_reloads.labels("invalid").inc()
                return "invalid"
            try:
                self._apply(config, digest)
            except ConfigError as exc:
                log.error(
                    "config reload refused; the previous config stays in force",
                    extra={"reason": reason, "problems": exc.problems, "sha256": digest[:12]},
                )
                self._metrics.config_reloads.labels("invalid").inc()
                return "invalid"
            self.digest = digest
            log.info("config reloaded", extra={"reason": reason, "sha256": digest[:12]})
            self._metrics.config_reloads.labels("applied").inc()
            return "applied"

    def _count(self, result: str, error: str | None) -> str:
        if error:
            log.error("config reload failed: %s", error)
        self._metrics.config_reloads.labels(result).inc()
        return result
