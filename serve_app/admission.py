"""Admission by time: an upload is admitted only if the ones ahead of it can be answered within a time budget at
the rate this replica is answering them now. The rest wait at the door, unread, for a place to free up, for at
most `door_wait_s`, first come first admitted, and are refused if none does, with the wait they would have had
as Retry-After. The short wait at the door is what keeps clients that send again the moment they are refused
from spinning: each of them costs one refusal per `door_wait_s` instead of one per round trip.

By Little's law the mean time an upload spends here is the number held over the rate they are answered at, so
`(held + 1) / rate` is the wait a new one can expect, whatever the machine, the model or the photos. The rate is
counted over time during which something was held (a *busy clock*), so a quiet spell does not make the replica
look slow, and it only decides anything once the pipeline is full (`floor` uploads held): below that an upload
is always admitted. `max_pending` stays as a cap on the memory uploads in progress can take.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

# Answers the rate is measured over: about a second of work on a small CPU, a fraction of one on a GPU node.
RATE_WINDOW = 128
MIN_SAMPLES = 16
MAX_RETRY_AFTER_S = 60


class Overloaded(Exception):
    """Refused: admitting the upload would keep it, or everyone after it, waiting longer than the budget."""

    def __init__(self, reason: str, retry_after_s: int) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Limits:
    max_wait_s: float
    max_pending: int
    floor: int
    min_retry_after_s: int = 1
    door_wait_s: float = 0.0


class Admission:
    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self.held = 0
        self._busy_total = 0.0  # busy-clock seconds accumulated before the current busy spell
        self._busy_since = 0.0
        self._answered: deque[float] = deque(maxlen=RATE_WINDOW)  # busy-clock time of each recent answer
        self._waiting: deque[asyncio.Future[None]] = deque()  # uploads at the door, oldest first

    def _busy_clock(self) -> float:
        return self._busy_total + (self._clock() - self._busy_since if self.held else 0.0)

    def rate(self) -> float | None:
        """Uploads answered per busy second over the last `RATE_WINDOW`; None until there are enough."""
        if len(self._answered) < MIN_SAMPLES:
            return None
        span = self._answered[-1] - self._answered[0]
        return (len(self._answered) - 1) / span if span > 0 else None

    def expected_wait_s(self, held: int | None = None) -> float | None:
        rate = self.rate()
        return None if rate is None else ((self.held if held is None else held) + 1) / rate

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def admit(self) -> None:
        """Take a place now, or raise `Overloaded`; every admitted upload must be `release`d."""
        refusal = self._refusal()
        if refusal is not None:
            raise Overloaded(refusal, self.retry_after_s())
        self._take()

    async def enter(self) -> None:
        """Take a place, waiting at the door for one up to `door_wait_s` behind those already waiting; raise
        `Overloaded` if none frees up. Every upload that enters must be `release`d."""
        if not self._waiting:
            refusal = self._refusal()
            if refusal is None:
                self._take()
                return
            if self.limits.door_wait_s <= 0:
                raise Overloaded(refusal, self.retry_after_s())
        elif len(self._waiting) >= self.limits.max_pending:
            raise Overloaded(f"{len(self._waiting)} uploads are already waiting at the door", self.retry_after_s())
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        timer = asyncio.get_running_loop().call_later(self.limits.door_wait_s, self._turn_away, waiter)
        try:
            await waiter
        except asyncio.CancelledError:  # the request went away: give back a place given to it meanwhile
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release(answered=False)
            elif waiter in self._waiting:
                self._waiting.remove(waiter)
            raise
        finally:
            timer.cancel()

    def _turn_away(self, waiter: asyncio.Future[None]) -> None:
        if waiter.done():
            return
        self._waiting.remove(waiter)
        waiter.set_exception(Overloaded(self._refusal() or "no place freed up", self.retry_after_s()))

    def _refusal(self) -> str | None:
        """Why a new upload cannot be admitted now, or None if it can."""
        limits = self.limits
        if self.held >= limits.max_pending:
            return f"{limits.max_pending} uploads are already in progress"
        if self.held >= limits.floor:
            wait = self.expected_wait_s()
            if wait is not None and wait > limits.max_wait_s:
                return f"the wait would be {wait:.1f} s"
        return None

    def _take(self) -> None:
        if self.held == 0:
            self._busy_since = self._clock()
        self.held += 1

    def release(self, *, answered: bool = True) -> None:
        now = self._busy_clock()
        if answered:
            self._answered.append(now)
        self.held -= 1
        if self.held == 0:
            self._busy_total = now
        while self._waiting and self._refusal() is None:
            waiter = self._waiting.popleft()
            if not waiter.done():  # done: its request was cancelled this turn of the loop and has not run yet
                self._take()
                waiter.set_result(None)

    def retry_after_s(self) -> int:
        """When the uploads held now should have been answered: the wait a client refused now would have had."""
        wait = self.expected_wait_s(self.held - 1)
        return max(self.limits.min_retry_after_s, min(MAX_RETRY_AFTER_S, math.ceil(wait)) if wait is not None else 0)
