"""What the model's answers are, as the service sends them between processes and to people: numpy only, so that
the HTTP face reads them without loading torch. `bcnn.predict` makes them from logits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_WATERBIRD_THRESHOLD = 0.2
"""Probability mass the full softmax must put on the answer classes to call a photo a waterbird.

Measured with the embedded default (docs/model.md, "Choosing the waterbird threshold"): 20 non-bird photos (a cat,
people, a rocket, coffee, textures...) put at most 0.026 on the waterbird classes; 78% of the 243 shared
waterbird photos put at least 0.2 there (the rest are species ImageNet does not have, such as gulls and grebes).
0.2 keeps an eightfold margin above everything that is not a bird.
"""


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float
    index: int


@dataclass(frozen=True)
class Answer:
    is_waterbird: bool
    waterbird_score: float
    species_known: bool
    """a waterbird whose species the model can tell: False where it cannot, as for one it was never taught
    (`bcnn.species`)"""
    species_confidence: float | None
    """the probability that `predictions[0]` is the species in the photo (calibrated where the model has a rule);
    None where the model cannot tell the species (`species_known` false): it has no number to give then"""
    predictions: tuple[Prediction, ...]

    def to_dict(self) -> dict[str, object]:
        """The answer as the service sends it: JSON-ready, each prediction its label and score. (Written out: the
        Classifier makes one per image, and `dataclasses.asdict` copied every field first.)"""
        return {"is_waterbird": self.is_waterbird, "waterbird_score": self.waterbird_score,
                "species_known": self.species_known, "species_confidence": self.species_confidence,
                "predictions": [{"label": p.label, "score": p.score} for p in self.predictions]}


@dataclass(frozen=True)
class Ranked:
    """A batch's answers as arrays, best first, as ranking gives them; `answer` makes one image's with the model's
    labels."""

    indices: np.ndarray
    """int64 [N, k]: positions in the model's labels"""
    scores: np.ndarray
    """float32 [N, k]: renormalised over the answer classes"""
    waterbird_scores: np.ndarray
    """float32 [N]: mass of the full softmax on the answer classes"""
    is_waterbird: np.ndarray
    """bool [N]: `waterbird_scores` at least the threshold"""
    species_known: np.ndarray
    """bool [N]: a waterbird, and the model knows its species (`bcnn.species`)"""
    species_confidence: np.ndarray
    """float32 [N]: the probability that the top species is the one in the photo"""

    def __len__(self) -> int:
        return len(self.scores)

    def __getitem__(self, rows: slice) -> Ranked:
        return Ranked(self.indices[rows], self.scores[rows], self.waterbird_scores[rows], self.is_waterbird[rows],
                      self.species_known[rows], self.species_confidence[rows])

    def answer(self, row: int, labels: Sequence[str], top_k: int | None = None) -> Answer:
        predictions = tuple(Prediction(labels[i], round(s, 6), i) for s, i in
                            zip(self.scores[row, :top_k].tolist(), self.indices[row, :top_k].tolist(), strict=True))
        known = bool(self.species_known[row])
        return Answer(bool(self.is_waterbird[row]), round(float(self.waterbird_scores[row]), 6), known,
                      round(float(self.species_confidence[row]), 6) if known else None, predictions)
