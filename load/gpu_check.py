"""The GPU path's correctness, checked before any of its speed is measured (the first step of `load.gpu_run`):

1. **Pipelined against synchronous.** Rounds of three batches of mixed sizes in flight at once on a Predictor that
   was never warmed up, so that staging slots are made, and outgrown, while other batches run; launched on one
   thread and waited for on another, as the Classifier does; halfway, a second Predictor is built and warmed up
   between the rounds and takes over (a swap). Every batch against `Predictor.logits` of the same images, computed
   meanwhile on a third thread, at the export check's tolerance; no NaN or inf.
2. **Finite under autocast**: the embedded Lite0 on photos (or random images where there are none).
3. **First passes after warm-up**: each batch size up to the largest, its first pass against its second.
4. **Out of memory** (CUDA): a batch over a lowered memory limit fails, the next batch is answered right, and the
   error does not count as the device's failure.
5. **Copies overlap kernels** (CUDA): a torch.profiler trace of batches in flight, and the share of the host-to-device
   copies' time during which a kernel ran on another stream.

On a CPU, 1-3 run as they can there (a launch computes at once) and 4-5 say they need a GPU. `--short`: a
VGG16-BCNN at 64x64, a few rounds, seconds on a CPU.
"""

from __future__ import annotations

import json
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bcnn.backends import is_device_failure
from bcnn.export import LOGIT_TOLERANCE
from bcnn.models import get_weights
from bcnn.predict import Predictor
from bcnn.weights import Weights
from load.bare_model import random_bcnn_checkpoint
from load.runner import PHOTOS

SIZES = (3, 17, 64, 5, 33, 1, 48, 9, 64, 2, 27, 40)
SHORT_SIZES = (3, 1, 4, 2)


class Batches:
    """Launches on one thread and waits on another, as the Classifier's inference and completion threads do."""

    def __init__(self) -> None:
        self.inference = ThreadPoolExecutor(1, thread_name_prefix="inference")
        self.completion = ThreadPoolExecutor(1, thread_name_prefix="completion")

    def launch(self, predictor: Predictor, pixels: np.ndarray) -> Future[torch.Tensor]:
        in_flight = self.inference.submit(predictor.launch, [pixels]).result()
        return self.completion.submit(in_flight.wait)


def _images(rng: np.random.Generator, n: int, side: int) -> np.ndarray:
    return rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def _compare(got: torch.Tensor, expected: torch.Tensor) -> dict[str, Any]:
    relative = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30))
    return {"relative_diff": relative, "top1_equal": int((got.argmax(1) == expected.argmax(1)).sum()),
            "finite": bool(torch.isfinite(got).all())}


def pipelined_against_synchronous(weights: Weights, device: torch.device, rounds: int,
                                  sizes: tuple[int, ...]) -> dict[str, Any]:
    rng, side = np.random.default_rng(0), weights.preprocess.crop_size
    batches, reference = Batches(), ThreadPoolExecutor(1, thread_name_prefix="reference")
    predictor = Predictor(weights, device=device, backend="torch")
    checks: list[dict[str, Any]] = []
    building: Future[Predictor] | None = None
    warm_rounds: list[Future[None]] = []
    swapped_at = None
    for r in range(rounds):
        images = [_images(rng, sizes[(3 * r + i) % len(sizes)], side) for i in range(3)]
        launched = [batches.launch(predictor, b) for b in images]
        expected = [reference.submit(predictor.logits, torch.from_numpy(b).permute(0, 3, 1, 2)) for b in images]
        late = r >= 2 * rounds // 3  # the swap waits no longer for what it needs
        if r == rounds // 3:
            building = ThreadPoolExecutor(1).submit(Predictor, weights, device=device, backend="torch")
        elif building is not None and swapped_at is None:
            if not warm_rounds and (building.done() or late):
                new = building.result()  # warmed up on the inference thread, between this model's batches
                warm_rounds = [batches.inference.submit(new.warm_up, s) for s in new.warm_up_rounds(max(sizes), 3)]
            elif warm_rounds and (all(f.done() for f in warm_rounds) or late):
                [f.result() for f in warm_rounds]
                predictor, swapped_at = building.result(), r
        for got, want, b in zip(launched, expected, images, strict=True):
            checks.append({"round": r, "images": len(b), **_compare(got.result(), want.result())})
    worst = max(c["relative_diff"] for c in checks)
    images_checked = sum(c["images"] for c in checks)
    passed = worst <= LOGIT_TOLERANCE and all(c["finite"] for c in checks) and swapped_at is not None
    return {"passed": passed, "batches": len(checks), "images": images_checked, "swapped_at_round": swapped_at,
            "worst_relative_diff": worst, "tolerance": LOGIT_TOLERANCE,
            "top1_equal": sum(c["top1_equal"] for c in checks), "failing": [c for c in checks
                                                                            if c["relative_diff"] > LOGIT_TOLERANCE]}


def finite_under_autocast(device: torch.device, photos: Path | None, limit: int) -> dict[str, Any]:
    from bcnn.preprocess import load_image

    weights = get_weights("default")
    predictor = Predictor(weights, device=device, backend="torch")
    side = weights.preprocess.crop_size
    files = sorted(photos.glob("*.jpg"))[:limit] if photos and photos.is_dir() else []
    pixels = (np.stack([load_image(f.read_bytes(), weights.preprocess).pixels for f in files]) if files
              else _images(np.random.default_rng(1), limit, side))
    logits = predictor.launch([pixels]).wait()
    return {"passed": bool(torch.isfinite(logits).all()), "model": weights.name, "images": len(pixels),
            "photos": bool(files), "largest_logit": float(logits.abs().max())}


