"""Unit tests for sidecar/config.py: schema, defaults, substitution, secrets, errors."""

from __future__ import annotations

import json
from dataclasses import FrozenInstanceError
from pathlib import Path
from typing import Any

import pytest

from sidecar import config
from sidecar.config import Config, Secret, parse_bind
from sidecar.errors import ConfigError
from sidecar.schema import dump

SECRET = "s3cr3t-token-value"


def _problems(data: Any, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config.parse(data, env={} if env is None else env)
    problems = info.value.problems
    assert problems
    assert str(info.value) == "; ".join(problems)
    return problems


def _problem(data: Any, env: dict[str, str] | None = None) -> str:
    problems = _problems(data, env)
    assert len(problems) == 1, problems
    return problems[0]


def _upstream(**fields: Any) -> dict[str, Any]:
    return {"upstreams": {"orders": {"url": "http://orders:8080", **fields}}}


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "admin-token"
    path.write_text(SECRET + "\n", encoding="utf-8")
    return path


# --- defaults ------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [{}, None])
def test_defaults(data: Any) -> None:
    c = config.parse(data, env={})
    listeners = c.listeners
    assert parse_bind(listeners.inbound.bind) == ("0.0.0.0", 17006)
    assert parse_bind(listeners.outbound.bind) == ("127.0.0.1", 17001)
    assert parse_bind(listeners.api.bind) == ("127.0.0.1", 17000)
    assert parse_bind(listeners.peer.bind) == ("0.0.0.0", 17020)
    assert parse_bind(listeners.admin.bind) == ("0.0.0.0", 17090)
    assert listeners.require_c_parser is True
    assert c.app.url == "http://127.0.0.1:8080"
    assert c.xid.headers == ["XID", "X-GTS-XID", "TX_XID"]
    assert c.xid.app_headers == ["XID"]
    assert c.xid.max_length == 128
    assert c.upstreams == {}
    assert c.admin.token_file is None
    assert c.metrics.enabled is True
    assert (c.logging.level, c.logging.format) == ("info", "json")
    assert c.drain_timeout == 20.0
    assert c.node.advertise_address == "127.0.0.1"


def _assert_cluster_defaults(cluster: config.ClusterConfig) -> None:
    t = cluster.timeouts
    assert (t.connect, t.response_header, t.total) == (1.0, 8.0, 12.0)
    p = cluster.pool
    assert (p.max_connections, p.max_idle, p.idle_timeout, p.max_pending) == (100, 100, 30.0, 1024)
    assert (cluster.retries.attempts, cluster.retries.budget_ratio) == (1, 0.2)


def test_app_cluster_defaults() -> None:
    _assert_cluster_defaults(config.parse({}, env={}).app)


def test_upstream_defaults() -> None:
    up = config.parse(_upstream(), env={}).upstreams["orders"]
    assert up.url == "http://orders:8080"
    assert up.xid_headers is None
    _assert_cluster_defaults(up)


def test_proxy_listener_defaults() -> None:
    inbound = config.parse({}, env={}).listeners.inbound
    limits = inbound.limits
    assert (limits.request_line, limits.header_field, limits.header_bytes) == (
        8 * 1024,
        16 * 1024,
        64 * 1024,
    )
    assert limits.header_count == 100
    t = inbound.timeouts
    assert (t.header_read, t.body_idle, t.keepalive) == (10.0, 30.0, 60.0)


def test_a_section_given_in_part_keeps_the_other_defaults() -> None:
    c = config.parse(
        {"app": {"timeouts": {"total": "30s"}}, "listeners": {"api": {"bind": "[::1]:1"}}}, env={}
    )
    assert (c.app.timeouts.connect, c.app.timeouts.total) == (1.0, 30.0)
    assert c.app.url == "http://127.0.0.1:8080"
    assert c.listeners.inbound.bind == "0.0.0.0:17006"


def test_a_listener_given_in_part_keeps_its_default_bind() -> None:
    c = config.parse({"listeners": {"api": {}, "inbound": {"limits": {"header_count": 5}}}}, env={})
    assert c.listeners.api.bind == "127.0.0.1:17000"
    assert c.listeners.inbound.bind == "0.0.0.0:17006"
    assert c.listeners.inbound.limits.header_count == 5


def test_a_zero_duration_is_refused() -> None:
    assert (
        _problem({"drain_timeout": "0ms"})
        == "drain_timeout: duration '0ms' must be greater than zero"
    )


def test_a_key_given_twice_is_refused(tmp_path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("app:\n  url: http://a:1\napp:\n  url: http://b:1\n")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert info.value.problems == [
        "<file>: key 'app' appears twice in one mapping (line 1 and line 3)"
    ]


# --- durations and sizes -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("8s", 8.0),
        ("2m", 120.0),
        ("24h", 86400.0),
        ("1.5s", 1.5),
        (" 30 s ", 30.0),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert config.parse_duration(text) == seconds
    c = config.parse({"drain_timeout": text}, env={})
    assert c.drain_timeout == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value", ["soon", "30", 30, 30.0, True, None, "", "8 sec", "-1s", "1e3s", ".5s", "8S", "1d"]
)
def test_a_bad_duration_is_refused_with_its_key_path(value: object) -> None:
    msg = _problem(_upstream(timeouts={"total": value}))
    assert msg.startswith(f"upstreams.orders.timeouts.total: invalid duration {value!r}")
    assert "500ms" in msg  # says what would be valid


def test_the_brief_example_message() -> None:
    assert _problem(_upstream(timeouts={"total": "soon"})).startswith(
        "upstreams.orders.timeouts.total: invalid duration 'soon'"
    )


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.5, "500ms"), (8.0, "8s"), (120.0, "120s"), (0.0, "0s")]
)
def test_format_duration(seconds: float, text: str) -> None:
    assert config.format_duration(seconds) == text
    assert config.parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("64KiB", 64 * 1024),
        ("1MiB", 1024**2),
        ("2GiB", 2 * 1024**3),
        ("512", 512),
        ("512B", 512),
        (" 8 KiB ", 8 * 1024),
        (4096, 4096),
        (0, 0),
    ],
)
def test_sizes(value: object, size: int) -> None:
    c = config.parse(
        {"listeners": {"inbound": {"bind": "0.0.0.0:17006", "limits": {"header_bytes": value}}}},
        env={},
    )
    assert c.listeners.inbound.limits.header_bytes == size


