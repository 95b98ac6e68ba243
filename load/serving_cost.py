"""The serving path's CPU per answered request, per process role, read from /proc, and what it means for a GPU node.

A GPU node is CPU-bound in front of its GPU: how many answers it gives per second is set by how much CPU each
request costs in each process, and by the processes of which a node has only one. Both are measurable on a CPU
with the forward pass skipped (`load.devices`: what remains is what a GPU's speed leaves):

1. start Ray with many logical CPUs and one logical GPU, deploy the production `serve_config.yaml` with a
   VGG16-BCNN 448 checkpoint (random weights), the forward pass skipped;
2. load it with closed-loop users for a warm-up, then read every process's CPU time for a while with no load (its
   idle rate) and for a measured load;
3. per role (Ingress, Preprocessor, Classifier, Serve's proxy, HAProxy, Serve's controller, the rest of Ray),
   CPU milliseconds per answered request with each process's idle rate subtracted;
4. the same for the 2019 design (Flask + `gunicorn -w <cores>`, forward skipped the same way);

and projects the figures onto a node of N cores with one GPU of a given rate (`project`).

`--box cpu` measures the CPU box instead: `make serve` as it is (serve_config.local.yaml, the embedded default,
the real forward pass, Ray on this machine's cores) against the 2019 design around the same model and backend
(`gunicorn -w <cores>`), each alone on the machine in turn: their rates, and where each spends its CPU.

    python -m load.serving_cost [--box gpu|cpu] [--proxy haproxy,serve] [--users 64] [--seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from load.checkpoints import random_bcnn_checkpoint
from load.cpu_watch import CpuWatch, busy_ms_by_role
from load.harness import (
    PHOTOS,
    ROOT,
    SERVICE_URL,
    deploy,
    model_name,
    production_config,
    ray_cluster,
    seed_service,
    serve_env,
)
from load.loadgen import Upload, load_uploads, run_load

# The roles of which a node runs one process whatever the load: each caps the node at 1000 / its ms per request.
# (HAProxy and the raylet run a few threads each, but HAProxy's manager is one Python process and the raylet's
# node manager one event loop: counted as one process, a cap on the safe side.)
PER_NODE_ROLES = ("Classifier", "Serve proxy", "HAProxy", "Ray raylet")
SERVING_ROLES = ("Ingress", "Preprocessor", "Classifier", "Serve proxy", "HAProxy", "Ray raylet")
"""The processes a request passes through (the raylet moves the pixels between stages through the object store);
their sum is the serving path's CPU per request."""


@dataclass(frozen=True)
class Node:
    """What the projection is for. Defaults: the H100 machine measured on 2026-11-25 (16 cores; the bare
    VGG16-BCNN at 448 ran 1,693 images/s at batch 128 there)."""

    cores: int = 16
    gpu_images_per_s: float = 1693.0
    classifiers_per_gpu: int = 1


def measure(url: str, uploads: list[Upload], *, users: int, seconds: float, warmup_s: float, idle_s: float,
            roles: Callable[[str], bool] = lambda _role: True) -> dict[str, Any]:
    """Warm-up load, an idle window, then the measured load; CPU ms per answered request by role."""
    asyncio.run(run_load(url, uploads, users=users, seconds=warmup_s, timeout_s=120))
    with CpuWatch() as idle:
        time.sleep(idle_s)
    with CpuWatch() as load:
        result = asyncio.run(run_load(url, uploads, users=users, seconds=seconds, timeout_s=120))
    busy, idle_cores = busy_ms_by_role(idle, load)
    answered = len(result.ok)
    processes: dict[str, int] = defaultdict(int)
    for s in load.seen.values():
        processes[s.role] += 1
    return {
        "users": users, "seconds": round(result.seconds, 1), "answered": answered,
        "throughput_rps": round(result.throughput(), 1), "statuses": {str(k): v for k, v in result.statuses.items()},
        "ms_per_request": {r: round(ms / max(answered, 1), 2) for r, ms in sorted(busy.items()) if roles(r)},
        "idle_cores": {r: round(c, 3) for r, c in sorted(idle_cores.items()) if roles(r)},
        "processes": {r: n for r, n in sorted(processes.items()) if roles(r)},
    }


def project(cost: dict[str, Any], node: Node) -> dict[str, Any]:
    """Answers per second a node of `node.cores` cores and one GPU could give: the least of the GPU's rate, the
    per-node processes' caps (1000 / their ms per request, times the Classifier replicas per GPU), and the cores
    left after Ray's idle load shared by every process's CPU per request."""
    ms = cost["ms_per_request"]
    total = sum(ms.get(r, 0.0) for r in cost.get("request_path", SERVING_ROLES))
    everything = sum(ms.values())
    spare_cores = node.cores - sum(cost["idle_cores"].values())
    caps = {"GPU": node.gpu_images_per_s, "cores": spare_cores * 1000 / max(everything, 1e-9)}
    unused_proxy = {"Serve proxy", "HAProxy"} - set(cost.get("request_path", SERVING_ROLES))
    for role in PER_NODE_ROLES:
        if role not in unused_proxy and ms.get(role):
            replicas = node.classifiers_per_gpu if role == "Classifier" else 1
            caps[role] = replicas * 1000 / ms[role]
    limit = min(caps, key=lambda k: caps[k])
    return {"node": {"cores": node.cores, "gpu_images_per_s": node.gpu_images_per_s,
                     "classifiers_per_gpu": node.classifiers_per_gpu},
            "serving_ms_per_request": round(total, 2), "all_ms_per_request": round(everything, 2),
            "caps_rps": {k: round(v) for k, v in caps.items()}, "limited_by": limit,
            "rps": round(caps[limit])}


