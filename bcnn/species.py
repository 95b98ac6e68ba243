"""Whether an answer names a species the model knows, and how sure it is.

A classifier answers every photo with one of its species, also a photo of a species it was never taught. The
largest logit among its answer classes (`species_score`) separates the two: photos of species the model knows
reach higher logits than photos of species it does not (on the shared photos, for the embedded default, an AUROC
of 0.91, the best of the scores compared in docs/model.md, "Species the model does not know"). Below the rule's
threshold the answer is "a waterbird, species uncertain": the model cannot tell which, and it may be one it was not
taught (a low score is all it has, so the words claim no more), with the closest species it knows still listed as such.

The rule answers two questions apart. Whether the model knows the species: the score against a threshold chosen by a
stated procedure (`tolerance_threshold`: at least 90% of known-species answers kept, with 90% confidence, from their
scores on labelled photos). And, where it does, whether the species it names is the right one: the confidence,
`sigmoid(slope x score + intercept)` (Platt scaling), fitted only on answers judged known, of photos of species the
model knows, with Platt's own smoothed targets so that a fit on a few photos stays finite. An answer judged unknown
carries no confidence at all.

A rule travels with the weights (the registry's entry, a checkpoint's metadata, the ONNX export's metadata), so the
service, `bcnn predict`, the export and the phone apply the same one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

import numpy as np
import torch
from torch import Tensor

SCORE = "max_logit"
"""The score every rule thresholds: the largest logit among the answer classes."""
KEEP_KNOWN = 0.9
"""Share of known-species answers a fitted threshold keeps..."""
ASSURANCE = 0.9
"""...with this confidence, from the labelled photos at hand."""


@dataclass(frozen=True)
class SpeciesRule:
    threshold: float
    """`species_score` at or above which the model knows the species"""
    slope: float
    intercept: float
    fitted_on: str = ""
    """what the rule was measured on, for the people reading it"""

    def species_known(self, scores: Tensor, threshold: float | None = None) -> Tensor:
        return scores >= (self.threshold if threshold is None else threshold)

    def confidence(self, scores: Tensor) -> Tensor:
        """The probability that the top species is the one in the photo."""
        return torch.sigmoid(self.slope * scores.float() + self.intercept)

    def to_dict(self) -> dict[str, Any]:
        return {"score": SCORE, **asdict(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SpeciesRule:
        if d.get("score", SCORE) != SCORE:
            raise ValueError(f"unknown species score {d.get('score')!r}; this version reads {SCORE!r}")
        return cls(float(d["threshold"]), float(d["slope"]), float(d["intercept"]), str(d.get("fitted_on", "")))


def species_score(logits: Tensor, answer_index: Tensor) -> Tensor:
    """float [N]: the largest logit among the answer classes."""
    return logits[:, answer_index].max(dim=1).values


def fit(scores: np.ndarray, right: np.ndarray, *, threshold: float | None = None, fitted_on: str = "") -> SpeciesRule:
    """A rule from the answers to labelled photos of species the model knows: `scores` of the top species, `right`
    whether it was the species in the photo. The threshold, unless given, is `tolerance_threshold` of all their
    scores; the confidence is calibrated on the answers at or above it (judged known)."""
    scores, right = np.asarray(scores, dtype=np.float64), np.asarray(right, dtype=np.float64)
    if threshold is None:
        threshold = tolerance_threshold(scores)
    judged_known = scores >= threshold
    slope, intercept = platt(scores[judged_known], right[judged_known]) if judged_known.any() else (0.0, 0.0)
    # Plain floats: a checkpoint keeps the rule, and its loader refuses anything but plain data and tensors.
    return SpeciesRule(round(float(threshold), 4), round(float(slope), 6), round(float(intercept), 6), fitted_on)


def tolerance_threshold(scores: np.ndarray, *, keep: float = KEEP_KNOWN, assurance: float = ASSURANCE) -> float:
    """A score below which at most 1 - `keep` of known-species answers fall, with confidence `assurance`: the
    one-sided lower tolerance bound of a normal fitted to `scores` (mean - k x standard deviation, k by the
    Natrella approximation of the non-central t). A quantile of the photos at hand would keep `keep` of them and
    fewer of the next ones; with a handful of photos the bound says how far below them to go. The lowest score
    where there are too few to fit a spread (fewer than 4)."""
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    if n < 4:
        return float(scores.min())
    z_keep, z_sure = NormalDist().inv_cdf(keep), NormalDist().inv_cdf(assurance)
    a = 1 - z_sure**2 / (2 * (n - 1))
    b = z_keep**2 - z_sure**2 / n
    k = (z_keep + math.sqrt(max(z_keep**2 - a * b, 0.0))) / a
    return float(scores.mean() - k * scores.std(ddof=1))


def platt(scores: np.ndarray, right: np.ndarray, *, l2: float = 1e-2, steps: int = 50) -> tuple[float, float]:
    """Logistic regression of `right` on `scores` (Newton's method on standardised scores, a small L2 penalty on
    the slope), fitted to Platt's smoothed targets, (positives + 1) / (positives + 2) for a right answer and
    1 / (negatives + 2) for a wrong one: a few answers, all right, give a confidence below 1 (10 of 10: 0.917),
    not a certainty. (slope, intercept) on the scores' own scale."""
    positives = float(right.sum())
    target = np.where(right > 0, (positives + 1) / (positives + 2), 1 / (len(right) - positives + 2))
    mean, std = float(scores.mean()), float(scores.std()) or 1.0
    z = (scores - mean) / std
    rate = float(target.mean())
    a, b = 0.0, math.log(rate / (1 - rate))
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(a * z + b)))
        w = p * (1 - p)
        gradient = np.array([((p - target) * z).sum() + l2 * a, (p - target).sum()])
        hessian = np.array([[(w * z * z).sum() + l2, (w * z).sum()], [(w * z).sum(), w.sum() + 1e-9]])
        a, b = np.array([a, b]) - np.linalg.solve(hessian, gradient)
    return float(a / std), float(b - a * mean / std)


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson interval of a share `hits` / `n`: honest at 10 of 10, where the normal one says [1, 1]."""
    if n == 0:
        return (0.0, 1.0)
    p = hits / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (round((centre - half) / (1 + z * z / n), 4), round((centre + half) / (1 + z * z / n), 4))


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a positive scores above a negative (ties count half)."""
    pos, neg = np.asarray(scores)[positive], np.asarray(scores)[~np.asarray(positive)]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def auroc_interval(scores: np.ndarray, positive: np.ndarray, *, resamples: int = 2000,
                   seed: int = 0) -> tuple[float, float]:
    """The 95% percentile-bootstrap interval of `auroc`, the positives and the negatives resampled apart (so that each
    resample keeps both): with ten positives, how far the figure could move on other photos like these."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    pos, neg = scores[positive], scores[~positive]
    if not len(pos) or not len(neg):
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        p, n = rng.choice(pos, len(pos)), rng.choice(neg, len(neg))
        greater = (p[:, None] > n[None, :]).sum() + 0.5 * (p[:, None] == n[None, :]).sum()
        values.append(greater / (len(p) * len(n)))
    low, high = np.quantile(values, [0.025, 0.975])
    return (round(float(low), 4), round(float(high), 4))


def reliability(confidence: np.ndarray, right: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """Expected calibration error and the reliability diagram's bins (equal width): for each bin, how many answers,
    their mean confidence and the share of them that were right."""
    confidence, right = np.asarray(confidence, dtype=np.float64), np.asarray(right, dtype=np.float64)
    index = np.minimum((confidence * bins).astype(int), bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        mask = index == b
        if not mask.any():
            continue
        mean_confidence, accuracy = float(confidence[mask].mean()), float(right[mask].mean())
        ece += mask.mean() * abs(mean_confidence - accuracy)
        rows.append({"bin": [b / bins, (b + 1) / bins], "answers": int(mask.sum()),
                     "confidence": round(mean_confidence, 4), "right": round(accuracy, 4)})
    return {"ece": round(float(ece), 4), "bins": rows}
