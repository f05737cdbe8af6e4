"""TLS: contexts for the listeners that terminate it and for the connections that originate
it, built from config; handshake failures counted by listener and reason.

Rules: TLS 1.2 and later only, on the standard library's secure defaults
(`ssl.create_default_context`), ALPN from constants (h2 and http/1.1 on the proxy
listeners, http/1.1 elsewhere). A listener's server gets one *base*
context for its whole life; its `sni_callback` (called for every ClientHello, with or without
SNI) moves each new connection onto the context in force now, so a renewed certificate, key
or client CA is served to the next connection while open ones keep theirs. A whole set of
contexts is built (and can fail) before any is swapped in: a bad new pair leaves the old one.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

from aiohttp import web

from sidecar.config import Config, ListenerTlsConfig, OriginTlsConfig
from sidecar.errors import ConfigError
from sidecar.files import StatKey, stat_key
from sidecar.tls_cert import pem_validity

log = logging.getLogger("sidecar.tls")

#: protocols a control-plane listener (aiohttp: HTTP/1.1 only) and an origination offer
ALPN_PROTOCOLS: Final = ("http/1.1",)
#: the proxy listeners speak HTTP/2 beside HTTP/1.1 on one port: a client that picks h2 by
#: ALPN then opens with the HTTP/2 preface, as it would in cleartext with prior knowledge
PROXY_ALPN_PROTOCOLS: Final = ("h2", "http/1.1")
PROXY_LISTENERS: Final = ("inbound", "outbound")
MINIMUM_VERSION: Final = ssl.TLSVersion.TLSv1_2
LISTENERS: Final = ("inbound", "outbound", "api", "peer", "admin")


class TlsConfigError(Exception):
    """A certificate, key or CA file that cannot be used; the message names the file."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


_T = TypeVar("_T")


def _load(action: Callable[[], _T], what: str, path: str | None) -> _T:
    try:
        return action()
    except FileNotFoundError:
        raise TlsConfigError(f"{what} {path!r} does not exist") from None
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if reason == "KEY_VALUES_MISMATCH":
            raise TlsConfigError(f"key_file does not belong to cert_file {path!r}") from None
        raise TlsConfigError(f"{what} {path!r} is not usable ({reason})") from None
    except OSError as exc:
        raise TlsConfigError(f"cannot read {what} {path!r}: {exc.strerror or exc}") from None


def certificate_expiry(path: str, now: datetime | None = None) -> datetime:
    """When the (leaf) certificate in `path` expires; TlsConfigError when it is not valid
    now: an expired (or not yet valid) certificate would fail every handshake, so it is
    refused like a broken one (at start, and as a rotated file: the old one stays)."""
    try:
        with open(path, "rb") as f:
            pem = f.read(4 * 1024 * 1024)
    except OSError as exc:
        raise TlsConfigError(f"cannot read cert_file {path!r}: {exc.strerror or exc}") from None
    try:
        not_before, not_after = pem_validity(pem)
    except ValueError as exc:
        raise TlsConfigError(f"cert_file {path!r} is not usable ({exc})") from None
    now = now or datetime.now(UTC)
    if not_after <= now:
        raise TlsConfigError(f"cert_file {path!r} expired on {not_after:%Y-%m-%d %H:%M:%S} UTC")
    if not_before > now:
        raise TlsConfigError(
            f"cert_file {path!r} is not valid before {not_before:%Y-%m-%d %H:%M:%S} UTC"
        )
    return not_after


def alpn_for(listener: str) -> tuple[str, ...]:
    return PROXY_ALPN_PROTOCOLS if listener in PROXY_LISTENERS else ALPN_PROTOCOLS


