"""The production `serve_config.yaml` on a GPU machine, in one run:

1. the machine's two limits for each model: the bare model on the GPU per batch size, and decoding + resizing per
   core (times the cores);
2. our service (Classifier replicas = GPUs, everything else as the file says) at each point, for a VGG16-BCNN 448
   with random weights (speed does not depend on them) and for the embedded default, sampling the GPU's busy
   fraction (NVML) and every deployment's replica count, then the replica counts while autoscaling scales down;
3. the 2019 design (`gunicorn -w <cores>`) with the same models at the same points.

The load comes from `wrk` where it is installed (a Python generator on the node's own cores was a limit near 1,000
req/s); every point reports the generator's own CPU. It needs no `make`. Without a GPU, `--logical-gpus 1` runs the
same code path on the CPU (the suite does, in `python -m load.gpu_run --short`).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import statistics
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from load import runner
from load.bare_model import decode_rate, in_subprocess, model_checkpoint, model_rates
from serve_app.run import DASHBOARD_URL, dashboard_headers


@dataclass(frozen=True)
class Settings:
    seconds: float = 10.0
    warmup: float = 15.0  # load at 64 users after each deploy
    cooldown: float = 75.0  # replica counts watched after the load
    limit_seconds: float = 4.0  # per batch size, and for decoding
    users: tuple[int, ...] = (1, 16, 64, 256, 1024)
    batch_sizes: tuple[int, ...] = (1, 8, 32, 64, 128)
    models: tuple[str, ...] = ("vgg16_448", "default")  # vgg16_<size> and/or default (`model_checkpoint`)
    vgg_classes: int = 200
    seed_workers: int = 0  # 0: one per core
    proxy: str = "haproxy"
    generator: str = "auto"  # wrk, python, or auto: wrk where it is installed
    classifiers_per_gpu: int = 1  # more than 1: Ray's fractional GPUs
    py_spy_users: int = 0  # profile the Classifier with py-spy at this point
    logical_gpus: int = -1  # declare GPUs to Ray (a CPU run of the code path); -1: the GPUs torch sees
    logical_cpus: int = 0  # declare CPUs to Ray (the production file asks for 5); 0: the machine's
    py_spy_dir: str = str(runner.RESULTS)  # the folder py-spy's profiles go to


class Sampler:
    """Every `interval_s` on a thread of its own: the GPU's busy fraction (NVML, where there is a GPU) and the
    RUNNING replicas of each deployment (the dashboard's Serve API), each sample tagged with the current phase."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s, self.phase, self.samples = interval_s, "start", []
        self._stop, self._thread = threading.Event(), threading.Thread(target=self._run, daemon=True)
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # noqa: BLE001 - no NVML library, no driver or no GPU: no busy fraction to report
            self._nvml = []

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        start, headers = time.monotonic(), dashboard_headers()
        while not self._stop.wait(self.interval_s):
            try:
                apps = httpx.get(DASHBOARD_URL + "/api/serve/applications/", headers=headers, timeout=5).json()
                replicas = {name: sum(r["state"] == "RUNNING" for r in d["replicas"])
                            for name, d in apps["applications"]["waterbirds"]["deployments"].items()}
            except (httpx.HTTPError, KeyError, ValueError):
                replicas = {}
            sample: dict[str, Any] = {"t": round(time.monotonic() - start, 1), "phase": self.phase,
                                      "replicas": replicas}
            if self._nvml:
                import pynvml

                sample["gpu_busy"] = statistics.fmean(
                    pynvml.nvmlDeviceGetUtilizationRates(h).gpu / 100 for h in self._nvml)
            self.samples.append(sample)

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


def limits(uploads: list[Any], checkpoint: str, s: Settings, cores: int) -> dict[str, Any]:
    rates = in_subprocess(model_rates, checkpoint, s.batch_sizes, s.limit_seconds)
    per_core = in_subprocess(decode_rate, uploads, checkpoint, s.limit_seconds)
    print(f"  bare model per batch size: {rates} img/s; decoding: {per_core} img/s per core x {cores}", flush=True)
    return {"model_images_per_s": rates, "model_best": max(rates.values()), "decode_per_core": per_core,
            "decode_all_cores": round(per_core * cores, 1),
            "lower": round(min(max(rates.values()), per_core * cores), 1)}


def our_service(models: dict[str, str], uploads: list[Any], s: Settings, gpus: int, generator: str) -> dict[str, Any]:
    """The production file at each point; with `py_spy_users`, the Classifier processes profiled at that point."""
    results: dict[str, Any] = {}
    with runner.Cluster(s.proxy, num_cpus=s.logical_cpus or None, num_gpus=gpus) as cluster, Sampler() as sampler:
        for name, checkpoint in models.items():
            sampler.phase = f"{name}:deploy"
            config = runner.serve_config("production", checkpoint, gpus=gpus,
                                         classifiers_per_gpu=s.classifiers_per_gpu)
            cluster.deploy(config, uploads[0], checkpoint)
            print(f"our service, {name} ({s.classifiers_per_gpu} Classifier replicas per GPU, {gpus} GPUs):",
                  flush=True)
            sampler.phase = f"{name}:warmup"
            runner.point(runner.CLASSIFY_URL, uploads, 64, s.warmup, warm_s=0, quiet=True)
            points = {}
            for u in s.users:
                sampler.phase = f"{name}:{u}"
                profiling = (py_spy_record("Classifier", s.seconds + 3, Path(s.py_spy_dir), f"classifier-{name}-{u}")
                             if u == s.py_spy_users else contextlib.nullcontext([]))
                with profiling as profiles:
                    point = runner.point(runner.CLASSIFY_URL, uploads, u, s.seconds, generator=generator)
                points[str(u)] = {**point, **sampler.of(sampler.phase)}
                if profiles:
                    points[str(u)]["py_spy"] = [p.name for p in profiles]
            sampler.phase = f"{name}:cooldown"
            time.sleep(s.cooldown)
            results[name] = {"points": points, "cooldown": sampler.of(sampler.phase)}
        results["timeline"] = sampler.samples
    return results


@contextlib.contextmanager
def py_spy_record(role: str, seconds: float, out: Path, label: str) -> Any:
    """While the block runs, py-spy samples every process of a serving role for `seconds` (threads apart, idle
    samples left out) into `out/py-spy-<label>-<pid>.txt` (folded stacks). Nothing where py-spy is not installed."""
    import subprocess
    import sys

    import psutil

    from load.cpu_watch import role_of

    binary = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if binary is None:
        print("  (py-spy is not installed: no profile)", flush=True)
        yield []
        return
    pids = [p.pid for p in psutil.process_iter(["cmdline"]) if role_of(p.info["cmdline"] or []) == role]
    paths = [out / f"py-spy-{label}-{pid}.txt" for pid in pids]
    out.mkdir(parents=True, exist_ok=True)
    recorders = [subprocess.Popen([binary, "record", "--nonblocking", "--threads", "-r", "100", "-d",
                                   str(max(1, round(seconds))), "-f", "raw", "-o", str(path), "-p", str(pid)],
                                  stdout=subprocess.DEVNULL, stderr=path.with_suffix(".log").open("w"))
                 for pid, path in zip(pids, paths, strict=True)]
    try:
        yield paths
    finally:
        for recorder in recorders:
            try:
                recorder.wait(timeout=seconds + 30)
            except subprocess.TimeoutExpired:
                recorder.kill()


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
    if o1024 := point(ours, vgg, 1024):
        t["vgg_1024_over_lower_limit"] = round(o1024["throughput_rps"] / report["limits"][vgg]["lower"], 2)
    o1, s1 = point(ours, vgg, 1), point(seed, vgg, 1)
    if o1 and s1:
        t["vgg_1_user_p50_minus_2019_ms"] = round(o1["latency_ms_p50"] - s1["latency_ms_p50"], 1)
    for u in (64, 256):
        if o := point(ours, "default", u):
            t[f"default_{u}_p99_ms"] = o["latency_ms_p99"]
    for model in report["models"]:
        if model in ours:
            t[f"{model}_preprocessors_max_by_users"] = {
                u: p.get("replicas", {}).get("Preprocessor", {}).get("max") for u, p in ours[model]["points"].items()}
            t[f"{model}_preprocessors_after_cooldown"] = (
                ours[model]["cooldown"]["replicas"].get("Preprocessor", {}).get("last"))
    t["only_200_and_503"] = all(set(p["statuses"]) <= {"200", "503"} for model in report["models"] if model in ours
                                for p in ours[model]["points"].values())
    return t


def run(s: Settings) -> dict[str, Any]:
    import torch

    cores = len(os.sched_getaffinity(0))
    gpus = s.logical_gpus if s.logical_gpus >= 0 else torch.cuda.device_count()
    if gpus < 1:
        raise SystemExit("no GPU here: run on a GPU machine, or give --logical-gpus 1 to try the code path")
    uploads = runner.uploads()
    models = {name: model_checkpoint(name, classes=s.vgg_classes) for name in s.models}
    vgg = next((name for name in models if name.startswith("vgg16_")), "")
    generator = s.generator if s.generator != "auto" else ("wrk" if shutil.which("wrk") else "python")
    print(f"{len(uploads)} photos from {runner.PHOTOS}; {gpus} GPU(s), {cores} cores", flush=True)
    report: dict[str, Any] = {
        "date": runner.now(),
        "machine": {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (CPU run)",
                    "gpus": gpus, "cpus": cores, "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "seconds_per_point": s.seconds, "proxy": s.proxy, "models": list(models), "generator": generator,
        "classifiers_per_gpu": s.classifiers_per_gpu,
        "vgg_checkpoint": {"input_size": int(vgg.removeprefix("vgg16_")) if vgg else None, "classes": s.vgg_classes,
                           "weights": "random"}, "limits": {},
    }
    for name, checkpoint in models.items():
        print(f"limits, {name}:", flush=True)
        report["limits"][name] = limits(uploads, checkpoint, s, cores)
    report["ours"] = our_service(models, uploads, s, gpus, generator)
    report["seed_baseline"] = {}
    for name, checkpoint in models.items():
        with runner.seed_service(checkpoint, s.seed_workers or cores, uploads[0]) as url:
            print(f"the 2019 design (Flask + gunicorn -w {s.seed_workers or cores}), {name}:", flush=True)
            report["seed_baseline"][name] = {"points": {
                str(u): runner.point(url, uploads, u, s.seconds, generator=generator) for u in s.users}}
    report["targets"] = targets(report)
    return report


def plot(report: dict[str, Any], path: Path) -> None:
    series = [(f"{side}, {model}", report[key].get(model, {}).get("points", {}), style)
              for model in report["models"]
              for side, key, style in (("ours", "ours", "o-"), ("2019 design", "seed_baseline", "s--"))]
    runner.plot_by_users(path, f"Waterbird service on {report['machine']['gpu']}, {report['machine']['cpus']} CPUs, "
                         f"{report['date'][:10]}", series, left_label="answers per second (dotted: the lower limit)",
                         limits=[(f"lower limit, {m}", report["limits"][m]["lower"]) for m in report["models"]])


def sections(report: dict[str, Any]) -> dict[str, str]:
    machine = report["machine"]
    lines = [f"Measured {report['date']} on {machine['gpu']} x {machine['gpus']}, {machine['cpus']} CPUs, "
             f"{report['seconds_per_point']:g} s per point, `python -m load gpu`.", "",
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
    return {"bench-gpu": "\n".join(lines)}
