"""Closed-loop HTTP load: N users, each sending its next upload as soon as the last one is answered.

One asyncio process with aiohttp, so the client takes little of a small machine's CPU away from the server it
measures. Used by the benchmark and by the tests that need traffic in flight (redeploys, overload, crashes).
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp


@dataclass(frozen=True)
class Upload:
    name: str
    data: bytes
    multipart: bool = True

    def request_kwargs(self, field_name: str) -> dict[str, object]:
        if self.multipart:
            form = aiohttp.FormData()
            form.add_field(field_name, self.data, filename=self.name, content_type="image/jpeg")
            return {"data": form}
        return {"data": self.data, "headers": {"Content-Type": "image/jpeg"}}


@dataclass
class Outcome:
    status: int
    latency_s: float
    error: str = ""
    sent_at: float = 0.0  # time.monotonic() when the request was sent


@dataclass
class LoadResult:
    users: int
    seconds: float
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def statuses(self) -> Counter[int]:
        return Counter(o.status for o in self.outcomes)

    @property
    def ok(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == 200]

    def throughput(self) -> float:
        return len(self.ok) / self.seconds if self.seconds else 0.0

    def percentile_ms(self, q: float) -> float:
        latencies = sorted(o.latency_s for o in self.ok)
        if not latencies:
            return float("nan")
        index = min(len(latencies) - 1, max(0, round(q / 100 * len(latencies)) - 1))
        return latencies[index] * 1000

    def summary(self) -> dict[str, object]:
        ok = self.ok
        return {
            "users": self.users,
            "seconds": round(self.seconds, 2),
            "requests": len(self.outcomes),
            "ok": len(ok),
            "overloaded_503": self.statuses.get(503, 0),
            "over_share_429": self.statuses.get(429, 0),
            "failed": len(self.outcomes) - len(ok) - self.statuses.get(503, 0) - self.statuses.get(429, 0),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "throughput_rps": round(self.throughput(), 2),
            "latency_ms_p50": round(self.percentile_ms(50), 1),
            "latency_ms_p90": round(self.percentile_ms(90), 1),
            "latency_ms_p99": round(self.percentile_ms(99), 1),
            "latency_ms_mean": round(statistics.fmean(o.latency_s for o in ok) * 1000, 1) if ok else None,
        }


def load_uploads(folder: str | Path, *, limit: int | None = None, raw_every: int = 0) -> list[Upload]:
    """Photos from a folder; every `raw_every`-th is sent as a raw body instead of multipart."""
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})[:limit]
    return [Upload(p.name, p.read_bytes(), multipart=not (raw_every and i % raw_every == 0))
            for i, p in enumerate(paths, 1)]


async def run_load(url: str, uploads: list[Upload], *, users: int, seconds: float | None = None,
                   requests_per_user: int | None = None, timeout_s: float = 60.0, field_name: str = "file",
                   stop: asyncio.Event | None = None, honour_retry_after: bool = True,
                   local_addresses: Sequence[str] = ()) -> LoadResult:
    """Run until `seconds` pass, each user has sent `requests_per_user`, or `stop` is set (then each user's request
    in flight is waited for). With `honour_retry_after` false, a refused user (503 or 429) sends again at once, as
    retry loops and impatient apps do. With `local_addresses` (loopback has all of 127.0.0.0/8), user i connects
    from address i modulo their number: as many clients as addresses, as the service tells clients apart."""
    if seconds is None and requests_per_user is None and stop is None:
        raise ValueError("give seconds, requests_per_user or stop")
    result = LoadResult(users=users, seconds=0.0)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    start = time.perf_counter()
    deadline = start + seconds if seconds is not None else float("inf")
    sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(
        limit=0, force_close=False, local_addr=(address, 0) if address else None), timeout=timeout)
        for address in (local_addresses or [""])]

    async def user(index: int) -> None:
        session = sessions[index % len(sessions)]
        uploads_cycle = itertools.islice(itertools.cycle(uploads), index, None)
        sent = 0
        while time.perf_counter() < deadline and (requests_per_user is None or sent < requests_per_user):
            if stop is not None and stop.is_set():
                return
            upload = next(uploads_cycle)
            t0, sent_at = time.perf_counter(), time.monotonic()
            try:
                async with session.post(url, **upload.request_kwargs(field_name)) as response:
                    await response.read()
                    result.outcomes.append(Outcome(response.status, time.perf_counter() - t0, sent_at=sent_at))
                    retry_after = response.headers.get("Retry-After", "")
                if honour_retry_after and response.status in (429, 503) and retry_after.isdigit():
                    await asyncio.sleep(min(int(retry_after), 5))  # as a well-behaved client would
            except (aiohttp.ClientError, TimeoutError) as e:
                result.outcomes.append(Outcome(0, time.perf_counter() - t0, f"{type(e).__name__}: {e}", sent_at))
            sent += 1

    try:
        await asyncio.gather(*(user(i) for i in range(users)))
    finally:
        await asyncio.gather(*(session.close() for session in sessions))
    result.seconds = time.perf_counter() - start
    return result


class BackgroundLoad:
    """Closed-loop load on a thread of its own until `stop()`: traffic in flight while something else happens
    (a redeploy, a crash, a node going away).

        with BackgroundLoad(url, uploads, users=8) as load:
            ...
        result = load.result
    """

    def __init__(self, url: str, uploads: list[Upload], *, users: int) -> None:
        self._args = (url, uploads, users)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.result: LoadResult | None = None

    def _run(self) -> None:
        async def main() -> LoadResult:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            self._ready.set()
            url, uploads, users = self._args
            return await run_load(url, uploads, users=users, stop=self._stop)

        self.result = asyncio.run(main())

    def __enter__(self) -> BackgroundLoad:
        self._thread.start()
        self._ready.wait(timeout=30)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def stop(self) -> LoadResult:
        if self._loop is not None and self._stop is not None and not self._stop.is_set():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=180)
        assert self.result is not None, "the load did not finish"
        return self.result