@pytest.mark.parametrize(
    "value", ["64KB", "64kib", "1.5KiB", "-1", -1, True, "lots", 1.5, None, ""]
)
def test_a_bad_size_is_refused_with_its_key_path(value: object) -> None:
    msg = _problem(
        {"listeners": {"outbound": {"bind": "127.0.0.1:17001", "limits": {"request_line": value}}}}
    )
    assert msg.startswith(f"listeners.outbound.limits.request_line: invalid size {value!r}")


def test_header_count_must_be_positive() -> None:
    msg = _problem(
        {"listeners": {"inbound": {"bind": "0.0.0.0:17006", "limits": {"header_count": 0}}}}
    )
    assert msg.startswith("listeners.inbound.limits.header_count:")


# --- environment substitution --------------------------------------------------------------


def test_substitution_of_set_variables() -> None:
    env = {"POD_IP": "10.1.2.3", "ORDERS": "orders.prod.svc"}
    c = config.parse(
        {
            "node": {"advertise_address": "${POD_IP}"},
            "upstreams": {"orders": {"url": "http://${ORDERS}:8080/v1"}},
        },
        env=env,
    )
    assert c.node.advertise_address == "10.1.2.3"
    assert c.upstreams["orders"].url == "http://orders.prod.svc:8080/v1"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "fallback"),
        ({"POD_IP": "10.1.2.3"}, "10.1.2.3"),
        # as in the shell, ':-' also replaces an empty value
        ({"POD_IP": ""}, "fallback"),
    ],
)
def test_substitution_with_a_default(env: dict[str, str], expected: str) -> None:
    c = config.parse({"node": {"advertise_address": "${POD_IP:-fallback}"}}, env=env)
    assert c.node.advertise_address == expected


