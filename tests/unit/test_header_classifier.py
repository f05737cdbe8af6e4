"""The proxy listeners' header classifier: configured names, folded spellings, learning."""

from __future__ import annotations

from sidecar.proxy import headers as h


def test_spellings_fold_to_the_configured_header() -> None:
    c = h.build_classifier(["XID", "X-GTS-XID", "TX_XID"], ["XID", "X-Trace-Xid"])
    assert c[b"tx_xid"] == c[b"tx-xid"] == h.XID
    assert c[b"x_gts_xid"] == c[b"x-gts_xid"] == h.XID  # an alias wins over x-gts-*
    assert c[b"x-gts-phase"] == c[b"x_gts_phase"] == c[b"x-gts-whatever"] == h.GTS
    assert c[b"idempotency-key"] == c[b"idempotency_key"] == h.IDEMPOTENCY_KEY
    assert c[b"x-trace-xid"] == c[b"x_trace_xid"] == h.GTS  # an app header, not an alias
    assert c[b"xid"] == h.XID  # an app header that is an alias stays one
    # a configured spelling keeps its own kind over another that folds the same
    assert c[b"content-length"] == h.CONTENT_LENGTH and c[b"content_length"] == h.DROP
    assert c[b"x_forwarded_for"] == h.XFF
    assert c[b"user-agent"] == c[b"user_agent"] == h.PASS


def test_new_names_are_remembered_up_to_a_bound() -> None:
    c = h.build_classifier(["XID"])
    size = len(c)
    for i in range(5000):
        assert c[b"x-n%d" % i] == h.PASS
    assert len(c) == size + 1024  # the rest are classified each time, never stored


def test_the_head_records_the_clients_idempotency_key() -> None:
    c = h.build_classifier(["XID"])
    head = h.RequestHead(headers=[])
    for name, value in [(b"Idempotency_Key", b"k1"), (b"Idempotency-Key", b"k2")]:
        head.add(name, value, c[name.lower()])
    assert head.idempotency_key == b"k1" and head.idempotency_key_repeated
    assert head.client_only
    assert head.headers == [(b"Idempotency_Key", b"k1"), (b"Idempotency-Key", b"k2")]
