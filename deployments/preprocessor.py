"""CPU replicas that turn batches of upload bytes into uint8 pixels with `bcnn.preprocess.load_image`."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from ray import serve

from bcnn.allocator import keep_freed_memory
from bcnn.images import ImageError, Preprocess
from bcnn.preprocess import load_image
from deployments.config import PreprocessorConfig
from deployments.messages import PreparedBatch
from deployments.metrics import PreprocessorMetrics
from deployments.threads import DedicatedThread

log = logging.getLogger("ray.serve")


@serve.deployment(name="Preprocessor", user_config={}, ray_actor_options={"num_cpus": 1})
class Preprocessor:
    """Stateless apart from its limits: the model's preprocessing arrives with each batch, so a model swap
    on the classifiers never leaves the preprocessors behind."""

    def __init__(self) -> None:
        torch.set_num_threads(1)  # decoding is Pillow's, resizing one image is torch's on one core
        keep_freed_memory()  # messages of a few MB each: reuse their buffers instead of page-faulting new ones
        self.config = PreprocessorConfig()
        self.metrics = PreprocessorMetrics()
        self._decoding = DedicatedThread("decode")

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.config = PreprocessorConfig(**user_config)

    async def __call__(self, uploads: list[bytes], preprocess: Preprocess,
                       request_ids: tuple[str, ...]) -> PreparedBatch:
        """A bad upload is refused on its own; the others of its batch go on. Batches are decoded one after
        another on the replica's decoding thread (`num_cpus: 1`)."""
        return await self._decoding.run(self._prepare, uploads, preprocess, request_ids)

    def _prepare(self, uploads: list[bytes], preprocess: Preprocess, request_ids: tuple[str, ...]) -> PreparedBatch:
        images: list[np.ndarray] = []
        timings: list[float] = []
        rejected: dict[int, ImageError] = {}
        for position, data in enumerate(uploads):
            start = time.perf_counter()
            try:
                loaded = load_image(data, preprocess, max_pixels=self.config.max_pixels)
            except ImageError as e:
                rejected[position] = e
                continue
            elapsed = (time.perf_counter() - start) * 1000
            images.append(loaded.pixels)
            timings.append(elapsed)
            self.metrics.latency.observe(elapsed)
            self.metrics.pixels.observe(loaded.width * loaded.height)
        log.info("prepared %d of %d uploads", len(images), len(uploads), extra={"request_ids": request_ids})
        size = preprocess.crop_size
        pixels = np.stack(images) if images else np.empty((0, size, size, 3), dtype=np.uint8)
        return PreparedBatch(pixels, tuple(timings), rejected, request_ids)

    def check_health(self) -> None:
        """Nothing to load: a replica that answers is healthy."""
