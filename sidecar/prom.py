"""The Prometheus objects the sidecar uses (counter, gauge, histogram, info, metric families,
a registry, the process and Python collectors) and the text exposition format 0.0.4.

Why not prometheus_client: importing its package also imports its exposition servers
(wsgiref, http.server, gzip and more), 1.2 MiB of idle RSS the sidecar never uses; aiohttp
serves /metrics. This module keeps prometheus_client's API for what the sidecar calls and
writes byte for byte the text that `prometheus_client.generate_latest` writes for it
(tests/unit/test_prom.py compares the two), `_created` series included.

Rules: no I/O apart from the process collector reading /proc at scrape time. Metric and
label names are checked when a metric is made (legacy Prometheus names only, so no name is
ever escaped); label values are escaped on output. Updates take a lock per child, as
prometheus_client's do, since threads (the journal writer, `to_thread` work) update some.
"""

from __future__ import annotations

import gc
import math
import os
import platform
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Final, NamedTuple, TypeVar, cast

CONTENT_TYPE_LATEST: Final = "text/plain; version=0.0.4; charset=utf-8"

_METRIC_NAME: Final = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME: Final = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
INF: Final = float("inf")

#: PROMETHEUS_DISABLE_CREATED_SERIES, as prometheus_client reads it
_USE_CREATED: Final = os.environ.get("PROMETHEUS_DISABLE_CREATED_SERIES", "False").lower() not in (
    "true",
    "1",
    "t",
)


class Sample(NamedTuple):
    name: str
    labels: dict[str, str]
    value: float
    timestamp: float | None = None


def float_to_go_string(d: float) -> str:
    """A float as Go (and so Prometheus) prints it: +Inf, NaN, exponents past 1e6."""
    d = float(d)
    if d == INF:
        return "+Inf"
    if d == -INF:
        return "-Inf"
    if math.isnan(d):
        return "NaN"
    s = repr(d)
    dot = s.find(".")
    if d > 0 and dot > 6:
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return s


def _check_names(name: str, labelnames: Iterable[str], reserved: Sequence[str] = ()) -> None:
    if not _METRIC_NAME.match(name):
        raise ValueError(f"invalid metric name: {name!r}")
    for label in labelnames:
        if not _LABEL_NAME.match(label) or label.startswith("__") or label in reserved:
            raise ValueError(f"invalid label name: {label!r}")


# --- metric families: what a collector yields ------------------------------------------------


class Metric:
    """One metric family: name, help, type and its samples."""

    def __init__(self, name: str, documentation: str, typ: str) -> None:
        _check_names(name, ())
        self.name = name
        self.documentation = documentation
        self.type = typ
        self.samples: list[Sample] = []

    def add_sample(
        self, name: str, labels: dict[str, str], value: float, timestamp: float | None = None
    ) -> None:
        self.samples.append(Sample(name, labels, value, timestamp))


class CounterMetricFamily(Metric):
    def __init__(
        self,
        name: str,
        documentation: str,
        value: float | None = None,
        labels: Sequence[str] | None = None,
        created: float | None = None,
    ) -> None:
        if name.endswith("_total"):
            name = name[:-6]
        super().__init__(name, documentation, "counter")
        if labels is not None and value is not None:
            raise ValueError("Can only specify at most one of value and labels.")
        self._labelnames = tuple(labels or ())
        if value is not None:
            self.add_metric([], value, created)

    def add_metric(self, labels: Sequence[str], value: float, created: float | None = None) -> None:
        pairs = dict(zip(self._labelnames, labels, strict=True))
        self.samples.append(Sample(self.name + "_total", pairs, value))
        if created is not None:
            self.samples.append(Sample(self.name + "_created", pairs, created))