def server_context(
    cfg: ListenerTlsConfig, alpn: tuple[str, ...] = ALPN_PROTOCOLS
) -> ssl.SSLContext:
    """A fresh context for a listener: its certificate, and client verification for mTLS."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = MINIMUM_VERSION
    ctx.set_alpn_protocols(list(alpn))
    _load(lambda: ctx.load_cert_chain(cfg.cert_file, cfg.key_file), "cert_file", cfg.cert_file)
    certificate_expiry(cfg.cert_file)
    if cfg.client_ca_file is not None:
        ca = cfg.client_ca_file
        _load(lambda: ctx.load_verify_locations(cafile=ca), "client_ca_file", ca)
        required = cfg.require_client_cert is not False
        ctx.verify_mode = ssl.CERT_REQUIRED if required else ssl.CERT_OPTIONAL
    return ctx


#: what an upstream declared `protocol: h2` is offered: HTTP/2 only
H2_ALPN_PROTOCOLS: Final = ("h2",)


def client_context(
    cfg: OriginTlsConfig | None, alpn: tuple[str, ...] = ALPN_PROTOCOLS
) -> ssl.SSLContext:
    """A fresh context for https:// origination: CA (default: the system's), client
    certificate, verification."""
    if cfg is not None and cfg.ca_file is not None:
        # ca_file replaces the system's CAs: they are not loaded at all, so a certificate
        # from a public CA is not trusted here (and the bundle's ~1.3 MiB is not parsed)
        ca = cfg.ca_file
        ctx = _load(lambda: ssl.create_default_context(cafile=ca), "ca_file", ca)
    else:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = MINIMUM_VERSION
    ctx.set_alpn_protocols(list(alpn))
    if cfg is None:
        return ctx
    if cfg.cert_file is not None and cfg.key_file is not None:
        cert, key = cfg.cert_file, cfg.key_file
        _load(lambda: ctx.load_cert_chain(cert, key), "cert_file", cert)
        certificate_expiry(cert)
    if not cfg.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


# --- handshake failures --------------------------------------------------------------------

#: OpenSSL reasons → a bounded label value
_REASONS: Final = {
    "HTTP_REQUEST": "plaintext",
    "WRONG_VERSION_NUMBER": "plaintext",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no_client_cert",
    "CERTIFICATE_VERIFY_FAILED": "client_cert_rejected",
    "UNSUPPORTED_PROTOCOL": "protocol_version",
    "VERSION_TOO_LOW": "protocol_version",
    "TLSV1_ALERT_PROTOCOL_VERSION": "protocol_version",
    "NO_SHARED_CIPHER": "no_shared_cipher",
    "NO_APPLICATION_PROTOCOL": "alpn",
}


def failure_reason(exc: ssl.SSLError) -> str:
    """A handshake error as one of a few label values (never the peer's own words)."""
    reason = exc.reason or ""
    if reason in _REASONS:
        return _REASONS[reason]
    if reason.startswith(("TLSV1_ALERT_", "SSLV3_ALERT_", "TLSV13_ALERT_")):
        return "peer_alert"  # the client refused us (e.g. our certificate is not trusted)
    return "other"


def _counting_sslobject(count: Callable[[str], None]) -> type[ssl.SSLObject]:
    """An SSLObject class that reports how its server-side handshake failed: a refused
    handshake by its OpenSSL reason, and one that never finished (the handshake timeout, or
    the client gone mid-handshake) when the object is dropped unfinished."""

    class CountingSSLObject(ssl.SSLObject):
        _tls_state = "new"

        def do_handshake(self) -> None:
            if self._tls_state == "new":
                self._tls_state = "started"
            try:
                super().do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise
            except ssl.SSLError as exc:
                self._tls_state = "counted"
                count(failure_reason(exc))
                raise
            self._tls_state = "done"

        def __del__(self) -> None:
            if self._tls_state == "started":
                count("incomplete")

    return CountingSSLObject


class ListenerTls:
    """The TLS side of one listener: the base context handed to its server once, and the
    context (certificate, key, client CA) new connections get now."""

    def __init__(
        self, name: str, cfg: ListenerTlsConfig, current: ssl.SSLContext, failures: Any
    ) -> None:
        self.name = name
        self.cfg = cfg
        self.current = current
        # the base context's own certificate is never served (each connection moves to
        # `current` before the server's first flight), but the server needs a whole one
        self.base = server_context(cfg, alpn_for(name))
        self.base.sni_callback = self._pick
        children: dict[str, Any] = {}

        def count(reason: str) -> None:
            child = children.get(reason)
            if child is None:
                child = children[reason] = failures.labels(name, reason)
            child.inc()

        self.base.sslobject_class = _counting_sslobject(count)

    def _pick(self, sslobj: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        sslobj.context = self.current

    @property
    def handshake_timeout(self) -> float:
        return self.cfg.handshake_timeout


# --- a whole set, built from one config ----------------------------------------------------


@dataclass
class TlsSet:
    """Every context one config asks for: per TLS listener (the context to serve now), per
    cluster that originates TLS (key 'app', 'upstream:NAME'), and for the coordinator."""

    servers: dict[str, ssl.SSLContext] = field(default_factory=dict)
    clients: dict[str, ssl.SSLContext] = field(default_factory=dict)
    coordinator: ssl.SSLContext | None = None
    #: sha256 over every certificate, key and CA file read (tells a rotation from no change)
    fingerprint: str = ""
    #: when each certificate this process presents expires (seconds since the epoch), by
    #: 'listener:NAME', 'app', 'upstream:NAME', 'coordinator'
    expiry: dict[str, float] = field(default_factory=dict)


def tls_files(config: Config) -> Iterator[tuple[str, str]]:
    """(key path, file path) of every certificate, key and CA file in `config`."""
    for name in LISTENERS:
        tls = getattr(config.listeners, name).tls
        if tls is not None:
            for key in ("cert_file", "key_file", "client_ca_file"):
                if (path := getattr(tls, key)) is not None:
                    yield f"listeners.{name}.tls.{key}", path
    origins: list[tuple[str, OriginTlsConfig | None]] = [
        ("app.tls", config.app.tls),
        ("coordinator.tls", config.coordinator.tls),
        *((f"upstreams.{n}.tls", u.tls) for n, u in config.upstreams.items()),
    ]
    for where, origin in origins:
        if origin is not None:
            for key in ("ca_file", "cert_file", "key_file"):
                if (path := getattr(origin, key)) is not None:
                    yield f"{where}.{key}", path


def fingerprint(config: Config) -> str:
    """sha256 over every certificate, key and CA file `config` names (tells a rotation)."""
    digest = hashlib.sha256()
    for _, path in tls_files(config):
        digest.update(path.encode("utf-8", "surrogateescape") + b"\0")
        try:
            with open(path, "rb") as f:
                digest.update(hashlib.sha256(f.read(4 * 1024 * 1024)).digest())
        except OSError as exc:
            digest.update(f"unreadable {exc.errno}".encode())
    return digest.hexdigest()


def build(config: Config) -> TlsSet:
    """Every context `config` asks for, or TlsConfigError naming each key path that fails.
    Files are read twice over if they change while being read (a Secret's symlink swap
    between the certificate and the key would otherwise pair an old one with a new one)."""
    for _ in range(3):
        before = fingerprint(config)
        built = _build_once(config)
        built.fingerprint = fingerprint(config)
        if built.fingerprint == before:
            return built
    return built


def _build_once(config: Config) -> TlsSet:
    out = TlsSet()
    problems: list[str] = []
    # origins asking for the same context share one: each context made without a ca_file
    # parses the system's CA bundle (~1.3 MiB), and nothing changes a context once built
    shared: dict[tuple[object, ...], ssl.SSLContext] = {}

    def client(origin: OriginTlsConfig | None, alpn: tuple[str, ...]) -> ssl.SSLContext:
        key: tuple[object, ...] = (alpn, None, None, None, True)  # no tls: the defaults
        if origin is not None:
            key = (alpn, origin.ca_file, origin.cert_file, origin.key_file, origin.verify)
        if key not in shared:
            shared[key] = client_context(origin, alpn)
        return shared[key]

    for name in LISTENERS:
        tls = getattr(config.listeners, name).tls
        if tls is not None:
            try:
                out.servers[name] = server_context(tls, alpn_for(name))
                out.expiry[f"listener:{name}"] = certificate_expiry(tls.cert_file).timestamp()
            except TlsConfigError as exc:
                problems.append(f"listeners.{name}.tls: {exc.message}")
    clusters: list[tuple[str, str, str, OriginTlsConfig | None, str]] = [
        ("app", "app.tls", config.app.url, config.app.tls, config.app.protocol),
        *(
            (f"upstream:{n}", f"upstreams.{n}.tls", u.url, u.tls, u.protocol)
            for n, u in config.upstreams.items()
        ),
    ]
    for key, where, url, origin, protocol in clusters:
        if url.startswith("https://"):
            alpn = H2_ALPN_PROTOCOLS if protocol == "h2" else ALPN_PROTOCOLS
            try:
                out.clients[key] = client(origin, alpn)
                if origin is not None and origin.cert_file is not None:
                    out.expiry[key] = certificate_expiry(origin.cert_file).timestamp()
            except TlsConfigError as exc:
                problems.append(f"{where}: {exc.message}")
    origin = config.coordinator.tls
    try:
        out.coordinator = client(origin, ALPN_PROTOCOLS)
        if origin is not None and origin.cert_file is not None:
            out.expiry["coordinator"] = certificate_expiry(origin.cert_file).timestamp()
    except TlsConfigError as exc:
        problems.append(f"coordinator.tls: {exc.message}")
    if problems:
        raise TlsConfigError("; ".join(problems))
    return out


# --- aiohttp ------------------------------------------------------------------------------


class TlsSite(web.TCPSite):
    """aiohttp's TCPSite with a TLS handshake timeout (TCPSite leaves asyncio's 60 s): the
    control-plane listeners get the same slowloris bound as the proxy listeners."""

    __slots__ = ("_handshake_timeout",)

    def __init__(self, *args: Any, handshake_timeout: float | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._handshake_timeout = handshake_timeout

    async def start(self) -> None:
        if self._ssl_context is None or self._handshake_timeout is None:
            await super().start()
            return
        # TCPSite.start with the timeout added (its attributes, as of aiohttp 3.10-3.14)
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            server,
            self._host,
            self._port,
            ssl=self._ssl_context,
            ssl_handshake_timeout=self._handshake_timeout,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
        if self._server.sockets:
            self._bound_port = self._server.sockets[0].getsockname()[1]
        else:
            self._bound_port = self._port


def check(config: Config) -> TlsSet:
    """Every context `config` asks for, or ConfigError with each failing key path (what
    `check-config` and a start add to loading: the files are read and used)."""
    try:
        return build(config)
    except TlsConfigError as exc:
        raise ConfigError(exc.message.split("; ")) from None


# --- rotation where the config itself does not reload ---------------------------------------


class TlsFileWatcher:
    """Re-reads the certificate, key and CA files of a fixed config when they change (the
    standalone coordinator, whose config does not reload): the listeners' contexts and the
    origination context are swapped for new connections; a bad new set is refused, logged
    and counted, and the old one stays. (The sidecar gets the same through its config
    watcher, which watches these files with every other one the config names.)"""

    def __init__(
        self,
        config: Config,
        listeners: dict[str, ListenerTls],
        on_origin: Callable[[ssl.SSLContext | None], None],
        reloads: Any,
        current: TlsSet,
        interval: float = 1.0,
        expiry: Any = None,
    ) -> None:
        self.config = config
        self.expiry = expiry
        self.listeners = listeners
        self.on_origin = on_origin
        self.reloads = reloads
        self.current = current
        self.interval = interval
        self._stat = self._stat_key()
        self._task: asyncio.Task[None] | None = None

    def _stat_key(self) -> tuple[StatKey, ...]:
        return tuple(stat_key(path) for _, path in tls_files(self.config))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._poll(), name="tls-watcher")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            key = self._stat_key()
            if key != self._stat:
                self._stat = key
                self.reload()

    def reload(self) -> str:
        try:
            fresh = build(self.config)
        except TlsConfigError as exc:
            log.error("TLS files refused; the previous ones stay", extra={"problems": exc.message})
            self.reloads.labels("invalid").inc()
            return "invalid"
        if fresh.fingerprint == self.current.fingerprint:
            return "unchanged"
        for name, listener in self.listeners.items():
            listener.current = fresh.servers[name]
        self.on_origin(fresh.coordinator)
        if self.expiry is not None:
            publish_expiry(self.expiry, self.current, fresh)
        self.current = fresh
        log.info("TLS certificates and keys reloaded")
        self.reloads.labels("applied").inc()
        return "applied"


def publish_expiry(gauge: Any, old: TlsSet | None, new: TlsSet) -> None:
    """Set the expiry gauge to `new`'s certificates (names no longer present removed)."""
    for name in set(old.expiry if old else ()) - set(new.expiry):
        gauge.remove(name)
    for name, when in new.expiry.items():
        gauge.labels(name).set(when)
