"""Overload: goodput under a retry storm, and what a refusal costs.

Back to back on one service: closed-loop users at a calm level (16, honouring Retry-After), then storms of many
users that ignore Retry-After and send again the moment they are refused, then one request right after. For each
point: statuses, goodput, latency of the answered, and every process role's CPU from /proc (idle subtracted), from
which the CPU of one refusal per role follows (the storm's CPU less its answers at the calm point's cost per
answer, over its refusals).

    python -m load.overload [--profile local|production] [--storms 400,1000] [--seconds 45]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from load import harness
from load.checkpoints import random_bcnn_checkpoint
from load.cpu_watch import CpuWatch, busy_ms_by_role, refusal_cost, refusal_cost_cell
from load.harness import SERVICE_URL as URL
from load.loadgen import Upload, load_uploads, run_load


def point(url: str, uploads: list[Upload], idle: CpuWatch, *, users: int, seconds: float,
          honour_retry_after: bool) -> dict[str, Any]:
    generator_cpu = time.process_time()
    with CpuWatch() as watch:
        result = asyncio.run(run_load(url, uploads, users=users, seconds=seconds, timeout_s=120,
                                      honour_retry_after=honour_retry_after))
    busy, _ = busy_ms_by_role(idle, watch)
    busy["load generator"] = (time.process_time() - generator_cpu) * 1000  # this process: same cores, so it counts
    summary = result.summary()
    return {**summary, "honour_retry_after": honour_retry_after,
            "refused_per_s": round(summary["overloaded_503"] / result.seconds, 1),
            "cpu_ms": {r: round(ms, 1) for r, ms in sorted(busy.items())}}


def after(uploads: list[Upload], requests: int = 10) -> dict[str, Any]:
    """One user right after the storm: the service is healthy and answers at its normal pace."""
    health = httpx.get(URL + "/healthz", timeout=30).json()["status"]
    result = asyncio.run(run_load(URL + "/classify", uploads, users=1, requests_per_user=requests, timeout_s=60))
    return {"healthz": health, **{k: result.summary()[k] for k in ("statuses", "latency_ms_p50", "latency_ms_p99")}}


def config_for(profile: str, workdir: Path, *, forward: bool = False, fixed_replicas: bool = False) -> dict[str, Any]:
    """The local profile as it is, or the production file with a VGG16-BCNN 448 (random weights), its forward pass
    skipped unless `forward`. `fixed_replicas` holds every deployment at its minimum: on a small CPU standing in for
    a 16-core node, replicas started by autoscaling get no core of their own, and starting them costs seconds of
    the CPU the storm is measured on."""
    if profile == "local":
        return yaml.safe_load((harness.ROOT / "serve_config.local.yaml").read_text())
    checkpoint = random_bcnn_checkpoint(workdir / "vgg16-bcnn.pt", num_classes=200, input_size=448)
    config = harness.production_config(str(checkpoint), skip_forward=not forward)
    if fixed_replicas:
        for d in harness.deployments(config):
            if "autoscaling_config" in d:
                d["num_replicas"] = d.pop("autoscaling_config")["min_replicas"]
    return config


def run(uploads: list[Upload], *, profile: str = "local", calm_users: int = 16, storms: tuple[int, ...] = (400, 1000),
        seconds: float = 45.0, calm_seconds: float = 30.0, warmup_s: float = 15.0, forward: bool = False,
        fixed_replicas: bool = False) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="overload-"))
    env = harness.serve_env()
    production = profile == "production"
    with harness.ray_cluster(env, num_cpus=16 if production else None, num_gpus=1 if production else None):
        config = config_for(profile, workdir, forward=forward, fixed_replicas=fixed_replicas)
        checkpoint = str(workdir / "vgg16-bcnn.pt") if production else "default"
        harness.deploy(config, env, uploads[0], model_name=harness.model_name(checkpoint))
        url = URL + "/classify"
        asyncio.run(run_load(url, uploads, users=calm_users, seconds=warmup_s, timeout_s=120))
        with CpuWatch() as idle:
            time.sleep(5)
        report: dict[str, Any] = {"profile": profile, "seconds": seconds, "forward": forward or not production,
                                  "fixed_replicas": fixed_replicas}
        report["calm"] = point(url, uploads, idle, users=calm_users, seconds=calm_seconds, honour_retry_after=True)
        print("calm:", json.dumps(report["calm"]), flush=True)
        for users in storms:
            storm = point(url, uploads, idle, users=users, seconds=seconds, honour_retry_after=False)
            storm["goodput_ratio"] = round(storm["throughput_rps"] / max(report["calm"]["throughput_rps"], 1e-9), 3)
            storm["ms_per_refusal"] = refusal_cost(report["calm"], storm)
            storm["after"] = after(uploads)
            report[f"storm_{users}"] = storm
            print(f"storm {users}:", json.dumps(storm), flush=True)
    return report


def table(reports: list[dict[str, Any]]) -> str:
    """The overload table of docs/performance.md: one row per point of each profile measured."""
    lines = ["| profile | users | answered/s | goodput vs calm | refused/s | failed | p50 / p99 answered (s) | "
             "CPU ms per refusal (Ingress + HAProxy) | right after: healthz, p50 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for report in reports:
        name = {"local": "local (`make serve`)", "production": "production file, VGG16-BCNN 448"}[report["profile"]]
        if report["profile"] == "production":
            name += ", forward " + ("run" if report["forward"] else "skipped")
            name += ", replicas fixed" if report["fixed_replicas"] else ""
        for key in ["calm", *sorted((k for k in report if k.startswith("storm_")), key=lambda k: int(k[6:]))]:
            p = report[key]
            other = sum(v for k, v in p["statuses"].items() if k != "200" and k != "503")
            cost = refusal_cost_cell(p.get("ms_per_refusal"))
            after = f"{p['after']['healthz']}, {p['after']['latency_ms_p50']:.0f} ms" if "after" in p else ""
            users = f"{p['users']}" + ("" if p["honour_retry_after"] else ", retrying at once")
            lines.append(f"| {name} | {users} | {p['throughput_rps']} | {p.get('goodput_ratio', 1.0):.2f} | "
                         f"{p['refused_per_s']} | {other} | {p['latency_ms_p50'] / 1000:.2f} / "
                         f"{p['latency_ms_p99'] / 1000:.2f} | {cost} | "
                         f"{after} |")
    return "\n".join(lines)


def section(reports: list[dict[str, Any]], date: str, cpus: int) -> str:
    return (f"Measured {date} on {cpus} CPUs (`make bench`, or alone: `python -m load.overload`): "
            f"{reports[0]['seconds']:g} s per storm, right after 16 users honouring Retry-After (the calm row); CPU "
            f"from /proc, idle subtracted; the load generator runs on the same cores.\n\n{table(reports)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=("local", "production"), default="local")
    parser.add_argument("--storms", default="400,1000")
    parser.add_argument("--seconds", type=float, default=45.0)
    parser.add_argument("--calm-seconds", type=float, default=30.0)
    parser.add_argument("--forward", action="store_true", help="production: run the model (a GPU machine)")
    parser.add_argument("--fixed-replicas", action="store_true", help="production: no autoscaling (a small CPU)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    uploads = [Upload(u.name, u.data) for u in load_uploads(harness.PHOTOS)]
    report = run(uploads, profile=args.profile, storms=tuple(int(u) for u in args.storms.split(",")),
                 seconds=args.seconds, calm_seconds=args.calm_seconds, forward=args.forward,
                 fixed_replicas=args.fixed_replicas)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("\n" + table([report]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
