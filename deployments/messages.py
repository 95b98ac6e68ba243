"""What crosses the hops between stages: uint8 pixels and small results, never floats or PIL images.

Pixels travel as numpy arrays, channels last, as decoders and resizers write them and as a GPU model reads them
(channels_last): Ray pickles a torch tensor through torch's own serializer, several times slower than an array.

Uploads travel in batches (the ingress gathers the requests in flight): one call per stage carries many images,
so Serve's per-call cost is paid once per batch rather than once per image.

With `RAY_SERVE_THROUGHPUT_OPTIMIZED` these calls are gRPC messages, which Ray limits to 4 MiB unless
`RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH` says otherwise: a single phone photo, or a batch of seven 448x448
images (602 KB each), went over it and failed. Both serve configs set that limit to gRPC's largest,
`MAX_MESSAGE_BYTES`, in the application's `runtime_env`, so every replica has it wherever it runs, and the
ingress keeps each call's payload under `MESSAGE_BUDGET_BYTES` (README, "Messages between stages").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bcnn.predict import Answer
from bcnn.preprocess import ImageError, Preprocess

MAX_MESSAGE_BYTES = 2**31 - 1
"""gRPC's largest message; the value of RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH in the serve configs."""
MESSAGE_BUDGET_BYTES = MAX_MESSAGE_BYTES // 2
"""Upload bytes plus decoded pixels per call, with room to spare for pickling and the rest of the message."""


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
    version: str
    labels: tuple[str, ...]
    preprocess: Preprocess
    device: str


@dataclass(frozen=True)
class Classified:
    """Classifier -> Ingress, one per usable upload."""

    answer: Answer
    model_name: str
    model_version: str
    preprocess_ms: float
    inference_ms: float
    batch_size: int


Outcome = Classified | ImageError
"""What the pipeline answers for each upload of a batch."""
