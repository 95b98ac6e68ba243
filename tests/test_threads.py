"""`DedicatedThread`: the one thread a replica runs its blocking work on."""

from __future__ import annotations

import asyncio
import contextvars
import threading

import pytest

from deployments.threads import DedicatedThread

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="none")


def test_every_call_from_every_task_runs_on_the_same_thread_in_its_callers_context() -> None:
    thread = DedicatedThread("work")

    async def call(i: int) -> tuple[int, str]:
        request_id.set(f"r{i}")
        return await thread.run(lambda: (threading.get_ident(), request_id.get()))

    async def main() -> list[tuple[int, str]]:
        return await asyncio.gather(*(asyncio.create_task(call(i)) for i in range(50)))

    results = asyncio.run(main())
    assert len({ident for ident, _ in results}) == 1
    assert results[0][0] != threading.get_ident()
    assert [rid for _, rid in results] == [f"r{i}" for i in range(50)]


def test_the_functions_exception_reaches_the_caller_and_the_thread_goes_on() -> None:
    thread = DedicatedThread("work")

    def fail() -> None:
        raise ValueError("bad upload")

    async def main() -> int:
        with pytest.raises(ValueError, match="bad upload"):
            await thread.run(fail)
        return await thread.run(lambda: 7)

    assert asyncio.run(main()) == 7


def test_work_submitted_from_another_thread_runs_in_that_threads_context() -> None:
    """The Classifier's inference thread hands each batch's wait to its completion thread this way."""
    first, second = DedicatedThread("first"), DedicatedThread("second")

    def hand_on() -> tuple[int, str]:
        return second.submit(lambda: (threading.get_ident(), request_id.get())).result()

    async def main() -> tuple[int, int, str]:
        request_id.set("r7")
        ident = await first.run(threading.get_ident)
        second_ident, rid = await first.run(hand_on)
        return ident, second_ident, rid

    ident, second_ident, rid = asyncio.run(main())
    assert ident != second_ident and rid == "r7"
