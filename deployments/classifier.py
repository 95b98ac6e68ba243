"""The BCNN replicas: every configured model loaded in each, by name; dynamic batching that never mixes models in
a forward pass; hot model swaps, additions and removals through `reconfigure`."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from ray import serve

from bcnn.backends import Backend
from bcnn.models import get_weights
from bcnn.phone import PhoneModel, parameter_bytes, phone_model
from bcnn.predict import Predictor
from bcnn.weights import Weights
from deployments.config import ClassifierConfig, ModelConfig
from deployments.device_watch import DeviceWatch
from deployments.messages import (
    Catalog,
    Classified,
    ModelCard,
    ModelUnavailable,
    Outcome,
    PreparedBatch,
    PreparedForAnotherModel,
)
from deployments.metrics import GAUGE_REFRESH_S, ClassifierMetrics
from deployments.threads import DedicatedThread

log = logging.getLogger("ray.serve")

# Batches the Classifier works on at once: one computing on the device, one staged and queued behind it so the device
# never waits for the host, one being ranked and answered (docs/performance.md, "The Classifier alone").
BATCHES_IN_FLIGHT = 3
# A change of any of these builds a new Predictor beside the old one.
_LOAD_FIELDS = ("checkpoint", "classes_file", "backend")


@dataclass(eq=False)
class _Served:
    """A model this replica serves under a name, and the phone's version of it once asked for."""

    name: str
    config: ModelConfig
    predictor: Predictor
    parameter_bytes: int
    phone: dict[int, PhoneModel] = field(default_factory=dict)  # by the largest size asked for


@dataclass(frozen=True, eq=False)
class _Images:
    """Part of one caller's batch for one model, at most one forward pass in size."""

    model: str
    pixels: np.ndarray
    """uint8 [n, H, W, 3]"""
    top_ks: tuple[int, ...]
    preprocess_ms: tuple[float, ...]


def _count_images(parts: list[_Images]) -> int:
    return sum(len(p.pixels) for p in parts)