Box = Literal["gpu", "cpu"]


def our_service(proxy: str, checkpoint: str, uploads: list[Upload], *, users: int, seconds: float,
                warmup_s: float, idle_s: float, box: Box = "gpu", logical_cpus: int = 16) -> dict[str, Any]:
    """The production file with the forward pass skipped on a Ray cluster declaring a GPU node's CPUs and a GPU, or
    on the CPU box `make serve`'s profile on this machine's cores."""
    env = serve_env(proxy)
    if box == "cpu":
        config = yaml.safe_load((ROOT / "serve_config.local.yaml").read_text())
        cluster = ray_cluster(env)
    else:
        config = production_config(checkpoint, skip_forward=True)
        cluster = ray_cluster(env, num_cpus=logical_cpus, num_gpus=1)
    with cluster:
        deploy(config, env, uploads[0], model_name=model_name(checkpoint))
        cost = measure(SERVICE_URL + "/classify", uploads, users=users, seconds=seconds, warmup_s=warmup_s,
                       idle_s=idle_s, roles=lambda r: r != "2019 design")
    # Serve's proxy idles beside HAProxy (its fallback), and HAProxy is absent without it.
    cost["request_path"] = [r for r in SERVING_ROLES if r != ("Serve proxy" if proxy == "haproxy" else "HAProxy")]
    return {"proxy": proxy, **cost}


def seed_design(checkpoint: str, uploads: list[Upload], *, users: int, seconds: float, warmup_s: float,
                idle_s: float, workers: int, box: Box = "gpu") -> dict[str, Any]:
    """The 2019 design with the same model, the forward pass skipped the same way (or, on the CPU box, run)."""
    with seed_service(checkpoint, workers, uploads[0], skip_forward=box == "gpu") as url:
        cost = measure(url, uploads, users=users, seconds=seconds, warmup_s=warmup_s, idle_s=idle_s,
                       roles=lambda r: r == "2019 design")
    return {"workers": workers, **cost}


def run(uploads: list[Upload], *, proxies: Iterable[str] = ("haproxy", "serve"), users: int = 64,
        seconds: float = 30.0, warmup_s: float = 30.0, idle_s: float = 10.0, node: Node = Node(),
        seed_workers: int | None = None, input_size: int = 448, seed: bool = True,
        box: Box = "gpu") -> dict[str, Any]:
    if box == "cpu":
        checkpoint = "default"
        report: dict[str, Any] = {"model": "the embedded default (EfficientNet-Lite0 224), the real forward pass, "
                                           "serve_config.local.yaml", "box": box, "users": users,
                                  "seconds": seconds, "ours": {}}
    else:
        workdir = Path(tempfile.mkdtemp(prefix="serving-cost-"))
        checkpoint = str(random_bcnn_checkpoint(workdir / "vgg16-bcnn.pt", num_classes=200, input_size=input_size))
        report = {"model": f"VGG16-BCNN {input_size}, 200 classes, random weights, forward skipped", "box": box,
                  "users": users, "seconds": seconds, "ours": {}}
    for proxy in proxies:
        print(f"serving cost, ours with {proxy}:", flush=True)
        cost = our_service(proxy, checkpoint, uploads, users=users, seconds=seconds, warmup_s=warmup_s,
                           idle_s=idle_s, box=box)
        if box == "gpu":
            cost["projection"] = project(cost, node)
        report["ours"][proxy] = cost
        print(format_cost(cost), flush=True)
    if seed:
        print("serving cost, the 2019 design:", flush=True)
        workers = seed_workers or len(os.sched_getaffinity(0))
        report["seed_baseline"] = seed_design(checkpoint, uploads, users=users, seconds=seconds,
                                              warmup_s=warmup_s, idle_s=idle_s, workers=workers, box=box)
        print(format_cost(report["seed_baseline"]), flush=True)
        for cost in report["ours"].values():
            cost["share_of_2019_rate"] = round(cost["throughput_rps"] / report["seed_baseline"]["throughput_rps"], 3)
    return report


