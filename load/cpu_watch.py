"""CPU time per process role, read from /proc: what each serving role (Ingress, Preprocessor, Classifier, the
proxies, Ray's own processes, the 2019 design's workers) spends while a benchmark loads it."""

from __future__ import annotations

import statistics
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import psutil


def role_of(cmdline: list[str]) -> str | None:
    """The serving role of a process, from its command line (Ray workers set theirs to `ray::<actor>`)."""
    if not cmdline:
        return None
    first = cmdline[0]
    if first.startswith("ray::ServeReplica:"):
        # `ray::ServeReplica:<app>:<deployment>`, with `.<method>` while it runs an actor task other than requests
        return first.rsplit(":", 1)[1].split(".", 1)[0]
    if first.startswith("ray::ProxyActor"):
        return "Serve proxy"
    if first.startswith("ray::HAProxyManager") or first.endswith("/haproxy"):
        return "HAProxy"
    if first.startswith("ray::ServeController"):
        return "Serve controller"
    if first == "wrk" or first.endswith("/wrk"):
        return "load generator"
    line = " ".join(cmdline[:4])
    if "gunicorn" in line and "load.seed_baseline" in " ".join(cmdline):
        return "2019 design"
    if first.endswith("/raylet"):
        return "Ray raylet"
    if first.endswith("/gcs_server"):
        return "Ray GCS"
    if first.startswith(("ray::", "ray-dashboard")) or "/site-packages/ray/" in line or "ray.util.client" in line:
        return "Ray (other)"
    return None


@dataclass
class _Seen:
    role: str
    first_cpu: float
    last_cpu: float
    first_at: float
    last_at: float


class CpuWatch:
    """Every `interval_s` on a thread of its own, the CPU time (user + system, all threads) of every process with a
    role. Replicas come and go under autoscaling: a process that exits keeps what it had spent at its last reading,
    so at most one interval of its CPU is lost, and one that starts counts from its first reading."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.seen: dict[int, _Seen] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CpuWatch:
        self._read()
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._read()
        self.seconds = time.monotonic() - self.started

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._read()

    def _read(self) -> None:
        now = time.monotonic()
        for process in psutil.process_iter(["cmdline", "cpu_times"]):
            role = role_of(process.info["cmdline"] or [])
            times = process.info["cpu_times"]
            if role is None or times is None:
                continue
            cpu = times.user + times.system
            seen = self.seen.get(process.pid)
            if seen is None:
                self.seen[process.pid] = _Seen(role, cpu, cpu, now, now)
            else:
                seen.last_cpu, seen.last_at = cpu, now

    def idle_rates(self) -> dict[int, float]:
        """Cores each process used (pid -> CPU seconds per second)."""
        return {pid: (s.last_cpu - s.first_cpu) / max(s.last_at - s.first_at, 1e-9)
                for pid, s in self.seen.items() if s.last_at > s.first_at}


def busy_ms_by_role(idle: CpuWatch, load: CpuWatch) -> tuple[dict[str, float], dict[str, float]]:
    """CPU ms each role spent during the load beyond its idle rate, and each role's idle rate in cores. A process
    with no idle reading (a replica scaled out during the load) is given its role's mean idle rate."""
    rates = idle.idle_rates()
    idle_cores: dict[str, float] = defaultdict(float)
    per_role: dict[str, list[float]] = defaultdict(list)
    for pid, rate in rates.items():
        idle_cores[idle.seen[pid].role] += rate
        per_role[idle.seen[pid].role].append(rate)
    busy: dict[str, float] = defaultdict(float)
    for pid, s in load.seen.items():
        rate = rates.get(pid, statistics.fmean(per_role[s.role]) if per_role[s.role] else 0.0)
        busy[s.role] += max(0.0, (s.last_cpu - s.first_cpu) - rate * (s.last_at - s.first_at)) * 1000
    return dict(busy), dict(idle_cores)


# Roles a request or a refusal passes through; the rest of Ray is reported but not charged to either.
REQUEST_ROLES = ("HAProxy", "Ingress", "Preprocessor", "Classifier", "Ray raylet")

# Fewer refusals than this leave their cost inside the noise of the answers' CPU.
MIN_REFUSALS = 1000


def refusal_cost(calm: dict[str, Any], storm: dict[str, Any]) -> dict[str, float]:
    """CPU ms per refusal by role: the storm's CPU less its answers at the calm point's cost per answer."""
    refused = storm["overloaded_503"] + storm.get("over_share_429", 0)
    if refused < MIN_REFUSALS or not calm["ok"]:
        return {}
    cost = {}
    for role in REQUEST_ROLES:
        per_answer = calm["cpu_ms"].get(role, 0.0) / calm["ok"]
        cost[role] = round(max(0.0, storm["cpu_ms"].get(role, 0.0) - storm["ok"] * per_answer) / refused, 3)
    return cost


def refusal_cost_cell(ms_per_refusal: dict[str, float] | None) -> str:
    """What a refusal cost where it is answered (Ingress + HAProxy, CPU ms), for a table; empty where not measured."""
    if not ms_per_refusal:
        return ""
    return f"{ms_per_refusal.get('Ingress', 0) + ms_per_refusal.get('HAProxy', 0):.2f}"
