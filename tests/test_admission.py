"""Admission by time, on a clock the test moves; the door, on asyncio's own loop."""

from __future__ import annotations

import asyncio

import pytest

from serve_app.admission import CLIENT_MEMORY_S, MAX_CLIENTS, MIN_SAMPLES, Admission, Limits, Overloaded, OverShare


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


# Fair shares among clients.

def _measured(*, max_wait_s: float = 1.0, floor: int = 4, min_client_share: int = 2, door_wait_s: float = 30,
              max_pending: int = 1000) -> tuple[Admission, Clock]:
    """50 answers/s measured: the budget admits 50 places."""
    clock = Clock()
    admission = Admission(Limits(max_wait_s=max_wait_s, max_pending=max_pending, floor=floor, door_wait_s=door_wait_s,
                                 min_client_share=min_client_share, over_share_door_wait_s=door_wait_s * 2), clock)
    _answer_at(admission, clock, per_s=50, count=MIN_SAMPLES * 2)
    clock.now += CLIENT_MEMORY_S + 1  # the client that was measured has gone
    return admission, clock


def test_a_client_over_its_share_waits_at_the_door_and_is_refused_with_429_while_others_are_admitted() -> None:
    async def scenario() -> None:
        admission, _ = _measured(door_wait_s=0.05)
        admission.admit("polite")
        for _ in range(25):
            await admission.enter("greedy")
        assert admission.capacity() == 50 and admission.client_share() == 25  # 50 places, 2 clients
        started = asyncio.get_running_loop().time()
        with pytest.raises(OverShare) as refused:  # the service has room (26 of 50 held), not this client
            await admission.enter("greedy")
        assert refused.value.status == 429 and refused.value.retry_after_s >= 1
        # it waited at the door longer than an upload that is not over its share would, but no longer than allowed
        assert 0.05 < asyncio.get_running_loop().time() - started < 0.1 + 0.05
        await admission.enter("polite")  # the others are still admitted at once
        assert admission.held == 27

    asyncio.run(scenario())


def test_a_single_user_with_a_few_tabs_is_never_refused_while_the_service_has_room() -> None:
    admission, _ = _measured(max_wait_s=10.0, min_client_share=8)
    for i in range(100):  # a hundred clients, one upload each: a share of 500 / 101 places, but at least 8
        admission.admit(f"10.0.0.{i}")
    for _ in range(8):
        admission.admit("tabs")
    with pytest.raises(OverShare):
        admission.admit("tabs")


def test_a_place_freed_at_the_door_goes_to_the_client_that_holds_the_fewest() -> None:
    async def scenario() -> None:
        admission, _ = _measured(min_client_share=100)
        while True:  # full: the budget's 50 places, all held by one client
            try:
                admission.admit("greedy")
            except Overloaded:
                break
        greedy = asyncio.create_task(admission.enter("greedy"))
        await asyncio.sleep(0)
        polite = asyncio.create_task(admission.enter("polite"))  # came later, holds nothing
        await asyncio.sleep(0)
        admission.release("greedy", answered=False)
        await asyncio.sleep(0)
        assert polite.done() and not greedy.done()
        admission.release("greedy", answered=False)
        await greedy

    asyncio.run(scenario())


def test_a_full_door_turns_away_the_newest_upload_of_the_client_with_the_most_there() -> None:
    async def scenario() -> None:
        admission, _ = _measured(min_client_share=100, max_pending=50)
        for _ in range(50):
            admission.admit("greedy")
        greedy = [asyncio.create_task(admission.enter("greedy")) for _ in range(50)]  # the door holds 50
        await asyncio.sleep(0)
        polite = asyncio.create_task(admission.enter("polite"))
        await asyncio.sleep(0)
        assert admission.waiting == 50 and not polite.done()
        with pytest.raises(OverShare):
            await greedy[-1]
        for task in greedy[:-1] + [polite]:
            task.cancel()
        await asyncio.gather(*greedy[:-1], polite, return_exceptions=True)
        assert admission.waiting == 0

    asyncio.run(scenario())


def test_with_other_clients_about_each_takes_its_turn_into_the_pipeline() -> None:
    async def scenario() -> None:
        admission, _ = _measured(floor=8)
        for _ in range(6):
            admission.admit("greedy")
        assert admission.pipeline_share() is None  # alone: no limit
        admission.admit("polite")
        assert admission.pipeline_share() == 2  # half of the 8 places in the pipeline, 2 clients

        inside: list[str] = []
        gates = {name: asyncio.Event() for name in ("g1", "g2", "g3", "p1")}

        async def upload(client: str, name: str) -> None:
            async with admission.turn(client):
                inside.append(name)
                await gates[name].wait()

        tasks = [asyncio.create_task(upload("greedy", n)) for n in ("g1", "g2", "g3")]
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(upload("polite", "p1")))
        await asyncio.sleep(0)
        assert inside == ["g1", "g2", "p1"]  # g3 waits for a turn of its client; the polite upload does not
        gates["g1"].set()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert inside == ["g1", "g2", "p1", "g3"]
        for gate in gates.values():
            gate.set()
        await asyncio.gather(*tasks)

    asyncio.run(scenario())


def test_the_client_table_forgets_idle_clients_and_stays_bounded() -> None:
    admission, clock = _measured()
    admission.admit("busy")
    for i in range(MAX_CLIENTS + 500):
        admission.admit(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
        admission.release(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", answered=False)
    assert admission.clients <= MAX_CLIENTS + 1
    clock.now += CLIENT_MEMORY_S + 1
    for _ in range(MAX_CLIENTS):
        admission.admit("again")
        admission.release("again", answered=False)
    assert admission.clients == 2  # the busy one is kept, whatever its age
    admission.release("busy", answered=False)
