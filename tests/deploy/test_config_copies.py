"""The configs under deploy/k8s are config/sidecar.yaml with a few Kubernetes-specific keys
changed; nothing else may drift (a new section or default in the example must be copied)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from .kube import BASE, K8S, OVERLAYS, ROOT

EXAMPLE = ROOT / "config" / "sidecar.yaml"

#: the keys each copy may change, and why (each copy's header comment lists them too)
KUBERNETES_KEYS = [
    "node.advertise_address",  # ${POD_IP} with no fallback
    "coordinator.signing.key_id",  # one key shared by every pod, from the Secret
    "coordinator.signing.secret_file",
    "admin.token_file",  # /admin/* needs a token
    "local_coordinator.journal",  # absolute, on the journal volume
    "degraded.peer_networks",  # the pod CIDR (empty in the example: no peer is called)
]
COPIES = {
    BASE / "sidecar.yaml": KUBERNETES_KEYS,
    # the sidecars' locks are the replicated coordinator's (shared through its PostgreSQL)
    OVERLAYS / "coordinator" / "sidecar.yaml": [
        *KUBERNETES_KEYS,
        "coordinator.endpoints",
        "locks.backend",
    ],
    # the injected sidecars' config: the app's port comes from the pod's annotation
    K8S / "injector" / "app-namespace" / "sidecar.yaml": [*KUBERNETES_KEYS, "app.url"],
}


def _without(data: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    out = copy.deepcopy(data)
    for key in keys:
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.get(part) or {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out


def _load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return data


@pytest.mark.parametrize("path", list(COPIES), ids=lambda p: str(p.relative_to(ROOT)))
def test_copy_differs_from_the_example_only_in_kubernetes_keys(path: Path) -> None:
    keys = COPIES[path]
    example, deployed = _without(_load(EXAMPLE), keys), _without(_load(path), keys)
    for section in sorted(set(example) | set(deployed)):
        assert deployed.get(section) == example.get(section), (
            f"{path.relative_to(ROOT)}: section {section!r} differs from config/sidecar.yaml; "
            "copy the change (only these keys may differ: " + ", ".join(keys) + ")"
        )
    text = path.read_text(encoding="utf-8")
    for key in keys:
        assert key in text.split("\n\n", 1)[0], f"the header comment should list {key}"
