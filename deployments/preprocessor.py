"""CPU replicas that turn upload bytes into uint8 tensors with `bcnn.preprocess_image`."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from ray import serve

from bcnn.preprocess import Preprocess, load_image
from deployments.config import PreprocessorConfig
from deployments.messages import Prepared
from deployments.metrics import PreprocessorMetrics

log = logging.getLogger("ray.serve")


@serve.deployment(name="Preprocessor", user_config={}, ray_actor_options={"num_cpus": 1})
class Preprocessor:
    """Stateless apart from its limits: the model's preprocessing arrives with each request, so a model swap
    on the classifiers never leaves the preprocessors behind."""

    def __init__(self) -> None:
        torch.set_num_threads(1)  # decoding is Pillow's; torch only wraps the array
        self.config = PreprocessorConfig()
        self.metrics = PreprocessorMetrics()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.config = PreprocessorConfig(**user_config)

    def __call__(self, data: bytes, preprocess: Preprocess) -> Prepared:
        start = time.perf_counter()
        loaded = load_image(data, preprocess, max_pixels=self.config.max_pixels)
        elapsed = (time.perf_counter() - start) * 1000
        pixels = loaded.width * loaded.height
        self.metrics.latency.observe(elapsed)
        self.metrics.pixels.observe(pixels)
        return Prepared(image=loaded.tensor, pixels=pixels, preprocess_ms=elapsed)

    def check_health(self) -> None:
        """Nothing to load: a replica that answers is healthy."""
