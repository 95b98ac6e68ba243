"""Admission by time, on a clock the test moves; the door, on asyncio's own loop."""

from __future__ import annotations

import asyncio

import pytest

from serve_app.admission import MIN_SAMPLES, Admission, Limits, Overloaded


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _answer_at(admission: Admission, clock: Clock, *, per_s: float, count: int) -> None:
    """`count` uploads admitted and answered one after another at `per_s`."""
    for _ in range(count):
        admission.admit()
        clock.now += 1 / per_s
        admission.release()


def test_below_the_floor_and_before_any_measurement_uploads_are_admitted() -> None:
    clock = Clock()
    admission = Admission(Limits(max_wait_s=1.0, max_pending=100, floor=4), clock)
    for _ in range(100):
        admission.admit()
    assert admission.held == 100 and admission.rate() is None
    with pytest.raises(Overloaded, match="100 uploads"):
        admission.admit()


def test_admits_what_can_be_answered_within_the_budget_at_the_measured_rate() -> None:
    clock = Clock()
    admission = Admission(Limits(max_wait_s=2.0, max_pending=1000, floor=4), clock)
    _answer_at(admission, clock, per_s=50, count=MIN_SAMPLES * 2)
    assert admission.rate() == pytest.approx(50)
    admitted = 0
    with pytest.raises(Overloaded) as refused:
        while True:
            admission.admit()
            admitted += 1
    assert admitted == 100  # the 100th waits (99 + 1) / 50 = 2 s; the next would wait longer
    assert refused.value.retry_after_s == 2  # the wait it would have had
    for _ in range(10):
        admission.release()
    admission.admit()  # answers free places


def test_a_quiet_spell_does_not_lower_the_rate() -> None:
    clock = Clock()
    admission = Admission(Limits(max_wait_s=1.0, max_pending=1000, floor=1), clock)
    _answer_at(admission, clock, per_s=100, count=MIN_SAMPLES)
    clock.now += 3600  # nothing held for an hour
    _answer_at(admission, clock, per_s=100, count=MIN_SAMPLES)
    assert admission.rate() == pytest.approx(100)


def test_a_slower_model_shrinks_what_is_admitted() -> None:
    clock = Clock()
    admission = Admission(Limits(max_wait_s=1.0, max_pending=1000, floor=1), clock)
    _answer_at(admission, clock, per_s=100, count=200)
    _answer_at(admission, clock, per_s=10, count=200)
    assert admission.rate() == pytest.approx(10)
    for _ in range(9):
        admission.admit()
    with pytest.raises(Overloaded):
        admission.admit()


def test_retry_after_is_at_least_the_configured_one() -> None:
    clock = Clock()
    admission = Admission(Limits(max_wait_s=0.1, max_pending=1000, floor=1, min_retry_after_s=3), clock)
    _answer_at(admission, clock, per_s=1000, count=MIN_SAMPLES)
    admission.admit()
    with pytest.raises(Overloaded) as refused:
        for _ in range(1000):
            admission.admit()
    assert refused.value.retry_after_s == 3


def _full(door_wait_s: float) -> Admission:
    """An admission whose next upload cannot be admitted: 50 answers/s measured, one second's worth held."""
    clock = Clock()
    admission = Admission(Limits(max_wait_s=1.0, max_pending=1000, floor=4, door_wait_s=door_wait_s), clock)
    _answer_at(admission, clock, per_s=50, count=MIN_SAMPLES * 2)
    while True:
        try:
            admission.admit()
        except Overloaded:
            return admission


def test_an_upload_that_cannot_be_admitted_waits_at_the_door_and_takes_the_first_place_freed() -> None:
    async def scenario() -> None:
        admission = _full(door_wait_s=30)
        held = admission.held  # places below are freed with answered=False: the measured rate stays as it is
        first = asyncio.create_task(admission.enter())
        second = asyncio.create_task(admission.enter())
        await asyncio.sleep(0)
        assert admission.waiting == 2 and not first.done()
        admission.release(answered=False)
        await asyncio.sleep(0)
        assert first.done() and not second.done()  # first come, first admitted
        assert admission.held == held and admission.waiting == 1
        admission.release(answered=False)
        await second
        assert admission.waiting == 0

    asyncio.run(scenario())


def test_an_upload_is_refused_once_it_has_waited_at_the_door_for_door_wait_s() -> None:
    async def scenario() -> None:
        admission = _full(door_wait_s=0.05)
        held = admission.held
        with pytest.raises(Overloaded) as refused:
            await admission.enter()
        assert refused.value.retry_after_s == 1 and admission.waiting == 0 and admission.held == held
        with pytest.raises(Overloaded):  # with no door to wait at, at once
            await _full(door_wait_s=0).enter()

    asyncio.run(scenario())


def test_a_request_that_goes_away_at_the_door_leaves_no_place_taken() -> None:
    async def scenario() -> None:
        admission = _full(door_wait_s=30)
        held = admission.held
        gone = asyncio.create_task(admission.enter())
        await asyncio.sleep(0)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert admission.waiting == 0 and admission.held == held
        # admitted and cancelled in the same turn of the loop: the place it was given is given back
        admitted_then_gone = asyncio.create_task(admission.enter())
        await asyncio.sleep(0)
        admission.release(answered=False)
        admitted_then_gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await admitted_then_gone
        assert admission.waiting == 0 and admission.held == held - 1

    asyncio.run(scenario())


def test_a_place_freed_while_a_cancelled_request_is_still_at_the_door_goes_to_the_next() -> None:
    async def scenario() -> None:
        admission = _full(door_wait_s=30)
        held = admission.held
        gone = asyncio.create_task(admission.enter())
        behind = asyncio.create_task(admission.enter())
        await asyncio.sleep(0)
        gone.cancel()  # the client went away, and in the same turn of the loop a place frees up
        admission.release(answered=False)
        with pytest.raises(asyncio.CancelledError):
            await gone
        await behind
        assert admission.waiting == 0 and admission.held == held

    asyncio.run(scenario())
