"""The in-process record of tries in flight: when a try stops counting as running."""

from __future__ import annotations

import asyncio

from sidecar.txn.tries import Key, Running, TriesInFlight, TryEnd

KEY = ("10.0.0.5:17020:1", 7)


def _tracker() -> tuple[TriesInFlight, list[Key]]:
    ended: list[Key] = []
    return TriesInFlight(lambda key, entry: ended.append(key)), ended


def _now() -> float:
    return asyncio.get_running_loop().time()


async def test_an_answered_try_ends_at_once_and_is_forgotten_once_recorded() -> None:
    tries, ended = _tracker()
    entry = tries.begin(KEY, 60)
    assert entry.running(_now())
    tries.end(KEY, TryEnd.ANSWERED)
    assert ended == [KEY] and entry.ended.is_set()
    assert tries.get(KEY) is entry and not entry.running(_now())  # kept until recorded
    tries.forget(KEY, entry)
    assert tries.get(KEY) is None
    tries.end(KEY, TryEnd.ANSWERED)  # a second end changes nothing
    assert ended == [KEY]


async def test_an_unanswered_try_runs_until_its_deadline() -> None:
    tries, ended = _tracker()
    entry = tries.begin(KEY, 0.05)
    tries.end(KEY, TryEnd.NO_ANSWER)  # the app may still be working on it
    assert entry.running(_now()) and ended == []
    await asyncio.wait_for(entry.ended.wait(), 5)  # ended by its deadline timer
    assert ended == [KEY] and not entry.running(_now())


async def test_a_repeated_try_keeps_the_branch_running_until_both_ended() -> None:
    tries, ended = _tracker()
    first = tries.begin(KEY, 60)
    second = tries.begin(KEY, 60)
    assert first is second and first.count == 2
    tries.end(KEY, TryEnd.ANSWERED)
    assert first.running(_now()) and ended == []
    tries.end(KEY, TryEnd.ANSWERED)
    assert ended == [KEY]


async def test_a_new_try_after_an_ended_one_is_a_new_entry() -> None:
    tries, _ = _tracker()
    old = tries.begin(KEY, 60)
    tries.end(KEY, TryEnd.ANSWERED)
    new = tries.begin(KEY, 60)
    assert new is not old and new.running(_now())
    tries.forget(KEY, old)  # the old one's record finishing does not drop the new one
    assert tries.get(KEY) is new
    tries.close()
    assert tries.get(KEY) is None


def test_running_needs_both_a_try_and_time_left() -> None:
    assert Running(1, 10.0).running(9.9)
    assert not Running(1, 10.0).running(10.0)
    assert not Running(0, 10.0).running(0.0)


async def test_delivery_is_remembered_for_the_record_of_the_end() -> None:
    tries, ended = _tracker()
    entry = tries.begin(KEY, 60)
    tries.end(KEY, TryEnd.NOT_DELIVERED)  # refused, or the exchange ended before sending it
    assert ended == [KEY] and not entry.delivered
    again = tries.begin(KEY, 60)
    tries.end(KEY, TryEnd.ANSWERED)
    assert again.delivered
    late = tries.begin(KEY, 0.05)
    await asyncio.wait_for(late.ended.wait(), 5)  # no end at all: taken as delivered
    assert late.delivered
