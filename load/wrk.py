"""Closed-loop HTTP load from `wrk` (Debian's package), a compiled load generator, for rates where one Python process
on the node's own cores would itself be the limit (near 1,000 req/s on a 16-core GPU node).

Each of `users` connections posts the photos of a folder as multipart uploads one after another, as the Python
generator's users do (`load/wrk_post.lua`); the summary has the same keys as `LoadResult.summary()`, plus the
generator's own CPU, so that a report can show it was not the limit.
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).with_name("wrk_post.lua")
PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png"}


def available() -> bool:
    return shutil.which("wrk") is not None


def run(url: str, photos: Path, *, users: int, seconds: float, threads: int = 2, field_name: str = "file",
        timeout_s: float = 120) -> dict[str, Any]:
    """`users` connections on `threads` threads for `seconds`."""
    if not available():
        raise RuntimeError("wrk is not installed (Debian: apt-get install wrk; the GPU kit carries it)")
    paths = sorted(str(p.resolve()) for p in Path(photos).iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as manifest:
        manifest.write("\n".join(paths) + "\n")
        manifest.flush()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run(["wrk", f"-t{min(threads, users)}", f"-c{users}", f"-d{max(1, round(seconds))}s",
                               f"--timeout={timeout_s:g}s", "-s", str(SCRIPT), url, "--", manifest.name, field_name],
                              capture_output=True, text=True, check=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("WRK_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result: {done.stdout[-2000:]} {done.stderr[-2000:]}")
    return summary(json.loads(line.removeprefix("WRK_JSON ")), users=users,
                   cpu_s=(after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))


def summary(raw: dict[str, Any], *, users: int, cpu_s: float) -> dict[str, Any]:
    """wrk's figures in `LoadResult.summary()`'s shape: connections that got no answer count under status 0."""
    seconds = raw["duration_us"] / 1e6
    statuses = {str(k): v for k, v in sorted(raw["statuses"].items(), key=lambda kv: int(kv[0]))}
    lost = sum(raw["errors"].values())
    if lost:
        statuses["0"] = lost
    ok = statuses.get("200", 0)
    latency = raw["latency_us"]
    return {
        "users": users, "seconds": round(seconds, 2), "requests": sum(statuses.values()), "ok": ok,
        "overloaded_503": statuses.get("503", 0),
        "failed": sum(statuses.values()) - ok - statuses.get("503", 0),
        "statuses": statuses, "throughput_rps": round(ok / seconds, 2) if seconds else 0.0,
        # wrk's latency is over every answer; in a run where all are 200, as the GPU points are, that is the same.
        "latency_ms_p50": round(latency["p50"] / 1000, 1), "latency_ms_p90": round(latency["p90"] / 1000, 1),
        "latency_ms_p99": round(latency["p99"] / 1000, 1), "latency_ms_mean": round(latency["mean"] / 1000, 1),
        "generator": "wrk", "generator_cpu_cores": round(cpu_s / seconds, 3) if seconds else None,
        "generator_cpu_ms_per_request": round(cpu_s * 1000 / max(raw["requests"], 1), 4),
    }
