"""The bare model, timed one way (`rates`), and what is built on it: a checkpoint with random weights (a forward pass
costs the same whatever the weights, so nothing needs a trained model), the serving backend's rate per batch size,
one core's decoding rate, a GPU's time per batch fitted as `a + b x n`, and the in-process limit (decode +
preprocess + model in a tight loop in P processes of T threads, no HTTP, no Ray).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing as mp
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from load.loadgen import Upload

Forward = Callable[[Any], Any]  # uint8 [N, 3, H, W] on the host -> float32 logits [N, C] on the host


def random_bcnn_checkpoint(path: str | Path, *, backbone: str = "vgg16", num_classes: int = 200,
                           input_size: int | None = None, seed: int = 0) -> Path:
    """A BCNN checkpoint in our format; `input_size` overrides the backbone's default (448 for VGG-16)."""
    import torch

    from bcnn.checkpoint import save_checkpoint
    from bcnn.images import default_preprocess
    from bcnn.models import bcnn

    preprocess = default_preprocess(backbone)
    if input_size is not None:
        preprocess = dataclasses.replace(preprocess, crop_size=input_size, resize_size=input_size)
    torch.manual_seed(seed)
    model = bcnn(backbone, num_classes=num_classes, preprocess=preprocess)
    categories = tuple(f"species {i:03d}" for i in range(num_classes))
    save_checkpoint(path, model, arch=f"bcnn_{backbone}", categories=categories, preprocess=preprocess,
                    meta={"version": f"random-{backbone}-{preprocess.crop_size}-seed{seed}"})
    return Path(path)


def model_checkpoint(model: str, *, classes: int = 200) -> str:
    """What a benchmark's `--checkpoint` names: `vgg16_<size>` is a VGG16-BCNN at that input size with random weights
    (written to a temporary folder), anything else (`default`, a path) a checkpoint as `bcnn` reads it."""
    size = model.removeprefix("vgg16_")
    if model.startswith("vgg16_") and size.isdigit():
        folder = Path(tempfile.mkdtemp(prefix="bench-"))
        return str(random_bcnn_checkpoint(folder / f"{model}.pt", num_classes=classes, input_size=int(size)))
    return model


def in_subprocess(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` in a fresh process, so the GPU memory it takes is given back when it returns."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def model_rates(checkpoint: str, batch_sizes: tuple[int, ...], seconds: float) -> dict[str, float]:
    """Images per second of the serving backend (`Predictor`) per batch size; run it `in_subprocess`."""
    from bcnn.models import get_weights
    from bcnn.predict import Predictor

    predictor = Predictor(get_weights(checkpoint))
    return rates(predictor.logits, predictor.weights.preprocess.crop_size, batch_sizes, seconds)


def rates(forward: Forward, side: int, batch_sizes: tuple[int, ...], seconds: float) -> dict[str, float]:
    import torch

    rates = {}
    for n in batch_sizes:
        images = torch.randint(0, 256, (n, side, side, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
        forward(images)  # warm up this size
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            forward(images)  # returns on the host, so the device has finished
            done += n
        rates[str(n)] = round(done / (time.perf_counter() - start), 1)
    return rates


def fit_device(checkpoint: str, sizes: tuple[int, int] = (8, 64), seconds: float = 3.0) -> dict[str, Any]:
    """The GPU's time per batch as `a + b x n` ms, from the bare model at two batch sizes (in a process of its own,
    which gives its GPU memory back)."""
    measured = in_subprocess(model_rates, checkpoint, sizes, seconds)
    (n1, r1), (n2, r2) = ((n, measured[str(n)]) for n in sizes)
    ms1, ms2 = 1000 * n1 / r1, 1000 * n2 / r2
    per_image = (ms2 - ms1) / (n2 - n1)
    return {"fixed_ms": round(ms1 - per_image * n1, 3), "per_image_ms": round(per_image, 4), "time_scale": 1.0,
            "bare_model_images_per_s": measured}


def decode_rate(uploads: list[Upload], checkpoint: str, seconds: float) -> float:
    """Images per second that one core turns from upload bytes into the model's uint8 input; run it
    `in_subprocess`."""
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


def _in_process_worker(uploads: list[Upload], seconds: float, threads: int, batch_size: int, backend: str,
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
        batch = [preprocess_image(uploads[(i + j) % len(uploads)].data, weights.preprocess) for j in range(batch_size)]
        i += batch_size
        predictor(torch.stack(batch))
        latencies.append(time.perf_counter() - t0)
        done += batch_size
    queue.put((done, latencies, predictor.backend.name))


def in_process(uploads: list[Upload], *, processes: int = 1, threads: int = 1, batch_size: int = 1,
               seconds: float = 10.0, backend: str = "auto") -> dict[str, Any]:
    """The in-process limit: with P processes of T threads, batch size B, the photos per second this machine turns
    into answers with no HTTP and no Ray, and how long a batch takes."""
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    start_at = time.time() + 8.0  # every worker loaded and warm before the clock starts
    workers = [ctx.Process(target=_in_process_worker,
                           args=(uploads, seconds, threads, batch_size, backend, start_at, queue))
               for _ in range(processes)]
    for w in workers:
        w.start()
    results = [queue.get(timeout=seconds + 120) for _ in workers]
    for w in workers:
        w.join()
    latencies = [lat for _, lats, _ in results for lat in lats]
    return {"backend": results[0][2], "processes": processes, "threads": threads, "batch_size": batch_size,
            "images_per_s": round(sum(done for done, _, _ in results) / seconds, 2),
            "latency_ms_p50": round(statistics.median(latencies) * 1000, 2)}
