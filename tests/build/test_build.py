"""Which build the suite runs against. scripts/test.sh runs the suite twice, on pure Python
and then on the mypyc-compiled build, and says which it expects in GTS_SIDECAR_BUILD: these
tests fail when the other build was loaded, so the compiled run cannot quietly test pure
Python (or a stale tree). Without GTS_SIDECAR_BUILD they check the two reports agree."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

from sidecar import compiled

#: setup.py's COMPILED list, as module names
REQUEST_PATH = (
    "sidecar.proxy.listener",
    "sidecar.proxy.exchange",
    "sidecar.proxy.upstream",
    "sidecar.proxy.headers",
    "sidecar.proxy.route",
    "sidecar.proxy.inbound",
    "sidecar.proxy.outbound",
    "sidecar.proxy.runtime",
    "sidecar.request_stats",
)
EXPECTED = os.environ.get("GTS_SIDECAR_BUILD", "")


def loaded_build() -> str:
    """From the modules as imported: all C extensions, or all Python source."""
    files = [importlib.import_module(name).__file__ or "" for name in REQUEST_PATH]
    kinds = {"pure" if f.endswith(".py") else "compiled" for f in files}
    assert len(kinds) == 1, f"a mixed build: {files}"
    return kinds.pop()


def test_the_expected_build_is_loaded() -> None:
    if EXPECTED not in ("pure", "compiled"):
        pytest.skip("GTS_SIDECAR_BUILD is not set (scripts/test.sh sets it)")
    assert loaded_build() == EXPECTED


def test_the_build_report_matches_the_modules_loaded() -> None:
    assert compiled.build() == loaded_build()


def test_gts_sidecar_version_names_the_build() -> None:
    """A process started as operators start it (`python -m sidecar --version`) reports the build it
    imports; in the compiled run, that is the compiled one too."""
    out = subprocess.run(
        [sys.executable, "-m", "sidecar", "--version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert f"({loaded_build()})" in out, out
