"""sidecar/prom.py against prometheus_client (kept for the tests): the same metrics, updated
the same way, give the same /metrics text byte for byte, apart from the values that are
clocks or the process's own state (`*_created`, process_*, python_gc_*). Both the primitives
on awkward inputs and the sidecar's whole `Metrics()` are compared."""

from __future__ import annotations

import math
import re
import sys
import types
from pathlib import Path
from typing import Any

import prometheus_client
import prometheus_client.core
import prometheus_client.registry
import pytest

from sidecar import prom

METRICS_PY = Path(__file__).resolve().parents[2] / "sidecar" / "metrics.py"

# a sample line whose value is a clock or the process's own state: the value is masked
_VOLATILE = re.compile(r"^((?:\S+_created|process_\S+|python_gc_\S+)(?:\{.*\})?) .*$", re.M)


def normalized(text: bytes) -> str:
    return _VOLATILE.sub(r"\1 X", text.decode())


def _exercise(lib: Any) -> Any:
    """Every primitive, on inputs where formatting could differ."""
    registry = lib.CollectorRegistry()
    counter = lib.Counter("t_requests", "Requests \\ with\nnewline", ["a", "b"], registry=registry)
    counter.labels("x", 'quote " back \\ nl \n é').inc()
    counter.labels(a="y", b="z").inc(2.5)
    counter.labels("big", "1").inc(12345678.0)
    counter.labels("gone", "1").inc()
    counter.remove("gone", "1")
    plain = lib.Counter("t_plain_total", "ends in _total", registry=registry)
    plain.inc(1e-7)
    gauge = lib.Gauge("t_gauge", "g", ["k"], registry=registry)
    gauge.labels("neg").set(-3.25)
    gauge.labels("inf").set(math.inf)
    gauge.labels("nan").set(math.nan)
    gauge.labels("n").inc(3)
    gauge.labels("n").dec(1)
    gauge.labels("huge").set(1.5e21)
    func = lib.Gauge("t_func", "from a function", registry=registry)
    func.set_function(lambda: 7)
    lib.Gauge("t_empty", "labelled, never set", ["k"], registry=registry)
    hist = lib.Histogram(
        "t_seconds", "h", ["op"], buckets=(0.0005, 0.001, 0.5, 10.0, 1e7), registry=registry
    )
    for value in (0.0005, 0.0004, 0.7, 10.0, 11, 2e7):
        hist.labels("read").observe(value)
    hist.labels("write")
    unlabelled = lib.Histogram("t_plain_seconds", "h2", registry=registry)
    unlabelled.observe(0.3)
    info = lib.Info("t_build", "build", registry=registry)
    info.info({"version": "1.2.3", "commit": 'a"b'})

    class Families(
        prometheus_client.registry.Collector if lib is prometheus_client else prom.Collector
    ):  # type: ignore[misc]
        def collect(self) -> Any:
            core = prometheus_client.core if lib is prometheus_client else prom
            c = core.CounterMetricFamily("t_family_total", "cf", labels=["l"])
            c.add_metric(["one"], 3)
            g = core.GaugeMetricFamily("t_family_gauge", "gf", labels=["l"])
            g.add_metric(["two"], 0.1)
            h = core.HistogramMetricFamily("t_family_seconds", "hf", labels=["l"])
            h.add_metric(["three"], [("0.5", 1.0), ("+Inf", 4.0)], 2.5)
            return [c, g, h]

        def describe(self) -> Any:
            return iter(())

    registry.register(Families())
    return registry


def test_primitives_write_what_prometheus_client_writes() -> None:
    ours = prom.generate_latest(_exercise(prom))
    theirs = prometheus_client.generate_latest(_exercise(prometheus_client))
    assert normalized(ours) == normalized(theirs)
    assert b"t_requests_created" in ours  # the _created series are there, as theirs


