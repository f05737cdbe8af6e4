from sidecar import config
from sidecar.txn.rules import RuleSet


def rules(*specs: dict) -> RuleSet:
    cfg = config.parse(
        {
            "transactions": [
                {"name": f"r{i}", "timeout": "60s", "match": m} for i, m in enumerate(specs)
            ]
        },
        env={},
    )
    return RuleSet(cfg.transactions)


def test_exact_prefix_regex_and_method() -> None:
    rs = rules(
        {"method": "POST", "path": "/orders"},
        {"path_prefix": "/pay/"},
        {"method": "PUT", "path_regex": r"/carts/[0-9]+"},
    )
    assert rs.match(b"POST", b"/orders").name == "r0"
    assert rs.match(b"POST", b"/orders?x=1").name == "r0"  # the query is not part of the path
    assert rs.match(b"GET", b"/orders") is None  # method given: must match
    assert rs.match(b"POST", b"/orders/1") is None  # exact means exact
    assert rs.match(b"GET", b"/pay/42").name == "r1"  # no method: any
    assert rs.match(b"GET", b"/pay").name == "r1"  # `/pay/` is `/pay` in normal form
    assert rs.match(b"GET", b"/payments") is None  # but the prefix is a whole segment
    assert rs.match(b"PUT", b"/carts/17").name == "r2"
    assert rs.match(b"PUT", b"/carts/17/x") is None  # regex must match the whole path
    assert rules().match(b"POST", b"/orders") is None


def test_first_matching_rule_wins_and_timeout_is_compiled() -> None:
    rs = rules({"path_prefix": "/a"}, {"path": "/a/b"})
    rule = rs.match(b"GET", b"/a/b")
    assert rule.name == "r0"
    assert rule.timeout_ms == 60_000


def test_rules_match_the_normal_form_of_the_path() -> None:
    rs = rules({"method": "POST", "path": "/orders"}, {"path_prefix": "/pay"})
    for raw in [b"/orders/", b"//orders", b"/./orders", b"/%6Frders", b"/orders;jsessionid=1",
                b"/x/../orders?q=1"]:  # fmt: skip
        assert rs.match(b"POST", raw).name == "r0", raw
    assert rs.match(b"POST", b"/orders%2F") is None  # an escaped slash is not a separator
    assert rs.match(b"GET", b"//pay").name == "r1"
    # a configured path in another spelling is normalised too
    assert rules({"path": "/a//b/"}).match(b"GET", b"/a/b").name == "r0"
