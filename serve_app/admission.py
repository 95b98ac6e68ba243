"""Admission by time: an upload is admitted only if the ones ahead of it can be answered within a time budget at
the rate this replica is answering them now. The rest are refused at once, with the wait they would have had as
Retry-After.

By Little's law the mean time an upload spends here is the number held over the rate they are answered at, so
`(held + 1) / rate` is the wait a new one can expect, whatever the machine, the model or the photos. The rate is
counted over time during which something was held (a *busy clock*), so a quiet spell does not make the replica
look slow, and it only decides anything once the pipeline is full (`floor` uploads held): below that an upload
is always admitted. `max_pending` stays as a cap on the memory uploads in progress can take.
"""

from __future__ import annotations

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


class Admission:
    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self.held = 0
        self._busy_total = 0.0  # busy-clock seconds accumulated before the current busy spell
        self._busy_since = 0.0
        self._answered: deque[float] = deque(maxlen=RATE_WINDOW)  # busy-clock time of each recent answer

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

    def admit(self) -> None:
        """Take a place, or raise `Overloaded`; every admitted upload must be `release`d."""
        limits = self.limits
        if self.held >= limits.max_pending:
            raise Overloaded(f"{limits.max_pending} uploads are already in progress", self.retry_after_s())
        if self.held >= limits.floor:
            wait = self.expected_wait_s()
            if wait is not None and wait > limits.max_wait_s:
                raise Overloaded(f"the wait would be {wait:.1f} s", self.retry_after_s())
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

    def retry_after_s(self) -> int:
        """When the uploads held now should have been answered: the wait a client refused now would have had."""
        wait = self.expected_wait_s(self.held - 1)
        return max(self.limits.min_retry_after_s, min(MAX_RETRY_AFTER_S, math.ceil(wait)) if wait is not None else 0)