def _metrics_module(lib: str) -> types.ModuleType:
    """sidecar/metrics.py, its `sidecar.prom` imports served by `lib`."""
    source = METRICS_PY.read_text()
    if lib == "prometheus_client":
        shim = types.ModuleType("prom_shim")
        for name in dir(prom):
            for origin in (prometheus_client, prometheus_client.core, prometheus_client.registry):
                if hasattr(origin, name):
                    setattr(shim, name, getattr(origin, name))
                    break
        sys.modules["prom_shim"] = shim
        assert "from sidecar.prom import" in source
        source = source.replace("from sidecar.prom import", "from prom_shim import")
    module = types.ModuleType(f"metrics_with_{lib}")
    module.__dict__["__name__"] = module.__name__
    sys.modules[module.__name__] = module  # dataclasses and annotations look it up
    exec(compile(source, str(METRICS_PY), "exec"), module.__dict__)
    return module


class _Pool:
    def __init__(self, name: str) -> None:
        self.name, self.in_use, self.idle_count, self.waiting = name, 2, 3, 1


def _use(metrics: Any, lib: Any) -> None:
    """One update of every metric object the sidecar has (whatever its kind)."""
    for attr, value in sorted(vars(metrics).items()):
        if isinstance(value, lib.Counter | lib.Gauge | lib.Histogram):
            target = (
                value.labels(*[f"{attr}-{n}" for n in value._labelnames])
                if value._labelnames
                else value
            )
            if isinstance(value, lib.Counter):
                target.inc(3)
            elif isinstance(value, lib.Gauge):
                target.set(4.5)
            else:
                target.observe(0.02)
        elif isinstance(value, lib.Info):
            value.info({"version": "9.9"})
    metrics.proxy.stats("inbound", "app").observe(200, 0.003)
    metrics.proxy.stats("outbound", "inventory").observe(503, 2.0)
    pools = [_Pool("app"), _Pool("app"), _Pool("inventory")]
    for pool in pools:
        metrics.pools.add(pool)
    metrics.journal_files.add("journal", lambda: 4096)
    metrics._pools_alive = pools  # the pool set is weak


@pytest.mark.parametrize("_", [0])
def test_sidecar_metrics_write_what_they_wrote_with_prometheus_client(_: int) -> None:
    ours_module = _metrics_module("prom")
    theirs_module = _metrics_module("prometheus_client")
    ours, theirs = ours_module.Metrics(), theirs_module.Metrics()
    _use(ours, prom)
    _use(theirs, prometheus_client)
    ours_text = normalized(prom.generate_latest(ours.registry))
    theirs_text = normalized(prometheus_client.generate_latest(theirs.registry))
    assert ours_text == theirs_text
    assert "gts_sidecar_requests_total" in ours_text and "process_open_fds" in ours_text


def test_registry_refuses_a_name_twice_and_finds_samples() -> None:
    registry = prom.CollectorRegistry()
    counter = prom.Counter("t_once", "d", ["k"], registry=registry)
    with pytest.raises(ValueError, match="Duplicated"):
        prom.Gauge("t_once_total", "d", registry=registry)
    with pytest.raises(ValueError, match="Duplicated"):
        prom.Gauge("t_once", "d", registry=registry)  # as prometheus_client: the bare name too
    counter.labels("v").inc(2)
    assert registry.get_sample_value("t_once_total", {"k": "v"}) == 2
    assert registry.get_sample_value("t_once_total", {"k": "w"}) is None
    registry.unregister(counter)
    prom.Gauge("t_once_total", "d", registry=registry)  # free again


def test_bad_names_and_uses_are_refused() -> None:
    with pytest.raises(ValueError, match="metric name"):
        prom.Counter("t-bad", "d")
    with pytest.raises(ValueError, match="label name"):
        prom.Histogram("t_h", "d", ["le"])
    counter = prom.Counter("t_c", "d", ["k"])
    with pytest.raises(ValueError, match="label count"):
        counter.labels("a", "b")
    with pytest.raises(ValueError, match="non-negative"):
        counter.labels("a").inc(-1)
    with pytest.raises(ValueError, match="No label names"):
        prom.Gauge("t_g", "d").labels("x")
