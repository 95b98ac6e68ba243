"""`python -m load.bench --profile classifier`: the Classifier deployment alone, fed as a GPU node feeds it, against
what its device could do.

1. Ray with one GPU: the real one, or, where torch sees none, one logical GPU and the simulated device
   (`load.devices`, the H200's timing by default, slowed by `--time-scale` so that this machine's CPU can
   keep it busy);
2. the Classifier deployed alone with the production settings of `serve_config.yaml` (one replica per GPU, or
   several sharing it with `--classifiers-per-gpu`), a VGG16-BCNN at 448 with random weights;
3. ready-made batches as the Preprocessors send them: the shared photos decoded to 448 with the model's
   preprocessing, in batches of the ingress's `max_batch_size`, each put once into Ray's object store and passed by
   reference (the production path, `pixels_by_reference`), no HTTP;
4. `--callers` concurrent callers (the ingress replicas' batches in flight), each sending its next batch as soon as
   the last is answered, for `--seconds`.

It reports the images per second answered, what the device could do at the batch sizes it was given
(`device_limit_images_per_s`: on the simulated device its timing; on a GPU the bare model's, fitted as
`a + b x n` from two batch sizes), their ratio (the device's busy fraction), the batch sizes, and the CPU per image
of the Classifier process and of this driver. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from load import harness
from load.checkpoints import random_bcnn_checkpoint
from load.cpu_watch import CpuWatch, busy_ms_by_role

APP = "classifier-profile"


@dataclass(frozen=True)
class Settings:
    seconds: float = 20.0
    warmup: float = 5.0
    idle: float = 3.0
    callers: int = 32
    batch_size: int = 16
    distinct_batches: int = 8
    input_size: int = 448
    classifiers_per_gpu: int = 1
    simulate: bool = False
    """the simulated device even where there is a GPU"""
    fixed_ms: float = 1.6
    per_image_ms: float = 0.55
    time_scale: float = 1.0
    logical_cpus: int = 16
    photos: Path = harness.PHOTOS


def _batches(photos: Path, checkpoint: str, batch_size: int, count: int) -> list[Any]:
    """`count` batches of `batch_size` decoded photos, as `PreparedBatch`es."""
    import numpy as np

    from bcnn.models import get_weights
    from bcnn.preprocess import load_image
    from deployments.messages import PreparedBatch
    from load.loadgen import load_uploads

    preprocess = get_weights(checkpoint).preprocess
    images = [load_image(u.data, preprocess).pixels for u in load_uploads(photos, limit=batch_size * count)]
    batches = []
    for start in range(0, len(images) - batch_size + 1, batch_size):
        ids = tuple(f"profile-{start + i}" for i in range(batch_size))
        batches.append(PreparedBatch(np.stack(images[start:start + batch_size]), (1.0,) * batch_size, {}, ids))
    return batches


def _fit_device(checkpoint: str, sizes: tuple[int, int] = (8, 64), seconds: float = 3.0) -> dict[str, float]:
    """The real GPU's time per batch as `a + b x n` ms, from the bare model at two batch sizes (in a process of its
    own, which gives its GPU memory back)."""
    from load.bare_model import in_subprocess, model_rates

    rates = in_subprocess(model_rates, checkpoint, sizes, seconds)
    (n1, r1), (n2, r2) = ((n, rates[str(n)]) for n in sizes)
    ms1, ms2 = 1000 * n1 / r1, 1000 * n2 / r2
    per_image = (ms2 - ms1) / (n2 - n1)
    return {"fixed_ms": round(ms1 - per_image * n1, 3), "per_image_ms": round(per_image, 4), "time_scale": 1.0,
            "bare_model_images_per_s": rates}


def _deploy(checkpoint: str, classifiers_per_gpu: int, simulated: dict[str, float] | None) -> Any:
    """The Classifier alone, as serve_config.yaml deploys it on one GPU (one replica, or several sharing it)."""
    from ray import serve

    from deployments.classifier import Classifier
    from load.devices import BenchBackend, DeviceTiming  # Ray with it: imported once `run` has set RAY_AUTH_MODE

    settings = harness.deployment(harness.production_config(checkpoint, classifiers_per_gpu=classifiers_per_gpu),
                                  "Classifier")
    options = {k: settings[k] for k in ("num_replicas", "max_ongoing_requests", "max_queued_requests",
                                        "ray_actor_options")}
    device = BenchBackend("simulated", DeviceTiming(**simulated)) if simulated is not None else None
    app = Classifier.options(**options, user_config=settings["user_config"]).bind(device)
    return serve.run(app, name=APP, route_prefix=None)


async def _drive(handle: Any, refs: list[Any], *, batch_size: int, callers: int, seconds: float,
                 top_k: int = 5) -> dict[str, Any]:
    """Closed-loop callers, each sending the next batch when the last is answered; per answered image, the size of
    the forward pass it went through."""
    handle = handle.options(_by_reference=True)
    parts: list[tuple[int, int]] = []
    deadline = time.monotonic() + seconds

    async def caller(index: int) -> None:
        i = index
        while time.monotonic() < deadline:
            outcomes = await handle.remote(refs[i % len(refs)], (top_k,) * batch_size)
            parts.extend((1, o.batch_size) for o in outcomes)  # each image, and the pass it went through
            i += 1

    start = time.monotonic()
    await asyncio.gather(*(caller(i) for i in range(callers)))
    return {"seconds": time.monotonic() - start, "parts": parts}


async def _measure(handle: Any, refs: list[Any], args: Settings) -> tuple[dict[str, Any], dict[str, float], float]:
    """A warm-up, the replicas' idle CPU, then the measured load with every role's CPU and this driver's. (One event
    loop for all: a deployment handle keeps to the loop it was first used on.)"""
    await _drive(handle, refs, batch_size=args.batch_size, callers=args.callers, seconds=args.warmup)
    with CpuWatch() as idle:
        await asyncio.sleep(args.idle)
    driver_cpu = time.process_time()
    with CpuWatch() as watch:
        driven = await _drive(handle, refs, batch_size=args.batch_size, callers=args.callers, seconds=args.seconds)
    driver_cpu = time.process_time() - driver_cpu
    busy, _ = busy_ms_by_role(idle, watch)
    return driven, busy, driver_cpu


def _device_seconds(parts: list[tuple[int, int]], timing: dict[str, float]) -> float:
    """The device's busy time for the forward passes seen: each pass of n images takes a + b x n, shared among the
    callers' parts of it by their images."""
    from load.devices import DeviceTiming

    device = DeviceTiming(timing["fixed_ms"], timing["per_image_ms"], timing["time_scale"])
    return sum(images / n * device.seconds(n) for images, n in parts)


