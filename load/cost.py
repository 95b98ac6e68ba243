"""The serving path's CPU per answered request, per process role, read from /proc, and what it means for a GPU node.

A GPU node is CPU-bound in front of its GPU: its rate is set by what each request costs in each process and by the
processes of which a node has only one. Both are measurable on a CPU with the forward pass skipped (what remains is
what a GPU's speed leaves): Ray declaring 16 CPUs and a GPU, the production `serve_config.yaml` with a VGG16-BCNN
448 (random weights), a warm-up, the idle rates, then the measured load, per role (Ingress, Preprocessor,
Classifier, the proxies, Ray's processes) with each process's idle rate subtracted; the same for the 2019 design
(`gunicorn -w <cores>`, forward skipped the same way); projected onto a node of N cores and one GPU (`project`).

`--box cpu` measures the CPU box instead: `make serve` as it is (the embedded default, the real forward pass) against
the 2019 design around the same model, each alone on the machine in turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from load import runner
from load.bare_model import model_checkpoint
from load.loadgen import Upload

# The roles of which a node runs one process whatever the load: each caps the node at 1000 / its ms per request.
# (HAProxy and the raylet run a few threads each, but HAProxy's manager is one Python process and the raylet's
# node manager one event loop: counted as one process, a cap on the safe side.)
PER_NODE_ROLES = ("Classifier", "Serve proxy", "HAProxy", "Ray raylet")
# The processes a request passes through (the raylet moves pixels between stages through the object store).
SERVING_ROLES = ("Ingress", "Preprocessor", "Classifier", "Serve proxy", "HAProxy", "Ray raylet")
# The 2019 design (`gunicorn -w 16`, VGG16-BCNN 448) on the H100 machine of the default node, 256 users.
SEED_MEASURED_ON_H100_RPS = 793.0


@dataclass(frozen=True)
class Settings:
    box: str = "gpu"  # gpu: the production file, forward skipped; cpu: make serve, the real forward pass
    proxy: tuple[str, ...] = ("haproxy", "serve")
    users: int = 64
    seconds: float = 30.0
    warmup: float = 30.0
    idle: float = 10.0
    input_size: int = 448
    cores: int = 16  # the node projected onto: the H100 machine of 2026-11-25
    gpu_rate: float = 1693.0  # and its GPU's images/s (the bare VGG16-BCNN 448 at batch 128 there)
    seed: bool = True  # the 2019 design beside ours
    seed_workers: int = 0  # 0: one per CPU


def measure(url: str, uploads: list[Upload], s: Settings, ours: bool) -> dict[str, Any]:
    """A warm-up, the idle rates, then the measured load: CPU ms per answered request by role."""
    runner.point(url, uploads, s.users, s.warmup, warm_s=0, quiet=True)
    point = runner.point(url, uploads, s.users, s.seconds, warm_s=0, idle=runner.idle_cpu(s.idle))
    keep = (lambda r: r not in ("2019 design", "load generator")) if ours else (lambda r: r == "2019 design")
    return {"users": s.users, "seconds": point["seconds"], "answered": point["ok"],
            "throughput_rps": point["throughput_rps"], "statuses": point["statuses"],
            "ms_per_request": {r: round(ms / max(point["ok"], 1), 2) for r, ms in point["cpu_ms"].items() if keep(r)},
            **{k: {r: v for r, v in point[k].items() if keep(r)} for k in ("idle_cores", "processes")}}


def project(cost: dict[str, Any], s: Settings) -> dict[str, Any]:
    """Answers per second a node of `s.cores` cores and one GPU could give: the least of the GPU's rate, the
    per-node processes' caps (1000 / their ms per request), and the cores left after Ray's idle load shared by every
    process's CPU per request."""
    ms = cost["ms_per_request"]
    everything = sum(ms.values())
    caps = {"GPU": s.gpu_rate, "cores": (s.cores - sum(cost["idle_cores"].values())) * 1000 / max(everything, 1e-9)}
    caps |= {role: 1000 / ms[role] for role in PER_NODE_ROLES if role in cost["request_path"] and ms.get(role)}
    limit = min(caps, key=lambda k: caps[k])
    return {"node": {"cores": s.cores, "gpu_images_per_s": s.gpu_rate, "classifiers_per_gpu": 1},
            "serving_ms_per_request": round(sum(ms.get(r, 0.0) for r in cost["request_path"]), 2),
            "all_ms_per_request": round(everything, 2), "caps_rps": {k: round(v) for k, v in caps.items()},
            "limited_by": limit, "rps": round(caps[limit])}


