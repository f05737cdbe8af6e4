"""Build of gts-sidecar: pure Python by default; the request path compiled by mypyc on request.

    pip install .                                   pure Python: no compiler needed
    GTS_SIDECAR_COMPILE=1 pip install .             compiled: mypyc + a C compiler, or fail
    GTS_SIDECAR_COMPILE=auto pip install .          compiled if it builds, else pure (a warning)
    GTS_SIDECAR_COMPILE=1 python setup.py build_ext --inplace     compiled, in this tree

Everything else about the package is in pyproject.toml. mypyc compiles the modules below,
which the type checker already holds to mypy --strict, into one C extension group; the pure
modules stay importable beside them, so a machine without a compiler (or a build that fails
under `auto`) runs the same source interpreted. `gts-sidecar version` says which build runs.
"""

from __future__ import annotations

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

#: the request path of the HTTP/1.1 proxy listeners: what runs per request. Modules whose
#: attributes tests or operators patch at run time (access_log, branch_filter) stay out:
#: a compiled module's functions and constants cannot be replaced from Python.
COMPILED = [
    "sidecar/proxy/listener.py",
    "sidecar/proxy/exchange.py",
    "sidecar/proxy/upstream.py",
    "sidecar/proxy/headers.py",
    "sidecar/proxy/route.py",
    "sidecar/proxy/inbound.py",
    "sidecar/proxy/outbound.py",
    "sidecar/proxy/runtime.py",
    "sidecar/proxy/limits.py",
    "sidecar/request_stats.py",
]

MODE = os.environ.get("GTS_SIDECAR_COMPILE", "0").strip().lower()
if MODE not in ("0", "1", "auto", ""):
    sys.exit(f"GTS_SIDECAR_COMPILE must be 0, 1 or auto (got {MODE!r})")


class OptionalBuildExt(build_ext):
    """Under `auto`, a compile that fails (no compiler, no Python headers) leaves the pure
    modules in place instead of failing the install."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:
            if MODE != "auto":
                raise
            print(f"warning: gts-sidecar: compiled build failed ({exc}); pure Python installed")
            self.extensions = []

    def build_extension(self, ext):  # type: ignore[no-untyped-def]
        try:
            super().build_extension(ext)
        except Exception as exc:
            if MODE != "auto":
                raise
            print(f"warning: gts-sidecar: {ext.name} not compiled ({exc}); pure Python kept")


def ext_modules() -> list[object]:
    if MODE not in ("1", "auto"):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        # setuptools first runs this file only to learn setup_requires (below), before
        # mypy is installed into the build environment
        return []
    try:
        # one group (one shared library beside the package) named for the package
        return list(mypycify(COMPILED, opt_level="3", group_name="sidecar_native"))
    except (Exception, SystemExit) as exc:  # mypy refuses to compile (SystemExit)
        if MODE != "auto":
            raise
        print(f"warning: gts-sidecar: mypyc failed ({exc}); pure Python installed")
        return []


setup(
    # mypy carries mypyc, pinned to the version whose checks the code passes; mypyc
    # type-checks what the compiled modules import, so PyYAML's stubs too
    setup_requires=["mypy==2.4.1", "types-PyYAML"] if MODE in ("1", "auto") else [],
    ext_modules=ext_modules(),
    cmdclass={"build_ext": OptionalBuildExt},
)
