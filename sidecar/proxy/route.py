"""What routing decides once per request: the cluster and the head to send it."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sidecar.proxy.headers import RequestHead
    from sidecar.proxy.upstream import Cluster
    from sidecar.txn.branches import BranchRule
    from sidecar.txn.rules import TxnRule
    from sidecar.xid import Xid


class Route:
    """Where one request goes, and what goes with it. A plain class with its __init__ written
    out: a dataclass would cost more per request (a frozen one sets each field through
    object.__setattr__, ~1 us against ~0.3 us), and its generated __init__ stays interpreted
    when this module is compiled by mypyc. Nothing assigns to a Route once routing made it."""

    cluster: Cluster
    #: origin-form target sent upstream
    target: bytes
    #: Host header sent upstream (None: keep the client's)
    host: bytes | None
    #: headers added by filters (XID under the names the upstream expects, X-Forwarded-*)
    extra: list[tuple[bytes, bytes]]
    #: the declarative transaction this request begins (inbound, no XID, a rule matched)
    txn: TxnRule | None
    #: the TCC try / Saga action this request is (inbound, a declared resource matched)
    branch: BranchRule | None

    def __init__(
        self,
        cluster: Cluster,
        target: bytes,
        host: bytes | None,
        extra: list[tuple[bytes, bytes]],
        txn: TxnRule | None = None,
        branch: BranchRule | None = None,
    ) -> None:
        self.cluster = cluster
        self.target = target
        self.host = host
        self.extra = extra
        self.txn = txn
        self.branch = branch


class Router:
    """Decides, once per request, where it goes. Subclassed by inbound and outbound."""

    def route(self, head: RequestHead, xid: Xid | None, peer_ip: bytes) -> Route:
        raise NotImplementedError

    def clusters(self) -> list[Cluster]:
        raise NotImplementedError

    def xid_headers(self, xid: bytes) -> list[tuple[bytes, bytes]]:
        """The headers that carry `xid` to this router's upstream."""
        return []
