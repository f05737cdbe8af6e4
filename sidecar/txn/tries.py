"""Which tries (or Saga actions) this process is running at the app right now.

The fence holds the durable half (a TRYING row with the try's deadline, which survives a
restart); this is the in-process half, which knows the moment a try ends so that a phase
two waiting for it goes on at once rather than at the deadline.

Rules. A try counts as running from `begin` until `end`, and never past its deadline (the
app cluster's total timeout from its start): a try whose exchange ended without the app's
answer (the client left, the connection broke) may still be working at the app, so it is
ended by its deadline timer, not by `end`. An ended entry stays until `forget` (its fence
row is being set to TRIED meanwhile) so that it is not mistaken for a try of a previous
process, which only its row's deadline bounds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

Key = tuple[str, int]  # (xid, branch id)


@dataclass(slots=True)
class Running:
    #: tries of this branch not yet ended (more than one only for a repeated try)
    count: int
    #: loop time after which the branch's tries no longer count as running
    deadline: float
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    timer: asyncio.TimerHandle | None = None

    def running(self, now: float) -> bool:
        return self.count > 0 and now < self.deadline


class TriesInFlight:
    def __init__(self, on_ended: Callable[[Key, Running], None]) -> None:
        #: called once per entry when its last try ended (by `end` or by its deadline)
        self._on_ended = on_ended
        self._entries: dict[Key, Running] = {}

    def get(self, key: Key) -> Running | None:
        return self._entries.get(key)

    def begin(self, key: Key, timeout: float) -> Running:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        entry = self._entries.get(key)
        if entry is None or not entry.count:
            entry = self._entries[key] = Running(0, deadline)
        entry.count += 1
        if deadline >= entry.deadline or entry.timer is None:
            entry.deadline = max(entry.deadline, deadline)
            if entry.timer is not None:
                entry.timer.cancel()
            entry.timer = loop.call_at(entry.deadline, self._expire, key, entry)
        return entry

    def end(self, key: Key, *, answered: bool) -> None:
        """One try of `key` ended. `answered`: the app answered it (its work is done); else
        it may still be running at the app and counts as running until its deadline."""
        entry = self._entries.get(key)
        if entry is None or not entry.count or not answered:
            return
        entry.count -= 1
        if not entry.count:
            self._ended(key, entry)

    def _expire(self, key: Key, entry: Running) -> None:
        entry.timer = None
        if entry.count and self._entries.get(key) is entry:
            entry.count = 0
            self._ended(key, entry)

    def _ended(self, key: Key, entry: Running) -> None:
        if entry.timer is not None:
            entry.timer.cancel()
            entry.timer = None
        entry.ended.set()
        self._on_ended(key, entry)

    def forget(self, key: Key, entry: Running) -> None:
        """The end of `entry` is recorded: drop it (unless a new try took its place)."""
        if self._entries.get(key) is entry and not entry.count:
            del self._entries[key]

    def close(self) -> None:
        for entry in self._entries.values():
            if entry.timer is not None:
                entry.timer.cancel()
                entry.timer = None
        self._entries.clear()
