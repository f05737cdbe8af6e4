"""Structured logs: one JSON object per line, with the XID on every line that has one.

Call sites pass request facts through `extra={"xid": ..., "upstream": ...}`; the formatter
copies every such extra field into the object. A line written while a request or transaction
is handled also gets its `trace_id` and `xid` (sidecar/tracing.py's context variable), unless
the call site gave them. Nothing on the request path logs above debug.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Final

import orjson

from sidecar.tracing import current

_STANDARD: Final = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys() | {"message", "asctime"}
)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        trace, xid = current()
        if trace is not None:
            out["trace_id"] = trace.trace_id
        if xid is not None:
            out["xid"] = xid
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


#: the level given on the command line (--log-level): it wins over the config file's, on
#: reloads too, so a debugging session is not undone by the next ConfigMap update
_override: str | None = None


def setup(level: str, fmt: str, *, override: str | None = None) -> None:
    global _override
    _override = override
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    set_level(level)
    # aiohttp's access log is per request: never at info on the sidecar's listeners
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def set_level(level: str) -> None:
    logging.getLogger().setLevel((_override or level).upper())