def test_an_empty_default_and_an_empty_variable_give_empty_text() -> None:
    c = config.parse({"node": {"advertise_address": "a${X:-}b${Y}c"}}, env={"Y": ""})
    assert c.node.advertise_address == "abc"


def test_an_unset_variable_is_an_error_naming_the_key_path() -> None:
    problems = _problems(
        {
            "node": {"advertise_address": "${POD_IP}"},
            "xid": {"headers": ["XID", "${HDR}"]},
            "upstreams": {"orders": {"url": "http://${ORDERS_HOST}:8080"}},
        }
    )
    assert "node.advertise_address: environment variable POD_IP is not set" in problems
    assert "xid.headers[1]: environment variable HDR is not set" in problems
    assert "upstreams.orders.url: environment variable ORDERS_HOST is not set" in problems


def test_substitution_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GTS_TEST_POD_IP", "10.9.8.7")
    c = config.parse({"node": {"advertise_address": "${GTS_TEST_POD_IP}"}})
    assert c.node.advertise_address == "10.9.8.7"


@pytest.mark.parametrize(
    "value",
    [
        "1.2.3.4\nadmin: {token_file: /etc/passwd}",
        "{admin: {token_file: /etc/passwd}}",
        "x\n  bogus: 1",
        "[1, 2]",
        "'quoted' # comment",
    ],
)
def test_substitution_cannot_inject_yaml_structure(tmp_path: Path, value: str) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text("node:\n  advertise_address: ${POD_IP}\n", encoding="utf-8")
    c = config.load(path, env={"POD_IP": value})
    assert c.node.advertise_address == value
    assert c.admin.token_file is None


def test_a_substituted_value_is_not_substituted_again() -> None:
    c = config.parse({"node": {"advertise_address": "${A}"}}, env={"A": "${B}", "B": "no"})
    assert c.node.advertise_address == "${B}"


def test_keys_are_not_substituted() -> None:
    assert _problem({"${SECTION}": {}}, env={"SECTION": "node"}) == "${SECTION}: unknown key"


def test_a_substituted_scalar_is_still_validated() -> None:
    c = config.parse(
        {"xid": {"max_length": "${ML}"}, "drain_timeout": "${DRAIN}"},
        env={"ML": "256", "DRAIN": "45s"},
    )
    assert (c.xid.max_length, c.drain_timeout) == (256, 45.0)
    assert _problem({"drain_timeout": "${DRAIN}"}, env={"DRAIN": "45"}).startswith(
        "drain_timeout: invalid duration '45'"
    )


# --- secrets -------------------------------------------------------------------------------


def test_a_secret_is_read_from_its_file(token_file: Path) -> None:
    c = config.parse({"admin": {"token_file": str(token_file)}}, env={})
    secret = c.admin.token_file
    assert isinstance(secret, Secret)
    assert secret.reveal() == SECRET  # the trailing newline of a mounted file is dropped
    assert secret.path == str(token_file)


def test_a_secret_path_may_come_from_the_environment(token_file: Path) -> None:
    c = config.parse(
        {"admin": {"token_file": "${TOKEN_FILE}"}}, env={"TOKEN_FILE": str(token_file)}
    )
    assert c.admin.token_file is not None
    assert c.admin.token_file.reveal() == SECRET


def test_a_secret_never_shows(token_file: Path) -> None:
    c = config.parse({"admin": {"token_file": str(token_file)}}, env={})
    redacted = c.redacted()
    renderings = [
        repr(c),
        str(c),
        repr(c.admin),
        repr(c.admin.token_file),
        str(c.admin.token_file),
        f"{c.admin.token_file}",
        json.dumps(redacted),
        str(redacted),
        json.dumps(dump(c)),
        str(dump(c)),
    ]
    for text in renderings:
        assert SECRET not in text
    assert redacted["admin"]["token_file"] == f"<redacted: {token_file}>"
    assert str(token_file) in repr(c.admin.token_file)


