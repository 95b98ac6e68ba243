"""The BCNN replicas: one loaded model each, dynamic batching, hot model swaps through `reconfigure`."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from ray import serve

from bcnn.backends import Backend
from bcnn.models import get_weights
from bcnn.phone import PhoneModel, phone_model
from bcnn.predict import Predictor
from bcnn.weights import Weights
from deployments.config import ClassifierConfig
from deployments.device_watch import DeviceWatch
from deployments.messages import Classified, ModelCard, Outcome, PreparedBatch, PreparedForAnotherModel
from deployments.metrics import GAUGE_REFRESH_S, ClassifierMetrics
from deployments.threads import DedicatedThread

log = logging.getLogger("ray.serve")

# Batches the Classifier works on at once: one computing on the device, one staged and queued behind it so the device
# never waits for the host, one being ranked and answered (docs/performance.md, "The Classifier alone").
BATCHES_IN_FLIGHT = 3
# A change of any of these builds a new Predictor beside the old one (ONNX Runtime fixes its threads per session).
_MODEL_FIELDS = ("checkpoint", "classes_file", "backend", "threads")


@dataclass(frozen=True, eq=False)
class _Images:
    """Part of one caller's batch, at most one forward pass in size."""

    pixels: np.ndarray
    """uint8 [n, H, W, 3]"""
    top_ks: tuple[int, ...]
    preprocess_ms: tuple[float, ...]


def _count_images(parts: list[_Images]) -> int:
    return sum(len(p.pixels) for p in parts)


