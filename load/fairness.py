"""One greedy client against polite users: fair admission per client (serve_app/admission.py).

16 polite users, each from an address of its own and honouring Retry-After, alone (calm); then the same 16 while a
greedy client opens 400 connections and sends again the moment it is refused; then the polite users alone again,
window after window until they are answered at `RECOVERED` of their calm rate (or `recover_within_s` has passed).
Loopback has all of 127.0.0.0/8, so every client is a real address to the service. The greedy client runs in a
process of its own, so that its refusals do not slow the polite users' loop; each generator's CPU is reported. With
more than one greedy address, its connections are spread over them: a small distributed abuse. The scenario starts
its own cluster with the local profile; `contest` drives a service already running (the suite's).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

from load import runner
from load.cpu_watch import CpuWatch, busy_ms_by_role, refusal_cost, refusal_cost_cell
from load.loadgen import LoadResult, Upload, run_load

POLITE_USERS = 16
GREEDY_CONNECTIONS = 400
RECOVERED = 0.8  # the polite users' rate after, as a share of calm, that counts as recovered


@dataclass(frozen=True)
class Settings:
    greedy_addresses: tuple[int, ...] = (1, 50)
    seconds: float = 30.0
    more_ingress_replicas: int = 2  # then one greedy address with this many Ingress replicas (0: not)


def polite(url: str, uploads: list[Upload], *, users: int, seconds: float) -> dict[str, Any]:
    return runner.point(url, uploads, users, seconds, warm_s=0, quiet=True,
                        local_addresses=[f"127.0.1.{i + 1}" for i in range(users)])


def _greedy(url: str, uploads: list[Upload], connections: int, addresses: list[str], running: Any, stop: Any) -> dict:
    """The greedy client, in its own process until `stop` is set (then its requests in flight are answered) or the
    process that started it is gone (killed: else it would go on sending to whatever listens next on the port);
    `running` is set once it sends."""
    parent = os.getppid()

    async def main() -> LoadResult:
        stopped = asyncio.Event()

        async def watch() -> None:
            running.set()
            # A multiprocessing event cannot be awaited: looked at 10 times a second.
            while os.getppid() == parent and not _is_set(stop):
                await asyncio.sleep(0.1)
            stopped.set()

        watcher = asyncio.create_task(watch())
        result = await run_load(url, uploads, users=connections, stop=stopped, timeout_s=120,
                                honour_retry_after=False, local_addresses=addresses)
        await watcher
        return result

    cpu = time.process_time()
    result = asyncio.run(main())
    return {**result.summary(), "generator": "python",
            "generator_cpu_cores": round((time.process_time() - cpu) / max(result.seconds, 1e-9), 3)}


def contest(url: str, uploads: list[Upload], *, seconds: float = 30.0, calm_seconds: float = 10.0,
            greedy_address_count: int = 1, connections: int = GREEDY_CONNECTIONS, users: int = POLITE_USERS,
            after_seconds: float = 5.0, warm_seconds: float = 5.0, recover_within_s: float = 30.0,
            idle: CpuWatch | None = None) -> dict[str, Any]:
    """Calm, contended and after, back to back, against the service at `url` (its /classify): the polite users'
    rate with the greedy client as a share of their calm rate (before and after it, averaged: this host's speed
    drifts), their rate right after as a share of before, and how long after the greedy client stopped they were
    answered at `RECOVERED` of it again (`recovered_in_s`, None if not within `recover_within_s`). With `idle` (a
    CpuWatch of the service at rest), each serving role's CPU in the calm and contended phases, and a refusal's."""
    report: dict[str, Any] = {"polite_users": users, "greedy_connections": connections,
                              "greedy_addresses": greedy_address_count, "seconds": seconds}
    polite(url, uploads, users=users, seconds=warm_seconds)
    with CpuWatch() as calm_cpu:
        report["calm"] = polite(url, uploads, users=users, seconds=calm_seconds)
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, ProcessPoolExecutor(1, mp_context=context, max_tasks_per_child=1) as pool:
        running, stop = manager.Event(), manager.Event()
        addresses = [f"127.0.2.{i + 1}" for i in range(greedy_address_count)]
        greedy = pool.submit(_greedy, url, uploads, connections, addresses, running, stop)
        if not running.wait(timeout=60):
            raise RuntimeError(f"the greedy client did not start: {greedy.exception(timeout=0)}")
        with CpuWatch() as contended_cpu:
            report["contended"] = polite(url, uploads, users=users, seconds=seconds)
        stop.set()
        report["greedy"] = greedy.result(timeout=180)  # once its last requests in flight are answered
    before, stopped = report["calm"]["throughput_rps"], time.monotonic()
    windows = [polite(url, uploads, users=users, seconds=after_seconds)]
    # One short window right after can read low with nothing wrong (the host's speed swings within seconds); harm
    # that lasts (a place never given back, a queue never drained) reads low in every one.
    while (windows[-1]["throughput_rps"] < RECOVERED * before
           and time.monotonic() - stopped + after_seconds <= recover_within_s):
        windows.append(polite(url, uploads, users=users, seconds=after_seconds))
    recovered = windows[-1]["throughput_rps"] >= RECOVERED * before
    report["after"], report["after_windows"] = windows[0], windows
    report["recovered_in_s"] = round(time.monotonic() - stopped, 1) if recovered else None
    calm_rps = max((before + windows[0]["throughput_rps"]) / 2, 1e-9)
    report["calm_rps"] = round(calm_rps, 2)
    report["polite_share_of_calm"] = round(report["contended"]["throughput_rps"] / calm_rps, 3)
    report["after_share_of_calm"] = round(windows[0]["throughput_rps"] / max(before, 1e-9), 3)
    if idle is not None:
        calm = {**report["calm"], "cpu_ms": busy_ms_by_role(idle, calm_cpu)[0]}
        contended: dict[str, Any] = {key: report["contended"][key] + report["greedy"][key]
                                     for key in ("ok", "overloaded_503", "over_share_429")}
        contended["cpu_ms"] = busy_ms_by_role(idle, contended_cpu)[0]
        report["cpu_ms"] = {phase: {role: round(ms, 1) for role, ms in sorted(p["cpu_ms"].items())}
                            for phase, p in (("calm", calm), ("contended", contended))}
        report["ms_per_refusal"] = refusal_cost(calm, contended)
    return report


def _is_set(event: Any) -> bool:
    """A manager's event; set (stop) once the manager is gone with the process that started it."""
    try:
        return bool(event.is_set())
    except (OSError, EOFError):
        return True


