"""Which build of the data plane is running: compiled by mypyc, or pure Python.

The request path (sidecar/proxy/listener.py, exchange.py, upstream.py, headers.py, ...) is
compiled to C extensions by mypyc when the package is built with GTS_SIDECAR_COMPILE=1
(setup.py); both builds run the same source, so the same tests hold for both. `mypyc_attr`
marks the few classes that must stay ordinary Python classes once compiled (weak-referenced,
or dataclasses whose annotations name types imported for the type checker only); at run
time it does nothing, so mypy_extensions is no dependency. Imports nothing of the sidecar.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mypy_extensions import mypyc_attr as mypyc_attr
else:

    def mypyc_attr(*_attrs: object, **_flags: object) -> Callable[[type], type]:
        """mypyc reads the decorator when it compiles; once compiled or not, a no-op."""
        return lambda cls: cls


def build() -> str:
    """ "compiled" when the request path's modules are C extensions, else "pure". Found
    without importing them (this is also asked by `gts-sidecar version`)."""
    spec = importlib.util.find_spec("sidecar.proxy.listener")
    origin = spec.origin if spec is not None else None
    return "compiled" if origin is not None and not origin.endswith(".py") else "pure"
