"""The in-process limit: decode + preprocess + model in a tight loop, no HTTP, no Ray.

What the serving stack is measured against: with P worker processes of T threads each, batch size B, how many
photos per second does this machine turn into answers, and how long does one take?
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
from typing import Any

from load.loadgen import Upload


def _worker(uploads: list[Upload], seconds: float, threads: int, batch_size: int, backend: str,
            start_at: float, queue: mp.Queue) -> None:  # type: ignore[type-arg]
    import torch

    from bcnn.models import get_weights
    from bcnn.predict import Predictor
    from bcnn.preprocess import preprocess_image

    torch.set_num_threads(threads)
    weights = get_weights("default")
    predictor = Predictor(weights, backend=backend, threads=threads)  # type: ignore[arg-type]
    for upload in uploads[:3]:
        predictor(preprocess_image(upload.data, weights.preprocess)[None])
    while time.time() < start_at:
        time.sleep(0.005)
    done, latencies, i = 0, [], 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        batch = []
        for _ in range(batch_size):
            batch.append(preprocess_image(uploads[i % len(uploads)].data, weights.preprocess))
            i += 1
        predictor(torch.stack(batch))
        latencies.append(time.perf_counter() - t0)
        done += batch_size
    queue.put((done, latencies, predictor.backend.name))


def measure(uploads: list[Upload], *, processes: int = 1, threads: int = 1, batch_size: int = 1,
            seconds: float = 10.0, backend: str = "auto") -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    start_at = time.time() + 8.0  # every worker loaded and warm before the clock starts
    workers = [ctx.Process(target=_worker, args=(uploads, seconds, threads, batch_size, backend, start_at, queue))
               for _ in range(processes)]
    for w in workers:
        w.start()
    results = [queue.get(timeout=seconds + 120) for _ in workers]
    for w in workers:
        w.join()
    total = sum(done for done, _, _ in results)
    latencies = [lat for _, lats, _ in results for lat in lats]
    return {
        "backend": results[0][2],
        "processes": processes,
        "threads": threads,
        "batch_size": batch_size,
        "images_per_s": round(total / seconds, 2),
        "latency_ms_p50": round(statistics.median(latencies) * 1000, 2),
    }