def test_a_secret_does_not_leak_into_other_errors(token_file: Path) -> None:
    problems = _problems(
        {"admin": {"token_file": str(token_file)}, "drain_timeout": "soon", "bogus": 1}
    )
    assert len(problems) == 2
    assert all(SECRET not in p for p in problems)


def test_secrets_compare_by_value_without_showing_it() -> None:
    a, b = Secret("x", "/a"), Secret("x", "/b")
    assert a == b
    assert hash(a) == hash(b)
    assert a != Secret("y", "/a")
    assert a != "x"


@pytest.mark.parametrize("content", ["", "\n", "   \n\t\n"])
def test_an_empty_secret_file_is_an_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "token"
    path.write_text(content, encoding="utf-8")
    msg = _problem({"admin": {"token_file": str(path)}})
    assert msg == f"admin.token_file: secret file {str(path)!r} is empty"


def test_a_missing_secret_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "nope"
    msg = _problem({"admin": {"token_file": str(path)}})
    assert msg.startswith(f"admin.token_file: cannot read secret file {str(path)!r}")
    assert "No such file" in msg


def test_a_directory_is_not_a_secret_file(tmp_path: Path) -> None:
    msg = _problem({"admin": {"token_file": str(tmp_path)}})
    assert msg == f"admin.token_file: secret file {str(tmp_path)!r} is not a regular file"


@pytest.mark.parametrize("value", ["", 123, ["a"], {"path": "x"}])
def test_a_secret_file_must_be_a_path(value: object) -> None:
    msg = _problem({"admin": {"token_file": value}})
    assert msg == "admin.token_file: must be the path of a file holding the secret"


def test_an_explicit_null_secret_is_no_secret() -> None:
    assert config.parse({"admin": {"token_file": None}}, env={}).admin.token_file is None


# --- unknown keys --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"bogus": 1}, "bogus"),
        ({"xid": {"header": ["XID"]}}, "xid.header"),
        (_upstream(timeout={"total": "1s"}), "upstreams.orders.timeout"),
        (_upstream(pool={"max_conections": 5}), "upstreams.orders.pool.max_conections"),
        (
            {"listeners": {"inbound": {"bind": "0.0.0.0:17006", "limits": {"x": 1}}}},
            "listeners.inbound.limits.x",
        ),
        ({"listeners": {"api": {"bind": "127.0.0.1:17000", "limits": {}}}}, "listeners.api.limits"),
        ({"app": {"xid_headers": ["XID"]}}, "app.xid_headers"),
    ],
)
def test_unknown_keys_are_errors(data: dict[str, Any], path: str) -> None:
    assert _problem(data) == f"{path}: unknown key"


# --- cross-field checks --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("timeouts", "needles"),
    [
        ({"total": "8s"}, ["timeouts.total (8s) must exceed timeouts.response_header (8s)"]),
        ({"total": "5s"}, ["timeouts.total (5s) must exceed timeouts.response_header (8s)"]),
        (
            {"total": "1s", "response_header": "500ms"},
            ["timeouts.total (1s) must exceed timeouts.connect (1s)"],
        ),
        (
            {"connect": "3s", "response_header": "2s", "total": "2500ms"},
            ["timeouts.total (2.5s) must exceed timeouts.connect (3s)"],
        ),
        (
            {"total": "500ms"},
            [
                "timeouts.total (500ms) must exceed timeouts.response_header (8s)",
                "timeouts.total (500ms) must exceed timeouts.connect (1s)",
            ],
        ),
    ],
)
def test_total_timeout_must_exceed_the_others(timeouts: dict[str, str], needles: list[str]) -> None:
    msg = _problem(_upstream(timeouts=timeouts))
    assert msg.startswith("upstreams.orders: ")
    for needle in needles:
        assert needle in msg
    msg = _problem({"app": {"timeouts": timeouts}})
    assert msg.startswith("app: ")


