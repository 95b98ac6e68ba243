"""Overload: goodput under a retry storm, and what a refusal costs.

Back to back on one service: closed-loop users at a calm level (16, honouring Retry-After), then storms of many
users that ignore Retry-After and send again the moment they are refused, then one user right after. For each
point: statuses, goodput, latency of the answered, and every process role's CPU from /proc (idle subtracted), from
which the CPU of one refusal per role follows (the storm's CPU less its answers at the calm point's cost per
answer, over its refusals). Profiles: `local` (`make serve`) and `production` (the production file with a
VGG16-BCNN 448, random weights, its forward pass skipped unless `--forward`, replicas fixed unless told not).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from load import runner
from load.bare_model import model_checkpoint
from load.cpu_watch import refusal_cost, refusal_cost_cell


@dataclass(frozen=True)
class Settings:
    profiles: tuple[str, ...] = ("local", "production")
    storms: tuple[int, ...] = (400, 1000)
    seconds: float = 45.0
    calm_seconds: float = 30.0
    calm_users: int = 16
    forward: bool = False  # production: run the model (a GPU machine)
    fixed_replicas: bool = True  # production: no autoscaling (a small CPU standing in for a node)


def storms(profile: str, s: Settings) -> dict[str, Any]:
    uploads, url = runner.uploads(), runner.CLASSIFY_URL
    production = profile == "production"
    checkpoint = model_checkpoint("vgg16_448" if production else "default")
    config = runner.serve_config(profile, checkpoint, skip_forward=production and not s.forward,
                                 fixed_replicas=production and s.fixed_replicas)
    with runner.Cluster(num_cpus=16 if production else None, num_gpus=1 if production else None) as cluster:
        cluster.deploy(config, uploads[0], checkpoint)
        runner.point(url, uploads, s.calm_users, 15, warm_s=0, quiet=True)
        idle = runner.idle_cpu(5)
        report: dict[str, Any] = {"profile": profile, "seconds": s.seconds, "forward": s.forward or not production,
                                  "fixed_replicas": production and s.fixed_replicas}
        print(f"overload, {profile}: calm, then storms of {s.storms} users retrying at once:", flush=True)
        report["calm"] = {**runner.point(url, uploads, s.calm_users, s.calm_seconds, warm_s=0, idle=idle),
                          "honour_retry_after": True}
        for users in s.storms:
            storm = runner.point(url, uploads, users, s.seconds, warm_s=0, idle=idle, honour_retry_after=False)
            after = runner.point(url, uploads, 1, 3, warm_s=0, quiet=True)  # one user right after, at its pace
            report[f"storm_{users}"] = {
                **storm, "honour_retry_after": False,
                "refused_per_s": round(storm["overloaded_503"] / storm["seconds"], 1),
                "goodput_ratio": round(storm["throughput_rps"] / max(report["calm"]["throughput_rps"], 1e-9), 3),
                "ms_per_refusal": refusal_cost(report["calm"], storm),
                "after": {"healthz": httpx.get(runner.SERVICE_URL + "/healthz", timeout=30).json()["status"],
                          **{k: after[k] for k in ("statuses", "latency_ms_p50", "latency_ms_p99")}}}
        report["calm"]["refused_per_s"] = round(report["calm"]["overloaded_503"] / report["calm"]["seconds"], 1)
    return report


def run(s: Settings) -> list[dict[str, Any]]:
    return [storms(profile, s) for profile in s.profiles]


def sections(reports: list[dict[str, Any]]) -> dict[str, str]:
    lines = [f"Measured {runner.now()} on {runner.machine()['cpus']} CPUs (`make bench`, or alone: `python -m load "
             f"overload`): {reports[0]['seconds']:g} s per storm, right after 16 users honouring Retry-After (the calm "
             "row); CPU from /proc, idle subtracted; the load generator runs on the same cores.", "",
             "| profile | users | answered/s | goodput vs calm | refused/s | failed | p50 / p99 answered (s) | "
             "CPU ms per refusal (Ingress + HAProxy) | right after: healthz, p50 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for report in reports:
        name = {"local": "local (`make serve`)", "production": "production file, VGG16-BCNN 448"}[report["profile"]]
        if report["profile"] == "production":
            name += ", forward " + ("run" if report["forward"] else "skipped")
            name += ", replicas fixed" if report["fixed_replicas"] else ""
        for key in ["calm", *sorted((k for k in report if k.startswith("storm_")), key=lambda k: int(k[6:]))]:
            p = report[key]
            other = sum(v for k, v in p["statuses"].items() if k not in ("200", "503"))
            after = f"{p['after']['healthz']}, {p['after']['latency_ms_p50']:.0f} ms" if "after" in p else ""
            users = f"{p['users']}" + ("" if p["honour_retry_after"] else ", retrying at once")
            lines.append(f"| {name} | {users} | {p['throughput_rps']} | {p.get('goodput_ratio', 1.0):.2f} | "
                         f"{p['refused_per_s']} | {other} | {p['latency_ms_p50'] / 1000:.2f} / "
                         f"{p['latency_ms_p99'] / 1000:.2f} | {refusal_cost_cell(p.get('ms_per_refusal'))} | {after} |")
    return {"bench-overload": "\n".join(lines)}
