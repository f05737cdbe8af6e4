"""HTTP/1.1 desync and request-smuggling vectors against both proxy listeners.

Every case of `corpus.CASES` runs against the inbound listener (→ the app) and the outbound
listener (prefix route `/up/...` → upstream `up`). Behind each is `servers.Upstream`, a raw
server with its own strict framing parser that records every request it receives. For each
case: a refusal is the sidecar's JSON error with the fitting status, the connection is closed
where the framing is ambiguous, and the upstream never sees a second request (`/smuggled`) nor
a complete request built from a stream the sidecar refused; an accepted case reaches the
upstream as exactly one request, re-framed, with exactly the body the client framed.

References: the same corpus goes to a bare llhttp parser (which layer refuses what) and to
the control plane's aiohttp parser (the api listener), where a request smuggled behind each
vector would begin a transaction.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.component.servers import (
    Client,
    Response,
    Upstream,
    UpstreamFactory,
    error_of,
    read_response,
)
from tests.security.corpus import CASES, Case, llhttp_verdict

PREFIX = {"inbound": b"", "outbound": b"/up"}
#: a negative check ("nothing else arrives") needs a grace period; on loopback the sidecar
#: forwards within a millisecond
GRACE = 0.05


@pytest.fixture
async def upstream() -> AsyncIterator[UpstreamFactory]:
    factory = UpstreamFactory()
    yield factory
    await factory.close()


async def start(
    sidecar_factory: Any, upstream: UpstreamFactory, listener: str
) -> tuple[Any, Upstream, Upstream, int]:
    """A sidecar whose app (inbound) and upstream `up` (outbound) are one recording server;
    `other` is a second upstream that must never see anything unless a test routes to it."""
    up = await upstream()
    other = await upstream()
    sc = await sidecar_factory(
        {
            "app": {"url": up.url},
            "upstreams": {"up": {"url": up.url}, "other": {"url": other.url}},
        }
    )
    return sc, up, other, sc.ports[listener]


async def first_response(raw: bytes) -> tuple[Response, bytes]:
    """The first response in `raw` and the bytes after it."""
    reader = asyncio.StreamReader()
    reader.feed_data(raw)
    reader.feed_eof()
    resp = await read_response(reader, timeout=1.0)
    return resp, await reader.read()


def _marks(case: Case) -> list[Any]:
    return [pytest.mark.xfail(reason=case.bug, strict=True)] if case.bug else []


def case_params() -> list[Any]:
    return [
        pytest.param(listener, case, id=f"{listener}-{case.id}", marks=_marks(case))
        for case in CASES
        for listener in ("inbound", "outbound")
    ]


# --- the corpus through both proxy listeners ----------------------------------------------------


@pytest.mark.parametrize(("listener", "case"), case_params())
async def test_smuggling_vector(sidecar_factory, upstream, listener: str, case: Case) -> None:
    sc, up, other, port = await start(sidecar_factory, upstream, listener)
    prefix = PREFIX[listener]
    async with await Client.connect(port) as client:
        await client.send(case.render(prefix))
        if case.outcome == "forward":
            resp = await client.response()
            assert resp.status == 200, resp.raw_head + resp.body
            # still in step: a follow-up request is the very next one upstream
            await client.send(b"GET %s/sentinel HTTP/1.1\r\nHost: t\r\n\r\n" % prefix)
            assert (await client.response()).status == 200
        else:
            resp = await client.response()
            assert resp.status in case.statuses, resp.raw_head + resp.body
            if case.closed:
                rest = await client.read_to_eof(timeout=5.0)
            else:
                rest, _ = await client.read_for(GRACE)
            assert rest == b"", f"more than one response: {rest!r}"
    await asyncio.sleep(GRACE)
    seen = [(r.target, r.complete) for r in up.requests]
    if case.outcome == "forward":
        assert seen == [("/first", True), ("/sentinel", True)], seen
        first = up.requests[0]
        assert first.body == case.body
        # re-framed by the sidecar: one canonical framing header, never the client's bytes
        if first.framing == "chunked":
            assert first.get_all("transfer-encoding") == ["chunked"]
        elif case.body:
            # byte for byte: the value the upstream parses is the length we framed
            assert b"\r\ncontent-length: %d\r\n" % len(case.body) in first.raw_head, first.raw_head
        else:
            assert "content-length" not in first.names()
        assert up.connections == 1
    else:
        err = error_of(resp)
        if case.code is not None:
            assert err["code"] == case.code
        if case.bug is None:
            # which layer answered: llhttp's refusals are reported as malformed HTTP
            assert err["message"].startswith("malformed HTTP request") == (
                case.refused_by == "llhttp"
            ), err
        if case.closed:
            assert resp.get("connection") == "close"
        if case.head_may_reach_upstream:
            # streamed before the body broke: at most that one head, and cut off
            assert seen in ([], [("/first", False)]), seen
        else:
            assert seen == [], seen
    assert all(r.target != "/smuggled" for r in up.requests)
    assert other.connections == 0


# --- which layer refuses: the references ----------------------------------------------------------


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_reference_llhttp_verdict(case: Case) -> None:
    """The corpus says which cases a bare llhttp refuses; hold it to the installed one, so a
    parser upgrade that starts accepting one of them shows up here first."""
    verdict = llhttp_verdict(case.data.replace(b"{P}", b""))
    if case.llhttp_refuses:
        assert verdict is not None, "llhttp accepts this now: our own code must refuse it"
    else:
        assert verdict is None, verdict


BEGIN_BODY = b'{"name": "smuggled"}'
BEGIN = (
    b"POST /v1/transactions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(BEGIN_BODY), BEGIN_BODY)
)


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=c.id) for c in CASES if c.llhttp_refuses and c.smuggle]
)
async def test_control_plane_parser_refuses_and_runs_nothing_smuggled(
    sidecar_factory, case: Case
) -> None:
    """The api listener is aiohttp (its C parser is llhttp too): each vector llhttp refuses
    is a 400 and a close there as well, and a begin smuggled behind it never runs."""
    sc = await sidecar_factory()
    engine = sc.control.engine
    async with await Client.connect(sc.ports["api"]) as client:
        await client.send(case.data.replace(b"{P}", b"") + BEGIN)
        raw = await client.read_to_eof(timeout=5.0)
    resp, rest = await first_response(raw)
    assert resp.status == 400, raw
    assert rest == b"", raw
    assert engine.active == 0


async def test_control_plane_runs_a_begin_pipelined_after_a_clean_request(sidecar_factory):
    """The control of the test above: the same smuggled begin, behind a well-framed request,
    is a legitimate pipelined request and does run."""
    sc = await sidecar_factory()
    async with await Client.connect(sc.ports["api"]) as client:
        await client.send(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n" + BEGIN)
        assert (await client.response()).status == 200
        assert (await client.response()).status == 200
    assert sc.control.engine.active == 1


# --- outbound: absolute-form and Host routing ----------------------------------------------------

OUTBOUND_REFUSALS = [
    # (id, request line target, Host, status, code)
    ("absolute-form-unknown-host", b"http://unknown.example/x", b"unknown.example", 404),
    ("absolute-form-unknown-host-known-host-header", b"http://unknown.example/x", b"up", 404),
    ("absolute-form-loopback-not-an-upstream", b"http://127.0.0.1/x", b"127.0.0.1", 404),
    (
        "absolute-form-to-the-sidecar-admin-port",
        b"http://127.0.0.1:{ADMIN}/admin/config",
        b"127.0.0.1:{ADMIN}",
        404,
    ),
    ("absolute-form-userinfo-before-unknown-host", b"http://up@unknown.example/x", b"up", 404),
    ("absolute-form-host-header-names-other", b"http://up/x", b"other", 400),
    ("absolute-form-authority-vs-host-other", b"http://127.0.0.1:{UP}/x", b"other", 400),
    ("absolute-form-host-header-names-up", b"http://other/x", b"up", 400),
    ("absolute-form-https", b"https://up/x", b"up", 400),
    ("absolute-form-no-host", b"http:///x", b"up", 400),
    ("absolute-form-port-out-of-range", b"http://up:99999/x", b"up", 400),
    ("prefix-unknown-upstream", b"/unknown/x", b"t", 404),
    ("prefix-percent-encoded-name", b"/%75p/x", b"t", 404),
]


@pytest.mark.parametrize(
    ("target", "host", "status"),
    [pytest.param(t, h, s, id=i) for i, t, h, s in OUTBOUND_REFUSALS],
)
async def test_outbound_absolute_form_and_host_mismatch_are_refused(
    sidecar_factory, upstream, target: bytes, host: bytes | None, status: int
) -> None:
    """The outbound listener is no open proxy: an absolute-form target names an upstream or
    is refused, and a Host naming a different upstream than the request line is a 400."""
    sc, up, other, port = await start(sidecar_factory, upstream, "outbound")
    target = target.replace(b"{ADMIN}", b"%d" % sc.ports["admin"])
    target = target.replace(b"{UP}", b"%d" % up.port)
    if host is not None:
        host = host.replace(b"{ADMIN}", b"%d" % sc.ports["admin"])
    head = b"GET " + target + b" HTTP/1.1\r\n" + (b"Host: " + host + b"\r\n" if host else b"")
    async with await Client.connect(port) as client:
        await client.send(head + b"\r\n")
        resp = await client.response()
        assert resp.status == status, resp.body
        err = error_of(resp)
        assert err["code"] == ("UPSTREAM_NOT_FOUND" if status == 404 else "BAD_REQUEST")
        # a refusal of a bodiless request keeps the connection in step
        await client.send(b"GET /up/next HTTP/1.1\r\nHost: t\r\n\r\n")
        assert (await client.response()).status == 200
    await asyncio.sleep(GRACE)
    assert [r.target for r in up.requests] == ["/next"]
    assert other.connections == 0


@pytest.mark.parametrize(
    ("target", "host", "expected"),
    [
        pytest.param(b"http://up/x?q=1", b"up", "/x?q=1", id="absolute-form-by-name"),
        pytest.param(b"http://UP/x", b"UP", "/x", id="absolute-form-name-case-insensitive"),
        pytest.param(b"http://127.0.0.1:{UP}/x", b"127.0.0.1:{UP}", "/x", id="by-authority"),
        pytest.param(b"http://up/x", b"evil.example", "/x", id="absolute-form-unknown-host-hdr"),
    ],
)
async def test_outbound_routes_to_exactly_one_upstream_with_its_own_authority(
    sidecar_factory, upstream, target: bytes, host: bytes | None, expected: str
) -> None:
    """Whatever the client's Host said, the upstream sees its own authority as Host."""
    sc, up, other, port = await start(sidecar_factory, upstream, "outbound")
    target = target.replace(b"{UP}", b"%d" % up.port)
    head = b"GET " + target + b" HTTP/1.1\r\n"
    if host is not None:
        head += b"Host: " + host.replace(b"{UP}", b"%d" % up.port) + b"\r\n"
    async with await Client.connect(port) as client:
        await client.send(head + b"\r\n")
        assert (await client.response()).status == 200
    (req,) = up.requests
    assert req.target == expected
    assert req.get_all("host") == [f"127.0.0.1:{up.port}"]
    assert other.connections == 0


