"""Cookie crumbs: HTTP/2 clients may split a Cookie into one field per crumb (browsers do, for
HPACK's sake). An HTTP/1.1 app must get them joined by "; " in one field (RFC 9113 §8.2.3):
many servers read only the first Cookie field (aiohttp's request.cookies, CGI-style
gateways), so a crumb passed on as a field of its own is a cookie lost."""

from __future__ import annotations

from tests.component.h2client import H2Client


async def test_cookie_crumbs_reach_an_http11_app_as_one_field(sidecar_factory, upstream):
    app = await upstream()
    sc = await sidecar_factory({"app": {"url": app.url}})
    client = await H2Client.connect(sc.ports["inbound"])
    try:
        crumbs = [("cookie", "session=abc"), ("cookie", "theme=dark"), ("cookie", "lang=en")]
        response = await client.get("/items", headers=crumbs)
    finally:
        client.close()
    assert response.status == 200
    (req,) = app.requests
    assert req.get_all("Cookie") == ["session=abc; theme=dark; lang=en"]
