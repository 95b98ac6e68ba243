"""Closed-loop HTTP load: N users, each sending its next upload as soon as the last one is answered.

Two generators with one summary shape: `run_load`, one asyncio process with aiohttp (little of a small machine's CPU
taken from the server it measures; the tests use it for traffic in flight during redeploys, overload and crashes),
and `wrk` (Debian's package, compiled), for rates where one Python process on the node's own cores would itself be
the limit (near 1,000 req/s on a 16-core GPU node).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import resource
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png"}
WRK_SCRIPT = Path(__file__).with_name("wrk_post.lua")


def load_uploads(folder: str | Path, *, limit: int | None = None, raw_every: int = 0) -> list[Upload]:
    """Photos from a folder; every `raw_every`-th is sent as a raw body instead of multipart."""
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)[:limit]
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


def wrk(url: str, photos: Path, *, users: int, seconds: float, threads: int = 2, field_name: str = "file",
        timeout_s: float = 120) -> dict[str, Any]:
    """`users` wrk connections on `threads` threads for `seconds`, each posting the photos of a folder as multipart
    uploads one after another (`load/wrk_post.lua`), as `run_load`'s users do."""
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed (Debian: apt-get install wrk; the GPU kit carries it)")
    paths = sorted(str(p.resolve()) for p in Path(photos).iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as manifest:
        manifest.write("\n".join(paths) + "\n")
        manifest.flush()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run(["wrk", f"-t{min(threads, users)}", f"-c{users}", f"-d{max(1, round(seconds))}s",
                               f"--timeout={timeout_s:g}s", "-s", str(WRK_SCRIPT), url, "--", manifest.name,
                               field_name], capture_output=True, text=True, check=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("WRK_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result: {done.stdout[-2000:]} {done.stderr[-2000:]}")
    return wrk_summary(json.loads(line.removeprefix("WRK_JSON ")), users=users,
                       cpu_s=(after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))


def wrk_summary(raw: dict[str, Any], *, users: int, cpu_s: float) -> dict[str, Any]:
    """wrk's figures in `LoadResult.summary()`'s shape, with its own CPU: connections that got no answer count under
    status 0."""
    seconds = raw["duration_us"] / 1e6
    statuses = {str(k): v for k, v in sorted(raw["statuses"].items(), key=lambda kv: int(kv[0]))}
    if lost := sum(raw["errors"].values()):
        statuses["0"] = lost
    ok, latency = statuses.get("200", 0), raw["latency_us"]
    return {
        "users": users, "seconds": round(seconds, 2), "requests": sum(statuses.values()), "ok": ok,
        "overloaded_503": statuses.get("503", 0), "failed": sum(statuses.values()) - ok - statuses.get("503", 0),
        "statuses": statuses, "throughput_rps": round(ok / seconds, 2) if seconds else 0.0,
        # wrk's latency is over every answer; in a run where all are 200, as the GPU points are, that is the same.
        "latency_ms_p50": round(latency["p50"] / 1000, 1), "latency_ms_p90": round(latency["p90"] / 1000, 1),
        "latency_ms_p99": round(latency["p99"] / 1000, 1), "latency_ms_mean": round(latency["mean"] / 1000, 1),
        "generator": "wrk", "generator_cpu_cores": round(cpu_s / seconds, 3) if seconds else None,
        "generator_cpu_ms_per_request": round(cpu_s * 1000 / max(raw["requests"], 1), 4),
    }
