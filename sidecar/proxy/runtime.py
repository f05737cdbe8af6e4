"""A proxy listener's runtime: what it needs from config, compiled once per config version.

A plain class with its __init__ written out, not a dataclass: its annotations name types
imported for the type checker only, which a dataclass compiled by mypyc (setup.py) would
need at run time, and the request path calls its methods (stats) on every request.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from sidecar.config import ClientLimits, HeaderLimits, ProxyListenerTimeouts
from sidecar.proxy.limits import ClientPolicy, HeadLimits, ListenerTimeouts

if TYPE_CHECKING:
    from sidecar.coordinator.client import Coordinator
    from sidecar.metrics import Metrics
    from sidecar.proxy.route import Router
    from sidecar.request_stats import RequestStats
    from sidecar.txn.branches import Participant
    from sidecar.txn.repeats import Repeats
    from sidecar.xid import Xid


class ListenerRuntime:
    """Everything a listener needs that comes from config, compiled once per config version.
    A request keeps the runtime it began with, so a reload never changes it mid-flight."""

    name: str
    router: Router
    classifier: dict[bytes, int]
    xid_max_length: int
    #: (config's models, copied to plain attributes: the request path reads them)
    limits: HeadLimits
    timeouts: ListenerTimeouts
    metrics: Metrics
    clients: ClientPolicy
    #: where declarative transactions begin and end (None: no rules, or no coordinator)
    coordinator: Coordinator | None
    #: the fence and phase-two caller of declared TCC/Saga resources
    participant: Participant | None
    #: http://advertised-address:peer-port/v1/resources: branches' callback URLs start here
    callback_base: str
    #: the XID header names accepted, for error messages
    xid_aliases: tuple[str, ...]
    #: told the XID of each declarative transaction seen finish (releases its global locks)
    on_finished: Callable[[str], None] | None
    #: records of declared-route requests with an Idempotency-Key (a repeat never runs twice)
    repeats: Repeats | None
    #: XID → deadline of the transactions this process knows (calls made for one are
    #: clamped to it): the coordinator clients' own tables, read without a call
    deadline_tables: tuple[Mapping[str, float], ...]
    #: recently validated XIDs (a transaction's XID recurs on every call it makes)
    xid_cache: dict[bytes, Xid]

    def __init__(
        self,
        *,
        name: str,
        router: Router,
        classifier: dict[bytes, int],
        xid_max_length: int,
        limits: HeaderLimits,
        timeouts: ProxyListenerTimeouts,
        metrics: Metrics,
        clients: ClientLimits | None = None,
        coordinator: Coordinator | None = None,
        participant: Participant | None = None,
        callback_base: str = "",
        xid_aliases: tuple[str, ...] = (),
        on_finished: Callable[[str], None] | None = None,
        repeats: Repeats | None = None,
        deadline_tables: tuple[Mapping[str, float], ...] = (),
    ) -> None:
        self.name = name
        self.router = router
        self.classifier = classifier
        self.xid_max_length = xid_max_length
        self.limits = HeadLimits(limits)
        self.timeouts = ListenerTimeouts(timeouts)
        self.metrics = metrics
        self.clients = ClientPolicy(clients if clients is not None else ClientLimits())
        self.coordinator = coordinator
        self.participant = participant
        self.callback_base = callback_base
        self.xid_aliases = xid_aliases
        self.on_finished = on_finished
        self.repeats = repeats
        self.deadline_tables = deadline_tables
        self.xid_cache = {}
        self._stats: dict[str, RequestStats] = {}
        self._timeouts: dict[tuple[str, str], Any] = {}
        self._xid_rejects: dict[str, Any] = {}

    def stats(self, upstream: str) -> RequestStats:
        st = self._stats.get(upstream)
        if st is None:
            st = self._stats[upstream] = self.metrics.proxy.stats(self.name, upstream)
        return st

    def count_timeout(self, upstream: str, kind: str) -> None:
        key = (upstream, kind)
        child = self._timeouts.get(key)
        if child is None:
            child = self._timeouts[key] = self.metrics.upstream_timeouts.labels(
                self.name, upstream, kind
            )
        child.inc()

    def count_xid_rejection(self, reason: str) -> None:
        child = self._xid_rejects.get(reason)
        if child is None:
            child = self._xid_rejects[reason] = self.metrics.xid_rejections.labels(
                self.name, reason
            )
        child.inc()