async def test_outbound_host_header_beats_the_path_prefix_and_reaches_one_upstream(
    sidecar_factory, upstream
):
    """The routing order (README, "Outbound"): a Host equal to an upstream's name routes
    before the path prefix;
    either way exactly one upstream gets exactly one request."""
    sc, up, other, port = await start(sidecar_factory, upstream, "outbound")
    async with await Client.connect(port) as client:
        await client.send(b"GET /up/x HTTP/1.1\r\nHost: other\r\n\r\n")
        assert (await client.response()).status == 200
    await asyncio.sleep(GRACE)
    assert up.requests == []
    assert [r.target for r in other.requests] == ["/up/x"]


# --- inbound: absolute-form and Host -------------------------------------------------------------


async def test_inbound_absolute_form_host_mismatch(sidecar_factory, upstream):
    sc, app, other, port = await start(sidecar_factory, upstream, "inbound")
    async with await Client.connect(port) as client:
        await client.send(b"GET http://evil.example/x HTTP/1.1\r\nHost: good\r\n\r\n")
        resp = await client.response()
    await asyncio.sleep(GRACE)
    if resp.status == 400:
        assert app.requests == []
    else:
        (req,) = app.requests
        assert req.get_all("host") == ["evil.example"]


@pytest.mark.parametrize(
    "target",
    [
        pytest.param(b"/try", id="origin-form-try"),
        pytest.param(b"http://t/try", id="absolute-form-try"),
        pytest.param(b"/p", id="origin-form-base-path"),
        pytest.param(b"http://t/p", id="absolute-form-base-path"),
    ],
)
async def test_inbound_absolute_form_is_routed_like_origin_form(sidecar_factory, upstream, target):
    """The same request in origin-form and absolute-form gets the same treatment: the try of
    a declared TCC resource needs an XID either way, and both forms stay under app.url's path
    (the origin-form params are the control)."""
    app = await upstream()
    sc = await sidecar_factory(
        {
            "app": {"url": app.url + "/base"},
            "tcc": [
                {
                    "resource": "inv",
                    "try": {"method": "POST", "path": "/try"},
                    "confirm": {"method": "POST", "path": "/confirm"},
                    "cancel": {"method": "POST", "path": "/cancel"},
                }
            ],
        }
    )
    async with await Client.connect(sc.ports["inbound"]) as client:
        await client.send(b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n" % target)
        resp = await client.response()
    await asyncio.sleep(GRACE)
    if target.endswith(b"/try"):
        assert resp.status == 400 and error_of(resp)["code"] == "XID_REQUIRED"
        assert app.requests == []
    else:
        assert [r.target for r in app.requests] == ["/base/p"]


@pytest.mark.parametrize("host", [b"a b", b"a/b@c", b"a:b:c", b"a\xffb"])
async def test_inbound_invalid_host_value_is_400(sidecar_factory, upstream, host):
    sc, app, other, port = await start(sidecar_factory, upstream, "inbound")
    async with await Client.connect(port) as client:
        await client.send(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        resp = await client.response()
    await asyncio.sleep(GRACE)
    assert resp.status == 400
    assert app.requests == []


@pytest.mark.parametrize("listener", ["inbound", "outbound"])
async def test_expect_100_continue_on_http11_gets_one_interim_then_the_answer(
    sidecar_factory, upstream, listener
):
    sc, up, other, port = await start(sidecar_factory, upstream, listener)
    head = b"POST %s/e HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
    async with await Client.connect(port) as client:
        await client.send(head % PREFIX[listener])
        interim = await client.response(interim=True)
        assert interim.status == 100
        await client.send(b"hello")
        final = await client.response()
    assert final.status == 200
    (req,) = up.requests
    assert req.body == b"hello" and "expect" not in req.names()


@pytest.mark.parametrize("listener", ["inbound", "outbound"])
async def test_expect_100_continue_on_http10_is_ignored(sidecar_factory, upstream, listener):
    sc, up, other, port = await start(sidecar_factory, upstream, listener)
    data = (
        b"POST %s/e HTTP/1.0\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\nhello"
    )
    async with await Client.connect(port) as client:
        await client.send(data % PREFIX[listener])
        raw = await client.read_to_eof()
    assert raw.startswith(b"HTTP/1.1 200 "), raw[:64]
