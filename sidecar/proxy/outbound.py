"""Outbound listener routing: the app → named upstreams.

Three ways to name an upstream, tried in this order:
1. absolute-form request line (the app uses us as HTTP_PROXY): its host is an upstream's name
   or the host[:port] of an upstream's url;
2. a Host header equal to an upstream's name;
3. a path prefix: `/{upstream}/{rest}` → `{upstream url path}/{rest}`.
The XID is written under the upstream's `xid_headers`; Host becomes the upstream's authority.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httptools

from sidecar.errors import BadRequest, UpstreamNotFound
from sidecar.proxy.route import Route, Router

if TYPE_CHECKING:
    from sidecar.proxy.headers import RequestHead
    from sidecar.proxy.upstream import Cluster
    from sidecar.xid import Xid


class OutboundRouter(Router):
    def __init__(self, clusters: dict[str, Cluster], xid_headers: dict[str, list[str]]) -> None:
        self._by_name = {name.encode("latin-1"): c for name, c in clusters.items()}
        self._by_lower_name = {name.lower(): c for name, c in self._by_name.items()}
        self._by_authority: dict[bytes, Cluster] = {}
        for c in clusters.values():
            self._by_authority.setdefault(c.authority.lower(), c)
            if c.port in (80, 443):
                self._by_authority.setdefault(c.host.encode("latin-1").lower(), c)
        self._host_cache: dict[bytes, Cluster | None] = {}
        self._xid_names = {
            name: [n.encode("latin-1") for n in names] for name, names in xid_headers.items()
        }

    def clusters(self) -> list[Cluster]:
        return list(self._by_name.values())

    def _by_host(self, host: bytes) -> Cluster | None:
        # the same few Host values recur on every request: remember the answers
        try:
            return self._host_cache[host]
        except KeyError:
            pass
        cluster = self._lookup_host(host)
        if len(self._host_cache) >= 1024:
            self._host_cache.clear()
        self._host_cache[host] = cluster
        return cluster

    def _lookup_host(self, host: bytes) -> Cluster | None:
        host = host.lower()
        cluster = self._by_lower_name.get(host)
        if cluster is None:
            cluster = self._by_authority.get(host)
        if cluster is None:
            name, sep, port = host.rpartition(b":")
            if sep and port.isdigit():
                cluster = self._by_lower_name.get(name)
        return cluster

    def route(self, head: RequestHead, xid: Xid | None, peer_ip: bytes) -> Route:
        url = head.url
        cluster: Cluster | None = None
        if url[:1] != b"/":
            try:
                # Any: httptools' stub says host is bytes and port int, but either may be
                # None, and compiled code would check the stub's types on every read
                parsed: Any = httptools.parse_url(url)
            except httptools.HttpParserInvalidURLError:
                raise BadRequest("invalid request target") from None
            if parsed.schema not in (b"http", None) or not parsed.host:
                raise BadRequest(
                    "absolute-form requests must be http://host/...; TLS is originated by "
                    "the sidecar from the upstream's url"
                )
            authority = parsed.host + (b":%d" % parsed.port if parsed.port else b"")
            cluster = self._by_host(authority)
            if cluster is None:
                raise UpstreamNotFound(f"no upstream named {authority.decode('latin-1')!r}")
            if head.host is not None and self._by_host(head.host) not in (cluster, None):
                raise BadRequest("Host header names a different upstream than the request line")
            path = parsed.path or b"/"
            rest = path + (b"?" + parsed.query if parsed.query else b"")
        elif head.host is not None and (cluster := self._by_host(head.host)) is not None:
            rest = url
        else:
            # prefix: /{upstream}/{rest}; the name ends at the next '/' or '?' (a loop over
            # its few bytes: two bytes.find calls cost four times as much, compiled)
            end = 1
            size = len(url)
            while end < size and url[end] != 47 and url[end] != 63:  # '/', '?'
                end += 1
            name = url[1:end]
            cluster = self._by_name.get(name)
            if cluster is None:
                shown = name[:64].decode("latin-1")
                raise UpstreamNotFound(
                    f"no upstream named {shown!r} (route by /{{upstream}}/path, by a Host "
                    "equal to the upstream's name, or by an absolute-form request line)"
                )
            rest = url[end:]
            if rest[:1] != b"/":
                rest = b"/" + rest
        target = cluster.base_path + rest if cluster.base_path else rest
        extra: list[tuple[bytes, bytes]] = []
        if xid is not None:
            raw = xid.raw.encode("ascii")
            extra = [(n, raw) for n in self._xid_names[cluster.name]]
        return Route(cluster, target, cluster.authority, extra)
