"""The Classifier deployment alone, fed as a GPU node feeds it, against what its device could do.

Ray with one GPU: the real one, or, where torch sees none, one logical GPU and the simulated device (`load.devices`,
the H200's timing by default, slowed by `--time-scale` so that this machine's CPU can keep it busy). The Classifier
deployed alone with the production settings of `serve_config.yaml` (one replica per GPU, or several sharing it), a
VGG16-BCNN with random weights, fed ready-made batches as the Preprocessors send them (the shared photos decoded
with the model's preprocessing, each batch put once into Ray's object store and passed by reference, no HTTP) by
`--callers` closed-loop callers.

It reports the images per second answered, what the device could do at the batch sizes it was given (on the
simulated device its timing; on a GPU the bare model's, fitted as `a + b x n` from two batch sizes), their ratio
(the device's busy fraction), and the CPU per image of the Classifier process and of this driver.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from load import runner
from load.bare_model import fit_device, model_checkpoint
from load.cpu_watch import CpuWatch, busy_ms_by_role

APP = "classifier-profile"


@dataclass(frozen=True)
class Settings:
    seconds: float = 20.0
    warmup: float = 5.0
    idle: float = 3.0
    callers: int = 32  # batches in flight (ingress replicas x 4)
    batch_size: int = 16  # images per call (the ingress's max_batch_size)
    distinct_batches: int = 8
    input_size: int = 448
    classifiers_per_gpu: int = 1
    simulate: bool = False  # the simulated device even where there is a GPU
    fixed_ms: float = 1.6  # simulated device: ms per forward pass
    per_image_ms: float = 0.55  # and per image
    time_scale: float = 1.0  # this many times slower than the H200 (a slow CPU can feed it)
    logical_cpus: int = 16


def _batches(checkpoint: str, s: Settings) -> list[Any]:
    import numpy as np

    from bcnn.models import get_weights
    from bcnn.preprocess import load_image
    from deployments.messages import PreparedBatch
    from load.loadgen import load_uploads

    preprocess = get_weights(checkpoint).preprocess
    images = [load_image(u.data, preprocess).pixels
              for u in load_uploads(runner.PHOTOS, limit=s.batch_size * s.distinct_batches)]
    return [PreparedBatch(np.stack(images[i:i + s.batch_size]), (1.0,) * s.batch_size, {},
                          tuple(f"profile-{i + j}" for j in range(s.batch_size)))
            for i in range(0, len(images) - s.batch_size + 1, s.batch_size)]


def _deploy(checkpoint: str, classifiers_per_gpu: int, simulated: dict[str, float] | None) -> Any:
    """The Classifier alone, as serve_config.yaml deploys it on one GPU (one replica, or several sharing it)."""
    from ray import serve

    from deployments.classifier import Classifier
    from load.devices import BenchBackend, DeviceTiming  # Ray with it: imported once `run` has set RAY_AUTH_MODE

    settings = runner.deployment(runner.serve_config("production", checkpoint,
                                                     classifiers_per_gpu=classifiers_per_gpu), "Classifier")
    options = {k: settings[k] for k in ("num_replicas", "max_ongoing_requests", "max_queued_requests",
                                        "ray_actor_options")}
    device = BenchBackend("simulated", DeviceTiming(**simulated)) if simulated is not None else None
    app = Classifier.options(**options, user_config=settings["user_config"]).bind(device)
    return serve.run(app, name=APP, route_prefix=None)


async def _drive(handle: Any, refs: list[Any], s: Settings, seconds: float) -> dict[str, Any]:
    """Closed-loop callers, each sending the next batch when the last is answered; per answered image, the size of
    the forward pass it went through."""
    handle = handle.options(_by_reference=True)
    parts: list[tuple[int, int]] = []
    deadline = time.monotonic() + seconds

    async def caller(i: int) -> None:
        while time.monotonic() < deadline:
            outcomes = await handle.remote(refs[i % len(refs)], (5,) * s.batch_size)
            parts.extend((1, o.batch_size) for o in outcomes)
            i += 1

    start = time.monotonic()
    await asyncio.gather(*(caller(i) for i in range(s.callers)))
    return {"seconds": time.monotonic() - start, "parts": parts}


async def _measure(handle: Any, refs: list[Any], s: Settings) -> tuple[dict[str, Any], dict[str, float], float]:
    """A warm-up, the idle CPU, then the measured load with every role's CPU and this driver's (one event loop for
    all: a deployment handle keeps to the loop it was first used on)."""
    await _drive(handle, refs, s, s.warmup)
    with CpuWatch() as idle:
        await asyncio.sleep(s.idle)
    driver_cpu = time.process_time()
    with CpuWatch() as watch:
        driven = await _drive(handle, refs, s, s.seconds)
    return driven, busy_ms_by_role(idle, watch)[0], time.process_time() - driver_cpu


def run(s: Settings) -> dict[str, Any]:
    import ray  # imported here, once `python -m load` has set Ray's settings (its token auth among them)
    import torch

    from load.devices import DeviceTiming

    gpu = torch.cuda.is_available() and not s.simulate
    checkpoint = model_checkpoint(f"vgg16_{s.input_size}")
    timing = fit_device(checkpoint) if gpu else {"fixed_ms": s.fixed_ms, "per_image_ms": s.per_image_ms,
                                                 "time_scale": s.time_scale}
    batches = _batches(checkpoint, s)
    print(f"{len(batches)} batches of {s.batch_size} images at {s.input_size}; device: "
          f"{'the GPU' if gpu else 'simulated'} {timing}", flush=True)
    with runner.Cluster(num_cpus=s.logical_cpus, num_gpus=None if gpu else 1):
        ray.init(address="auto", logging_level="ERROR")
        try:
            handle = _deploy(checkpoint, s.classifiers_per_gpu,
                             None if gpu else {k: timing[k] for k in ("fixed_ms", "per_image_ms", "time_scale")})
            driven, busy, driver_cpu = asyncio.run(_measure(handle, [ray.put(b) for b in batches], s))
        finally:
            ray.shutdown()  # and the cluster with it: nothing to delete first
    parts, seconds = driven["parts"], driven["seconds"]
    images = sum(n for n, _ in parts)
    device = DeviceTiming(timing["fixed_ms"], timing["per_image_ms"], timing["time_scale"])
    # Each pass of n images takes a + b x n, shared among the callers' parts of it by their images.
    device_s = sum(part / n * device.seconds(n) for part, n in parts)
    passes: Counter[int] = Counter()
    for part, n in parts:
        passes[n] += part / n
    return {
        "device": "gpu" if gpu else "simulated", "timing": timing, "input_size": s.input_size,
        "callers": s.callers, "batch_size": s.batch_size, "classifiers_per_gpu": s.classifiers_per_gpu,
        "seconds": round(seconds, 2), "images": images, "images_per_s": round(images / seconds, 1),
        "device_limit_images_per_s": round(images / device_s, 1) if device_s else None,
        "device_busy": round(device_s / seconds, 3), "forward_passes": round(sum(passes.values())),
        "forward_pass_images_mean": round(images / max(sum(passes.values()), 1e-9), 1),
        "forward_passes_by_size": {str(n): round(c) for n, c in sorted(passes.items())},
        "classifier_cpu_ms_per_image": round(busy.get("Classifier", 0.0) / max(images, 1), 3),
        "driver_cpu_ms_per_image": round(driver_cpu * 1000 / max(images, 1), 3),
        "driver_cpu_cores": round(driver_cpu / seconds, 3),
    }


def sections(r: dict[str, Any]) -> dict[str, str]:
    device = "GPU" if r["device"] == "gpu" else f"simulated, time_scale {r['timing']['time_scale']:g}"
    if r["classifiers_per_gpu"] > 1:
        device += f", {r['classifiers_per_gpu']} replicas sharing it"
    return {"bench-classifier": "\n".join([
        f"`python -m load classifier` {runner.now()} on {runner.machine()['cpus']} CPUs, {r['seconds']:g} s:", "",
        "| device | images/s | device's limit at the sizes seen | device busy | images per pass | "
        "Classifier CPU ms per image | driver cores |", "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {device} | {r['images_per_s']:,} | {r['device_limit_images_per_s']:,} | {r['device_busy']} | "
        f"{r['forward_pass_images_mean']} | {r['classifier_cpu_ms_per_image']} | {r['driver_cpu_cores']} |"])}
