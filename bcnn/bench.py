"""The bare model's speed on this machine: images/s and latency per backend, batch size and thread count."""

from __future__ import annotations

import itertools
import os
import platform
import resource
import statistics
import time
from datetime import UTC, datetime
from typing import Any

import torch

from bcnn.backend_names import BackendName
from bcnn.models import get_weights
from bcnn.predict import Predictor


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_model(checkpoint: str = "default", *, batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32),
                threads: tuple[int, ...] = (1, 2), seconds: float = 3.0, classes_file: str | None = None,
                device: str | None = None, backends: tuple[BackendName, ...] = ("auto",)) -> dict[str, Any]:
    weights = get_weights(checkpoint, classes_file=classes_file)
    size = weights.preprocess.crop_size
    rows = []
    for backend, n_threads in itertools.product(backends, threads):
        predictor = Predictor(weights, device=device, backend=backend, threads=n_threads)
        for batch in batch_sizes:
            images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
            for _ in range(2):
                predictor.logits(images)
            latencies = []
            start = time.perf_counter()
            while time.perf_counter() - start < seconds or len(latencies) < 3:
                t0 = time.perf_counter()
                predictor.logits(images)
                latencies.append(time.perf_counter() - t0)
            rows.append({
                "backend": predictor.backend.name,
                "threads": n_threads,
                "batch_size": batch,
                "images_per_s": round(batch * len(latencies) / sum(latencies), 2),
                "latency_ms_p50": round(statistics.median(latencies) * 1000, 2),
                "latency_ms_max": round(max(latencies) * 1000, 2),
            })
    best = max(rows, key=lambda r: r["images_per_s"])
    return {
        "model": weights.name,
        "model_version": weights.version,
        "input_size": size,
        "device": str(predictor.device),
        "backends": sorted({r["backend"] for r in rows}),
        "machine": {"cpus": len(os.sched_getaffinity(0)),
                    "platform": platform.platform(), "processor": platform.machine(),
                    "torch": torch.__version__, "onnxruntime": _onnxruntime_version()},
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "results": rows,
        "best": best,
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def _onnxruntime_version() -> str | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime.__version__