def test_timeouts_that_nest_are_accepted() -> None:
    c = config.parse(
        _upstream(timeouts={"connect": "200ms", "response_header": "2s", "total": "2001ms"}),
        env={},
    )
    assert c.upstreams["orders"].timeouts.total == pytest.approx(2.001)


def test_max_idle_must_not_exceed_max_connections() -> None:
    msg = _problem(_upstream(pool={"max_connections": 10, "max_idle": 11}))
    assert msg == "upstreams.orders: pool.max_idle must not exceed pool.max_connections"
    assert _problem({"app": {"pool": {"max_idle": 101}}}).startswith("app: pool.max_idle")
    c = config.parse(_upstream(pool={"max_connections": 10, "max_idle": 10}), env={})
    assert c.upstreams["orders"].pool.max_idle == 10


@pytest.mark.parametrize(
    ("pool", "key"),
    [
        ({"max_connections": 0, "max_idle": 0}, "max_connections"),
        ({"max_idle": -1}, "max_idle"),
        ({"max_pending": -1}, "max_pending"),
        ({"idle_timeout": 30}, "idle_timeout"),
    ],
)
def test_pool_bounds(pool: dict[str, Any], key: str) -> None:
    assert _problem(_upstream(pool=pool)).startswith(f"upstreams.orders.pool.{key}:")


@pytest.mark.parametrize(
    ("retries", "key"), [({"attempts": 11}, "attempts"), ({"budget_ratio": 1.5}, "budget_ratio")]
)
def test_retry_bounds(retries: dict[str, Any], key: str) -> None:
    assert _problem(_upstream(retries=retries)).startswith(f"upstreams.orders.retries.{key}:")


# --- binds, urls, names, headers -----------------------------------------------------------


@pytest.mark.parametrize(
    ("bind", "parsed"),
    [
        ("0.0.0.0:17006", ("0.0.0.0", 17006)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("localhost:65535", ("localhost", 65535)),
        ("sidecar.local:80", ("sidecar.local", 80)),
        ("[::1]:17006", ("::1", 17006)),
        ("[::]:17006", ("::", 17006)),
    ],
)
def test_valid_binds(bind: str, parsed: tuple[str, int]) -> None:
    assert parse_bind(bind) == parsed
    c = config.parse({"listeners": {"admin": {"bind": bind}}}, env={})
    assert c.listeners.admin.bind == bind


@pytest.mark.parametrize(
    "bind",
    [
        "17006",
        ":17006",
        "0.0.0.0:",
        "0.0.0.0",
        "0.0.0.0:65536",
        "0.0.0.0:-1",
        "0.0.0.0:abc",
        "0.0.0.0:\u00b2",  # SUPERSCRIPT TWO: str.isdigit says yes, int() says no
        "0.0.0.0:\uff11",  # FULLWIDTH DIGIT ONE
        "::1:17006",  # IPv6 must be bracketed
        "a:b:17006",
        "[::1:17006",
        "[zz]:17006",
        "[1.2.3.4]:17006",
        "local host:17006",
        "localhost\n:17006",
        "",
    ],
)
def test_invalid_binds(bind: str) -> None:
    with pytest.raises(ValueError):
        parse_bind(bind)
    msg = _problem({"listeners": {"peer": {"bind": bind}}})
    assert msg.startswith("listeners.peer.bind: ")
    assert "invalid" in msg


def test_a_bind_must_be_a_string() -> None:
    assert _problem({"listeners": {"peer": {"bind": 17020}}}).startswith("listeners.peer.bind: ")


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080",
        "https://orders.prod.svc:8443/base/",
        "http://[::1]:8080",
        "http://orders",
        "HTTP://orders:80",
    ],
)
def test_valid_urls(url: str) -> None:
    assert config.parse(_upstream(url=url), env={}).upstreams["orders"].url == url


