"""What routing decides once per request: the cluster and the head to send it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sidecar.proxy.headers import RequestHead
    from sidecar.proxy.upstream import Cluster
    from sidecar.txn.branches import BranchRule
    from sidecar.txn.rules import TxnRule
    from sidecar.xid import Xid


# Not frozen, though nothing assigns to a Route once routing made it: a frozen dataclass's
# __init__ sets each field through object.__setattr__, about three times the cost of this
# one (~1 µs against ~0.3 µs), on every request
@dataclass(slots=True)
class Route:
    cluster: Cluster
    #: origin-form target sent upstream
    target: bytes
    #: Host header sent upstream (None: keep the client's)
    host: bytes | None
    #: headers added by filters (XID under the names the upstream expects, X-Forwarded-*)
    extra: list[tuple[bytes, bytes]] = field(default_factory=list)
    #: the declarative transaction this request begins (inbound, no XID, a rule matched)
    txn: TxnRule | None = None
    #: the TCC try / Saga action this request is (inbound, a declared resource matched)
    branch: BranchRule | None = None


class Router:
    """Decides, once per request, where it goes. Subclassed by inbound and outbound."""

    def route(self, head: RequestHead, xid: Xid | None, peer_ip: bytes) -> Route:
        raise NotImplementedError

    def clusters(self) -> list[Cluster]:
        raise NotImplementedError

    def xid_headers(self, xid: bytes) -> list[tuple[bytes, bytes]]:
        """The headers that carry `xid` to this router's upstream."""
        return []
