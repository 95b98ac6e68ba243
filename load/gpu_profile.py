"""`python -m load.bench --profile gpu`: the production `serve_config.yaml` on a GPU machine, in one run:

1. the machine's two limits for each model: the bare model on the GPU per batch size, and decoding + resizing
   per core (times the cores);
2. our service (Classifier replicas = GPUs, everything else as the file says) at 1, 16, 64, 256 and 1024 users,
   for a VGG16-BCNN 448 checkpoint generated with random weights (speed does not depend on them) and for the
   embedded default, sampling the GPU's busy fraction (NVML) and every deployment's replica count meanwhile,
   then the replica counts for a while after the load stops (autoscaling back down);
3. the 2019 design (`load/seed_baseline`, `gunicorn -w <cores>`) with the same models at the same points;

then `load/results/gpu-<date>.json`, a plot beside it, and the GPU table in docs/performance.md. The load comes from
`wrk` where it is installed (`load/wrk.py`: a Python generator on the node's own cores was a limit near 1,000
req/s), else from `load.loadgen`; every point reports the generator's own CPU. It needs no `make`:
`ray`, `serve` and `gunicorn` are found beside this Python, on PATH, or run as modules. On a machine without a
GPU, `--logical-gpus 1` runs the same code path on the CPU (the suite does, in a short form).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from load import harness, wrk
from load.bare_model import in_subprocess, model_rates
from load.checkpoints import random_bcnn_checkpoint
from load.loadgen import Upload, load_uploads, run_load
from serve_app.run import DASHBOARD_URL, dashboard_headers

USERS = (1, 16, 64, 256, 1024)
BATCH_SIZES = (1, 8, 32, 64, 128)
DOC_MARKERS = ("<!-- bench-gpu:start -->", "<!-- bench-gpu:end -->")


class Sampler:
    """Every `interval_s` on a thread of its own: the GPU's busy fraction (NVML, where there is a GPU) and the
    RUNNING replicas of each deployment (the dashboard's Serve API), each sample tagged with the current phase."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.phase = "start"
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._nvml = _nvml_handles()
        self._headers = dashboard_headers()

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.wait(self.interval_s):
            sample: dict[str, Any] = {"t": round(time.monotonic() - start, 1), "phase": self.phase,
                                      "replicas": self._replicas()}
            if self._nvml:
                import pynvml

                sample["gpu_busy"] = statistics.fmean(
                    pynvml.nvmlDeviceGetUtilizationRates(h).gpu / 100 for h in self._nvml)
            self.samples.append(sample)

    def _replicas(self) -> dict[str, int]:
        try:
            apps = httpx.get(DASHBOARD_URL + "/api/serve/applications/", headers=self._headers, timeout=5).json()
            deployments = apps["applications"]["waterbirds"]["deployments"]
        except (httpx.HTTPError, KeyError, ValueError):
            return {}
        return {name: sum(r["state"] == "RUNNING" for r in d["replicas"]) for name, d in deployments.items()}

    def of(self, phase: str) -> dict[str, Any]:
        """GPU busy fraction (mean) and replica counts (min, max, last) during one phase."""
        samples = [s for s in self.samples if s["phase"] == phase]
        busy = [s["gpu_busy"] for s in samples if "gpu_busy" in s]
        counts: dict[str, list[int]] = defaultdict(list)
        for s in samples:
            for name, n in s["replicas"].items():
                counts[name].append(n)
        return {"gpu_busy": round(statistics.fmean(busy), 3) if busy else None,
                "replicas": {name: {"min": min(v), "max": max(v), "last": v[-1]} for name, v in counts.items()}}


def _nvml_handles() -> list[Any]:
    try:
        import pynvml

        pynvml.nvmlInit()
        return [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception:  # noqa: BLE001 - no NVML library, no driver or no GPU: no busy fraction to report
        return []


def _decode_rate(uploads: list[Upload], checkpoint: str, seconds: float) -> float:
    """Images per second that one core turns from upload bytes into the model's uint8 input."""
    import torch

    from bcnn.models import get_weights
    from bcnn.preprocess import preprocess_image

    torch.set_num_threads(1)
    preprocess = get_weights(checkpoint).preprocess
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        preprocess_image(uploads[done % len(uploads)].data, preprocess)
        done += 1
    return round(done / (time.perf_counter() - start), 1)


def limits(uploads: list[Upload], checkpoint: str, batch_sizes: tuple[int, ...], seconds: float,
           cores: int) -> dict[str, Any]:
    rates = in_subprocess(model_rates, checkpoint, batch_sizes, seconds)
    per_core = in_subprocess(_decode_rate, uploads, checkpoint, seconds)
    best = max(rates.values())
    print(f"  bare model per batch size: {rates} img/s; decoding: {per_core} img/s per core x {cores}", flush=True)
    return {"model_images_per_s": rates, "model_best": best, "decode_per_core": per_core,
            "decode_all_cores": round(per_core * cores, 1), "lower": round(min(best, per_core * cores), 1)}


def our_service(models: dict[str, str], uploads: list[Upload], users: tuple[int, ...], seconds: float,
                warmup_s: float, cooldown_s: float, classifiers_per_gpu: int, gpus: int, cpus: int | None,
                env: dict[str, str], generator: str, py_spy_users: int | None = None,
                out: Path = harness.RESULTS) -> dict[str, Any]:
    """The production file at each point; with `py_spy_users`, the Classifier processes profiled at that point."""
    url = harness.SERVICE_URL + "/classify"
    results: dict[str, Any] = {}
    with harness.ray_cluster(env, num_cpus=cpus, num_gpus=gpus), Sampler() as sampler:
        for name, checkpoint in models.items():
            sampler.phase = f"{name}:deploy"
            config = harness.production_config(checkpoint, gpus=gpus, classifiers_per_gpu=classifiers_per_gpu)
            harness.deploy(config, env, uploads[0], model_name=harness.model_name(checkpoint))
            print(f"our service, {name} (serve_config.yaml, {classifiers_per_gpu} Classifier replicas per GPU, "
                  f"{gpus} GPUs):",
                  flush=True)
            sampler.phase = f"{name}:warmup"
            asyncio.run(run_load(url, uploads, users=64, seconds=warmup_s, timeout_s=120))
            points = {}
            for u in users:
                sampler.phase = f"{name}:{u}"
                profiling = (harness.py_spy_record("Classifier", seconds + 3, out, f"classifier-{name}-{u}")
                             if u == py_spy_users else contextlib.nullcontext([]))
                with profiling as profiles:
                    point = harness.load_point(url, uploads, u, seconds, generator=generator)
                points[str(u)] = {**point, **sampler.of(sampler.phase)}
                if profiles:
                    points[str(u)]["py_spy"] = [p.name for p in profiles]
            sampler.phase = f"{name}:cooldown"
            time.sleep(cooldown_s)
            results[name] = {"points": points, "cooldown": sampler.of(sampler.phase)}
        results["timeline"] = sampler.samples
    return results


def seed_design(models: dict[str, str], uploads: list[Upload], users: tuple[int, ...], seconds: float,
                workers: int, generator: str) -> dict[str, Any]:
    results = {}
    for name, checkpoint in models.items():
        with harness.seed_service(checkpoint, workers, uploads[0]) as url:
            print(f"the 2019 design (Flask + gunicorn -w {workers}), {name}:", flush=True)
            results[name] = {"points": {str(u): harness.load_point(url, uploads, u, seconds, generator=generator)
                                        for u in users}}
    return results


def targets(report: dict[str, Any]) -> dict[str, Any]:
    """The targets of issue #13, computed from this run's figures (None where a point was not measured)."""
    ours, seed = report["ours"], report["seed_baseline"]

    def point(side: dict[str, Any], model: str, users: int) -> dict[str, Any] | None:
        return side.get(model, {}).get("points", {}).get(str(users))

    t: dict[str, Any] = {}
    vgg = next((m for m in report["models"] if m.startswith("vgg16_")), "")
    o256, s256 = point(ours, vgg, 256), point(seed, vgg, 256)
    if o256 and s256:
        t["vgg_256_throughput_over_2019"] = round(o256["throughput_rps"] / max(s256["throughput_rps"], 1e-9), 2)
        t["vgg_256_p99_lower_than_2019"] = o256["latency_ms_p99"] < s256["latency_ms_p99"]
    o1024 = point(ours, vgg, 1024)
    if o1024:
        t["vgg_1024_over_lower_limit"] = round(o1024["throughput_rps"] / report["limits"][vgg]["lower"], 2)
    o1, s1 = point(ours, vgg, 1), point(seed, vgg, 1)
    if o1 and s1:
        t["vgg_1_user_p50_minus_2019_ms"] = round(o1["latency_ms_p50"] - s1["latency_ms_p50"], 1)
    for u in (64, 256):
        o = point(ours, "default", u)
        if o:
            t[f"default_{u}_p99_ms"] = o["latency_ms_p99"]
    for model in report["models"]:
        if model in ours:
            t[f"{model}_preprocessors_max_by_users"] = {
                u: p.get("replicas", {}).get("Preprocessor", {}).get("max") for u, p in ours[model]["points"].items()}
            t[f"{model}_preprocessors_after_cooldown"] = (
                ours[model]["cooldown"]["replicas"].get("Preprocessor", {}).get("last"))
    t["only_200_and_503"] = all(
        set(p["statuses"]) <= {"200", "503"} for model in report["models"] if model in ours
        for p in ours[model]["points"].values())
    return t


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for model in report["models"]:
        for name, results, style in (("ours", report["ours"].get(model, {}).get("points", {}), "o-"),
                                     ("2019 design", report["seed_baseline"].get(model, {}).get("points", {}), "s--")):
            users = sorted(results, key=int)
            x = [int(u) for u in users]
            left.plot(x, [results[u]["throughput_rps"] for u in users], style, label=f"{name}, {model}")
            right.plot(x, [results[u]["latency_ms_p99"] for u in users], style, label=f"{name}, {model}")
        left.axhline(report["limits"][model]["lower"], linestyle=":", color="gray")
    harness.finish_plot(fig, "answers per second (dotted: the lower limit)", "p99 latency (ms)",
                f"Waterbird service on {report['machine']['gpu']}, {report['machine']['cpus']} CPUs, "
                f"{report['date'][:10]}", path)


def table(report: dict[str, Any]) -> str:
    machine = report["machine"]
    lines = [f"Measured {report['date']} on {machine['gpu']} x {machine['gpus']}, {machine['cpus']} CPUs, "
             f"{report['seconds_per_point']:g} s per point, `python -m load.bench --profile gpu`.", "",
             "| model | users | ours req/s | ours p50 / p99 ms | ours 503 | GPU busy | replicas (I/P/C, max) "
             "| 2019 req/s | 2019 p50 / p99 ms |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for model in report["models"]:
        ours = report["ours"].get(model, {}).get("points", {})
        seed = report["seed_baseline"].get(model, {}).get("points", {})
        for u in sorted(ours, key=int):
            o, s = ours[u], seed.get(u, {})
            r = o.get("replicas", {})
            counts = "/".join(str(r.get(d, {}).get("max", "?")) for d in ("Ingress", "Preprocessor", "Classifier"))
            lines.append(f"| {model} | {u} | {o['throughput_rps']} | {o['latency_ms_p50']} / {o['latency_ms_p99']} | "
                         f"{o['overloaded_503']} | {o.get('gpu_busy')} | {counts} | {s.get('throughput_rps', '')} | "
                         f"{s.get('latency_ms_p50', '')} / {s.get('latency_ms_p99', '')} |")
    lines.append("")
    for model, lim in report["limits"].items():
        lines.append(f"- Limits, {model}: bare model {lim['model_images_per_s']} img/s by batch size; decoding "
                     f"{lim['decode_per_core']} img/s per core, {lim['decode_all_cores']} on all cores.")
    lines.append(f"- Targets: `{json.dumps(report['targets'])}`")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    cores = len(os.sched_getaffinity(0))
    gpus = args.logical_gpus if args.logical_gpus is not None else torch.cuda.device_count()
    if gpus < 1:
        raise SystemExit("no GPU here: run on a GPU machine, or give --logical-gpus 1 to try the code path")
    uploads = [Upload(u.name, u.data) for u in load_uploads(harness.PHOTOS)]
    workdir = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    vgg = random_bcnn_checkpoint(workdir / "vgg16-bcnn.pt", num_classes=args.vgg_classes, input_size=args.vgg_size)
    available = {f"vgg16_{args.vgg_size}": str(vgg), "default": "default"}
    models = {name: available[name] for name in args.models.split(",")}
    users = tuple(int(u) for u in args.users.split(","))
    batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    env = harness.serve_env(args.proxy)
    generator = args.generator if args.generator != "auto" else ("wrk" if wrk.available() else "python")
    print(f"{len(uploads)} photos from {harness.PHOTOS}; {gpus} GPU(s), {cores} cores", flush=True)

    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (CPU run)",
                    "gpus": gpus, "cpus": cores, "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "seconds_per_point": args.seconds, "proxy": args.proxy, "models": list(models), "generator": generator,
        "classifiers_per_gpu": args.classifiers_per_gpu,
        "vgg_checkpoint": {"input_size": args.vgg_size, "classes": args.vgg_classes, "weights": "random"},
        "limits": {}, "ours": {}, "seed_baseline": {},
    }
    for name, checkpoint in models.items():
        print(f"limits, {name}:", flush=True)
        report["limits"][name] = limits(uploads, checkpoint, batch_sizes, args.limit_seconds, cores)
    report["ours"] = our_service(models, uploads, users, args.seconds, args.warmup, args.cooldown,
                                 args.classifiers_per_gpu,
                                 gpus, args.logical_cpus, env, generator, args.py_spy_users, args.out)
    report["seed_baseline"] = seed_design(models, uploads, users, args.seconds, args.seed_workers or cores, generator)
    report["targets"] = targets(report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load.bench --profile gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring time per point")
    parser.add_argument("--warmup", type=float, default=15.0, help="load at 64 users after each deploy")
    parser.add_argument("--cooldown", type=float, default=75.0, help="replica counts watched after the load")
    parser.add_argument("--limit-seconds", type=float, default=4.0, help="per batch size, and for decoding")
    parser.add_argument("--users", default=",".join(map(str, USERS)))
    parser.add_argument("--batch-sizes", default=",".join(map(str, BATCH_SIZES)))
    parser.add_argument("--models", default="vgg16_448,default", help="vgg16_<vgg-size> and/or default")
    parser.add_argument("--vgg-size", type=int, default=448)
    parser.add_argument("--vgg-classes", type=int, default=200)
    parser.add_argument("--seed-workers", type=int, default=0, help="gunicorn workers (default: one per core)")
    parser.add_argument("--proxy", choices=("haproxy", "serve"), default="haproxy")
    parser.add_argument("--generator", choices=("auto", "wrk", "python"), default="auto",
                        help="the load generator: auto is wrk where it is installed, else the Python one")
    parser.add_argument("--classifiers-per-gpu", type=int, default=1,
                        help="Classifier replicas per GPU (more than 1: Ray's fractional GPUs)")
    parser.add_argument("--py-spy-users", type=int, help="profile the Classifier with py-spy at this point")
    parser.add_argument("--logical-gpus", type=int, help="declare GPUs to Ray (a CPU run of the code path)")
    parser.add_argument("--logical-cpus", type=int, help="declare CPUs to Ray (the production file asks for 5)")
    parser.add_argument("--out", type=Path, default=harness.RESULTS)
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args(argv)
    if not harness.PHOTOS.is_dir():
        parser.error(f"no photos at {harness.PHOTOS}; set WATERBIRD_PHOTOS to a folder of JPEGs")
    report = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"gpu-{report['date'][:10]}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out / f"{stem}.png")
    text = table(report)
    print("\n" + text)
    if not args.no_readme:
        harness.replace_doc_section(DOC_MARKERS, f"{text}\n\n![GPU benchmark](../load/results/{stem}.png)")
    return 0