class GaugeMetricFamily(Metric):
    def __init__(
        self,
        name: str,
        documentation: str,
        value: float | None = None,
        labels: Sequence[str] | None = None,
    ) -> None:
        super().__init__(name, documentation, "gauge")
        if labels is not None and value is not None:
            raise ValueError("Can only specify at most one of value and labels.")
        self._labelnames = tuple(labels or ())
        if value is not None:
            self.add_metric([], value)

    def add_metric(self, labels: Sequence[str], value: float) -> None:
        self.samples.append(
            Sample(self.name, dict(zip(self._labelnames, labels, strict=True)), value)
        )


class HistogramMetricFamily(Metric):
    def __init__(self, name: str, documentation: str, labels: Sequence[str] | None = None) -> None:
        super().__init__(name, documentation, "histogram")
        self._labelnames = tuple(labels or ())

    def add_metric(
        self,
        labels: Sequence[str],
        buckets: Sequence[tuple[str, float]],
        sum_value: float | None,
    ) -> None:
        """`buckets`: (upper bound as text, cumulative count), sorted, +Inf last."""
        pairs = list(zip(self._labelnames, labels, strict=True))
        for bound, count in buckets:
            self.samples.append(Sample(self.name + "_bucket", dict([*pairs, ("le", bound)]), count))
        if float(buckets[0][0]) >= 0 and sum_value is not None:
            self.samples.append(Sample(self.name + "_count", dict(pairs), buckets[-1][1]))
            self.samples.append(Sample(self.name + "_sum", dict(pairs), sum_value))


# --- the registry -----------------------------------------------------------------------------


class Collector:
    """Anything a registry can collect from."""

    def collect(self) -> Iterable[Metric]:
        raise NotImplementedError

    def describe(self) -> Iterable[Metric]:
        """The families `collect` yields, without samples (for name clash checks); empty:
        not checked."""
        return ()


class CollectorRegistry(Collector):
    """Collectors in the order they were registered; one name belongs to one collector."""

    def __init__(self) -> None:
        self._collectors: dict[Collector, set[str]] = {}
        self._names: dict[str, Collector] = {}
        self._lock = threading.Lock()

    def register(self, collector: Collector) -> None:
        with self._lock:
            names = _series_names(collector)
            clash = names & self._names.keys()
            if clash:
                raise ValueError(f"Duplicated timeseries in CollectorRegistry: {clash}")
            for name in names:
                self._names[name] = collector
            self._collectors[collector] = names

    def unregister(self, collector: Collector) -> None:
        with self._lock:
            for name in self._collectors.pop(collector):
                del self._names[name]

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            collectors = list(self._collectors)
        for collector in collectors:
            yield from collector.collect()

    def get_sample_value(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """The value of one sample, or None (for tests and checks, not for speed)."""
        labels = labels or {}
        for metric in self.collect():
            for sample in metric.samples:
                if sample.name == name and sample.labels == labels:
                    return sample.value
        return None


_SUFFIXES: Final = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "info": ("_info",),
}


def _series_names(collector: Collector) -> set[str]:
    names = set()
    for metric in collector.describe():
        names.add(metric.name)
        for suffix in _SUFFIXES.get(metric.type, ()):
            names.add(metric.name + suffix)
    return names


# --- the metric objects the code updates ------------------------------------------------------

M = TypeVar("M", bound="MetricWrapperBase")