@serve.deployment(name="Classifier", user_config={}, ray_actor_options={"num_cpus": 1})
class Classifier:
    """Holds the model for the replica's life. Uses the GPU Ray assigned it, or the CPU where torch sees none."""

    def __init__(self, backend_factory: Callable[[Weights], Backend] | None = None) -> None:
        """`backend_factory`: builds what runs the forward pass for each model loaded, instead of the backend the
        configuration names (the benchmarks' devices, load/devices.py)."""
        self.backend_factory = backend_factory
        self.config: ClassifierConfig | None = None
        self.predictor: Predictor | None = None
        self.load_error: str | None = None
        # Batches are staged and their forward passes queued on one thread of their own (torch's thread settings
        # and CUDA's per-thread state stick); the waits for the device, and the ranking, on another. The event loop
        # stays free to gather the next batches and answer health checks meanwhile.
        self._inference = DedicatedThread("inference")
        self._completion = DedicatedThread("completion")
        self.metrics = ClassifierMetrics()
        self.device_watch = DeviceWatch()
        self._gauges: asyncio.Task[None] | None = None
        self._phone: PhoneModel | None = None  # made for the model and thresholds now served, on first request
        self._phone_max_bytes = 0
        self._phone_lock = asyncio.Lock()
        if torch.cuda.is_available():
            log.info("Classifier on GPU %s (CUDA_VISIBLE_DEVICES=%s)", torch.cuda.get_device_name(0),
                     os.environ.get("CUDA_VISIBLE_DEVICES"))
        else:
            log.warning("Classifier: torch sees no GPU (CUDA_VISIBLE_DEVICES=%r); running on the CPU",
                        os.environ.get("CUDA_VISIBLE_DEVICES"))

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply new settings. A new checkpoint is loaded and warmed up beside the old model, on the inference
        thread, and swapped in only once it works, so requests in flight finish on the old one and none fails.
        A checkpoint that does not load leaves the old model serving and fails the update, which `serve status`
        reports."""
        config = ClassifierConfig(**user_config)
        old = self.config
        if self.predictor is None or old is None or any(
                getattr(old, f) != getattr(config, f) for f in _MODEL_FIELDS):
            await self._load(config)
        else:
            self.predictor.threshold = config.waterbird_threshold
            self.predictor.species_threshold = config.species_threshold
            if config.max_batch_size != old.max_batch_size:
                await self._warm_up(self.predictor, config.max_batch_size)
        self._classify_batch.set_max_batch_size(config.max_batch_size)
        self._classify_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        self.config = config
        self._phone = None
        if self._gauges is None:
            self._gauges = asyncio.create_task(self._refresh_gauges())

    async def _load(self, config: ClassifierConfig) -> None:
        start = time.perf_counter()
        try:
            weights = get_weights(config.checkpoint, classes_file=config.classes_file)
            backend = self.backend_factory(weights) if self.backend_factory else config.backend
            # Built off the inference thread, which keeps answering with the old model meanwhile; warmed up on it.
            predictor = await asyncio.to_thread(Predictor, weights, threshold=config.waterbird_threshold,
                                                species_threshold=config.species_threshold, backend=backend,
                                                threads=config.threads)
            sizes = await self._warm_up(predictor, config.max_batch_size)
        except Exception as e:
            self.device_watch.failed(e)
            self.load_error = f"model {config.checkpoint!r} failed to load: {e}"
            log.error(self.load_error)
            raise RuntimeError(self.load_error) from None
        self.predictor, self.load_error = predictor, None
        load_seconds = time.perf_counter() - start
        self.metrics.serving({"model": weights.name, "version": weights.version, "device": str(predictor.device),
                              "backend": predictor.backend.name}, load_seconds)
        log.info("loaded model %s version %s on %s (%s, %d threads) in %.2f s, warmed up on the inference thread "
                 "for batch sizes %s", weights.name, weights.version, predictor.device, predictor.backend.name,
                 config.threads, load_seconds, f"{sizes[0]}-{sizes[-1]}" if len(sizes) > 1 else sizes[0])

    async def _warm_up(self, predictor: Predictor, max_batch_size: int) -> list[int]:
        """On the inference thread, a round at a time: the model serving now launches its batches between them.
        Returns the sizes warmed, in order (every one from 1 up to a largest)."""
        rounds = predictor.warm_up_rounds(max_batch_size, in_flight=BATCHES_IN_FLIGHT)
        for sizes in rounds:
            await self._inference.run(predictor.warm_up, sizes)
        return sorted(set(itertools.chain.from_iterable(rounds)))

    async def _refresh_gauges(self) -> None:
        while True:
            await asyncio.sleep(GAUGE_REFRESH_S)
            self.metrics.refresh()

    def card(self) -> ModelCard:
        predictor = self._require_model()
        weights = predictor.weights
        return ModelCard(weights.name, weights.version, predictor.labels, weights.preprocess,
                         str(predictor.device), predictor.backend.name)

    async def phone_model_info(self, max_bytes: int) -> dict[str, object]:
        """What the page saves for offline use (`bcnn.phone`), without the file: made on the first request for a
        model (an export where none is cached: seconds, off the event loop), kept until the next reconfigure."""
        model = await self._phone_model(max_bytes)
        return {"sha256": model.sha256, "bytes": len(model.data), "name": model.name, "version": model.version,
                "species": model.species, "same_as_service": model.same_as_service}

    async def phone_model_data(self, sha256: str, max_bytes: int) -> bytes | None:
        """The file `phone_model_info` described (made here too where another replica described it), if it is still
        the one this replica gives: None during a swap that changed it."""
        model = await self._phone_model(max_bytes)
        return model.data if model.sha256 == sha256 else None

    async def _phone_model(self, max_bytes: int) -> PhoneModel:
        async with self._phone_lock:
            predictor, config = self._require_model(), self.config
            assert config is not None
            if self._phone is not None and self._phone_max_bytes == max_bytes:
                return self._phone
            model = await asyncio.to_thread(
                phone_model, predictor.weights, max_bytes=max_bytes, waterbird_threshold=config.waterbird_threshold,
                species_threshold=config.species_threshold)
            log.info("phone model: %s version %s, %.1f MB, sha256 %s", model.name, model.version,
                     len(model.data) / 1e6, model.sha256[:12])
            if self.predictor is predictor and self.config is config:  # no reconfigure meanwhile
                self._phone, self._phone_max_bytes = model, max_bytes
            return model

    async def __call__(self, batch: PreparedBatch, top_ks: tuple[int, ...]) -> list[Outcome]:
        """Each upload's outcome, in upload order: its answer with its own `top_ks` species, or the error the
        Preprocessor refused it with. A batch larger than one forward pass is split; `@serve.batch` merges small
        ones from concurrent callers into one pass."""
        self._require_model()
        assert self.config is not None
        usable = [i for i in range(batch.size) if i not in batch.rejected]
        step = self.config.max_batch_size
        parts = [_Images(batch.pixels[i:i + step], tuple(top_ks[u] for u in usable[i:i + step]),
                         batch.preprocess_ms[i:i + step]) for i in range(0, len(usable), step)]
        try:
            answered = iter(itertools.chain.from_iterable(await asyncio.gather(*map(self._classify_batch, parts))))
        except Exception as e:
            # Sent on as a builtin type: the ingress, which never loads torch, would import it to unpickle one of
            # torch's (out of memory, a CUDA error); it answers any failure here as a 500 all the same.
            raise RuntimeError(f"the forward pass failed: {type(e).__name__}: {e}") from e
        log.info("classified %d of %d uploads", len(usable), batch.size, extra={"request_ids": batch.request_ids})
        return [batch.rejected[i] if i in batch.rejected else next(answered) for i in range(batch.size)]

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0, batch_size_fn=_count_images,
                 max_concurrent_batches=BATCHES_IN_FLIGHT)
    async def _classify_batch(self, parts: list[_Images]) -> list[list[Classified | PreparedForAnotherModel]]:
        predictor = self._require_model()  # one model for the whole batch, even if a swap lands meanwhile
        side = predictor.weights.preprocess.crop_size
        # Only during a swap to a model of another input size do images arrive decoded for the old one.
        fitting = [p for p in parts if p.pixels.shape[1:3] == (side, side)]
        pixels = [p.pixels for p in fitting]
        top_ks = tuple(itertools.chain.from_iterable(p.top_ks for p in fitting))
        images = len(top_ks)
        start = time.perf_counter()
        answers: list[dict[str, object]] = []
        if fitting:
            answers = await asyncio.wrap_future(await self._inference.run(self._launch, predictor, pixels, top_ks))
        inference_ms = (time.perf_counter() - start) * 1000
        if fitting:
            self.metrics.latency.observe(inference_ms)
            self.metrics.batch_size.observe(images)
        weights, answered = predictor.weights, iter(answers)
        return [[Classified(next(answered), weights.name, weights.version, ms, inference_ms, images)
                 for ms in p.preprocess_ms] if p in fitting else [PreparedForAnotherModel()] * len(p.pixels)
                for p in parts]

    def _launch(self, predictor: Predictor, pixels: list[np.ndarray],
                top_ks: tuple[int, ...]) -> Future[list[dict[str, object]]]:
        """On the inference thread: stage the batch and queue its forward pass, then hand the wait for the device
        and the answers to the completion thread, so that the next batch is staged and queued meanwhile. Chained
        here rather than from the event loop, so that a batch launched is always waited for (its staging memory
        freed) even if its caller is gone."""
        token = self.device_watch.launched()
        try:
            in_flight = predictor.launch(pixels)
        except BaseException as e:
            self.device_watch.finished(token, e)
            raise

        def complete() -> list[dict[str, object]]:
            try:
                logits = in_flight.wait()
            except BaseException as e:
                self.device_watch.finished(token, e)
                raise
            self.device_watch.finished(token)
            return _answers(predictor, logits, top_ks)

        return self._completion.submit(complete)

    def _require_model(self) -> Predictor:
        if self.predictor is None:
            raise RuntimeError(self.load_error or "the model is not loaded yet")
        return self.predictor

    def check_health(self) -> None:
        """Serve replaces a replica whose check raises: no model loaded, a failed device, or a batch stuck on it."""
        if self.predictor is None:
            raise RuntimeError(self.load_error or "the model is not loaded")
        self.device_watch.check()


def _answers(predictor: Predictor, logits: torch.Tensor, top_ks: tuple[int, ...]) -> list[dict[str, object]]:
    """Each image's answer with its own number of species, as the service sends it."""
    ranked = predictor.rank(logits, max(top_ks))
    return [ranked.answer(row, predictor.labels, k, predictor.names).to_dict() for row, k in enumerate(top_ks)]
