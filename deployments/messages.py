"""What crosses the hops between stages: uint8 tensors and small results, never floats or PIL images."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from bcnn.predict import Answer
from bcnn.preprocess import Preprocess


@dataclass(frozen=True)
class Prepared:
    """Preprocessor -> Classifier: the image as a uint8 [3, H, W] tensor, plus what the metrics need."""

    image: Tensor
    pixels: int
    preprocess_ms: float


@dataclass(frozen=True)
class ModelCard:
    name: str
    version: str
    labels: tuple[str, ...]
    preprocess: Preprocess
    device: str


@dataclass(frozen=True)
class Classified:
    """Classifier -> Ingress."""

    answer: Answer
    model_name: str
    model_version: str
    preprocess_ms: float
    inference_ms: float
    batch_size: int
