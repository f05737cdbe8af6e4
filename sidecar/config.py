"""The config file: a typed, validated, immutable schema and `load(path, env)`.

Rules: everything here is pure apart from reading the file and the `*_file` secrets it names.
A `Config` is frozen; reloading builds a whole new one and swaps a reference (see reload.py),
so a half-valid config is never in force. Every problem is reported with its key path, all at
once, so `check-config` can list them together.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import field
from typing import Annotated, Any, Final, Literal, TypeVar
from urllib.parse import urlsplit

import yaml

from sidecar.errors import ConfigError
from sidecar.schema import (
    After,
    Alias,
    Before,
    Dump,
    Ge,
    Gt,
    Invalid,
    Le,
    Len,
    Model,
    Pattern,
    check,
    dump,
    model,
    validate,
)

# --- scalar types --------------------------------------------------------------------------

_DURATION_RE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_DURATION_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
#: no timeout or period is meant to be longer (and inf is refused with it)
_MAX_DURATION: Final = 366 * 86400.0


def parse_duration(value: object) -> float:
    """'500ms' / '8s' / '2m' / '24h' → seconds. Bare numbers are refused: a unit is required
    so that nobody wonders whether `timeout: 30` means seconds or milliseconds."""
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
            if seconds <= _MAX_DURATION:
                return seconds
            raise ValueError(f"duration {value!r} is longer than a year")
    raise ValueError(f"invalid duration {value!r} (use a number and a unit: 500ms, 8s, 2m, 24h)")


def format_duration(seconds: float) -> str:
    if seconds and seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


_SIZE_RE: Final = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB)?\s*$")
_SIZE_UNITS: Final = {None: 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


def parse_size(value: object) -> int:
    """64KiB / 1MiB / 512 → bytes."""
    if isinstance(value, bool):
        raise ValueError(f"invalid size {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"invalid size {value!r} (must not be negative)")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            return int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    raise ValueError(f"invalid size {value!r} (use bytes or a unit: 512, 64KiB, 1MiB)")


def parse_positive_duration(value: object) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"duration {value!r} must be greater than zero")
    return seconds


Duration = Annotated[float, Before(parse_positive_duration), Dump(format_duration)]
Size = Annotated[int, Before(parse_size)]


class Secret:
    """A secret read from a file. Never shows its value in repr, str or serialisation."""

    __slots__ = ("_value", "path")

    def __init__(self, value: str, path: str) -> None:
        self._value = value
        self.path = path

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret(path={self.path!r}, value=<redacted>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


_MAX_SECRET: Final = 64 * 1024


def _read_secret(value: object) -> Secret:
    if isinstance(value, Secret):
        return value
    if not isinstance(value, str) or not value:
        raise ValueError("must be the path of a file holding the secret")
    try:
        # a regular file, read with a cap: a FIFO would block, /dev/zero never end
        st = os.stat(value)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"secret file {value!r} is not a regular file")
        with open(value, "rb") as f:
            raw = f.read(_MAX_SECRET + 1)
    except OSError as exc:
        raise ValueError(f"cannot read secret file {value!r}: {exc.strerror}") from None
    if len(raw) > _MAX_SECRET:
        raise ValueError(f"secret file {value!r} is larger than {_MAX_SECRET} bytes")
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        # say nothing of its bytes: they are the secret
        raise ValueError(f"secret file {value!r} is not UTF-8 text") from None
    if not text:
        raise ValueError(f"secret file {value!r} is empty")
    return Secret(text, value)


def _redacted(secret: Secret) -> str:
    return f"<redacted: {secret.path}>"


SecretFile = Annotated[Secret, Before(_read_secret), Dump(_redacted)]

_TOKEN_RE: Final = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")  # \Z: "$" allows a final \n


def _header_name(value: str) -> str:
    if not _TOKEN_RE.match(value):
        raise ValueError(f"invalid header name {value!r}")
    return value


HeaderName = Annotated[str, Before(lambda v: _header_name(v) if isinstance(v, str) else v)]


_BIND_HOST_RE: Final = re.compile(r"^[A-Za-z0-9._-]+\Z")


def parse_bind(value: str) -> tuple[str, int]:
    """'0.0.0.0:17006' / '[::1]:17006' / 'localhost:17006' → (host, port)."""
    host, sep, port_s = value.rpartition(":")
    if not sep or not host or not (port_s.isascii() and port_s.isdigit()):
        raise ValueError(f"invalid bind address {value!r} (expected host:port)")
    port = int(port_s)
    if not 0 <= port <= 65535:
        raise ValueError(f"invalid port in {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"invalid IPv6 address in bind address {value!r}") from None
    elif not _BIND_HOST_RE.match(host):
        # an IPv6 address must be bracketed; spaces and control characters are typos
        raise ValueError(f"invalid host in bind address {value!r} (IPv6 goes in brackets)")
    return host, port


def _bind(value: object) -> object:
    if isinstance(value, str):
        parse_bind(value)
    return value


Bind = Annotated[str, Before(_bind)]


_URL_UNSAFE_RE: Final = re.compile(r"[\x00-\x20\x7f]")


def _http_url(value: object) -> object:
    if isinstance(value, str):
        if _URL_UNSAFE_RE.search(value):
            # urlsplit silently drops tab/CR/LF, so they would pass here and reach the wire
            raise ValueError(f"invalid url {value!r} (contains whitespace or control characters)")
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"invalid url {value!r} (expected http://host[:port][/base])")
        try:
            _ = parts.port
        except ValueError:
            raise ValueError(f"invalid port in url {value!r}") from None
        if parts.query or parts.fragment:
            raise ValueError(f"url {value!r} must not carry a query or fragment")
    return value


HttpUrl = Annotated[str, Before(_http_url)]


# --- sections ------------------------------------------------------------------------------


@model
class NodeConfig(Model):
    #: the address peers and coordinators reach this sidecar at (Kubernetes: the pod IP)
    advertise_address: str = "127.0.0.1"


def _file_path(value: object) -> object:
    # existence and content are checked when the TLS context is built (start, reload), so
    # that a certificate swapped for a broken one is refused like any invalid config
    if isinstance(value, str) and (not value or "\x00" in value):
        raise ValueError("must be the path of a file")
    return value


FilePath = Annotated[str, Before(_file_path)]


@model
class ListenerTlsConfig(Model):
    """TLS terminated on a listener: TLS 1.2 and later only, the standard library's secure
    defaults; mutual TLS when `client_ca_file` is given. The files are re-read when they
    change (a renewed certificate is served to the next connection)."""

    cert_file: FilePath
    key_file: FilePath
    #: CA bundle that client certificates must chain to (mutual TLS)
    client_ca_file: FilePath | None = None
    #: default: true when client_ca_file is set (false: a certificate is verified if sent)
    require_client_cert: bool | None = None
    #: a client must complete its handshake within this (a slow handshake is a slowloris)
    handshake_timeout: Duration = 10.0

    @check
    def _client_ca(self) -> None:
        if self.require_client_cert and self.client_ca_file is None:
            raise ValueError(
                "require_client_cert needs client_ca_file (the CA client certificates must "
                "chain to)"
            )


@model
class OriginTlsConfig(Model):
    """TLS this process originates to an https:// URL: the CA to trust (default: the
    system's), an optional client certificate (mutual TLS), the name to verify."""

    ca_file: FilePath | None = None
    cert_file: FilePath | None = None
    key_file: FilePath | None = None
    #: the name sent as SNI and verified in the certificate (default: the URL's host)
    server_name: Annotated[str, Len(1, 253)] | None = None
    #: false turns certificate and name checks off (tests only: anyone can then pose as it)
    verify: bool = True

    @check
    def _pairs(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")


@model
class ListenerConfig(Model):
    bind: Bind
    #: TLS on this listener (absent: plain HTTP)
    tls: ListenerTlsConfig | None = None


@model
class HeaderLimits(Model):
    request_line: Size = 8 * 1024
    header_field: Size = 16 * 1024
    header_count: Annotated[int, Ge(1)] = 100
    #: total bytes of the request head (request line + all headers)
    header_bytes: Size = 64 * 1024


@model
class ProxyListenerTimeouts(Model):
    #: a client must finish sending its request head within this (slowloris)
    header_read: Duration = 10.0
    #: a request body that stalls this long is cut off
    body_idle: Duration = 30.0
    #: an idle keep-alive client connection is closed after this
    keepalive: Duration = 60.0


@model
class ClientLimits(Model):
    """What a proxy listener grants each client, so that slow or idle clients cannot take
    the capacity (connections, file descriptors, pooled upstream connections) others need."""

    #: open client connections on this listener; past it a new one gets 503 and is closed
    max_connections: Annotated[int, Ge(1)] = 10_000
    #: open connections from one client address (0: no cap of its own; behind a mesh proxy
    #: every client is 127.0.0.1, so only set it where clients connect directly)
    max_connections_per_client: Annotated[int, Ge(0)] = 0
    #: request-body bytes held before an upstream connection is taken: a body that fits is
    #: sent whole once it is in, so a slow client never holds a pooled connection for it;
    #: a larger one streams once this much has arrived
    request_buffer: Size = 64 * 1024
    #: the slowest a client may send a request body or read a response: at least this many
    #: bytes every `min_rate_window` while it has bytes to move (0: no rate, only
    #: `timeouts.body_idle` for bodies); slower is 408 (bodies) or a cut connection (reads)
    min_rate_bytes: Size = 1024
    min_rate_window: Duration = 5.0
    #: HTTP/2: streams one client connection may have open at once (SETTINGS)
    max_concurrent_streams: Annotated[int, Ge(1), Le(10_000)] = 100


@model
class ProxyListenerConfig(ListenerConfig):
    limits: HeaderLimits = HeaderLimits()
    timeouts: ProxyListenerTimeouts = ProxyListenerTimeouts()
    clients: ClientLimits = ClientLimits()


_DEFAULT_BINDS: Final = {
    "inbound": "0.0.0.0:17006",
    "outbound": "127.0.0.1:17001",
    "api": "127.0.0.1:17000",
    "peer": "0.0.0.0:17020",
    "admin": "0.0.0.0:17090",
}


@model
class ListenersConfig(Model):
    @classmethod
    def _before(cls, data: Mapping[Any, Any]) -> Mapping[Any, Any]:
        # a listener given in part (say, only its limits) keeps its default bind
        data = dict(data)
        for name, bind in _DEFAULT_BINDS.items():
            section = data.get(name)
            if isinstance(section, dict) and "bind" not in section:
                data[name] = {**section, "bind": bind}
        return data

    inbound: ProxyListenerConfig = ProxyListenerConfig(bind="0.0.0.0:17006")
    outbound: ProxyListenerConfig = ProxyListenerConfig(bind="127.0.0.1:17001")
    api: ListenerConfig = ListenerConfig(bind="127.0.0.1:17000")
    peer: ListenerConfig = ListenerConfig(bind="0.0.0.0:17020")
    admin: ListenerConfig = ListenerConfig(bind="0.0.0.0:17090")
    #: aiohttp's pure-Python parser mis-frames inputs its C parser refuses; start only with
    #: the C parsers unless this is explicitly turned off.
    require_c_parser: bool = True


@model
class UpstreamTimeouts(Model):
    connect: Duration = 1.0
    #: from the request head sent to the response head received
    response_header: Duration = 8.0
    #: the whole exchange, request start to response end
    total: Duration = 12.0


@model
class PoolConfig(Model):
    max_connections: Annotated[int, Ge(1)] = 100
    max_idle: Annotated[int, Ge(0)] = 100
    idle_timeout: Duration = 30.0
    #: requests allowed to wait for a connection; past it → 503 POOL_EXHAUSTED at once
    max_pending: Annotated[int, Ge(0)] = 1024


@model
class RetryConfig(Model):
    #: extra attempts for idempotent requests that cannot have reached the upstream
    attempts: Annotated[int, Ge(0), Le(10)] = 1
    #: retries in flight may be at most this share of requests in flight (min 3)
    budget_ratio: Annotated[float, Ge(0.0), Le(1.0)] = 0.2


@model
class ClusterConfig(Model):
    """A pool of one upstream host: the app behind the inbound listener, or a named upstream."""

    url: HttpUrl
    timeouts: UpstreamTimeouts = UpstreamTimeouts()
    pool: PoolConfig = PoolConfig()
    retries: RetryConfig = RetryConfig()
    #: bounds on this upstream's response heads (status line, field size and count, total),
    #: as the listeners' `limits` bound request heads; past them the answer is 502
    response_limits: HeaderLimits = HeaderLimits()
    #: TLS to an https:// url (absent: the system's CAs, the url's host)
    tls: OriginTlsConfig | None = None
    #: how to speak to it: HTTP/1.1 (keep-alive pool), or HTTP/2 (what a gRPC server speaks;
    #: multiplexed streams over pool.max_connections connections): h2c with prior knowledge on
    #: an http:// url, h2 through TLS (ALPN) on an https:// url
    protocol: Literal["http1", "h2c", "h2"] = "http1"

    @check
    def _timeouts_nest(self) -> None:
        t = self.timeouts
        problems = []
        if self.protocol == "h2c" and not self.url.startswith("http://"):
            problems.append("protocol h2c needs an http:// url (HTTP/2 without TLS)")
        if self.protocol == "h2" and not self.url.startswith("https://"):
            problems.append("protocol h2 needs an https:// url (HTTP/2 through TLS; h2c: without)")
        if self.tls is not None and not self.url.startswith("https://"):
            problems.append("tls applies to an https:// url only")
        if t.total <= t.response_header:
            problems.append(
                f"timeouts.total ({format_duration(t.total)}) must exceed "
                f"timeouts.response_header ({format_duration(t.response_header)})"
            )
        if t.total <= t.connect:
            problems.append(
                f"timeouts.total ({format_duration(t.total)}) must exceed "
                f"timeouts.connect ({format_duration(t.connect)})"
            )
        if self.pool.max_idle > self.pool.max_connections:
            problems.append("pool.max_idle must not exceed pool.max_connections")
        if problems:
            raise ValueError("; ".join(problems))


@model
class AppConfig(ClusterConfig):
    url: HttpUrl = "http://127.0.0.1:8080"
    #: routes on which the app receives the client's own Idempotency-Key (the inbound
    #: listener strips it everywhere else, and always on declared TCC/Saga tries)
    idempotency_key_routes: list[TransactionMatch] = field(default_factory=list)


def _unique_headers(v: list[str]) -> list[str]:
    # a header written twice is a repeated XID header, which receivers refuse
    if len({h.lower() for h in v}) != len(v):
        raise ValueError("names a header twice (header names are case-insensitive)")
    return v


def _header_list(v: list[str]) -> list[str]:
    if not v:
        raise ValueError("must name at least one header")
    return _unique_headers(v)


@model
class UpstreamConfig(ClusterConfig):
    #: header names the XID is written under for this upstream (None: xid.app_headers)
    xid_headers: Annotated[list[HeaderName], After(_unique_headers)] | None = None


#: a non-empty list of header names, none twice
HeaderList = Annotated[list[HeaderName], After(_header_list)]


@model
class XidConfig(Model):
    #: aliases accepted on incoming requests
    headers: HeaderList = field(default_factory=lambda: ["XID", "X-GTS-XID", "TX_XID"])
    #: names the app receives the XID under
    app_headers: HeaderList = field(default_factory=lambda: ["XID"])
    max_length: Annotated[int, Ge(8), Le(4096)] = 128


@model
class AccessLogConfig(Model):
    """One JSON line per proxied request (logger `sidecar.access`, at info)."""

    enabled: bool = False
    #: the share of requests logged (1.0: every one; 0.01: one in a hundred, at random)
    sample_ratio: Annotated[float, Gt(0.0), Le(1.0)] = 1.0


@model
class LoggingConfig(Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"
    access_log: AccessLogConfig = AccessLogConfig()


@model
class TracingConfig(Model):
    """Spans over OTLP/HTTP (protobuf). Without an endpoint no span is recorded, and the
    calls made for a transaction still carry its `traceparent`."""

    #: the collector: `http://HOST:4318` (its /v1/traces) or the full traces URL
    otlp_endpoint: HttpUrl | None = None
    #: the share of new traces recorded; a request that arrives with a traceparent keeps
    #: its caller's decision (the sampled flag)
    sample_ratio: Annotated[float, Ge(0.0), Le(1.0)] = 1.0


@model
class AdminConfig(Model):
    #: bearer token for /admin/* (metrics and health stay open)
    token_file: SecretFile | None = None


@model
class MetricsConfig(Model):
    enabled: bool = True


# --- coordinator, local coordinator, declarative transactions --------------------------------


KeyId = Annotated[str, Len(1, 64), Pattern(r"^[A-Za-z0-9._-]+$")]


@model
class SigningKey(Model):
    key_id: KeyId
    secret_file: SecretFile


@model
class SigningConfig(Model):
    """HMAC-SHA256 request signing (docs/signing.md). Without a key the sidecar makes up a random
    one at start: it then signs and verifies only its own calls (one pod, development)."""

    key_id: KeyId | None = None
    secret_file: SecretFile | None = None
    #: keys that still verify (not sign) during a rotation
    previous: list[SigningKey] = field(default_factory=list)
    #: accepted clock difference between signer and verifier, either way
    window: Duration = 300.0

    @check
    def _pairs(self) -> None:
        if (self.key_id is None) != (self.secret_file is None):
            raise ValueError("key_id and secret_file go together")
        ids = [k.key_id for k in self.previous] + ([self.key_id] if self.key_id else [])
        if len(set(ids)) != len(ids):
            raise ValueError("a key id appears twice (current and previous keys must differ)")


_JWT_ALGORITHMS: Final = frozenset(
    {"HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "EdDSA"}
)


def _allow_list(v: list[str]) -> list[str]:
    bad = [a for a in v if a not in _JWT_ALGORITHMS]
    if bad or not v:
        raise ValueError(
            f"unsupported algorithm(s) {bad or v}; choose from {sorted(_JWT_ALGORITHMS)}"
        )
    return v


@model
class AuthConfig(Model):
    """Bearer JWTs: fetched from `token_url` with the access key (client side), verified with
    `verify_key_file` when this process serves the protocol (coordinator side)."""

    token_url: HttpUrl | None = None
    access_key_file: SecretFile | None = None
    audience: str | None = None
    algorithms: Annotated[list[str], After(_allow_list)] = field(default_factory=lambda: ["HS256"])
    verify_key_file: SecretFile | None = None

    @check
    def _pairs(self) -> None:
        if (self.token_url is None) != (self.access_key_file is None):
            raise ValueError("token_url and access_key_file go together")


@model
class CoordinatorTimeouts(Model):
    connect: Duration = 1.0
    #: one call to the coordinator, connect included; must be below every transaction timeout
    request: Duration = 3.0


@model
class BreakerConfig(Model):
    #: consecutive failures that open the breaker
    failures: Annotated[int, Ge(1)] = 5
    #: how long it stays open before one probe is let through
    reset: Duration = 10.0


@model
class CoordinatorConfig(Model):
    #: the coordinator cluster (http://host:port of each node's peer listener); empty: this
    #: sidecar's local coordinator serves every transaction
    endpoints: list[HttpUrl] = field(default_factory=list)
    signing: SigningConfig = SigningConfig()
    auth: AuthConfig = AuthConfig()
    timeouts: CoordinatorTimeouts = CoordinatorTimeouts()
    breaker: BreakerConfig = BreakerConfig()
    #: TLS to https:// endpoints and peers (absent: the system's CAs)
    tls: OriginTlsConfig | None = None


@model
class PhaseTwoRetry(Model):
    initial: Duration = 1.0
    max: Duration = 60.0
    multiplier: Annotated[float, Ge(1.0), Le(10.0)] = 2.0
    #: +/- this share of each delay is random, so retries of many branches spread out
    jitter: Annotated[float, Ge(0.0), Le(1.0)] = 0.2
    #: attempts before a branch is marked stuck (it then waits for /admin retry or skip)
    max_attempts: Annotated[int, Ge(1)] = 20


def _journal_url(value: object) -> object:
    if isinstance(value, str) and value.startswith(("postgresql://", "postgres://")):
        return _postgresql_url(value)
    if isinstance(value, str) and not (
        value == "memory://" or (value.startswith("sqlite:///") and len(value) > 10)
    ):
        raise ValueError(
            f"invalid journal {value!r} (sqlite:///relative/path.db, "
            "sqlite:////absolute/path.db, postgresql://USER@HOST:PORT/DB for replicas of "
            "`gts-sidecar coordinator`, or memory:// for tests: not durable)"
        )
    return value


def _postgresql_url(value: str) -> str:
    """postgresql://USER@HOST[:PORT]/DB: the password never inline (password_file or
    libpq's PGPASSWORD / .pgpass), no query parameters (the sidecar sets the session's)."""
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"invalid PostgreSQL journal URL: {exc}") from None
    if parts.password is not None:
        # never echo the URL: it holds the password
        raise ValueError(
            "the PostgreSQL journal URL must not hold a password: put it in "
            "local_coordinator.password_file (or libpq's PGPASSWORD)"
        )
    database = parts.path.lstrip("/")
    if not parts.hostname or not parts.username or not database or "/" in database:
        raise ValueError(
            f"invalid journal {value!r}: expected postgresql://USER@HOST:PORT/DATABASE"
        )
    if parts.query or parts.fragment:
        raise ValueError(f"invalid journal {value!r}: no query parameters or fragment")
    if port == 0:
        raise ValueError(f"invalid journal {value!r}: port must be 1-65535")
    return value


@model
class LocalCoordinatorConfig(Model):
    journal: Annotated[str, Before(_journal_url)] = "sqlite:///var/journal.db"
    #: for begins that name no timeout
    default_timeout: Duration = 60.0
    max_timeout: Duration = 86400.0
    phase_two: PhaseTwoRetry = PhaseTwoRetry()
    #: finished transactions stay queryable this long, then are compacted away (with their
    #: lock and outbox rows; docs/operations.md sizes the volume from it)
    retention: Duration = 86400.0
    #: undelivered decisions for the cluster kept at most; past it a decision is answered
    #: 503 OUTBOX_FULL instead of growing the outbox without limit
    outbox_max_items: Annotated[int, Ge(1), Le(10_000_000)] = 10_000
    #: POSTed a JSON event when a branch is marked stuck
    alert_webhook: HttpUrl | None = None
    #: PostgreSQL journal only: its password (else libpq's PGPASSWORD or .pgpass)
    password_file: SecretFile | None = None
    #: PostgreSQL journal only: a replica that stops renewing its lease this long has its
    #: transactions taken over by another replica
    lease: Duration = 10.0
    #: PostgreSQL journal only: bound on every statement (and on connecting); at most half
    #: the lease, so a renewal that hangs fails while the lease still holds
    statement_timeout: Duration = 2.0
    #: PostgreSQL journal only: connections per replica
    pool_size: Annotated[int, Ge(2), Le(200)] = 10

    @property
    def replicated(self) -> bool:
        """The journal is a PostgreSQL database that replicas share."""
        return self.journal.startswith(("postgresql://", "postgres://"))

    def beside_journal(self, suffix: str) -> str | None:
        """The path of a small file kept next to the journal (fence, locks, outbox), or None
        when the journal is memory:// or PostgreSQL (then those live in memory)."""
        if self.journal == "memory://" or self.replicated:
            return None
        return self.journal[len("sqlite:///") :] + suffix

    @check
    def _bounds(self) -> None:
        if self.default_timeout > self.max_timeout:
            raise ValueError("default_timeout must not exceed max_timeout")
        if not 1.0 <= self.lease <= 600.0:
            raise ValueError("lease must be between 1s and 600s")
        if not 0.1 <= self.statement_timeout <= self.lease / 2:
            raise ValueError("statement_timeout must be between 100ms and half the lease")


_METHOD_RE: Final = re.compile(r"^[A-Z]+\Z")


def _method(v: str) -> str:
    if not _METHOD_RE.match(v):
        raise ValueError(f"invalid method {v!r} (upper-case, e.g. POST)")
    return v


Method = Annotated[str, After(_method)]


def _regex(v: str) -> str:
    try:
        re.compile(v)
    except re.error as exc:
        raise ValueError(f"invalid regex {v!r}: {exc}") from None
    return v


@model
class TransactionMatch(Model):
    method: Method | None = None
    #: exactly one of: path (exact), path_prefix, path_regex (full match)
    path: str | None = None
    path_prefix: str | None = None
    path_regex: Annotated[str, After(_regex)] | None = None

    @check
    def _one_path(self) -> None:
        given = [k for k in ("path", "path_prefix", "path_regex") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of path, path_prefix, path_regex")
        for key in ("path", "path_prefix"):
            value = getattr(self, key)
            if value is not None and not value.startswith("/"):
                raise ValueError(f"{key} must start with '/'")


def _cidrs(v: list[str]) -> list[str]:
    for net in v:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ValueError(f"invalid network {net!r} (CIDR, e.g. 10.0.0.0/8)") from None
    return v


@model
class DegradedConfig(Model):
    """When the coordinator cluster is unreachable (README, "Degraded mode")."""

    #: a branch registration for a cluster-owned XID while the cluster is unreachable:
    #: reject (503 COORDINATOR_UNAVAILABLE + Retry-After; the try is not forwarded, so the
    #: initiator rolls back). The only policy that cannot split one transaction's outcome.
    remote_xid_policy: Literal["reject"] = "reject"
    #: while the cluster is down, XIDs owned by addresses in these networks (on the peer
    #: port) are routed to that owner (a peer sidecar coordinating in degraded mode);
    #: anything else is never called, so a forged XID cannot aim signed calls at arbitrary
    #: hosts. Empty by default: set the pod CIDR (Kubernetes) to let peers coordinate.
    peer_networks: Annotated[list[str], After(_cidrs)] = field(default_factory=list)
    #: clients of peer sidecars kept (least recently used dropped past it)
    max_peers: Annotated[int, Ge(1), Le(100_000)] = 64


@model
class TransactionRule(Model):
    match: TransactionMatch
    name: Annotated[str, Len(1, 128)]
    timeout: Duration = 60.0


def _endpoint_path(v: str) -> str:
    if not v.startswith("/") or any(c in v for c in " ?#\r\n"):
        raise ValueError(f"invalid path {v!r} (starts with '/', no query)")
    return v


@model
class Endpoint(Model):
    """One route of the app: an exact method and path."""

    method: Method
    path: Annotated[str, After(_endpoint_path)]


_NOT_FOR_PHASE_TWO: Final = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "te",
     "trailer", "upgrade", "proxy-connection", "expect"}
)  # fmt: skip


@model
class PhaseTwoHeader(Model):
    """A header sent with confirm/cancel/compensation calls, its value from a secret file
    (the try's own Authorization is never replayed: it may have expired by then)."""

    name: HeaderName
    value_file: SecretFile

    @check
    def _safe(self) -> None:
        if self.name.lower() in _NOT_FOR_PHASE_TWO:
            raise ValueError(f"{self.name!r} is set by the sidecar itself (framing, hop)")
        if any(c in self.value_file.reveal() for c in "\r\n\x00"):
            raise ValueError("the value must be one line (no CR, LF or NUL)")


#: request headers never kept from phase one for phase two (forward_headers)
_CREDENTIAL_HEADERS: Final = frozenset({"authorization", "cookie", "proxy-authorization"})

_RESOURCE_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")


def _resource(v: str) -> str:
    if not _RESOURCE_RE.match(v):
        raise ValueError(f"invalid resource {v!r} (1-128 letters, digits, '.', '_' or '-')")
    return v


def _no_credentials(v: list[str]) -> list[str]:
    # a credential kept from phase one is replayed on every confirm/cancel retry, long
    # after it may have expired: each retry then fails and the branch never settles
    refused = [h for h in v if h.lower() in _CREDENTIAL_HEADERS]
    if refused:
        raise ValueError(
            f"{refused} carry credentials, which phase two must not replay (they may have "
            "expired by then); authenticate phase two with phase_two_headers (a fixed "
            "header whose value comes from a secret file)"
        )
    return v


@model
class _BranchResource(Model):
    resource: Annotated[str, After(_resource)]
    #: request headers of phase one kept for phase two (an allowlist)
    forward_headers: Annotated[list[HeaderName], After(_no_credentials)] = field(
        default_factory=list
    )
    phase_two_headers: list[PhaseTwoHeader] = field(default_factory=list)
    #: the phase-one body, query and headers are journalled up to this size (past it: 413)
    max_application_data: Size = 64 * 1024


@model
class TccResource(_BranchResource):
    try_: Annotated[Endpoint, Alias("try")]
    confirm: Endpoint
    cancel: Endpoint


@model
class SagaResource(_BranchResource):
    action: Endpoint
    compensation: Endpoint


def check_store(value: str) -> str:
    """`memory` or a redis:// / rediss:// URL naming host, optional port and db."""
    if value == "memory":
        return value
    if _URL_UNSAFE_RE.search(value):
        raise ValueError(f"invalid {value!r} (contains whitespace or control characters)")
    parts = urlsplit(value)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ValueError(f"invalid {value!r} (memory, or redis://host[:port][/db])")
    if parts.username is not None or parts.password is not None:
        raise ValueError("put the Redis password in password_file, not in the URL")
    try:
        _ = parts.port
    except ValueError:
        raise ValueError(f"invalid port in {value!r}") from None
    db = parts.path.lstrip("/")
    if parts.path not in ("", "/") and not (db.isascii() and db.isdigit() and len(db) <= 5):
        raise ValueError(f"invalid db in {value!r} (a number: redis://host:6379/0)")
    if parts.query or parts.fragment:
        raise ValueError(f"{value!r} must not carry a query or fragment")
    return value


def _lock_backend(v: str) -> str:
    return v if v in ("journal", "coordinator") else check_store(v)


@model
class IdempotencyConfig(Model):
    """Where `Idempotency-Key`s (TM API, declarative begins) and the replay cache of signed
    requests live: this process (`memory`), or a Redis shared by a service's replicas."""

    #: memory, or redis://host[:port][/db] (rediss:// for TLS); no password in the URL
    store: Annotated[str, After(check_store)] = "memory"
    #: the Redis AUTH password, from a secret file
    password_file: SecretFile | None = None
    #: how long a key is remembered
    ttl: Duration = 86400.0


@model
class LocksConfig(Model):
    """Global locks (`POST /v1/locks`, seed §3.3): per resource key, held by XIDs."""

    #: journal (SQLite beside local_coordinator.journal: one replica, survives restarts),
    #: memory (this process only: lost on restart), redis://host[:port][/db] (rediss://
    #: for TLS), shared by every replica, or coordinator (the coordinator cluster's, shared
    #: by its replicas on PostgreSQL and released with each transaction's end)
    backend: Annotated[str, After(_lock_backend)] = "journal"
    #: the Redis AUTH password, from a secret file
    password_file: SecretFile | None = None


_UPSTREAM_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")


def _upstream_names(v: dict[str, UpstreamConfig]) -> dict[str, UpstreamConfig]:
    for name in v:
        if not _UPSTREAM_NAME_RE.match(name):
            raise ValueError(
                f"upstream name {name!r} must be 1-63 letters, digits, '.', '_' or '-' "
                "(it is used as a path prefix and a Host name)"
            )
    return v


@model
class Config(Model):
    node: NodeConfig = NodeConfig()
    listeners: ListenersConfig = ListenersConfig()
    app: AppConfig = AppConfig()
    xid: XidConfig = XidConfig()
    upstreams: Annotated[dict[str, UpstreamConfig], After(_upstream_names)] = field(
        default_factory=dict
    )
    admin: AdminConfig = AdminConfig()
    metrics: MetricsConfig = MetricsConfig()
    logging: LoggingConfig = LoggingConfig()
    tracing: TracingConfig = TracingConfig()
    drain_timeout: Duration = 20.0
    coordinator: CoordinatorConfig = CoordinatorConfig()
    local_coordinator: LocalCoordinatorConfig = LocalCoordinatorConfig()
    transactions: list[TransactionRule] = field(default_factory=list)
    degraded: DegradedConfig = DegradedConfig()
    tcc: list[TccResource] = field(default_factory=list)
    saga: list[SagaResource] = field(default_factory=list)
    idempotency: IdempotencyConfig = IdempotencyConfig()
    locks: LocksConfig = LocksConfig()

    @check
    def _coordinator_locks(self) -> None:
        if self.locks.backend == "coordinator" and not self.coordinator.endpoints:
            raise ValueError(
                "locks.backend: coordinator keeps the locks in the coordinator cluster, "
                "which needs coordinator.endpoints"
            )

    @check
    def _resources_unique(self) -> None:
        names = [r.resource for r in self.tcc] + [r.resource for r in self.saga]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"tcc/saga: resource name(s) {dupes} declared twice")

    @check
    def _timeouts_below_transactions(self) -> None:
        """The seed's trap: a call that outlives the transaction it serves leaves it
        "committed, response lost". Everything a transaction waits on must give up first."""
        problems = []
        budgets = [
            (f"transactions[{i}].timeout", r.timeout) for i, r in enumerate(self.transactions)
        ]
        budgets.append(
            ("local_coordinator.default_timeout", self.local_coordinator.default_timeout)
        )
        waits = [("coordinator.timeouts.request", self.coordinator.timeouts.request)]
        for i, rule in enumerate(self.transactions):
            where = f"transactions[{i}].timeout"
            if self.app.timeouts.total >= rule.timeout:
                problems.append(
                    f"{where} ({format_duration(rule.timeout)}) must exceed app.timeouts.total "
                    f"({format_duration(self.app.timeouts.total)}): the app's answer decides it"
                )
            for name, up in self.upstreams.items():
                if up.timeouts.total >= rule.timeout:
                    problems.append(
                        f"upstreams.{name}.timeouts.total ({format_duration(up.timeouts.total)}) "
                        f"must be below {where} ({format_duration(rule.timeout)}): calls made "
                        "inside the transaction must give up before it does"
                    )
        for budget_key, budget in budgets:
            for wait_key, wait in waits:
                if wait >= budget:
                    problems.append(
                        f"{wait_key} ({format_duration(wait)}) must be below {budget_key} "
                        f"({format_duration(budget)})"
                    )
        if problems:
            raise ValueError("; ".join(problems))

    def redacted(self) -> dict[str, Any]:
        """The effective config as plain data with every secret replaced by its file path."""
        return dump(self)


