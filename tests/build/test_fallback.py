"""setup.py on a machine without a C compiler: the default build never compiles, and
GTS_SIDECAR_COMPILE=auto falls back to pure Python when compiling fails (here: the compiler
is /bin/false), leaving a tree that imports and reports itself pure."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _tree(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, tree / name)
    shutil.copytree(
        ROOT / "sidecar", tree / "sidecar", ignore=shutil.ignore_patterns("__pycache__", "*.so")
    )
    return tree


def _build(tree: Path, mode: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GTS_SIDECAR_COMPILE": mode, "CC": "/bin/false", "LDSHARED": "/bin/false"}
    return subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _version(tree: Path) -> str:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "--version"],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout


def test_the_default_build_compiles_nothing(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    done = _build(tree, "0")
    assert done.returncode == 0, done.stderr[-2000:]
    assert not list(tree.rglob("*.so"))
    assert "(pure)" in _version(tree)


@pytest.mark.slow
def test_auto_falls_back_to_pure_python_without_a_compiler(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    done = _build(tree, "auto")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pure Python" in done.stdout + done.stderr  # the warning says what happened
    assert not list((tree / "sidecar").rglob("*.so"))
    assert "(pure)" in _version(tree)


@pytest.mark.slow
def test_asking_for_the_compiled_build_without_a_compiler_fails(tmp_path: Path) -> None:
    done = _build(_tree(tmp_path), "1")
    assert done.returncode != 0
