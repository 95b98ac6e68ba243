"""What the Classifier's health check asks of its device: that it has not failed, and that no batch is stuck on it.

After a sticky CUDA error (an illegal address, a GPU fallen off the bus, an uncorrectable ECC error) every later pass
fails, and a hung kernel holds its batch's wait forever; in both cases only a new replica serves again, and Serve
starts one when `check_health` raises. Running out of memory fails only the batch that asked for too much.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable

from bcnn.backends import is_device_failure


class DeviceWatch:
    """Batches from their launch until their logits are on the host, from any thread."""

    def __init__(self, *, min_stall_s: float = 30.0, stall_factor: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """A batch is stuck once it has been in flight `stall_factor` times as long as the slowest batch that
        finished, and at least `min_stall_s` (a batch queues behind the others in flight, and a CPU is slow)."""
        self.min_stall_s, self.stall_factor = min_stall_s, stall_factor
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens = itertools.count()
        self._in_flight: dict[int, float] = {}
        self._slowest_s = 0.0
        self.failure: str | None = None
        """the first device failure seen, as the error said it"""

    def launched(self) -> int:
        with self._lock:
            token = next(self._tokens)
            self._in_flight[token] = self._clock()
            return token

    def finished(self, token: int, error: BaseException | None = None) -> None:
        with self._lock:
            began = self._in_flight.pop(token)
            if error is None:
                self._slowest_s = max(self._slowest_s, self._clock() - began)
        if error is not None:
            self.failed(error)

    def failed(self, error: BaseException) -> None:
        """Remember `error` if it says the device failed; any other error concerns its batch alone."""
        if self.failure is None and is_device_failure(error):
            self.failure = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300] if str(error) else ''}"

    @property
    def stall_s(self) -> float:
        with self._lock:
            return max(self.min_stall_s, self.stall_factor * self._slowest_s)

    def check(self) -> None:
        """Raises where the replica can no longer answer: its device failed, or a batch is stuck on it."""
        if self.failure is not None:
            raise RuntimeError(f"the device failed ({self.failure}); this replica cannot answer again")
        bound = self.stall_s
        with self._lock:
            oldest = min(self._in_flight.values(), default=None)
        if oldest is not None and (waited := self._clock() - oldest) > bound:
            raise RuntimeError(f"a batch has been on the device for {waited:.0f} s (stuck past {bound:.0f} s)")