# --- loading -------------------------------------------------------------------------------

_ENV_RE: Final = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


#: more values than any real config has: a YAML alias bomb expands past it at once
_MAX_NODES: Final = 100_000


class _TooLarge(Exception):
    pass


def _substitute(
    node: Any,
    env: Mapping[str, str],
    path: str,
    problems: list[str],
    budget: list[int] | None = None,
) -> Any:
    """Replace ${VAR} and ${VAR:-default} in string scalars (not in the raw text, so that a
    value can never inject YAML structure). Counts the values it visits against a budget."""
    if budget is None:
        budget = [_MAX_NODES]
    budget[0] -= 1
    if budget[0] < 0:
        raise _TooLarge()
    if isinstance(node, str):

        def repl(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            # ${VAR:-default} as in the shell: the default also replaces an empty value
            if env.get(name):
                return env[name]
            if default is not None:
                return default
            if name in env:
                return ""
            problems.append(f"{path or '<root>'}: environment variable {name} is not set")
            return ""

        return _ENV_RE.sub(repl, node)
    if isinstance(node, dict):
        return {
            k: _substitute(v, env, f"{path}.{k}" if path else str(k), problems, budget)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_substitute(v, env, f"{path}[{i}]", problems, budget) for i, v in enumerate(node)]
    return node


def parse(data: Any, env: Mapping[str, str] | None = None) -> Config:
    """Validate already-parsed YAML data into a Config, or raise ConfigError with every
    problem and its key path."""
    return parse_as(Config, data, env)


_M = TypeVar("_M", bound=Model)


def parse_as(cls: type[_M], data: Any, env: Mapping[str, str] | None = None) -> _M:
    """`parse` for any schema built like Config (the injector's config uses it too)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(["<root>: the config file must be a mapping of sections"])
    problems: list[str] = []
    try:
        data = _substitute(data, os.environ if env is None else env, "", problems)
    except _TooLarge:
        raise ConfigError(
            [f"<root>: more than {_MAX_NODES} values (YAML aliases expanding?): refused"]
        ) from None
    except RecursionError:
        raise ConfigError(["<root>: nested too deeply"]) from None
    try:
        config = validate(cls, data)
    except Invalid as exc:
        problems.extend(exc.problems)
    except (RecursionError, TypeError, ValueError) as exc:
        problems.append(f"<root>: not a usable config: {type(exc).__name__}")
    if problems:
        raise ConfigError(problems)
    return config


class _DuplicateKey(Exception):
    pass


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping: PyYAML would keep the last
    one silently, so a pasted section could override another without a word."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                mark = key_node.start_mark
                raise _DuplicateKey(
                    f"<file>: key {key!r} appears twice in one mapping "
                    f"(line {seen[key]} and line {mark.line + 1})"
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


#: a ConfigMap holds at most 1 MiB; a config file has no reason to be larger
_MAX_FILE: Final = 1024 * 1024


def load(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read, substitute and validate one config file."""
    return parse(read_yaml(path), env)


def read_yaml(path: str | os.PathLike[str]) -> Any:
    """One config file's YAML, read with a size cap and a loader that refuses duplicate keys;
    ConfigError when it cannot be read or parsed."""
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_FILE + 1)  # never more: a sparse or endless file is refused
        if len(raw) > _MAX_FILE:
            raise ConfigError([f"<file>: {str(path)!r} is larger than {_MAX_FILE} bytes"])
        text = raw.decode("utf-8")
    except OSError as exc:
        raise ConfigError([f"<file>: cannot read {str(path)!r}: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"<file>: {str(path)!r} is not UTF-8 (byte {exc.start})"]) from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as exc:
        raise ConfigError([str(exc)]) from None
    except (RecursionError, TypeError, ValueError) as exc:
        # nesting too deep, unhashable (list/map) keys, absurd numbers: not a config
        raise ConfigError([f"<file>: not a usable config: {type(exc).__name__}"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"<file>: invalid YAML{where}: {problem}"]) from None
    return data
