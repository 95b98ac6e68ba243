"""A replica's own long-lived thread for blocking work.

Serve runs a replica's sync methods with `anyio.to_thread`, and on Serve's event loop (started with `run_forever`)
anyio ties each new worker thread to the request task that started it: the thread ends with that request, so a
busy replica starts and stops a thread for nearly every call. A deployment whose calls block (decoding, forward
passes) makes its methods async and runs the blocking part here, on one thread that lives as long as the replica."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

_T = TypeVar("_T")


class DedicatedThread:
    """Runs functions one after another on a thread of its own, named `name`."""

    def __init__(self, name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def run(self, fn: Callable[..., _T], *args: Any) -> _T:
        """`fn(*args)` on the thread, in the caller's context (Serve's request ids in its log lines)."""
        return await asyncio.wrap_future(self.submit(fn, *args))

    def submit(self, fn: Callable[..., _T], *args: Any) -> Future[_T]:
        """`fn(*args)` queued on the thread, in the caller's context; from any thread."""
        return self._executor.submit(contextvars.copy_context().run, fn, *args)