def run(args: Settings) -> dict[str, Any]:
    env = harness.serve_env()
    os.environ.update({k: v for k, v in env.items() if k.startswith("RAY_")})  # read when Ray is imported
    import ray
    import torch

    gpu = torch.cuda.is_available() and not args.simulate
    workdir = Path(tempfile.mkdtemp(prefix="classifier-profile-"))
    checkpoint = str(random_bcnn_checkpoint(workdir / "vgg16-bcnn.pt", num_classes=200, input_size=args.input_size))
    timing = _fit_device(checkpoint) if gpu else {"fixed_ms": args.fixed_ms, "per_image_ms": args.per_image_ms,
                                                 "time_scale": args.time_scale}
    batches = _batches(args.photos, checkpoint, args.batch_size, args.distinct_batches)
    print(f"{len(batches)} batches of {args.batch_size} images at {args.input_size}; device: "
          f"{'the GPU' if gpu else 'simulated'} {timing}", flush=True)
    with harness.ray_cluster(env, num_cpus=args.logical_cpus, num_gpus=None if gpu else 1):
        ray.init(address="auto", logging_level="ERROR")
        try:
            handle = _deploy(checkpoint, args.classifiers_per_gpu,
                             None if gpu else {k: timing[k] for k in ("fixed_ms", "per_image_ms", "time_scale")})
            refs = [ray.put(b) for b in batches]
            driven, busy, driver_cpu = asyncio.run(_measure(handle, refs, args))
        finally:
            ray.shutdown()  # and the cluster with it: nothing to delete first
    parts, seconds = driven["parts"], driven["seconds"]
    images = sum(n for n, _ in parts)
    device_s = _device_seconds(parts, timing)
    passes: Counter[int] = Counter()  # forward passes by size: each part of n images is images/n of its pass
    for part_images, n in parts:
        passes[n] += part_images / n
    report = {
        "device": "gpu" if gpu else "simulated", "timing": timing, "input_size": args.input_size,
        "callers": args.callers, "batch_size": args.batch_size, "classifiers_per_gpu": args.classifiers_per_gpu,
        "seconds": round(seconds, 2), "images": images,
        "images_per_s": round(images / seconds, 1),
        "device_limit_images_per_s": round(images / device_s, 1) if device_s else None,
        "device_busy": round(device_s / seconds, 3),
        "forward_passes": round(sum(passes.values())),
        "forward_pass_images_mean": round(images / max(sum(passes.values()), 1e-9), 1),
        "forward_passes_by_size": {str(n): round(c) for n, c in sorted(passes.items())},
        "classifier_cpu_ms_per_image": round(busy.get("Classifier", 0.0) / max(images, 1), 3),
        "driver_cpu_ms_per_image": round(driver_cpu * 1000 / max(images, 1), 3),
        "driver_cpu_cores": round(driver_cpu / seconds, 3),
    }
    return report


