"""Declarative global transactions: which inbound requests begin one.

Rules: pure. Compiled once per config from `transactions:`; `match_path(method, path)` runs
on every inbound request, so a config with no rules answers with one attribute test. Paths
are matched in their normal form (sidecar.paths: `;params` cut, unreserved escapes decoded,
dot segments resolved, repeated and trailing slashes dropped), on both sides: the configured
path and prefix are normalised here once, the request's by the caller once per request. A
prefix that ends in `/` matches below it and the path itself (`/pay/` matches `/pay` and
`/pay/42`, not `/payments`). First rule wins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sidecar.config import TransactionMatch, TransactionRule
from sidecar.paths import normalise


@dataclass(frozen=True, slots=True)
class PathMatch:
    """One `method` + `path` | `path_prefix` | `path_regex` match, compiled."""

    method: bytes | None
    path: bytes | None
    prefix: bytes | None
    #: the prefix ended in `/`: the path it names (without the slash) matches too
    prefix_root: bytes | None
    regex: re.Pattern[bytes] | None

    @classmethod
    def compile(cls, m: TransactionMatch) -> PathMatch:
        prefix = root = None
        if m.path_prefix is not None:
            prefix = normalise(m.path_prefix.encode())
            if m.path_prefix.endswith("/") and prefix != b"/":
                root, prefix = prefix, prefix + b"/"
        return cls(
            method=m.method.encode() if m.method else None,
            path=normalise(m.path.encode()) if m.path else None,
            prefix=prefix,
            prefix_root=root,
            regex=re.compile(m.path_regex.encode()) if m.path_regex else None,
        )

    def matches(self, method: bytes, path: bytes) -> bool:
        """`path` is in normal form."""
        if self.method is not None and method != self.method:
            return False
        if self.path is not None:
            return path == self.path
        if self.prefix is not None:
            return path.startswith(self.prefix) or path == self.prefix_root
        assert self.regex is not None
        return self.regex.fullmatch(path) is not None


@dataclass(frozen=True, slots=True)
class TxnRule:
    name: str
    timeout_ms: int
    match: PathMatch

    def matches(self, method: bytes, path: bytes) -> bool:
        return self.match.matches(method, path)


class PathMatcher:
    """Any of a list of matches (e.g. the routes allowed to keep a client's header)."""

    def __init__(self, matches: list[TransactionMatch]) -> None:
        self.matches = [PathMatch.compile(m) for m in matches]
        self.empty = not self.matches

    def any(self, method: bytes, path: bytes) -> bool:
        return any(m.matches(method, path) for m in self.matches)


class RuleSet:
    def __init__(self, rules: list[TransactionRule]) -> None:
        self.rules = [
            TxnRule(name=r.name, timeout_ms=int(r.timeout * 1000), match=PathMatch.compile(r.match))
            for r in rules
        ]
        self.empty = not self.rules

    def match(self, method: bytes, target: bytes) -> TxnRule | None:
        """The rule an origin-form target (query allowed) begins, if any."""
        if self.empty:
            return None
        return self.match_path(method, normalise(target.partition(b"?")[0]))

    def match_path(self, method: bytes, path: bytes) -> TxnRule | None:
        """The rule a normalised path begins, if any."""
        if self.empty:
            return None
        for rule in self.rules:
            if rule.matches(method, path):
                return rule
        return None