@serve.deployment(name="Classifier", user_config={}, ray_actor_options={"num_cpus": 1})
class Classifier:
    """Holds the configured models for the replica's life. Uses the GPU Ray assigned it, or the CPU where torch sees
    none."""

    def __init__(self, backend_factory: Callable[[Weights], Backend] | None = None) -> None:
        """`backend_factory`: builds what runs the forward pass for each model loaded, instead of the backend the
        configuration names (the benchmarks' devices, load/devices.py)."""
        self.backend_factory = backend_factory
        self.config: ClassifierConfig | None = None
        self.served: dict[str, _Served] = {}
        self.default = ""  # the name of the model that answers uploads naming none
        self.failed: dict[str, str] = {}  # models configured that could not be loaded: name -> why
        # Batches are staged and their forward passes queued on one thread of their own (torch's thread settings
        # and CUDA's per-thread state stick); the waits for the device, and the ranking, on another. The event loop
        # stays free to gather the next batches and answer health checks meanwhile.
        self._inference = DedicatedThread("inference")
        self._completion = DedicatedThread("completion")
        self.metrics = ClassifierMetrics()
        self.device_watch = DeviceWatch()
        self._gauges: asyncio.Task[None] | None = None
        self._phone_lock = asyncio.Lock()
        if torch.cuda.is_available():
            log.info("Classifier on GPU %s (CUDA_VISIBLE_DEVICES=%s)", torch.cuda.get_device_name(0),
                     os.environ.get("CUDA_VISIBLE_DEVICES"))
        else:
            log.warning("Classifier: torch sees no GPU (CUDA_VISIBLE_DEVICES=%r); running on the CPU",
                        os.environ.get("CUDA_VISIBLE_DEVICES"))

    @property
    def predictor(self) -> Predictor | None:
        """The default model's."""
        served = self.served.get(self.default)
        return served.predictor if served else None

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply new settings. A model whose checkpoint or backend changed (or a new one) is loaded and warmed up
        beside the old one, on the inference thread, and swapped in only once it works, so requests in flight finish
        on the old one and none fails; a model no longer configured is dropped once the rest are in place. A model
        that does not load where an old one serves leaves the old one serving and fails the update, which
        `serve status` reports; a new model that does not load is answered for with a 503 (and listed so in
        /models) while the others serve, except the default: a replica without its default model does not start."""
        config = ClassifierConfig(**user_config)
        old = self.config
        reload_all = old is None or old.threads != config.threads
        wanted: list[tuple[str | None, ModelConfig]] = [(config.name, config.model()), *config.models.items()]
        served: dict[str, _Served] = {}
        errors: list[str] = []
        failed: dict[str, str] = {}
        default = ""
        for index, (name, spec) in enumerate(wanted):
            current = self.served.get(self.default) if index == 0 else self.served.get(name or "")
            if current is not None and not reload_all and all(
                    getattr(current.config, f) == getattr(spec, f) for f in _LOAD_FIELDS):
                current.predictor.threshold = spec.waterbird_threshold
                current.predictor.species_threshold = spec.species_threshold
                if old is not None and config.max_batch_size != old.max_batch_size:
                    await self._warm_up(current.predictor, config.max_batch_size)
                current = _Served(name or current.predictor.weights.name, spec, current.predictor,
                                  current.parameter_bytes)
            else:
                try:
                    current = await self._load(name, spec, config)
                except Exception as e:  # noqa: BLE001 - reported below, as this model's alone
                    reason = f"model {name or 'default'!r} ({spec.checkpoint}) failed to load: {e}"
                    log.error(reason)
                    if current is not None:  # the old one keeps serving; the update fails
                        errors.append(reason)
                    elif index == 0:
                        raise RuntimeError(reason) from None
                    else:
                        failed[name or ""] = reason
                        continue
            if current.name in served:
                raise ValueError(f"two models are named {current.name!r}: name the default model (`name`)")
            served[current.name] = current
            default = default or current.name
        self.served, self.default, self.failed = served, default, failed
        self.metrics.serving({name: {"model": name, "version": s.predictor.weights.version,
                                     "device": str(s.predictor.device), "backend": s.predictor.backend.name}
                              for name, s in served.items()})
        self._classify_batch.set_max_batch_size(config.max_batch_size)
        self._classify_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        self.config = config
        if self._gauges is None:
            self._gauges = asyncio.create_task(self._refresh_gauges())
        if errors:
            raise RuntimeError("; ".join(errors))

    async def _load(self, name: str | None, spec: ModelConfig, config: ClassifierConfig) -> _Served:
        start = time.perf_counter()
        try:
            weights = get_weights(spec.checkpoint, classes_file=spec.classes_file)
            backend = self.backend_factory(weights) if self.backend_factory else spec.backend
            # Built off the inference thread, which keeps answering with the old model meanwhile; warmed up on it.
            predictor = await asyncio.to_thread(Predictor, weights, threshold=spec.waterbird_threshold,
                                                species_threshold=spec.species_threshold, backend=backend,
                                                threads=config.threads)
            sizes = await self._warm_up(predictor, config.max_batch_size)
            size = await asyncio.to_thread(parameter_bytes, weights)
        except Exception as e:
            self.device_watch.failed(e)
            raise
        load_seconds = time.perf_counter() - start
        served = _Served(name or weights.name, spec, predictor, size)
        self.metrics.loaded(served.name, load_seconds)
        log.info("loaded model %s (%s version %s) on %s (%s, %d threads) in %.2f s, warmed up on the inference "
                 "thread for batch sizes %s", served.name, weights.name, weights.version, predictor.device,
                 predictor.backend.name, config.threads, load_seconds,
                 f"{sizes[0]}-{sizes[-1]}" if len(sizes) > 1 else sizes[0])
        return served

    async def _warm_up(self, predictor: Predictor, max_batch_size: int) -> list[int]:
        """On the inference thread, a round at a time: the models serving now launch their batches between them.
        Returns the sizes warmed, in order (every one from 1 up to a largest)."""
        rounds = predictor.warm_up_rounds(max_batch_size, in_flight=BATCHES_IN_FLIGHT)
        for sizes in rounds:
            await self._inference.run(predictor.warm_up, sizes)
        return sorted(set(itertools.chain.from_iterable(rounds)))

    async def _refresh_gauges(self) -> None:
        while True:
            await asyncio.sleep(GAUGE_REFRESH_S)
            self.metrics.refresh()

    def catalog(self) -> Catalog:
        """Every model this replica serves, the default first, and those that failed to load."""
        self._require_default()
        cards = {}
        for name, served in self.served.items():
            predictor, weights = served.predictor, served.predictor.weights
            cards[name] = ModelCard(name, weights.version, predictor.labels, weights.preprocess,
                                    str(predictor.device), predictor.backend.name, served.parameter_bytes)
        return Catalog(self.default, cards, dict(self.failed))

    async def phone_model_info(self, max_bytes: int, model: str = "") -> dict[str, object]:
        """What the page saves for offline use (`bcnn.phone`) for `model` (default: the default), without the file:
        made on the first request for a model (an export where none is cached: seconds, off the event loop), kept
        until the next reconfigure."""
        phone = await self._phone_model(max_bytes, model or self.default)
        return {"sha256": phone.sha256, "bytes": len(phone.data), "name": phone.name, "version": phone.version,
                "species": phone.species, "same_as_service": phone.same_as_service}

    async def phone_model_data(self, sha256: str, max_bytes: int, model: str = "") -> bytes | None:
        """The file `phone_model_info` described (made here too where another replica described it), if it is still
        the one this replica gives: None during a swap that changed it, or for a model no longer served."""
        if (model or self.default) not in self.served:
            return None
        phone = await self._phone_model(max_bytes, model or self.default)
        return phone.data if phone.sha256 == sha256 else None

    async def _phone_model(self, max_bytes: int, model: str) -> PhoneModel:
        async with self._phone_lock:
            served = self._require(model)
            if max_bytes in served.phone:
                return served.phone[max_bytes]
            spec = served.config
            phone = await asyncio.to_thread(
                phone_model, served.predictor.weights, max_bytes=max_bytes,
                waterbird_threshold=spec.waterbird_threshold, species_threshold=spec.species_threshold)
            log.info("phone model for %s: %s version %s, %.1f MB, sha256 %s", model, phone.name, phone.version,
                     len(phone.data) / 1e6, phone.sha256[:12])
            if self.served.get(model) is served and served.config is spec:  # no reconfigure meanwhile
                served.phone = {max_bytes: phone}
            return phone

    async def __call__(self, batch: PreparedBatch, top_ks: tuple[int, ...], model: str = "") -> list[Outcome]:
        """Each upload's outcome, in upload order: its answer from `model` (default: the default model) with its
        own `top_ks` species, or the error the Preprocessor refused it with. A batch larger than one forward pass
        is split; `@serve.batch` merges small ones from concurrent callers, for the same model, into one pass."""
        self._require_default()
        assert self.config is not None
        model = model or self.default
        if model not in self.served:  # removed, or failed to load, since the caller looked
            reason = self.failed.get(model, f"the model {model!r} is not served now")
            return [batch.rejected.get(i, ModelUnavailable(model, reason)) for i in range(batch.size)]
        usable = [i for i in range(batch.size) if i not in batch.rejected]
        step = self.config.max_batch_size
        parts = [_Images(model, batch.pixels[i:i + step], tuple(top_ks[u] for u in usable[i:i + step]),
                         batch.preprocess_ms[i:i + step]) for i in range(0, len(usable), step)]
        try:
            answered = iter(itertools.chain.from_iterable(await asyncio.gather(*map(self._classify_batch, parts))))
        except Exception as e:
            # Sent on as a builtin type: the ingress, which never loads torch, would import it to unpickle one of
            # torch's (out of memory, a CUDA error); it answers any failure here as a 500 all the same.
            raise RuntimeError(f"the forward pass failed: {type(e).__name__}: {e}") from e
        log.info("classified %d of %d uploads with %s", len(usable), batch.size, model,
                 extra={"request_ids": batch.request_ids})
        return [batch.rejected[i] if i in batch.rejected else next(answered) for i in range(batch.size)]

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0, batch_size_fn=_count_images,
                 max_concurrent_batches=BATCHES_IN_FLIGHT)
    async def _classify_batch(self, parts: list[_Images]) -> list[list[Outcome]]:
        if all(p.model == parts[0].model for p in parts):  # one model served, or one asked for: no regrouping
            return await self._classify_model(parts[0].model, parts)
        by_model: dict[str, list[_Images]] = {}
        for part in parts:
            by_model.setdefault(part.model, []).append(part)
        outcomes = dict(zip(by_model, await asyncio.gather(*(self._classify_model(m, p) for m, p in by_model.items())),
                            strict=True))
        done = {id(p): o for model, ps in by_model.items() for p, o in zip(ps, outcomes[model], strict=True)}
        return [done[id(p)] for p in parts]

    async def _classify_model(self, model: str, parts: list[_Images]) -> list[list[Outcome]]:
        """One forward pass of `model` for `parts` (a batch never mixes models)."""
        served = self.served.get(model)  # one model for the whole pass, even if a swap lands meanwhile
        if served is None:  # removed between the call and its batch
            reason = self.failed.get(model, f"the model {model!r} is not served now")
            return [[ModelUnavailable(model, reason)] * len(p.pixels) for p in parts]
        predictor = served.predictor
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
            self.metrics.latency.observe(inference_ms, tags={"model": model})
            self.metrics.batch_size.observe(images, tags={"model": model})
        version, answered = predictor.weights.version, iter(answers)
        return [[Classified(next(answered), model, version, ms, inference_ms, images) for ms in p.preprocess_ms]
                if p in fitting else [PreparedForAnotherModel()] * len(p.pixels) for p in parts]

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

    def _require(self, model: str) -> _Served:
        self._require_default()
        served = self.served.get(model)
        if served is None:
            raise ModelUnavailable(model, self.failed.get(model, f"the model {model!r} is not served now"))
        return served

    def _require_default(self) -> None:
        if not self.served:
            raise RuntimeError("the model is not loaded yet")

    def check_health(self) -> None:
        """Serve replaces a replica whose check raises: no model loaded, a failed device, or a batch stuck on it."""
        self._require_default()
        self.device_watch.check()


def _answers(predictor: Predictor, logits: torch.Tensor, top_ks: tuple[int, ...]) -> list[dict[str, object]]:
    """Each image's answer with its own number of species, as the service sends it."""
    ranked = predictor.rank(logits, max(top_ks))
    return [ranked.answer(row, predictor.labels, k, predictor.names).to_dict() for row, k in enumerate(top_ks)]