class MetricWrapperBase(Collector):
    """A metric with label names: its children (one per label values) hold the values; one
    without label names is its own only child."""

    _type = ""
    _reserved: Sequence[str] = ()

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str] = (),
        registry: CollectorRegistry | None = None,
        _labelvalues: tuple[str, ...] = (),
    ) -> None:
        self._name = name[:-6] if self._type == "counter" and name.endswith("_total") else name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._labelvalues = _labelvalues
        _check_names(self._name, self._labelnames, self._reserved)
        self._lock = threading.Lock()
        self._metrics: dict[tuple[str, ...], MetricWrapperBase] = {}
        if not self._labelnames or self._labelvalues:
            self._metric_init()
        if registry is not None and not self._labelvalues:
            registry.register(self)

    def _child(self: M, labelvalues: tuple[str, ...]) -> M:
        child = object.__new__(type(self))
        child._copy_settings(self)
        child._labelvalues = labelvalues
        child._lock = threading.Lock()
        child._metrics = {}
        child._metric_init()
        return child

    def _copy_settings(self, parent: MetricWrapperBase) -> None:
        self._name = parent._name
        self._documentation = parent._documentation
        self._labelnames = parent._labelnames

    def _metric_init(self) -> None:
        raise NotImplementedError

    def describe(self) -> Iterable[Metric]:
        return (Metric(self._name, self._documentation, self._type),)

    def labels(self: M, *labelvalues: object, **labelkwargs: object) -> M:
        if not self._labelnames:
            raise ValueError(f"No label names were set when constructing {self._name}")
        if self._labelvalues:
            raise ValueError(f"{self._name} already has labels set; can not chain .labels()")
        if labelvalues and labelkwargs:
            raise ValueError("Can't pass both *args and **kwargs")
        if labelkwargs:
            if sorted(labelkwargs) != sorted(self._labelnames):
                raise ValueError("Incorrect label names")
            values = tuple(str(labelkwargs[name]) for name in self._labelnames)
        else:
            if len(labelvalues) != len(self._labelnames):
                raise ValueError("Incorrect label count")
            values = tuple(str(v) for v in labelvalues)
        with self._lock:
            child = self._metrics.get(values)
            if child is None:
                child = self._metrics[values] = self._child(values)
            return cast(M, child)

    def remove(self, *labelvalues: object) -> None:
        if not self._labelnames:
            raise ValueError(f"No label names were set when constructing {self._name}")
        if len(labelvalues) != len(self._labelnames):
            raise ValueError(
                f"Incorrect label count (expected {len(self._labelnames)}, got {labelvalues})"
            )
        with self._lock:
            self._metrics.pop(tuple(str(v) for v in labelvalues), None)

    def clear(self) -> None:
        with self._lock:
            self._metrics = {}

    def _child_samples(self) -> Iterable[tuple[str, dict[str, str], float]]:
        raise NotImplementedError

    def collect(self) -> Iterable[Metric]:
        metric = Metric(self._name, self._documentation, self._type)
        if self._labelnames:
            with self._lock:
                children = list(self._metrics.items())
            for values, child in children:
                series = list(zip(self._labelnames, values, strict=True))
                for suffix, labels, value in child._child_samples():
                    metric.add_sample(self._name + suffix, dict([*series, *labels.items()]), value)
        else:
            for suffix, labels, value in self._child_samples():
                metric.add_sample(self._name + suffix, labels, value)
        return (metric,)


class Counter(MetricWrapperBase):
    _type = "counter"

    def _metric_init(self) -> None:
        self._value = 0.0
        self._created = time.time()

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        with self._lock:
            self._value += amount

    def _child_samples(self) -> Iterable[tuple[str, dict[str, str], float]]:
        samples: list[tuple[str, dict[str, str], float]] = [("_total", {}, self._value)]
        if _USE_CREATED:
            samples.append(("_created", {}, self._created))
        return samples


class Gauge(MetricWrapperBase):
    _type = "gauge"

    def _metric_init(self) -> None:
        self._value = 0.0
        self._function: Callable[[], float] | None = None

    def inc(self, amount: float = 1) -> None:
        with self._lock:
            self._value += amount

    def dec(self, amount: float = 1) -> None:
        with self._lock:
            self._value -= amount

    def set(self, value: float) -> None:
        with self._lock:
            self._value = float(value)

    def set_function(self, f: Callable[[], float]) -> None:
        """The value is `f()`, read at each scrape."""
        self._function = f

    def _child_samples(self) -> Iterable[tuple[str, dict[str, str], float]]:
        value = float(self._function()) if self._function is not None else self._value
        return (("", {}, value),)