@pytest.mark.parametrize(
    "url",
    [
        "ftp://orders",
        "orders:8080",
        "127.0.0.1:8080",
        "//orders:8080",
        "http://",
        "http://:8080",
        "http://orders:99999",
        "http://orders:port",
        "http://orders/?q=1",
        "http://orders/#frag",
        "http://orders/a\nb",  # urlsplit drops CR/LF/tab silently
        "http://orders/a\tb",
        "http://orders\r\n:80",
        "http://ord ers/",
        " http://orders",
        "http://[zz]:80/",
        "",
    ],
)
def test_invalid_urls(url: str) -> None:
    assert _problem(_upstream(url=url)).startswith("upstreams.orders.url: ")
    assert _problem({"app": {"url": url}}).startswith("app.url: ")


def test_an_upstream_needs_a_url() -> None:
    assert _problem({"upstreams": {"orders": {}}}) == "upstreams.orders.url: Field required"


@pytest.mark.parametrize("name", ["orders", "a", "orders-v2", "orders.prod", "a_b", "9x", "x" * 63])
def test_valid_upstream_names(name: str) -> None:
    c = config.parse({"upstreams": {name: {"url": "http://x"}}}, env={})
    assert list(c.upstreams) == [name]


@pytest.mark.parametrize(
    "name", ["", "-orders", ".orders", "_orders", "a/b", "a b", "a:b", "x" * 64, "orders\n", "é"]
)
def test_invalid_upstream_names(name: str) -> None:
    msg = _problem({"upstreams": {name: {"url": "http://x"}}})
    assert msg.startswith(f"upstreams: upstream name {name!r} must be")


def test_an_upstream_name_is_kept_in_key_paths() -> None:
    # a name that looks like a validator's own location part (pydantic's "function-before[...]",
    # once skipped when key paths were built) is kept as it is
    data = {"upstreams": {"function-x": {"url": "http://x", "timeouts": {"total": "soon"}}}}
    assert _problem(data).startswith("upstreams.function-x.timeouts.total: invalid duration")


def test_upstreams_must_be_a_mapping() -> None:
    assert _problem({"upstreams": ["orders"]}).startswith("upstreams: ")


@pytest.mark.parametrize(
    "name", ["X Bad", "", "XID:", "XID\n", "XID\r\n", "\u00e9", "X(ID)", "X/Y"]
)
def test_invalid_header_names(name: str) -> None:
    msg = _problem({"xid": {"headers": ["XID", name]}})
    assert msg == f"xid.headers[1]: invalid header name {name!r}"
    msg = _problem({"xid": {"app_headers": [name]}})
    assert msg == f"xid.app_headers[0]: invalid header name {name!r}"
    msg = _problem(_upstream(xid_headers=[name]))
    assert msg == f"upstreams.orders.xid_headers[0]: invalid header name {name!r}"


def test_header_names_may_use_any_token_character() -> None:
    c = config.parse({"xid": {"headers": ["TX_XID", "x-gts-xid", "a!#$%&'*+-.^_`|~9"]}}, env={})
    assert c.xid.headers[2] == "a!#$%&'*+-.^_`|~9"


def test_a_header_name_must_be_a_string() -> None:
    assert _problem({"xid": {"headers": [5]}}).startswith("xid.headers[0]: ")
    assert _problem({"xid": {"headers": "XID"}}).startswith("xid.headers: ")


@pytest.mark.parametrize("names", [["XID", "xid"], ["X-GTS-XID", "XID", "x-gts-xid"], ["A", "A"]])
def test_duplicate_header_names_case_insensitively(names: list[str]) -> None:
    dup = "names a header twice (header names are case-insensitive)"
    assert _problem({"xid": {"headers": names}}) == f"xid.headers: {dup}"
    assert _problem({"xid": {"app_headers": names}}) == f"xid.app_headers: {dup}"
    # written twice, the upstream's sidecar would refuse it as a repeated XID header
    assert _problem(_upstream(xid_headers=names)) == f"upstreams.orders.xid_headers: {dup}"


