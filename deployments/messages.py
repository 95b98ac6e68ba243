"""What crosses the hops between stages: uint8 pixels and small results, never floats or PIL images.

A batch's pixels go from the Preprocessor to the Classifier one of two ways (`IngressConfig.pixels_by_reference`):
through Ray's object store, written once into shared memory by the Preprocessor and mapped by the Classifier while
the ingress hands on only a reference (a third less CPU per request in the one Classifier a GPU has), or in Serve's
gRPC messages through the ingress (lower latency on a small CPU). gRPC messages are limited to 4 MiB unless
`RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH` says otherwise: one phone photo or seven 448x448 images went over it.
Both serve configs raise it to gRPC's largest in the application's `runtime_env`, and the ingress keeps each call
under `CALL_BUDGET_BYTES` whichever way it goes (docs/serving.md, "Messages between stages").

Pixels travel as numpy arrays, channels last, as decoders and resizers write them and as a GPU model reads them
(channels_last): Ray pickles a torch tensor through torch's own serializer, several times slower than an array.

Uploads travel in batches (the ingress gathers the requests in flight): one call per stage carries many images,
so Serve's per-call cost is paid once per batch rather than once per image. The Classifier finishes each upload's
answer, and the ingress hands it on: nothing of the model's travels further than its answers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bcnn.images import ImageError, Preprocess

CALL_BUDGET_BYTES = 2**30
"""Upload bytes plus decoded pixels per call between stages: a batch of any size, upload size or input size is sent
as calls no larger than this, so that each fits a gRPC message (at most 2 GiB - 1, the value of
RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH in the serve configs) and no single object crowds the object store."""


@dataclass(frozen=True)
class PreparedBatch:
    """Preprocessor -> Classifier: a batch of uploads, the usable ones as one uint8 [N, H, W, 3] array in upload
    order, each refused one as its error (kept by position, answered by the ingress as that request's error)."""

    pixels: np.ndarray
    preprocess_ms: tuple[float, ...]
    """one per image"""
    rejected: dict[int, ImageError]
    """upload position -> why it was refused"""
    request_ids: tuple[str, ...]
    """one per upload, for the logs: a batch has no single request id of its own"""

    @property
    def size(self) -> int:
        return len(self.request_ids)


@dataclass(frozen=True)
class ModelCard:
    name: str
    """as served: what `?model=` names and answers say"""
    version: str
    labels: tuple[str, ...]
    preprocess: Preprocess
    device: str
    backend: str
    parameter_bytes: int
    """its float32 weights: whether a phone can save it (`bcnn.phone`)"""


@dataclass(frozen=True)
class Catalog:
    """What the Classifiers serve: every model by name (the default first) and those configured that did not load."""

    default: str
    cards: dict[str, ModelCard]
    failed: dict[str, str]
    """name -> why it could not be loaded"""

    @property
    def names(self) -> list[str]:
        return [*self.cards, *self.failed]


class UnknownModel(LookupError):
    """An upload names a model the service does not serve (404)."""

    def __init__(self, name: str, served: list[str]) -> None:
        super().__init__(f"No model is named {name[:80]!r}; this service serves: {', '.join(served)}.")


class ModelUnavailable(Exception):
    """A model configured but not loaded (it failed to, or was removed meanwhile): 503 for it alone."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"The model {name!r} cannot answer now: {reason}")
        self.name, self.reason = name, reason

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # crosses from a Classifier replica as an outcome
        return ModelUnavailable, (self.name, self.reason)


@dataclass(frozen=True)
class Classified:
    """One usable upload's answer, finished by the Classifier."""

    answer: dict[str, object]
    """`bcnn.answers.Answer.to_dict()`: level, is_bird, bird_score, is_waterbird, waterbird_score, species_known,
    species_confidence, predictions"""
    model_name: str
    model_version: str
    preprocess_ms: float
    inference_ms: float
    batch_size: int
    """images in the forward pass, other callers' included"""


@dataclass(frozen=True)
class PreparedForAnotherModel:
    """An upload decoded for the input size of the model served before a swap: the ingress sends it again,
    prepared for the model served now, so that even the first answers after a swap are exact."""


Outcome = Classified | ImageError | PreparedForAnotherModel | ModelUnavailable
"""What the Classifier answers for each upload of a batch, in upload order."""
