from sidecar.coordinator.breaker import Breaker, BreakerState


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_consecutive_failures_only() -> None:
    b = Breaker(failures=3, reset=10, clock=Clock())
    b.failure()
    b.failure()
    b.success()  # a success in between resets the count
    b.failure()
    b.failure()
    assert b.state is BreakerState.CLOSED and b.allow()
    b.failure()
    assert b.state is BreakerState.OPEN
    assert not b.allow()


def test_half_open_lets_exactly_one_probe_through() -> None:
    clock = Clock()
    b = Breaker(failures=1, reset=10, clock=clock)
    b.failure()
    clock.now += 9.99
    assert not b.allow()
    clock.now += 0.01
    assert b.state is BreakerState.HALF_OPEN
    assert b.allow()
    assert not b.allow()  # the probe is out: nobody else
    b.success()
    assert b.state is BreakerState.CLOSED
    assert b.allow() and b.allow()


def test_failed_probe_reopens_for_a_full_period() -> None:
    clock = Clock()
    b = Breaker(failures=2, reset=5, clock=clock)
    b.failure()
    b.failure()
    clock.now += 5
    assert b.allow()
    b.failure()
    assert b.state is BreakerState.OPEN
    assert b.seconds_until_probe() == 5
    clock.now += 4.9
    assert not b.allow()
    clock.now += 0.1
    assert b.allow()
