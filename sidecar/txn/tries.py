"""Which tries (or Saga actions) this process is running at the app right now.

The fence holds the durable half (a TRYING row with the try's deadline, which survives a
restart); this is the in-process half, which knows the moment a try ends so that a phase
two waiting for it goes on at once rather than at the deadline.

Rules. A try counts as running from `begin` until `end`, and never past its deadline (the
app cluster's total timeout from its start). How it ended matters:

    ANSWERED       the app answered: its work is done                 → ended now
    NO_ANSWER      it reached the app, no answer came back (the client
                   left, the connection broke): the app may still be
                   working on it                                      → ended by its deadline
    NOT_DELIVERED  it never reached the app (refused, or the exchange
                   ended before a connection carried it)              → ended now, and the app
                                                                         has nothing to undo

An entry is `delivered` once any of its tries may have reached the app (or ran out its
deadline without an end). An ended entry stays until `forget` (its fence row is being
updated meanwhile) so that it is not mistaken for a try of a previous process, which only
its row's deadline bounds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

Key = tuple[str, int]  # (xid, branch id)


class TryEnd(Enum):
    ANSWERED = "answered"
    NO_ANSWER = "no_answer"
    NOT_DELIVERED = "not_delivered"


@dataclass(slots=True)
class Running:
    #: tries of this branch not yet ended (more than one only for a repeated try)
    count: int
    #: loop time after which the branch's tries no longer count as running
    deadline: float
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    timer: asyncio.TimerHandle | None = None
    #: some try of the branch may have reached the app
    delivered: bool = False

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

    def end(self, key: Key, how: TryEnd) -> None:
        """One try of `key` ended (see the rules above)."""
        entry = self._entries.get(key)
        if entry is None or not entry.count:
            return
        if how is not TryEnd.NOT_DELIVERED:
            entry.delivered = True
        if how is TryEnd.NO_ANSWER:
            return  # its deadline timer ends it
        entry.count -= 1
        if not entry.count:
            self._ended(key, entry)

    def _expire(self, key: Key, entry: Running) -> None:
        entry.timer = None
        if entry.count and self._entries.get(key) is entry:
            entry.count = 0
            entry.delivered = True  # never ended: as far as anyone knows, it reached the app
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
