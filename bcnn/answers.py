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


LEVELS = ("species", "waterbird", "bird", "not_a_bird")
"""How far an answer goes, from the most the model can support down: a species it knows; a waterbird whose species
it cannot tell; a bird, where the answer classes hold too little and the bird classes enough; probably not a bird."""


@dataclass(frozen=True)
class Prediction:
    label: str
    """the model's class name (an ImageNet class for the embedded default)"""
    score: float
    index: int
    name: str = ""
    """what a birder writes for it (`Weights.display_names`); the label where they are the same"""


@dataclass(frozen=True)
class Answer:
    level: str
    """one of `LEVELS`: what the answer can say"""
    is_bird: bool
    bird_score: float
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
        """The answer as the service sends it: JSON-ready, each prediction its label, name and score. (Written out: the
        Classifier makes one per image, and `dataclasses.asdict` copied every field first.)"""
        return {"level": self.level, "is_bird": self.is_bird, "bird_score": self.bird_score,
                "is_waterbird": self.is_waterbird, "waterbird_score": self.waterbird_score,
                "species_known": self.species_known, "species_confidence": self.species_confidence,
                "predictions": [{"label": p.label, "name": p.name, "score": p.score} for p in self.predictions]}


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
    bird_scores: np.ndarray
    """float32 [N]: mass of the full softmax on the bird classes (the answer classes among them)"""
    is_bird: np.ndarray
    """bool [N]: a waterbird, or `bird_scores` at least the threshold"""
    species_known: np.ndarray
    """bool [N]: a waterbird, and the model knows its species (`bcnn.species`)"""
    species_confidence: np.ndarray
    """float32 [N]: the probability that the top species is the one in the photo"""

    def __len__(self) -> int:
        return len(self.scores)

    def __getitem__(self, rows: slice) -> Ranked:
        return Ranked(self.indices[rows], self.scores[rows], self.waterbird_scores[rows], self.is_waterbird[rows],
                      self.bird_scores[rows], self.is_bird[rows], self.species_known[rows],
                      self.species_confidence[rows])

    def answer(self, row: int, labels: Sequence[str], top_k: int | None = None,
               names: Sequence[str] | None = None) -> Answer:
        """One image's answer with the model's labels (and a birder's names for them, where they differ)."""
        names = names or labels
        predictions = tuple(Prediction(labels[i], round(s, 6), i, names[i]) for s, i in
                            zip(self.scores[row, :top_k].tolist(), self.indices[row, :top_k].tolist(), strict=True))
        known, waterbird, bird = (bool(a[row]) for a in (self.species_known, self.is_waterbird, self.is_bird))
        level = LEVELS[0] if known else LEVELS[1] if waterbird else LEVELS[2] if bird else LEVELS[3]
        return Answer(level, bird, round(float(self.bird_scores[row]), 6), waterbird,
                      round(float(self.waterbird_scores[row]), 6), known,
                      round(float(self.species_confidence[row]), 6) if known else None, predictions)
