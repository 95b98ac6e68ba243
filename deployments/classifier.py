"""The BCNN replicas: one loaded model each, dynamic batching, hot model swaps through `reconfigure`."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.nn.functional as F
from ray import serve

from bcnn.predict import Answer, Predictor
from bcnn.weights import get_weights
from deployments.config import ClassifierConfig
from deployments.messages import Classified, ModelCard, Prepared
from deployments.metrics import ClassifierMetrics

log = logging.getLogger("ray.serve")

_MODEL_FIELDS = ("checkpoint", "classes_file")


@serve.deployment(name="Classifier", user_config={}, ray_actor_options={"num_cpus": 1})
class Classifier:
    """Holds the model for the replica's life. Uses the GPU Ray assigned it, or the CPU where torch sees none."""

    def __init__(self) -> None:
        self.config: ClassifierConfig | None = None
        self.predictor: Predictor | None = None
        self.load_error: str | None = None
        # Forward passes run on one thread of their own: the event loop stays free to gather the next batch
        # and answer health checks meanwhile, and torch's thread settings (per calling thread) stick.
        self._inference = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self.metrics = ClassifierMetrics()
        if torch.cuda.is_available():
            log.info("Classifier on GPU %s (CUDA_VISIBLE_DEVICES=%s)", torch.cuda.get_device_name(0),
                     os.environ.get("CUDA_VISIBLE_DEVICES"))
        else:
            log.warning("Classifier: torch sees no GPU (CUDA_VISIBLE_DEVICES=%r); running on the CPU",
                        os.environ.get("CUDA_VISIBLE_DEVICES"))

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply new settings. A new checkpoint is loaded beside the old model and swapped in only once it
        works, so requests in flight finish on the old one and none fails. A checkpoint that does not load
        leaves the old model serving and fails the update, which `serve status` reports."""
        config = ClassifierConfig(**user_config)
        old = self.config
        if self.predictor is None or old is None or any(
                getattr(old, f) != getattr(config, f) for f in _MODEL_FIELDS):
            self._load(config)
        else:
            self.predictor.threshold = config.waterbird_threshold
        self._classify_batch.set_max_batch_size(config.max_batch_size)
        self._classify_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        self.config = config

    def _load(self, config: ClassifierConfig) -> None:
        start = time.perf_counter()
        try:
            weights = get_weights(config.checkpoint, classes_file=config.classes_file)
            predictor = Predictor(weights, threshold=config.waterbird_threshold)
            size = weights.preprocess.crop_size
            predictor(torch.zeros(1, 3, size, size, dtype=torch.uint8))  # warm up before taking traffic
        except Exception as e:
            self.load_error = f"model {config.checkpoint!r} failed to load: {e}"
            log.error(self.load_error)
            raise RuntimeError(self.load_error) from None
        if self.predictor is not None:
            self._report_model(self.predictor, 0)
        self.predictor, self.load_error = predictor, None
        load_seconds = time.perf_counter() - start
        self.metrics.load_seconds.set(load_seconds)
        self._report_model(predictor, 1)
        log.info("loaded model %s version %s on %s in %.2f s", weights.name, weights.version, predictor.device,
                 load_seconds)

    def _report_model(self, predictor: Predictor, value: int) -> None:
        self.metrics.model.set(value, tags={"model": predictor.weights.name, "version": predictor.weights.version,
                                            "device": str(predictor.device)})

    def card(self) -> ModelCard:
        predictor = self._require_model()
        weights = predictor.weights
        return ModelCard(weights.name, weights.version, predictor.labels, weights.preprocess,
                         str(predictor.device))

    async def __call__(self, prepared: Prepared, top_k: int) -> Classified:
        return await self._classify_batch((prepared, top_k))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.003)
    async def _classify_batch(self, requests: list[tuple[Prepared, int]]) -> list[Classified]:
        predictor = self._require_model()  # one model for the whole batch, even if a swap lands meanwhile
        config = self.config
        assert config is not None
        size = predictor.weights.preprocess.crop_size
        images = torch.stack([_fit(p.image, size) for p, _ in requests])
        start = time.perf_counter()
        if config.skip_forward:
            logits = torch.zeros(len(requests), len(predictor.weights.categories))
        else:
            logits = await asyncio.get_running_loop().run_in_executor(
                self._inference, _forward, predictor, images, config.torch_threads)
        inference_ms = (time.perf_counter() - start) * 1000
        self.metrics.latency.observe(inference_ms)
        self.metrics.batch_size.observe(len(requests))
        answers = predictor.answers(logits, top_k=max(k for _, k in requests))
        weights = predictor.weights
        return [Classified(_truncate(answer, k), weights.name, weights.version, prepared.preprocess_ms,
                           inference_ms, len(requests))
                for answer, (prepared, k) in zip(answers, requests, strict=True)]

    def _require_model(self) -> Predictor:
        if self.predictor is None:
            raise RuntimeError(self.load_error or "the model is not loaded yet")
        return self.predictor

    def check_health(self) -> None:
        if self.predictor is None:
            raise RuntimeError(self.load_error or "the model is not loaded")


def _forward(predictor: Predictor, images: torch.Tensor, threads: int) -> torch.Tensor:
    if torch.get_num_threads() != threads:  # OpenMP's thread count belongs to the calling thread
        torch.set_num_threads(threads)
    return predictor.logits(images)


def _fit(image: torch.Tensor, size: int) -> torch.Tensor:
    """Only during a swap to a model with another input size can a tensor arrive at the old size."""
    if image.shape[-1] == size and image.shape[-2] == size:
        return image
    resized = F.interpolate(image[None].float(), size=(size, size), mode="bilinear", antialias=True)
    return resized[0].round().clamp(0, 255).to(torch.uint8)


def _truncate(answer: Answer, top_k: int) -> Answer:
    return Answer(answer.is_waterbird, answer.waterbird_score, answer.predictions[:top_k])
