"""Inbound listener routing: other pods → the local app (`app.url`).

The XID (already validated by the listener) reaches the app under `xid.app_headers` only; the
aliases it arrived under are dropped. The client's Host is kept, as Envoy does.
X-Forwarded-For gets the peer appended; X-Forwarded-Proto is set when absent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import httptools

from sidecar.errors import BadRequest
from sidecar.proxy.route import Route, Router

if TYPE_CHECKING:
    from sidecar.proxy.headers import RequestHead
    from sidecar.proxy.upstream import Cluster
    from sidecar.txn.branches import BranchRules
    from sidecar.txn.rules import RuleSet
    from sidecar.xid import Xid


class InboundRouter(Router):
    def __init__(
        self,
        app: Cluster,
        app_headers: list[str],
        rules: RuleSet | None = None,
        branches: BranchRules | None = None,
    ) -> None:
        self.app = app
        self.app_headers = [n.encode("latin-1") for n in app_headers]
        self.rules = rules
        self.branches = branches

    def xid_headers(self, xid: bytes) -> list[tuple[bytes, bytes]]:
        return [(name, xid) for name in self.app_headers]

    def clusters(self) -> list[Cluster]:
        return [self.app]

    def route(self, head: RequestHead, xid: Xid | None, peer_ip: bytes) -> Route:
        url = head.url
        if url[:1] != b"/":
            if url == b"*" and head.method == b"OPTIONS":
                url = b""  # no path: no rule can match it
                target = b"*"
            else:
                # absolute-form: reduce it to origin-form once, and route and match on that
                # (so a rule or the app's base path cannot be sidestepped)
                try:
                    parsed = httptools.parse_url(url)
                except httptools.HttpParserInvalidURLError:
                    raise BadRequest("invalid request target") from None
                authority = (parsed.host or b"") + (b":%d" % parsed.port if parsed.port else b"")
                if head.host is not None and head.host.lower() != authority.lower():
                    raise BadRequest("Host header differs from the request target's authority")
                url = (parsed.path or b"/") + (b"?" + parsed.query if parsed.query else b"")
                target = self.app.base_path + url if self.app.base_path else url
        else:
            target = self.app.base_path + url if self.app.base_path else url
        extra: list[tuple[bytes, bytes]] = []
        if xid is not None:
            raw = xid.raw.encode("ascii")
            extra = [(name, raw) for name in self.app_headers]
        xff = peer_ip if head.forwarded_for is None else head.forwarded_for + b", " + peer_ip
        extra.append((b"x-forwarded-for", xff))
        extra.append((b"x-forwarded-proto", head.forwarded_proto or b"http"))
        # an HTTP/1.0 request may come without Host; the hop to the app is HTTP/1.1, which
        # requires one
        txn = None
        if xid is None and self.rules is not None and not self.rules.empty:
            txn = self.rules.match(head.method, url)
        branch = None
        if self.branches is not None and not self.branches.empty:
            branch = self.branches.match(head.method, url)
        return Route(self.app, target, head.host or self.app.authority, extra, txn, branch)
