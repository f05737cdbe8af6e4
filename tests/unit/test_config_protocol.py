"""app.protocol / upstreams.NAME.protocol: http1, h2c (http:// only), h2 (https:// only)."""

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