def run(s: Settings) -> dict[str, Any]:
    uploads = runner.uploads()
    if s.box == "cpu":
        checkpoint, model = "default", "the embedded default (EfficientNet-Lite0 224), the real forward pass, " \
                                       "serve_config.local.yaml"
    else:
        checkpoint = model_checkpoint(f"vgg16_{s.input_size}")
        model = f"VGG16-BCNN {s.input_size}, 200 classes, random weights, forward skipped"
    report: dict[str, Any] = {"model": model, "box": s.box, "users": s.users, "seconds": s.seconds, "ours": {}}
    for proxy in s.proxy:
        print(f"serving cost, ours with {proxy}:", flush=True)
        gpu = s.box == "gpu"
        with runner.Cluster(proxy, num_cpus=16 if gpu else None, num_gpus=1 if gpu else None) as cluster:
            config = runner.serve_config("production" if gpu else "local", checkpoint, skip_forward=gpu)
            cluster.deploy(config, uploads[0], checkpoint)
            cost = {"proxy": proxy, **measure(runner.CLASSIFY_URL, uploads, s, ours=True)}
        # Serve's proxy idles beside HAProxy (its fallback), and HAProxy is absent without it.
        cost["request_path"] = [r for r in SERVING_ROLES if r != ("Serve proxy" if proxy == "haproxy" else "HAProxy")]
        if gpu:
            cost["projection"] = project(cost, s)
        report["ours"][proxy] = cost
    if s.seed:
        workers = s.seed_workers or runner.machine()["cpus"]
        print(f"serving cost, the 2019 design (gunicorn -w {workers}):", flush=True)
        with runner.seed_service(checkpoint, workers, uploads[0], skip_forward=s.box == "gpu") as url:
            report["seed_baseline"] = {"workers": workers, **measure(url, uploads, s, ours=False)}
        for cost in report["ours"].values():
            cost["share_of_2019_rate"] = round(cost["throughput_rps"] / report["seed_baseline"]["throughput_rps"], 3)
    return report


ROWS = (("Ingress", "Ingress replicas"), ("Preprocessor", "Preprocessor replicas"),
        ("Classifier", "Classifier (one per GPU)"), ("Serve proxy", "Serve's proxy (one per node)"),
        ("HAProxy", "HAProxy and its manager (one per node)"), ("Ray raylet", "raylet (one per node)"),
        ("Serve controller", "Serve's controller"), ("Ray GCS", "GCS"), ("Ray (other)", "Ray's other processes"),
        ("2019 design", "Gunicorn workers (2019 design)"))


def sections(report: dict[str, Any]) -> dict[str, str]:
    """CPU ms per request by process role side by side, and the projections."""
    columns = [(f"ours, {'HAProxy' if proxy == 'haproxy' else 'Serve proxy'}", cost)
               for proxy, cost in report["ours"].items()]
    if "seed_baseline" in report:
        columns.append((f"2019 design (`gunicorn -w {report['seed_baseline']['workers']}`)", report["seed_baseline"]))
    lines = [f"Measured {runner.now()} on {runner.machine()['cpus']} CPUs, `python -m load cost --box {report['box']}`"
             f": {report['model']}, {report['users']} users for {report['seconds']:g} s after a warm-up; CPU from "
             "/proc per process, each process's idle rate subtracted.", "",
             f"| CPU ms per answered request | {' | '.join(name for name, _ in columns)} |",
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
        lines += [f"| share of the 2019 design's rate | {' | '.join(shares)} |", ""]
    for name, cost in columns:
        if p := cost.get("projection"):
            caps = ", ".join(f"{k} {v:,}" for k, v in p["caps_rps"].items())
            lines.append(f"- Projected, {name}: **{p['rps']:,} req/s** per node of {p['node']['cores']} cores and a "
                         f"GPU of {p['node']['gpu_images_per_s']:,.0f} images/s, limited by {p['limited_by']} "
                         f"({caps}); {p['rps'] / SEED_MEASURED_ON_H100_RPS:.2f}x the 2019 design's "
                         f"{SEED_MEASURED_ON_H100_RPS:.0f} req/s measured on that H100 node.")
    if "seed_baseline" in report and "haproxy" in report["ours"]:
        ours, seed = totals[list(report["ours"]).index("haproxy")], totals[-1]
        lines.append(f"- The request's path with HAProxy costs {ours:.2f} ms against the 2019 design's {seed:.2f} ms "
                     f"({ours - seed:+.2f} ms).")
    return {"bench-cost": "\n".join(lines)}