class Histogram(MetricWrapperBase):
    _type = "histogram"
    _reserved = ("le",)
    DEFAULT_BUCKETS: Final = (
        *(0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75),
        *(1.0, 2.5, 5.0, 7.5, 10.0, INF),
    )

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str] = (),
        registry: CollectorRegistry | None = None,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> None:
        bounds = [float(b) for b in buckets]
        if bounds != sorted(bounds):
            raise ValueError("Buckets not in sorted order")
        if bounds and bounds[-1] != INF:
            bounds.append(INF)
        if len(bounds) < 2:
            raise ValueError("Must have at least two buckets")
        self._upper_bounds = bounds
        self._le = [float_to_go_string(b) for b in bounds]
        super().__init__(name, documentation, labelnames, registry)

    def _copy_settings(self, parent: MetricWrapperBase) -> None:
        super()._copy_settings(parent)
        assert isinstance(parent, Histogram)
        self._upper_bounds = parent._upper_bounds
        self._le = parent._le

    def _metric_init(self) -> None:
        self._counts = [0.0] * len(self._upper_bounds)
        self._sum = 0.0
        self._created = time.time()

    def observe(self, amount: float) -> None:
        with self._lock:
            self._sum += amount
            for i, bound in enumerate(self._upper_bounds):
                if amount <= bound:
                    self._counts[i] += 1
                    break

    def _child_samples(self) -> Iterable[tuple[str, dict[str, str], float]]:
        samples: list[tuple[str, dict[str, str], float]] = []
        acc = 0.0
        for le, count in zip(self._le, self._counts, strict=True):
            acc += count
            samples.append(("_bucket", {"le": le}, acc))
        samples.append(("_count", {}, acc))
        if self._upper_bounds[0] >= 0:
            samples.append(("_sum", {}, self._sum))
        if _USE_CREATED:
            samples.append(("_created", {}, self._created))
        return samples


class Info(MetricWrapperBase):
    _type = "info"

    def _metric_init(self) -> None:
        self._info: dict[str, str] = {}

    def info(self, val: dict[str, str]) -> None:
        if set(self._labelnames) & val.keys():
            raise ValueError(f"Overlapping labels for Info metric {self._name}: {val}")
        if any(v is None for v in val.values()):
            raise ValueError("Label value cannot be None")
        with self._lock:
            self._info = dict(val)

    def _child_samples(self) -> Iterable[tuple[str, dict[str, str], float]]:
        with self._lock:
            return (("_info", self._info, 1.0),)


# --- the standard process_* and python_* collectors ------------------------------------------


class ProcessCollector(Collector):
    """process_* from /proc/self: CPU, memory, start time, file descriptors."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._ticks = float(os.sysconf("SC_CLK_TCK"))
        self._pagesize = os.sysconf("SC_PAGE_SIZE")
        self._btime = 0.0
        try:
            with open("/proc/stat", "rb") as stat:
                for line in stat:
                    if line.startswith(b"btime "):
                        self._btime = float(line.split()[1])
        except OSError:
            pass
        if registry is not None:
            registry.register(self)

    def collect(self) -> Iterable[Metric]:
        if not self._btime:
            return []
        result: list[Metric] = []
        try:
            with open("/proc/self/stat", "rb") as f:
                parts = f.read().split(b")")[-1].split()
            result += [
                GaugeMetricFamily(
                    "process_virtual_memory_bytes",
                    "Virtual memory size in bytes.",
                    value=float(parts[20]),
                ),
                GaugeMetricFamily(
                    "process_resident_memory_bytes",
                    "Resident memory size in bytes.",
                    value=float(parts[21]) * self._pagesize,
                ),
                GaugeMetricFamily(
                    "process_start_time_seconds",
                    "Start time of the process since unix epoch in seconds.",
                    value=float(parts[19]) / self._ticks + self._btime,
                ),
                CounterMetricFamily(
                    "process_cpu_seconds_total",
                    "Total user and system CPU time spent in seconds.",
                    value=(float(parts[11]) + float(parts[12])) / self._ticks,
                ),
            ]
        except OSError:
            pass
        try:
            max_fds: Metric | None = None
            with open("/proc/self/limits", "rb") as limits:
                for line in limits:
                    if line.startswith(b"Max open file"):
                        max_fds = GaugeMetricFamily(
                            "process_max_fds",
                            "Maximum number of open file descriptors.",
                            value=float(line.split()[3]),
                        )
                        break
            result.append(
                GaugeMetricFamily(
                    "process_open_fds",
                    "Number of open file descriptors.",
                    value=len(os.listdir("/proc/self/fd")),
                )
            )
            if max_fds is not None:
                result.append(max_fds)
        except OSError:
            pass
        return result


class PlatformCollector(Collector):
    """python_info{version, implementation, major, minor, patchlevel} 1."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        major, minor, patchlevel = platform.python_version_tuple()
        info = {
            "version": platform.python_version(),
            "implementation": platform.python_implementation(),
            "major": major,
            "minor": minor,
            "patchlevel": patchlevel,
        }
        family = GaugeMetricFamily("python_info", "Python platform information", labels=list(info))
        family.add_metric(list(info.values()), 1)
        self._metrics = [family]
        if registry is not None:
            registry.register(self)

    def collect(self) -> Iterable[Metric]:
        return self._metrics


