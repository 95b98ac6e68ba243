"""From a uint8 batch to answers: the model's forward pass, then logits -> ranked species and `is_waterbird`."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from bcnn.allocator import keep_freed_memory
from bcnn.answers import DEFAULT_WATERBIRD_THRESHOLD, Answer, Ranked
from bcnn.backend_names import BackendName
from bcnn.backends import Backend, InFlight, build_backend
from bcnn.species import SpeciesRule, species_score
from bcnn.weights import Weights


def pick_device(requested: str | None = None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def rank_logits(logits: Tensor, answer_index: Tensor, *, top_k: int = 5,
                threshold: float = DEFAULT_WATERBIRD_THRESHOLD, rule: SpeciesRule | None = None,
                species_threshold: float | None = None, bird_index: Tensor | None = None) -> Ranked:
    """The `top_k` answer classes of each image, renormalised over the answer classes; whether the full softmax puts
    at least `threshold` of its mass on them (a waterbird), or else on the bird classes `bird_index` (a bird); whether
    the model knows the species and how sure it is that the top one is right (`bcnn.species`: the weights' rule, its
    threshold or `species_threshold`; without a rule, every waterbird's species counts as known and the confidence
    is the top class's softmax probability, uncalibrated)."""
    full = logits.softmax(dim=1)
    probs = full[:, answer_index]
    mass = probs.sum(dim=1)
    bird_mass = mass if bird_index is None else full[:, bird_index].sum(dim=1)
    scores = probs / mass.clamp_min(1e-12).unsqueeze(1)
    k = max(1, min(top_k, scores.shape[1]))
    top_scores, top_idx = scores.topk(k, dim=1)
    is_waterbird = mass >= threshold
    if rule is None:
        known, confidence = is_waterbird, probs.max(dim=1).values
    else:
        species = species_score(logits, answer_index)
        known = is_waterbird & rule.species_known(species, species_threshold)
        confidence = rule.confidence(species)
    return Ranked(top_idx.numpy(), top_scores.numpy(), mass.numpy(), is_waterbird.numpy(), bird_mass.numpy(),
                  (is_waterbird | (bird_mass >= threshold)).numpy(), known.numpy(), confidence.numpy())


class Predictor:
    """A loaded model plus what turns its logits into answers. Build once, call per batch."""

    def __init__(self, weights: Weights, *, device: str | torch.device | None = None,
                 threshold: float = DEFAULT_WATERBIRD_THRESHOLD, species_threshold: float | None = None,
                 backend: BackendName | Backend = "auto", threads: int | None = None,
                 cache_dir: str | os.PathLike[str] | None = None) -> None:
        """`backend`: where the forward pass runs, by name (`bcnn.backends`) or built (a `SimulatedDevice`);
        `threads`: its intra-op threads (None: the calling thread's torch setting); `cache_dir`: where ONNX
        Runtime's exported files are kept; `species_threshold`: instead of the weights' own (`bcnn.species`)."""
        keep_freed_memory()  # once per process: every forward pass reuses its buffers (bcnn/allocator.py)
        self.weights = weights
        self.device = pick_device(str(device) if device else None)
        self.threshold = threshold
        self.species_threshold = species_threshold
        if isinstance(backend, str):
            backend = build_backend(weights, device=self.device, backend=backend, threads=threads,
                                    cache_dir=cache_dir)
        self.backend = backend
        self.labels, self.names = weights.labels, weights.names
        answer = weights.answer_indices or range(len(weights.categories))
        self._answer_index = torch.tensor(list(answer), dtype=torch.long)
        self._bird_index = None if weights.bird_indices is None else torch.tensor(weights.bird_indices)

    def logits(self, images: Tensor) -> Tensor:
        """uint8 [N, 3, H, W] on any device -> float32 logits [N, C] on the CPU."""
        return self.backend(images)

    def launch(self, batches: Sequence[np.ndarray]) -> InFlight:
        """The forward pass of uint8 [n, H, W, 3] arrays as one batch, queued where the device works on its own;
        `.wait()` on the result gives the logits (`bcnn.backends`)."""
        return self.backend.launch(batches)

    def warm_up_rounds(self, max_batch_size: int, in_flight: int = 1) -> list[tuple[int, ...]]:
        """The batch sizes a warm-up runs before the model takes traffic, a round at a time (`warm_up`). On CUDA,
        first `in_flight` batches of the largest size at once, so the staging buffers every later batch fits in
        exist before traffic does; then every other size once: cuDNN chooses its plans and loads its kernels per
        input shape, and a batch may hold any number of images up to the largest. On the CPU a first pass at a new
        size costs what later ones do, so one image is enough."""
        if self.device.type != "cuda":
            return [(1,)]
        return [(max_batch_size,) * in_flight, *((n,) for n in range(1, max_batch_size))]

    def warm_up(self, sizes: Sequence[int]) -> None:
        """One forward pass of blank images per size, all in flight together, through the path a server takes.
        Call it on the thread that will run the real passes (CUDA and cuDNN keep per-thread state)."""
        side = self.weights.preprocess.crop_size
        in_flight: list[InFlight] = []
        try:
            for n in sizes:
                in_flight.append(self.launch([np.zeros((n, side, side, 3), dtype=np.uint8)]))
        finally:
            for batch in in_flight:  # each one waited for, so its staging buffers are given back
                batch.wait()

    def rank(self, logits: Tensor, top_k: int = 5) -> Ranked:
        return rank_logits(logits, self._answer_index, top_k=top_k, threshold=self.threshold,
                           rule=self.weights.species_rule, species_threshold=self.species_threshold,
                           bird_index=self._bird_index)

    def answers(self, logits: Tensor, top_k: int = 5) -> list[Answer]:
        ranked = self.rank(logits, top_k)
        return [ranked.answer(row, self.labels, names=self.names) for row in range(len(ranked))]

    def __call__(self, images: Tensor, top_k: int = 5) -> list[Answer]:
        return self.answers(self.logits(images), top_k)