def run(s: Settings) -> list[dict[str, Any]]:
    """`contest` for each count of greedy addresses with one Ingress replica (the local profile); then one greedy
    address again with `more_ingress_replicas`, HAProxy spreading the connections over them."""
    uploads, config = runner.uploads(), runner.serve_config("local")
    phases = [(1, s.greedy_addresses)] + ([(s.more_ingress_replicas, (1,))] if s.more_ingress_replicas > 1 else [])
    reports = []
    with runner.Cluster() as cluster:
        for replicas, counts in phases:
            runner.deployment(config, "Ingress")["num_replicas"] = replicas
            cluster.deploy(config, uploads[0])
            polite(runner.CLASSIFY_URL, uploads, users=POLITE_USERS, seconds=15)  # warm: admission's rate
            idle = runner.idle_cpu(5)
            for count in counts:
                print(f"fairness: a greedy client from {count} address(es), {replicas} Ingress replica(s)", flush=True)
                reports.append({**contest(runner.CLASSIFY_URL, uploads, seconds=s.seconds, calm_seconds=20,
                                          after_seconds=10, greedy_address_count=count, idle=idle),
                                "ingress_replicas": replicas})
    return reports


def sections(reports: list[dict[str, Any]]) -> dict[str, str]:
    lines = [f"Measured {runner.now()} on {runner.machine()['cpus']} CPUs (`make bench`, or alone: `python -m load "
             f"fairness`), local profile: {POLITE_USERS} polite users alone (calm), then for "
             f"{reports[0]['seconds']:g} s with the greedy client, then alone again right after it stopped (their "
             "share of calm: of the rates before and after, averaged); every user a loopback address of its own, the "
             "greedy client's connections on the addresses said; each generator a process of its own, its CPU "
             "reported.", "",
             "| greedy client | polite answered/s: calm, with it, right after | polite share of calm | "
             "polite p99 (s) | polite statuses | greedy statuses | greedy answered/s | "
             "generators' CPU (polite, greedy) | CPU ms per refusal (Ingress + HAProxy) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in reports:
        who = (f"{r['greedy_connections']} connections from "
               + ("one address" if r["greedy_addresses"] == 1 else f"{r['greedy_addresses']} addresses"))
        if r.get("ingress_replicas", 1) > 1:
            who += f", {r['ingress_replicas']} Ingress replicas"
        c, g = r["contended"], r["greedy"]
        lines.append(f"| {who} | {r['calm']['throughput_rps']}, {c['throughput_rps']}, {r['after']['throughput_rps']} "
                     f"| {r['polite_share_of_calm']:.2f} | {c['latency_ms_p99'] / 1000:.2f} | {c['statuses']} | "
                     f"{g['statuses']} | {g['throughput_rps']} | {c['generator_cpu_cores']:.0%}, "
                     f"{g['generator_cpu_cores']:.0%} of a core | {refusal_cost_cell(r.get('ms_per_refusal'))} |")
    return {"bench-fairness": "\n".join(lines)}