class GCCollector(Collector):
    """python_gc_*: the cyclic collector's counts per generation (gc.get_stats)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        if registry is not None:
            registry.register(self)

    def collect(self) -> Iterable[Metric]:
        collected = CounterMetricFamily(
            "python_gc_objects_collected", "Objects collected during gc", labels=["generation"]
        )
        uncollectable = CounterMetricFamily(
            "python_gc_objects_uncollectable",
            "Uncollectable objects found during GC",
            labels=["generation"],
        )
        collections = CounterMetricFamily(
            "python_gc_collections",
            "Number of times this generation was collected",
            labels=["generation"],
        )
        for gen, stat in enumerate(gc.get_stats()):
            collected.add_metric([str(gen)], value=stat["collected"])
            uncollectable.add_metric([str(gen)], value=stat["uncollectable"])
            collections.add_metric([str(gen)], value=stat["collections"])
        return [collected, uncollectable, collections]


# --- exposition -------------------------------------------------------------------------------

_TEXT_TYPES: Final = {"counter": "counter", "info": "gauge", "histogram": "histogram"}
_TEXT_NAMES: Final = {"counter": "_total", "info": "_info"}


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _sample_line(sample: Sample) -> str:
    if sample.labels:
        pairs = ",".join(
            '{}="{}"'.format(k, v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\""))
            for k, v in sorted(sample.labels.items())
        )
        labels = "{" + pairs + "}"
    else:
        labels = ""
    timestamp = f" {int(float(sample.timestamp) * 1000):d}" if sample.timestamp is not None else ""
    return f"{sample.name}{labels} {float_to_go_string(sample.value)}{timestamp}\n"


def generate_latest(registry: Collector) -> bytes:
    """The registry's metrics in the Prometheus text format 0.0.4."""
    output: list[str] = []
    for metric in registry.collect():
        name = metric.name + _TEXT_NAMES.get(metric.type, "")
        typ = _TEXT_TYPES.get(metric.type, metric.type)
        if typ == "unknown":
            typ = "untyped"
        doc = _escape_help(metric.documentation)
        output.append(f"# HELP {name} {doc}\n# TYPE {name} {typ}\n")
        created: list[str] = []
        for sample in metric.samples:
            if sample.name == metric.name + "_created":
                created.append(_sample_line(sample))  # a gauge of its own, after the family
            else:
                output.append(_sample_line(sample))
        if created:
            output.append(f"# HELP {metric.name}_created {doc}\n")
            output.append(f"# TYPE {metric.name}_created gauge\n")
            output.extend(created)
    return "".join(output).encode("utf-8")
