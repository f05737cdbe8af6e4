"""Inbound listener routing: other pods → the local app (`app.url`).

The XID (already validated by the listener) reaches the app under `xid.app_headers` only; the
aliases it arrived under are dropped. The client's Host is kept, as Envoy does.
X-Forwarded-For gets the peer appended; X-Forwarded-Proto is set when absent.

What a client can never send the app through this listener: `x-gts-*` headers (the sidecar
writes `x-gts-branch-id` and `x-gts-phase` itself, a forged pair would pass for its phase
two), its own copy of an `xid.app_headers` name that is not an accepted alias (the app would
read an XID nobody validated), an `Idempotency-Key` (phase two's dedup key at the app;
kept only on the routes of `app.idempotency_key_routes`, never on a declared try), and a
request to a declared confirm / cancel / compensation route (403 PHASE_TWO_PATH: the sidecar
calls those on the app directly, never through this listener). Rules match the normal form
of the path (sidecar.paths); the target itself is forwarded as sent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httptools

from sidecar import paths
from sidecar.errors import BadRequest, SidecarError
from sidecar.proxy.headers import client_only, fold, is_idempotency_key
from sidecar.proxy.route import Route, Router
from sidecar.txn.rules import PathMatcher

if TYPE_CHECKING:
    from sidecar.proxy.headers import RequestHead
    from sidecar.proxy.upstream import Cluster
    from sidecar.txn.branches import BranchRule, BranchRules
    from sidecar.txn.rules import RuleSet, TxnRule
    from sidecar.xid import Xid


class PhaseTwoPath(SidecarError):
    """A client asked the inbound listener for a declared confirm/cancel/compensation."""

    code = "PHASE_TWO_PATH"
    status = 403


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
        #: the names the app reads the XID under, folded: a client's copy is never passed
        self._app_names = frozenset(fold(n.lower()) for n in self.app_headers)
        self.rules = rules if rules is not None and not rules.empty else None
        declared = [] if branches is None else list(branches.by_resource.values())
        # (method, normal path) → the try / action; and the phase-two routes, refused
        self._branches: dict[tuple[bytes, bytes], BranchRule] = {
            (r.method, paths.normalise(r.path)): r for r in declared
        }
        self._phase_two: dict[tuple[bytes, bytes], str] = {}
        for r in declared:
            for endpoint in (r.confirm, r.cancel):
                if endpoint is not None:
                    key = (endpoint[0].encode(), paths.normalise(endpoint[1].encode()))
                    self._phase_two[key] = r.resource
        idem = getattr(app.cfg, "idempotency_key_routes", [])
        self._idempotency_ok = PathMatcher(idem) if idem else None
        #: no rule of any kind: the path need not even be normalised
        self._no_rules = self.rules is None and not self._branches

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
                    # Any: httptools' stub says host is bytes and port int, but either may be
                    # None, and compiled code would check the stub's types on every read
                    parsed: Any = httptools.parse_url(url)
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
        txn = branch = None
        keep_key = False
        if url and not (self._no_rules and not head.client_only):
            path = url.partition(b"?")[0]
            norm = paths.normalise(path)
            txn, branch, keep_key = self._decide(head, xid, norm)
            if (b"%" in path or b"\\" in path) and paths.ambiguous(path):
                # an encoded slash: some app frameworks decode it before routing, others
                # do not; if the two readings differ for the rules, neither is safe
                if self._decide(head, xid, paths.alternative(path)) != (txn, branch, keep_key):
                    raise BadRequest(
                        "the request path has an encoded '/' or a '\\' that makes it a "
                        "different declared route depending on how the app decodes it"
                    )
        if head.client_only:
            head.headers = [
                (n, v)
                for n, v in head.headers or ()
                if not (client_only(n.lower()) or fold(n.lower()) in self._app_names)
                or (keep_key and is_idempotency_key(n.lower()))
            ]
        # an HTTP/1.0 request may come without Host; the hop to the app is HTTP/1.1, which
        # requires one
        return Route(self.app, target, head.host or self.app.authority, extra, txn, branch)

    def _decide(
        self, head: RequestHead, xid: Xid | None, norm: bytes
    ) -> tuple[TxnRule | None, BranchRule | None, bool]:
        """What the rules make of one normal path: (transaction, branch, keep the client's
        Idempotency-Key). A declared phase-two route is refused here."""
        method = head.method
        if self._phase_two:
            resource = self._phase_two.get((method, norm))
            if resource is not None:
                raise PhaseTwoPath(
                    f"{method.decode('latin-1')} {norm[:128].decode('latin-1')} is a phase-two "
                    f"route of {resource!r}: only the sidecar calls it, never a client through "
                    "the inbound listener"
                )
        branch = self._branches.get((method, norm)) if self._branches else None
        txn = None
        if xid is None and self.rules is not None:
            txn = self.rules.match_path(method, norm)
        keep_key = (
            branch is None
            and self._idempotency_ok is not None
            and head.idempotency_key is not None
            and self._idempotency_ok.any(method, norm)
        )
        return txn, branch, keep_key
