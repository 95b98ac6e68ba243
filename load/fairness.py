"""One greedy client against polite users: fair admission per client (serve_app/admission.py).

16 polite users, each from an address of its own and honouring Retry-After, alone (calm); then the same 16 while a
greedy client opens 400 connections and sends again the moment it is refused; then the polite users alone again,
right after the greedy client has stopped (its last requests answered), window after window until they are
answered at `RECOVERED` of their calm rate again (or `recover_within_s` has passed). Loopback has all of
127.0.0.0/8, so every client is a real address to the service. The greedy client runs in a process of its own, so
that its refusals do not slow the polite users' loop; each generator's own CPU is reported. With
`greedy_addresses` > 1 its connections are spread over that many addresses: a small distributed abuse, where
fairness per address gives each of them a share.

    python -m load.fairness [--greedy-addresses 1,50] [--seconds 30] [--out FILE]

It starts its own Ray cluster with the local profile (`make bench` runs it too); `run` drives a service already
running (the suite's). Every serving role's CPU is read from /proc, from which a refusal's CPU follows, as in
`load.overload`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import yaml

from load import harness
from load.cpu_watch import CpuWatch, busy_ms_by_role, refusal_cost, refusal_cost_cell
from load.loadgen import LoadResult, Upload, load_uploads, run_load

POLITE_USERS = 16
GREEDY_CONNECTIONS = 400
RECOVERED = 0.8  # the polite users' rate after, as a share of calm, that counts as recovered


def polite_addresses(users: int) -> list[str]:
    return [f"127.0.1.{i + 1}" for i in range(users)]


def greedy_addresses(count: int) -> list[str]:
    return [f"127.0.2.{i + 1}" for i in range(count)]


def _summary(result: LoadResult, cpu_s: float) -> dict[str, Any]:
    return {**result.summary(), "generator_cpu_s": round(cpu_s, 2),
            "generator_cpu_share": round(cpu_s / result.seconds, 3) if result.seconds else 0.0}


def polite(url: str, uploads: list[Upload], *, users: int, seconds: float) -> dict[str, Any]:
    cpu = time.process_time()
    result = asyncio.run(run_load(url, uploads, users=users, seconds=seconds, timeout_s=120,
                                  local_addresses=polite_addresses(users)))
    return _summary(result, time.process_time() - cpu)


def _greedy(url: str, uploads: list[Upload], connections: int, addresses: list[str], running: Any, stop: Any) -> dict:
    """The greedy client, in its own process until `stop` is set (then its requests in flight are answered);
    `running` is set once it sends."""

    async def main() -> LoadResult:
        stopped = asyncio.Event()

        async def watch() -> None:
            running.set()
            while not stop.is_set():  # a multiprocessing event cannot be awaited: looked at 10 times a second
                await asyncio.sleep(0.1)
            stopped.set()

        watcher = asyncio.create_task(watch())
        result = await run_load(url, uploads, users=connections, stop=stopped, timeout_s=120,
                                honour_retry_after=False, local_addresses=addresses)
        await watcher
        return result

    cpu = time.process_time()
    result = asyncio.run(main())
    return _summary(result, time.process_time() - cpu)


def run(url: str, uploads: list[Upload], *, seconds: float = 30.0, calm_seconds: float = 10.0,
        greedy_address_count: int = 1, connections: int = GREEDY_CONNECTIONS, users: int = POLITE_USERS,
        after_seconds: float = 5.0, warm_seconds: float = 5.0, recover_within_s: float = 30.0,
        idle: CpuWatch | None = None) -> dict[str, Any]:
    """Calm, contended and after, back to back, against the service at `url` (its /classify): the polite users'
    rate with the greedy client as a share of their calm rate (before and after it, averaged), their rate right
    after as a share of before, and how long after the greedy client stopped they were answered at `RECOVERED` of
    it again (`recovered_in_s`, None if not within `recover_within_s`). With `idle` (a CpuWatch of the service at
    rest), each serving role's CPU in the calm and contended phases, and a refusal's."""
    report: dict[str, Any] = {"polite_users": users, "greedy_connections": connections,
                              "greedy_addresses": greedy_address_count, "seconds": seconds}
    polite(url, uploads, users=users, seconds=warm_seconds)  # warm: the polite users' first uploads
    with CpuWatch() as calm_cpu:
        report["calm"] = polite(url, uploads, users=users, seconds=calm_seconds)
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, ProcessPoolExecutor(1, mp_context=context) as pool:
        running, stop = manager.Event(), manager.Event()
        greedy = pool.submit(_greedy, url, uploads, connections, greedy_addresses(greedy_address_count),
                             running, stop)
        if not running.wait(timeout=60):
            raise RuntimeError(f"the greedy client did not start: {greedy.exception(timeout=0)}")
        with CpuWatch() as contended_cpu:
            report["contended"] = polite(url, uploads, users=users, seconds=seconds)
        stop.set()
        report["greedy"] = greedy.result(timeout=180)  # once its last requests in flight are answered
    before = report["calm"]["throughput_rps"]
    stopped = time.monotonic()
    windows = [polite(url, uploads, users=users, seconds=after_seconds)]
    # This host's speed swings within seconds, so one short window right after can read low with nothing wrong
    # with the service; harm that lasts (a place never given back, a queue never drained) reads low in every one.
    while (windows[-1]["throughput_rps"] < RECOVERED * before
           and time.monotonic() - stopped + after_seconds <= recover_within_s):
        windows.append(polite(url, uploads, users=users, seconds=after_seconds))
    recovered = windows[-1]["throughput_rps"] >= RECOVERED * before
    report["after"], report["after_windows"] = windows[0], windows
    report["recovered_in_s"] = round(time.monotonic() - stopped, 1) if recovered else None
    after = windows[0]["throughput_rps"]
    # This machine's speed drifts by 10% within a minute (a shared host): the contended rate is compared with the
    # calm rates on both sides of it, averaged, so that the drift does not count as the greedy client's doing.
    calm_rps = max((before + after) / 2, 1e-9)
    report["calm_rps"] = round(calm_rps, 2)
    report["polite_share_of_calm"] = round(report["contended"]["throughput_rps"] / calm_rps, 3)
    report["after_share_of_calm"] = round(after / max(before, 1e-9), 3)
    if idle is not None:
        calm = {**report["calm"], "cpu_ms": busy_ms_by_role(idle, calm_cpu)[0]}
        both = [report["contended"], report["greedy"]]
        contended: dict[str, Any] = {key: sum(r[key] for r in both)
                                     for key in ("ok", "overloaded_503", "over_share_429")}
        contended["cpu_ms"] = busy_ms_by_role(idle, contended_cpu)[0]
        report["cpu_ms"] = {"calm": _rounded(calm["cpu_ms"]), "contended": _rounded(contended["cpu_ms"])}
        report["ms_per_refusal"] = refusal_cost(calm, contended)
    return report


def _rounded(cpu_ms: dict[str, float]) -> dict[str, float]:
    return {role: round(ms, 1) for role, ms in sorted(cpu_ms.items())}


def measure(uploads: list[Upload], *, greedy_address_counts: tuple[int, ...] = (1, 50),
            seconds: float = 30.0, more_ingress_replicas: int = 2) -> list[dict[str, Any]]:
    """`run` for each count of greedy addresses, on a Ray cluster of its own with the local profile (one Ingress
    replica); then, one greedy address again with `more_ingress_replicas` Ingress replicas, HAProxy spreading the
    connections over them and each sharing its own places."""
    env = harness.serve_env()
    url = harness.SERVICE_URL + "/classify"
    config = yaml.safe_load((harness.ROOT / "serve_config.local.yaml").read_text())
    phases = [(1, greedy_address_counts)] + ([(more_ingress_replicas, (1,))] if more_ingress_replicas > 1 else [])
    reports = []
    with harness.ray_cluster(env):
        for replicas, counts in phases:
            harness.deployment(config, "Ingress")["num_replicas"] = replicas
            harness.deploy(config, env, uploads[0], model_name=harness.model_name("default"))
            polite(url, uploads, users=POLITE_USERS, seconds=15)  # warm: the rate admission decides with
            with CpuWatch() as idle:
                time.sleep(5)
            for count in counts:
                report = run(url, uploads, seconds=seconds, calm_seconds=20, after_seconds=10,
                             greedy_address_count=count, idle=idle)
                reports.append({**report, "ingress_replicas": replicas})
    return reports


def table(reports: list[dict[str, Any]]) -> str:
    lines = ["| greedy client | polite answered/s: calm, with it, right after | polite share of calm | "
             "polite p99 (s) | polite statuses | greedy statuses | greedy answered/s | "
             "generators' CPU (polite, greedy) | CPU ms per refusal (Ingress + HAProxy) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in reports:
        who = (f"{r['greedy_connections']} connections from "
               + ("one address" if r["greedy_addresses"] == 1 else f"{r['greedy_addresses']} addresses"))
        if r.get("ingress_replicas", 1) > 1:
            who += f", {r['ingress_replicas']} Ingress replicas"
        c, g = r["contended"], r["greedy"]
        cost = refusal_cost_cell(r.get("ms_per_refusal"))
        lines.append(f"| {who} | {r['calm']['throughput_rps']}, {c['throughput_rps']}, {r['after']['throughput_rps']} "
                     f"| {r['polite_share_of_calm']:.2f} | {c['latency_ms_p99'] / 1000:.2f} | {c['statuses']} | "
                     f"{g['statuses']} | {g['throughput_rps']} | {c['generator_cpu_share']:.0%}, "
                     f"{g['generator_cpu_share']:.0%} of a core | {cost} |")
    return "\n".join(lines)


def section(reports: list[dict[str, Any]], date: str, cpus: int) -> str:
    return (f"Measured {date} on {cpus} CPUs (`make bench`, or alone: `python -m load.fairness`), local profile: "
            f"{POLITE_USERS} polite users alone (calm), then for {reports[0]['seconds']:g} s with the greedy "
            f"client, then alone again right after it stopped (their share of calm: of the rates before and after, "
            f"averaged); every user a loopback "
            f"address of its own, the greedy client's connections on the addresses said; each generator a process "
            f"of its own, its CPU reported.\n\n{table(reports)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--greedy-addresses", default="1,50")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--more-ingress-replicas", type=int, default=2,
                        help="then one greedy address with this many Ingress replicas (0: not)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    uploads = [Upload(u.name, u.data) for u in load_uploads(harness.PHOTOS)]
    reports = measure(uploads, greedy_address_counts=tuple(int(n) for n in args.greedy_addresses.split(",")),
                      seconds=args.seconds, more_ingress_replicas=args.more_ingress_replicas)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(reports, f, indent=2)
    print(table(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
