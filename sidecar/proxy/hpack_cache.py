"""HPACK that remembers: header blocks a connection repeats are encoded and decoded once.

Rules (pure: no I/O). Decoding a header block is a function of its bytes and the dynamic
table; so is encoding a header list. The table here counts its changes (a `generation`,
bumped on every insertion and every size change, evictions happen only within those). A
block whose decode changed nothing in the table (only indexed references and literals
without indexing: what a gRPC client sends once its first call has filled the table)
decodes to the same list for as long as the generation stays the same, so it is kept,
keyed by its bytes; likewise a header list whose encoding inserted nothing and carried no
size update encodes to the same bytes. Anything that changed the table is never kept, and
a change of generation forgets everything kept. The limits that can change without the
table (SETTINGS_MAX_HEADER_LIST_SIZE, the table size the peer must stay within) are checked
again on every hit, so an HPACK bomb is refused exactly as plain hpack refuses it.

Installed on an h2 connection as `conn.encoder` / `conn.decoder` (see h2_conn); per
connection, so what is kept is bounded by a budget of `BUDGET` bytes per coder, counting the
block and `FIELD_COST` per field (a small block of indexed references can stand for hundreds
of fields): a client cannot make the sidecar hold more than that per connection.
"""

from __future__ import annotations

from typing import Any, Final

import hpack
from hpack.table import HeaderTable

#: what each coder may keep, in bytes: a block's length plus FIELD_COST per field (roughly
#: what its tuples take); an entry over a quarter of it is never kept. A gRPC call's blocks
#: are a few dozen bytes and about ten fields: about 700 each
BUDGET: Final = 8192
FIELD_COST: Final = 64
#: the largest block (or encoded list) kept
MAX_BLOCK: Final = 512
#: the size HPACK counts per field (RFC 7541 section 4.1)
_ENTRY_OVERHEAD: Final = 32


class CountingTable(HeaderTable):
    """hpack's table, counting its changes."""

    generation = 0

    def add(self, name: bytes, value: bytes) -> None:
        self.generation += 1
        super().add(name, value)

    @property
    def maxsize(self) -> int:
        return self._maxsize

    @maxsize.setter
    def maxsize(self, newmax: int) -> None:
        self.generation += 1
        HeaderTable.maxsize.fset(self, newmax)  # type: ignore[attr-defined]


class CachingDecoder(hpack.Decoder):
    """hpack's Decoder, answering a block seen before under the same table from memory."""

    def __init__(self, max_header_list_size: int = hpack.hpack.DEFAULT_MAX_HEADER_LIST_SIZE):
        super().__init__(max_header_list_size)
        self.header_table = CountingTable()
        #: block -> (fields, their HPACK size), valid for `_generation`, and its cost
        self._kept: dict[bytes, tuple[tuple[hpack.HeaderTuple, ...], int]] = {}
        self._generation = 0
        self._spent = 0

    def decode(self, data: bytes, raw: bool = False) -> Any:
        if not raw or len(data) > MAX_BLOCK:
            return super().decode(data, raw)
        if type(data) is not bytes:
            data = bytes(data)
        table = self.header_table
        generation = table.generation  # type: ignore[attr-defined]
        if generation != self._generation:
            self._kept.clear()
            self._spent = 0
            self._generation = generation
        kept = self._kept.get(data)
        if kept is not None and kept[1] <= self.max_header_list_size:
            self._assert_valid_table_size()
            return list(kept[0])
        # (a hit over a lowered limit falls through: the full decode raises as it should)
        headers = super().decode(data, raw)
        if table.generation == generation:  # type: ignore[attr-defined]
            fields = tuple(headers)
            cost = len(data) + FIELD_COST * len(fields)
            if cost <= BUDGET // 4:
                if self._spent + cost > BUDGET:
                    self._kept.clear()
                    self._spent = 0
                size = sum(_ENTRY_OVERHEAD + len(n) + len(v) for n, v in fields)
                self._kept[data] = (fields, size)
                self._spent += cost
        return headers


class CachingEncoder(hpack.Encoder):
    """hpack's Encoder without Huffman coding, answering a header list seen before under
    the same table from memory.

    No Huffman coding: a block a few bytes longer on the pod's loopback, for a tenth of a
    proxied call's CPU (pure-Python Huffman coding is the encoder's cost)."""

    def __init__(self) -> None:
        super().__init__()
        self.header_table = CountingTable()
        self._kept: dict[tuple[Any, ...], bytes] = {}
        self._generation = 0
        self._spent = 0

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        table = self.header_table
        generation = table.generation  # type: ignore[attr-defined]
        if generation != self._generation:
            self._kept.clear()
            self._spent = 0
            self._generation = generation
        # (h2 passes a list of (name, value) byte pairs.) A list is kept only when it holds
        # plain tuples (a never-indexed HeaderTuple compares equal to one, and is not
        # inserted when not found); so a list kept had every field found whole in the table,
        # which encodes it as an index whether or not it is flagged: an equal list, flagged
        # or not, encodes to the same bytes
        key = tuple(headers) if isinstance(headers, list) else None
        if key is not None:
            try:
                kept = self._kept.get(key)
            except TypeError:  # an unhashable name or value: hpack turns it into bytes
                return super().encode(headers, huffman=False)
            if kept is not None and not table.resized:
                return kept
            resized = table.resized
            encoded = super().encode(key, huffman=False)
            # the list's own bytes are held too (they are the key): counted in full
            cost = len(encoded) + sum(FIELD_COST + len(n) + len(v) for n, v, *_ in key)
            if (
                not resized
                and table.generation == generation  # type: ignore[attr-defined]
                and len(encoded) <= MAX_BLOCK
                and cost <= BUDGET // 4
                and all(type(f) is tuple for f in key)
            ):
                if self._spent + cost > BUDGET:
                    self._kept.clear()
                    self._spent = 0
                self._kept[key] = encoded
                self._spent += cost
            return encoded
        return super().encode(headers, huffman=False)