def test_header_lists_must_not_be_empty() -> None:
    assert _problem({"xid": {"headers": []}}) == "xid.headers: must name at least one header"
    assert (
        _problem({"xid": {"app_headers": []}}) == "xid.app_headers: must name at least one header"
    )


def test_upstream_xid_headers() -> None:
    c = config.parse(_upstream(xid_headers=["TX_XID", "X-GTS-XID"]), env={})
    assert c.upstreams["orders"].xid_headers == ["TX_XID", "X-GTS-XID"]
    # an upstream outside transactions may be sent no XID at all
    assert config.parse(_upstream(xid_headers=[]), env={}).upstreams["orders"].xid_headers == []


@pytest.mark.parametrize(("value", "ok"), [(8, True), (4096, True), (7, False), (4097, False)])
def test_xid_max_length_bounds(value: int, ok: bool) -> None:
    data = {"xid": {"max_length": value}}
    if ok:
        assert config.parse(data, env={}).xid.max_length == value
    else:
        assert _problem(data).startswith("xid.max_length: ")


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"logging": {"level": "verbose"}}, "logging.level"),
        ({"logging": {"format": "xml"}}, "logging.format"),
        ({"metrics": {"enabled": "perhaps"}}, "metrics.enabled"),
        ({"listeners": {"require_c_parser": "sometimes"}}, "listeners.require_c_parser"),
        ({"node": "10.0.0.1"}, "node"),
    ],
)
def test_other_typed_fields(data: dict[str, Any], path: str) -> None:
    assert _problem(data).startswith(f"{path}: ")


# --- all problems at once ------------------------------------------------------------------


def test_every_problem_is_reported_together(tmp_path: Path) -> None:
    problems = _problems(
        {
            "bogus": True,
            "listeners": {"inbound": {"bind": "nowhere"}, "admin": {"bind": "0.0.0.0:99999"}},
            "app": {"url": "ftp://app"},
            "xid": {"headers": ["XID", "xid"], "max_length": 1},
            "admin": {"token_file": str(tmp_path / "missing")},
            "upstreams": {
                "orders": {"url": "http://orders", "timeouts": {"total": "soon"}},
                "bad name": {"url": "http://x"},
                "stock": {"url": "http://stock", "pool": {"max_connections": 1, "max_idle": 2}},
            },
            "drain_timeout": "${DRAIN}",
        }
    )
    expected_prefixes = [
        "drain_timeout: environment variable DRAIN is not set",
        "bogus: unknown key",
        "listeners.inbound.bind: invalid bind address 'nowhere'",
        "listeners.admin.bind: invalid port in '0.0.0.0:99999'",
        "app.url: invalid url 'ftp://app'",
        "xid.headers: names a header twice",
        "xid.max_length: ",
        "admin.token_file: cannot read secret file",
        "upstreams.orders.timeouts.total: invalid duration 'soon'",
        "upstreams.stock: pool.max_idle must not exceed pool.max_connections",
        "drain_timeout: invalid duration ''",
    ]
    for prefix in expected_prefixes:
        assert sum(p.startswith(prefix) for p in problems) == 1, (prefix, problems)
    # the upstream-name check runs only once every upstream is itself valid
    assert len(problems) == len(expected_prefixes)


def test_a_config_that_is_not_a_mapping_is_refused() -> None:
    assert _problem([1, 2]) == "<root>: the config file must be a mapping of sections"
    assert _problem("text") == "<root>: the config file must be a mapping of sections"