def first_passes(weights: Weights, device: torch.device, largest: int) -> dict[str, Any]:
    predictor = Predictor(weights, device=device, backend="torch")
    for sizes in predictor.warm_up_rounds(largest, 3):
        predictor.warm_up(sizes)
    side, rng = weights.preprocess.crop_size, np.random.default_rng(2)
    first, second = {}, {}
    for n in range(1, largest + 1):
        for passes in (first, second):
            start = time.perf_counter()
            predictor.launch([_images(rng, n, side)]).wait()
            passes[n] = round((time.perf_counter() - start) * 1000, 2)
    ratios = [first[n] / max(second[n], 1e-6) for n in first]
    return {"first_ms": first, "second_ms": second, "worst_first_over_second": round(max(ratios), 2),
            "slowest_first_ms": max(first.values())}


def out_of_memory(weights: Weights, device: torch.device, largest: int) -> dict[str, Any]:
    predictor = Predictor(weights, device=device, backend="torch")
    side, rng = weights.preprocess.crop_size, np.random.default_rng(3)
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_allocated(device) + 2**26) / total, device)
    try:
        predictor.launch([_images(rng, largest, side)]).wait()
        error = None
    except torch.OutOfMemoryError as e:
        error = e
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    pixels = _images(rng, 4, side)
    check = _compare(predictor.launch([pixels]).wait(), predictor.logits(torch.from_numpy(pixels).permute(0, 3, 1, 2)))
    next_right = check["relative_diff"] <= LOGIT_TOLERANCE and check["finite"]
    return {"passed": error is not None and next_right and not is_device_failure(error),
            "raised": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}" if error else None,
            "next_batch": check}


def copies_overlap_kernels(weights: Weights, device: torch.device, out: Path, largest: int) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    predictor, batches = Predictor(weights, device=device, backend="torch"), Batches()
    for sizes in predictor.warm_up_rounds(largest, 3):
        predictor.warm_up(sizes)
    rng, side = np.random.default_rng(4), weights.preprocess.crop_size
    images = [_images(rng, largest, side) for _ in range(3)]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as trace:
        for _ in range(4):
            [f.result() for f in [batches.launch(predictor, b) for b in images]]
    path = out / "gpu-check-trace.json"
    trace.export_chrome_trace(str(path))
    events = json.loads(path.read_text())["traceEvents"]
    copies = [(e["ts"], e["ts"] + e["dur"], e["args"].get("stream")) for e in events
              if e.get("cat") == "gpu_memcpy" and "HtoD" in e.get("name", "")]
    kernels = [(e["ts"], e["ts"] + e["dur"], e["args"].get("stream")) for e in events if e.get("cat") == "kernel"]
    copy_time = sum(end - start for start, end, _ in copies)
    overlapped = sum(_covered(start, end, [(a, b) for a, b, s in kernels if s != stream])
                     for start, end, stream in copies)
    return {"trace": path.name, "copies": len(copies), "copy_streams": sorted({s for *_, s in copies}),
            "kernel_streams": sorted({s for *_, s in kernels}),
            "copy_time_overlapping_kernels": round(overlapped / copy_time, 3) if copy_time else None}


def _covered(start: float, end: float, intervals: list[tuple[float, float]]) -> float:
    """How much of [start, end) the union of `intervals` covers."""
    covered, reached = 0.0, start
    for a, b in sorted(intervals):
        a, b = max(a, reached), min(b, end)
        if b > a:
            covered, reached = covered + b - a, b
    return covered


@dataclass(frozen=True)
class Settings:
    short: bool = False
    trace_dir: str = "."  # where the CUDA profiler's trace goes


def run(s: Settings) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # the references are float32
    side, sizes = (64, SHORT_SIZES) if s.short else (448, SIZES)
    with tempfile.TemporaryDirectory() as tmp:
        weights = get_weights(str(random_bcnn_checkpoint(Path(tmp) / "vgg16-bcnn.pt", num_classes=200,
                                                         input_size=side)))
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                              "model": f"vgg16-bcnn {side}"}
    report["pipelined"] = pipelined_against_synchronous(weights, device, 8 if s.short else 40, sizes)
    report["lite0_autocast"] = finite_under_autocast(device, PHOTOS, 8 if s.short else 64)
    report["first_passes"] = first_passes(weights, device, max(sizes))
    needs_gpu = {"skipped": "needs a CUDA GPU"}
    report["out_of_memory"] = out_of_memory(weights, device, max(sizes)) if device.type == "cuda" else needs_gpu
    report["overlap"] = (copies_overlap_kernels(weights, device, Path(s.trace_dir), max(sizes))
                         if device.type == "cuda" else needs_gpu)
    report["passed"] = all(report[k].get("passed", True) for k in ("pipelined", "lite0_autocast", "out_of_memory"))
    print("correct" if report["passed"] else "NOT CORRECT: the GPU path gives wrong answers", flush=True)
    return report
