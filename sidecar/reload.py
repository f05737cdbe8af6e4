"""Config reload: watch the file and every file it names, validate the new version whole,
then swap.

Kubernetes mounts a ConfigMap or a Secret as `dir/name → ..data/name`, with `..data` a
symlink that an update swaps atomically to a new timestamped directory; inotify on the file
itself misses that, so the watcher polls `stat()` through the symlinks. It watches the config
file and every `*_file` the config in force names (secrets, certificates, keys, CAs): a
rotated Secret is a reload like an edited ConfigMap. A change is applied only when the config
text, or what the files hold (`same` tells), differs. An invalid new version (a bad key pair,
an empty token file, a broken YAML) is refused, logged and counted; the old one stays in
force, and is not retried until something changes again.

The stat of every watched file is taken before anything is read: a file that changes while a
reload reads it (or applies it) differs from that snapshot, so the next poll reloads again
and nothing is missed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

from sidecar.config import Config, Secret, load
from sidecar.errors import ConfigError
from sidecar.files import StatKey, stat_key
from sidecar.metrics import Metrics
from sidecar.schema import Model, dump, field_names

log = logging.getLogger("sidecar.reload")


#: the sections whose change needs a restart, except for the keys listed for each, which
#: apply live (below: what each live change does)
_RESTART_SECTIONS: Final = (
    "coordinator",
    "local_coordinator",
    "degraded",  # the routing coordinator keeps the settings it started with
    "tcc",
    "saga",
    "idempotency",
    "tracing",  # the span exporter is set up once, at start
    "locks",
)
#: coordinator.signing: the ring is replaced in place (the current key signs, current and
#: previous keys verify); coordinator.tls: new connections use the new context
_LIVE_KEYS: Final = {"coordinator": {"signing", "tls"}}
#: sections whose secret files' content applies live (the JWT keys, phase-two header values);
#: in the others a secret is read once by a client that keeps it (Redis, PostgreSQL
#: passwords), so a changed value needs a restart like any other change there
_LIVE_SECRETS: Final = frozenset({"coordinator", "tcc", "saga"})


def file_digest(path: str | os.PathLike[str]) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _files(node: Any, key: str = "") -> Iterator[str]:
    if isinstance(node, Secret):
        yield node.path
    elif isinstance(node, Model):
        for name in field_names(type(node)):
            yield from _files(getattr(node, name), name)
    elif isinstance(node, dict):
        for value in node.values():
            yield from _files(value, key)
    elif isinstance(node, list | tuple):
        for value in node:
            yield from _files(value, key)
    elif isinstance(node, str) and key.endswith("_file"):
        yield node  # a certificate, key or CA file (read by sidecar/tls.py)


def watched_files(config: Config) -> list[str]:
    """Every file `config` names: secrets, certificates, keys, CAs (sorted, unique)."""
    return sorted(set(_files(config)))


def _structure(value: Any, exclude: set[str] | None = None) -> Any:
    # secrets dump as their paths: a rotated value (same path) is not a structural change
    if isinstance(value, Model):
        return dump(value, exclude=exclude or frozenset())
    if isinstance(value, list):
        return [_structure(v) for v in value]
    return value


def restart_needed(old: Config, new: Config) -> list[str]:
    """What in `new` cannot be applied to a running process, one problem per key path.
    The content of certificate files and of the secrets that apply live needs no restart
    (their paths do, outside the keys that apply live)."""
    problems = [
        f"listeners.{name}.bind: changing a bind address needs a restart"
        for name in ("inbound", "outbound", "api", "peer", "admin")
        if getattr(new.listeners, name).bind != getattr(old.listeners, name).bind
    ]
    problems += [
        f"listeners.{name}.tls: changing a listener's TLS settings needs a restart (the "
        "certificate, key and CA files themselves are re-read live when they change)"
        for name in ("inbound", "outbound", "api", "peer", "admin")
        if getattr(new.listeners, name).tls != getattr(old.listeners, name).tls
    ]
    for section in _RESTART_SECTIONS:
        live = _LIVE_KEYS.get(section)
        if section in _LIVE_SECRETS:
            changed = _structure(getattr(new, section), live) != _structure(
                getattr(old, section), live
            )
        else:
            changed = getattr(new, section) != getattr(old, section)  # secrets by value
        if changed:
            what = f" (except {', '.join(sorted(live))})" if live else ""
            problems.append(f"{section}: changing this section{what} needs a restart")
    return problems


class ConfigWatcher:
    """Polls one config file and the files it names; calls `apply(config, digest)` for each
    new valid version (`digest`: the config file's sha256). `files` lists the files the
    config in force names; `same(config)` says whether a loaded config, with the files it
    names, is what is in force already (without it, an unchanged config file is enough)."""

    def __init__(
        self,
        path: str,
        digest: str,
        apply: Callable[[Config, str], None],
        metrics: Metrics,
        interval: float = 1.0,
        *,
        files: Callable[[], list[str]] = list,
        same: Callable[[Config], bool] | None = None,
    ) -> None:
        self.path = path
        self.digest = digest
        self._apply = apply
        self._metrics = metrics
        self.interval = interval
        self._files = files
        self._same = same
        self._stat = self._stat_key()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def _stat_key(self) -> tuple[StatKey, ...]:
        return tuple(stat_key(p) for p in [self.path, *self._files()])

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._poll(), name="config-watcher")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if self._stat_key() != self._stat:
                await self.reload(reason="file changed")

    async def reload(self, reason: str) -> str:
        """Load, validate and apply; returns the result label."""
        async with self._lock:
            # before reading anything: what changes from here on is seen by the next poll
            self._stat = self._stat_key()
            loop = asyncio.get_running_loop()
            try:
                digest = await loop.run_in_executor(None, file_digest, self.path)
            except OSError as exc:
                return self._count("invalid", f"cannot read {self.path}: {exc.strerror}")
            if digest == self.digest and self._same is None:
                return self._count("unchanged", None)
            try:
                config = await loop.run_in_executor(None, load, self.path)
            except Exception as exc:  # a bug in loading must not kill the watcher either
                if not isinstance(exc, ConfigError):
                    log.exception("config reload failed unexpectedly")
                    exc = ConfigError([f"<file>: {type(exc).__name__}"])
                return self._refused(reason, exc, digest)
            same = self._same
            if digest == self.digest and same is not None:
                if await loop.run_in_executor(None, same, config):  # reads the named files
                    return self._count("unchanged", None)
            try:
                self._apply(config, digest)
            except Exception as exc:  # as above: the watcher outlives any one bad version
                if not isinstance(exc, ConfigError):
                    log.exception("config apply failed unexpectedly")
                    exc = ConfigError([f"<apply>: {type(exc).__name__}"])
                return self._refused(reason, exc, digest)
            self.digest = digest
            log.info("config reloaded", extra={"reason": reason, "sha256": digest[:12]})
            self._metrics.config_reloads.labels("applied").inc()
            return "applied"

    def _refused(self, reason: str, exc: ConfigError, digest: str) -> str:
        log.error(
            "config reload refused; the previous config stays in force",
            extra={"reason": reason, "problems": exc.problems, "sha256": digest[:12]},
        )
        self._metrics.config_reloads.labels("invalid").inc()
        return "invalid"

    def _count(self, result: str, error: str | None) -> str:
        if error:
            log.error("config reload failed: %s", error)
        self._metrics.config_reloads.labels(result).inc()
        return result