# --- load ----------------------------------------------------------------------------------


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sidecar.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_load_a_whole_file(tmp_path: Path, token_file: Path) -> None:
    path = _write(
        tmp_path,
        f"""\
node:
  advertise_address: ${{POD_IP}}
listeners:
  inbound:
    bind: 0.0.0.0:16006
    limits: {{header_bytes: 32KiB}}
app:
  url: http://127.0.0.1:9090
  timeouts: {{connect: 250ms, response_header: 5s, total: 6s}}
xid:
  headers: [XID, TX_XID]
upstreams:
  orders:
    url: http://orders.prod.svc:8080
    pool: {{max_connections: 20, max_idle: 5}}
    xid_headers: [TX_XID]
admin:
  token_file: {token_file}
drain_timeout: 2m
""",
    )
    c = config.load(path, env={"POD_IP": "10.0.0.7"})
    assert c.node.advertise_address == "10.0.0.7"
    assert c.listeners.inbound.bind == "0.0.0.0:16006"
    assert c.listeners.inbound.limits.header_bytes == 32 * 1024
    assert c.listeners.outbound.bind == "127.0.0.1:17001"
    assert c.app.timeouts.connect == 0.25
    assert c.xid.headers == ["XID", "TX_XID"]
    assert c.upstreams["orders"].pool.max_idle == 5
    assert c.admin.token_file is not None and c.admin.token_file.reveal() == SECRET
    assert c.drain_timeout == 120.0
    assert SECRET not in repr(c)
    redacted = c.redacted()
    assert redacted["app"]["timeouts"] == {
        "connect": "250ms",
        "response_header": "5s",
        "total": "6s",
    }
    assert redacted["drain_timeout"] == "120s"
    # the redacted form is itself a valid config, apart from the secret it stands for
    del redacted["admin"]
    assert config.parse(redacted, env={}).upstreams == c.upstreams


def test_load_an_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    assert config.load(_write(tmp_path, ""), env={}) == config.parse({}, env={})
    assert config.load(_write(tmp_path, "# only a comment\n"), env={}) == Config()


@pytest.mark.parametrize(
    ("text", "line", "column"),
    [
        ("app:\n  url: http://x\n   bad: indent\n", 3, 7),
        ("xid:\n  headers: [XID, TX_XID\n", 3, 1),
        ("a: b: c\n", 1, 5),
        ("app:\n\turl: x\n", 2, 1),
    ],
)
def test_load_invalid_yaml_reports_line_and_column(
    tmp_path: Path, text: str, line: int, column: int
) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(_write(tmp_path, text), env={})
    [problem] = info.value.problems
    assert problem.startswith(f"<file>: invalid YAML at line {line}, column {column}: ")


def test_load_refuses_python_tags(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(_write(tmp_path, "app: !!python/object/apply:os.system [echo hi]\n"), env={})
    assert info.value.problems[0].startswith("<file>: invalid YAML at line 1")


def test_load_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        config.load(path, env={})
    assert info.value.problems == [f"<file>: cannot read {str(path)!r}: No such file or directory"]


def test_load_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("node:\n  advertise_address: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        config.load(path, env={})
    [problem] = info.value.problems
    assert problem.startswith(f"<file>: {str(path)!r} is not UTF-8")


def test_load_reports_schema_problems_with_key_paths(tmp_path: Path) -> None:
    path = _write(
        tmp_path, "upstreams:\n  orders:\n    url: http://o\n    timeouts: {total: soon}\n"
    )
    with pytest.raises(ConfigError) as info:
        config.load(path, env={})
    assert info.value.problems == [
        "upstreams.orders.timeouts.total: invalid duration 'soon' "
        "(use a number and a unit: 500ms, 8s, 2m, 24h)"
    ]


def test_load_a_root_that_is_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(_write(tmp_path, "- a\n- b\n"), env={})
    assert info.value.problems == ["<root>: the config file must be a mapping of sections"]


# --- immutability --------------------------------------------------------------------------


def test_config_is_frozen() -> None:
    c = config.parse(_upstream(), env={})
    with pytest.raises(FrozenInstanceError):
        c.drain_timeout = 1.0  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        c.app = config.AppConfig()  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        c.app.timeouts.total = 99.0  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        c.upstreams["orders"].pool.max_connections = 1  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        c.listeners.inbound.bind = "0.0.0.0:1"  # type: ignore[misc]
    assert c.app.timeouts.total == 12.0


def test_configs_compare_by_value() -> None:
    assert config.parse(_upstream(), env={}) == config.parse(_upstream(), env={})
    assert config.parse(_upstream(), env={}) != config.parse({}, env={})