def format_cost(cost: dict[str, Any]) -> str:
    lines = [f"  {cost['throughput_rps']} req/s at {cost['users']} users, statuses {cost['statuses']}"]
    for role, ms in cost["ms_per_request"].items():
        lines.append(f"    {role:<17} {ms:6.2f} ms/request  (idle {cost['idle_cores'].get(role, 0):.3f} cores, "
                     f"{cost['processes'].get(role, 0)} processes)")
    if "projection" in cost:
        p = cost["projection"]
        lines.append(f"    serving path {p['serving_ms_per_request']} ms/request; projected onto "
                     f"{p['node']['cores']} cores + a GPU of {p['node']['gpu_images_per_s']:g} img/s: {p['rps']} req/s "
                     f"(limited by {p['limited_by']}; caps {p['caps_rps']})")
    return "\n".join(lines)


ROWS = (("Ingress", "Ingress replicas"), ("Preprocessor", "Preprocessor replicas"),
        ("Classifier", "Classifier (one per GPU)"), ("Serve proxy", "Serve's proxy (one per node)"),
        ("HAProxy", "HAProxy and its manager (one per node)"), ("Ray raylet", "raylet (one per node)"),
        ("Serve controller", "Serve's controller"), ("Ray GCS", "GCS"), ("Ray (other)", "Ray's other processes"),
        ("2019 design", "Gunicorn workers (2019 design)"))
SEED_MEASURED_ON_H100_RPS = 793.0
"""The 2019 design (`gunicorn -w 16`, VGG16-BCNN 448) on the H100 machine of `Node`'s defaults, 256 users."""


def table(report: dict[str, Any]) -> str:
    """The serving-cost section of docs/performance.md: CPU ms per request by process role side by side, and the
    projections."""
    columns = [(f"ours, {'HAProxy' if proxy == 'haproxy' else 'Serve proxy'}", cost)
               for proxy, cost in report["ours"].items()]
    if "seed_baseline" in report:
        columns.append((f"2019 design (`gunicorn -w {report['seed_baseline']['workers']}`)", report["seed_baseline"]))
    lines = [f"| CPU ms per answered request | {' | '.join(name for name, _ in columns)} |",
             f"| --- |{' --- |' * len(columns)}"]
    for role, label in ROWS:
        values = [c["ms_per_request"].get(role) for _, c in columns]
        if any(v for v in values):
            lines.append(f"| {label} | {' | '.join('' if v is None else f'{v:.2f}' for v in values)} |")
    totals = [sum(c["ms_per_request"].get(r, 0.0) for r in c.get("request_path", ("2019 design",)))
              for _, c in columns]
    lines.append(f"| **the request's path** | {' | '.join(f'**{t:.2f}**' for t in totals)} |")
    lines.append(f"| answered here, req/s | {' | '.join(str(c['throughput_rps']) for _, c in columns)} |")
    if "seed_baseline" in report:
        shares = [f"{c['share_of_2019_rate']:.2f}" if "share_of_2019_rate" in c else "1" for _, c in columns]
        lines.append(f"| share of the 2019 design's rate | {' | '.join(shares)} |")
    lines.append("")
    for name, cost in columns:
        if "projection" not in cost:
            continue
        p = cost["projection"]
        caps = ", ".join(f"{k} {v:,}" for k, v in p["caps_rps"].items())
        lines.append(f"- Projected, {name}: **{p['rps']:,} req/s** per node of {p['node']['cores']} cores and a GPU "
                     f"of {p['node']['gpu_images_per_s']:,.0f} images/s, limited by {p['limited_by']} ({caps}); "
                     f"{p['rps'] / SEED_MEASURED_ON_H100_RPS:.2f}x the 2019 design's {SEED_MEASURED_ON_H100_RPS:.0f} "
                     f"req/s measured on that H100 node.")
    if "seed_baseline" in report and "haproxy" in report["ours"]:
        ours = totals[list(report["ours"]).index("haproxy")]
        seed = report["seed_baseline"]["ms_per_request"]["2019 design"]
        lines.append(f"- The request's path with HAProxy costs {ours:.2f} ms against the 2019 design's {seed:.2f} ms "
                     f"({ours - seed:+.2f} ms).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--box", choices=("gpu", "cpu"), default="gpu",
                        help="gpu: the production file, forward skipped; cpu: make serve, the real forward pass")
    parser.add_argument("--proxy", default="haproxy,serve", help="haproxy and/or serve")
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=30.0)
    parser.add_argument("--idle", type=float, default=10.0)
    parser.add_argument("--input-size", type=int, default=448)
    parser.add_argument("--cores", type=int, default=Node.cores, help="cores of the node projected onto")
    parser.add_argument("--gpu-rate", type=float, default=Node.gpu_images_per_s, help="the GPU's images/s")
    parser.add_argument("--no-seed", action="store_true", help="leave out the 2019 design")
    parser.add_argument("--out", type=Path, help="write the report as JSON here")
    args = parser.parse_args(argv)
    uploads = [Upload(u.name, u.data) for u in load_uploads(PHOTOS)]
    report = run(uploads, proxies=[p for p in args.proxy.split(",") if p], users=args.users, seconds=args.seconds,
                 warmup_s=args.warmup, idle_s=args.idle, node=Node(args.cores, args.gpu_rate),
                 input_size=args.input_size, seed=not args.no_seed, box=args.box)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("\n" + table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