HELP = {
    "idle": "idle CPU measured before the load, subtracted",
    "callers": "batches in flight (ingress replicas x 4)",
    "batch_size": "images per call (the ingress's max_batch_size)",
    "simulate": "the simulated device even where there is a GPU",
    "fixed_ms": "simulated device: ms per forward pass",
    "per_image_ms": "simulated device: and per image",
    "time_scale": "simulated device: this many times slower than the H200 (a slow CPU can feed it)",
}


def table(reports: dict[str, dict[str, Any]]) -> str:
    """One row per report: what the Classifier answered against what its device could do."""
    lines = ["| run | device | images/s | device's limit at the sizes seen | device busy | images per pass | "
             "Classifier CPU ms per image | driver cores |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in reports.items():
        device = "GPU" if r["device"] == "gpu" else f"simulated, time_scale {r['timing']['time_scale']:g}"
        if r["classifiers_per_gpu"] > 1:
            device += f", {r['classifiers_per_gpu']} replicas sharing it"
        lines.append(f"| {name} | {device} | {r['images_per_s']:,} | {r['device_limit_images_per_s']:,} | "
                     f"{r['device_busy']} | {r['forward_pass_images_mean']} | {r['classifier_cpu_ms_per_image']} | "
                     f"{r['driver_cpu_cores']} |")
    return "\n".join(lines)


def plot(reports: dict[str, dict[str, Any]], path: Path) -> None:
    """Images per second answered beside the device's limit, one pair of bars per report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(reports)
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names)), 4.2))
    ax.bar([i - 0.2 for i in x], [reports[n]["device_limit_images_per_s"] for n in names], 0.4,
           label="the device's limit at the batch sizes seen", color="lightgray")
    ax.bar([i + 0.2 for i in x], [reports[n]["images_per_s"] for n in names], 0.4, label="answered")
    for i, n in enumerate(names):
        ax.annotate(f"{reports[n]['device_busy']:.2f}", (i + 0.2, reports[n]["images_per_s"]), ha="center",
                    va="bottom", fontsize=8)
    ax.set_xticks(list(x), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(top=1.25 * max(max(r["images_per_s"], r["device_limit_images_per_s"]) for r in reports.values()))
    ax.set_ylabel("images per second (label: device busy)")
    ax.set_title("The Classifier alone against its device")
    ax.legend(fontsize=8, loc="upper right", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load.bench --profile classifier", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in fields(Settings):
        flag = "--" + field.name.replace("_", "-")
        if isinstance(field.default, bool):
            parser.add_argument(flag, action="store_true", help=HELP.get(field.name))
        else:
            parser.add_argument(flag, type=type(field.default), default=field.default, help=HELP.get(field.name))
    parser.add_argument("--out", type=Path, help="write the report as JSON here too")
    parser.add_argument("--plot", type=Path, metavar="FOLDER",
                        help="measure nothing: plot and tabulate the reports in FOLDER (FOLDER/summary.png)")
    args = parser.parse_args(argv)
    if args.plot:
        reports = {p.stem: json.loads(p.read_text()) for p in sorted(args.plot.glob("*.json"))
                   if "device_busy" in p.read_text()}
        plot(reports, args.plot / "summary.png")
        print(table(reports))
        return 0
    if not args.photos.is_dir():
        parser.error(f"no photos at {args.photos}; set WATERBIRD_PHOTOS to a folder of JPEGs")
    settings = Settings(**{k: v for k, v in vars(args).items() if k not in ("out", "plot")})
    report = run(settings)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
