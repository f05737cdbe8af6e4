"""Declarative global transactions: which inbound requests begin one.

Rules: pure. Compiled once per config from `transactions:`; `match(method, path)` runs on
every inbound request, so a config with no rules answers with one attribute test. Paths are
matched as sent (percent-encoded, without the query), first rule wins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sidecar.config import TransactionRule


@dataclass(frozen=True, slots=True)
class TxnRule:
    name: str
    timeout_ms: int
    method: bytes | None
    path: bytes | None
    prefix: bytes | None
    regex: re.Pattern[bytes] | None

    def matches(self, method: bytes, path: bytes) -> bool:
        if self.method is not None and method != self.method:
            return False
        if self.path is not None:
            return path == self.path
        if self.prefix is not None:
            return path.startswith(self.prefix)
        assert self.regex is not None
        return self.regex.fullmatch(path) is not None


class RuleSet:
    def __init__(self, rules: list[TransactionRule]) -> None:
        self.rules = [
            TxnRule(
                name=r.name,
                timeout_ms=int(r.timeout * 1000),
                method=r.match.method.encode() if r.match.method else None,
                path=r.match.path.encode() if r.match.path else None,
                prefix=r.match.path_prefix.encode() if r.match.path_prefix else None,
                regex=re.compile(r.match.path_regex.encode()) if r.match.path_regex else None,
            )
            for r in rules
        ]
        self.empty = not self.rules

    def match(self, method: bytes, target: bytes) -> TxnRule | None:
        if self.empty:
            return None
        path = target.partition(b"?")[0]
        for rule in self.rules:
            if rule.matches(method, path):
                return rule
        return None
