"""app.protocol / upstreams.NAME.protocol (http1, h2c on http://, h2 on https://) and the
proxy listeners' clients limits: bad values are refused with their key path."""

from __future__ import annotations

import pytest

from sidecar import config as configmod
from sidecar.errors import ConfigError


@pytest.mark.parametrize(
    ("url", "protocol", "words"),
    [
        ("https://app:8443", "h2c", "protocol h2c needs an http:// url"),
        ("http://app:8080", "h2", "protocol h2 needs an https:// url"),
        ("http://app:8080", "http3", "protocol"),
    ],
)
def test_a_protocol_that_does_not_fit_the_url_is_refused_with_its_key_path(url, protocol, words):
    with pytest.raises(ConfigError) as info:
        configmod.parse({"upstreams": {"inventory": {"url": url, "protocol": protocol}}}, env={})
    problems = " ".join(info.value.problems)
    assert "upstreams.inventory" in problems
    assert words in problems


@pytest.mark.parametrize(
    ("url", "protocol"),
    [("http://app:8080", "http1"), ("http://app:9090", "h2c"), ("https://app:8443", "h2")],
)
def test_protocols_that_fit_are_accepted(url, protocol):
    cfg = configmod.parse({"app": {"url": url, "protocol": protocol}}, env={})
    assert cfg.app.protocol == protocol


@pytest.mark.parametrize(
    ("clients", "key"),
    [
        ({"max_connections": 0}, "listeners.inbound.clients.max_connections"),
        (
            {"max_connections_per_client": -1},
            "listeners.inbound.clients.max_connections_per_client",
        ),
        ({"request_buffer": "lots"}, "listeners.inbound.clients.request_buffer"),
        ({"min_rate_window": "soon"}, "listeners.inbound.clients.min_rate_window"),
        ({"max_concurrent_streams": 0}, "listeners.inbound.clients.max_concurrent_streams"),
        ({"max_conections": 5}, "listeners.inbound.clients.max_conections"),
    ],
)
def test_bad_client_limits_are_refused_with_their_key_path(clients, key):
    with pytest.raises(ConfigError) as info:
        configmod.parse({"listeners": {"inbound": {"clients": clients}}}, env={})
    assert any(p.startswith(key) for p in info.value.problems), info.value.problems
