"""The request path's two per-value caches in headers.py (Host values found valid, response
field names classified): they answer exactly as the uncached checks do, whatever came
before, and stay bounded whatever the peers send."""

from __future__ import annotations

from sidecar.proxy import headers as h


def test_a_host_is_judged_the_same_before_and_after_it_is_cached() -> None:
    for value in (b"example.com", b"127.0.0.1:8080", b"[::1]:80"):
        assert h.valid_host(value) and h.valid_host(value)
    for value in (b"exa mple.com", b"a/b", b"host:80:80", b""):
        assert not h.valid_host(value) and not h.valid_host(value)


def test_many_distinct_hosts_keep_the_host_cache_bounded() -> None:
    for i in range(h.VALID_HOSTS_MAX * 3):
        assert h.valid_host(b"host-%d.example" % i)
    assert 0 < len(h._VALID_HOSTS) <= h.VALID_HOSTS_MAX
    assert not h.valid_host(b"bad host")  # never cached, still refused


def test_response_fields_classify_each_spelling_alike_on_every_response() -> None:
    fields = [
        (b"Server", b"nginx"),
        (b"Content-Length", b"3"),
        (b"CONNECTION", b"keep-alive, X-Hop"),
        (b"x-hop", b"1"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Content_Length", b"9"),
        (b"X-App", b"a"),
    ]
    for _ in range(3):  # first from the names, then from the cache
        kept, length, chunked = h.response_fields(fields)
        assert kept == [(b"Server", b"nginx"), (b"X-App", b"a")]
        assert (length, chunked) == (b"3", False)
    kept, length, chunked = h.response_fields([(b"Transfer-Encoding", b"gzip, Chunked")])
    assert (kept, length, chunked) == ([], None, True)


def test_many_distinct_response_field_names_keep_the_kind_cache_bounded() -> None:
    for i in range(h.RESPONSE_KIND_MAX * 3):
        kept, _, _ = h.response_fields([(b"X-Field-%d" % i, b"v"), (b"Upgrade", b"h2c")])
        assert kept == [(b"X-Field-%d" % i, b"v")]
    assert 0 < len(h._RESPONSE_KIND) <= h.RESPONSE_KIND_MAX
