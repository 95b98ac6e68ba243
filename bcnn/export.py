"""The model off PyTorch: an ONNX file (or an ExecuTorch program) that carries all a caller needs, and a check that
it answers as PyTorch does.

The file takes what the model takes: uint8 images [N, 3, S, S] (any N), normalisation inside, logits out. Its
metadata holds the rest: input size and resize rule, mean/std (informative: already applied inside), the class
names, which of them are answers, the waterbird threshold, the model's name and version, and `content_sha256`,
the hash of the tensors it was exported from, which the serving cache (`bcnn.backends`) keys its files by.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bcnn.answers import DEFAULT_WATERBIRD_THRESHOLD
from bcnn.models import ImageClassifier, build_model, prepare_for_inference
from bcnn.weights import Weights

FORMAT = "waterbirds-onnx"
FORMAT_VERSION = 1
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
LOGIT_TOLERANCE = 1e-3
"""Largest |exported logit - PyTorch logit| `verify` accepts, relative to the largest |PyTorch logit| of the images
checked (float32 both; measured on the shared photos: the embedded default 1.1e-6 in ONNX Runtime and 1.8e-6 in
ExecuTorch, a VGG16-BCNN at 448 8.3e-5)."""


class OnnxModelError(ValueError):
    """An ONNX file that cannot serve a given model; the message names the file and what does not match."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


def content_sha256(weights: Weights) -> str:
    """What an exported file depends on: the weights' tensors (their `fingerprint` where they have one), classes,
    architecture and preprocessing, the exporter. Builds no model, so a cached export is found without one."""
    digest = hashlib.sha256(json.dumps([FORMAT_VERSION, torch.__version__, weights.arch, weights.preprocess.to_dict(),
                                        weights.categories, weights.answer_indices]).encode())
    if weights.fingerprint is not None:
        digest.update(weights.fingerprint().encode())
        return digest.hexdigest()
    for name, tensor in sorted(weights.load().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().data)  # the buffer itself, not a copy
    return digest.hexdigest()


def metadata(weights: Weights, content: str, threshold: float = DEFAULT_WATERBIRD_THRESHOLD) -> dict[str, str]:
    """The ONNX file's `metadata_props`: strings, JSON where structured."""
    answers = weights.answer_indices if weights.answer_indices is not None else range(len(weights.categories))
    return {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "name": weights.name,
        "version": weights.version,
        "arch": weights.arch,
        "input": json.dumps({"name": INPUT_NAME, "dtype": "uint8", "layout": "NCHW", "channels": "RGB",
                             "normalised_inside": True}),
        "preprocess": json.dumps(weights.preprocess.to_dict()),
        "categories": json.dumps(list(weights.categories), ensure_ascii=False),
        "answer_indices": json.dumps(list(answers)),
        # The bird classes an answer rolls up to "a bird" with ("null": the answer classes alone), and a birder's
        # names for labels that are not names.
        "bird_indices": json.dumps(list(weights.bird_indices) if weights.bird_indices is not None else None),
        "display_names": json.dumps(dict(weights.display_names), ensure_ascii=False),
        "waterbird_threshold": str(threshold),
        # How an app tells a species the model knows from one it does not, and its calibrated confidence
        # (bcnn.species); "null" for a model without a rule.
        "species_rule": json.dumps(weights.species_rule.to_dict() if weights.species_rule else None),
        "content_sha256": content,
        "exported_with": f"torch {torch.__version__}",
    }


def export_onnx(weights: Weights, model: ImageClassifier | None = None) -> tuple[bytes, str]:
    """The serialised ONNX model of `weights` (a model already built from them may be passed) and its
    `content_sha256`. Takes seconds (torch.export traces the model): never call it per request."""
    import onnx

    model = model if model is not None else prepare_for_inference(build_model(weights))
    content = content_sha256(weights)
    with _exporting():
        program = torch.onnx.export(model, (_example(weights),), dynamo=True, verbose=False, optimize=True,
                                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}})
    proto = program.model_proto
    onnx.helper.set_model_props(proto, metadata(weights, content))
    return proto.SerializeToString(), content


PTE_MAX_BATCH = 64
"""ExecuTorch plans its memory for the largest batch; a phone classifies one photo at a time."""


def export_pte(weights: Weights, model: ImageClassifier | None = None) -> tuple[bytes, dict[str, str]]:
    """An ExecuTorch program (`.pte`) of `weights` with the model's convolutions delegated to XNNPACK, and the
    metadata an app needs (`metadata`; a `.pte` has no place of its own for it). Needs the `mobile` extra."""
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
    except ImportError as e:
        raise RuntimeError("ExecuTorch is not installed: pip install -e '.[mobile]'") from e

    model = model if model is not None else prepare_for_inference(build_model(weights))
    with _exporting():
        program = torch.export.export(model, (_example(weights),), dynamic_shapes={
            "x": {0: torch.export.Dim("batch", min=1, max=PTE_MAX_BATCH)}})
        lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
    return lowered.buffer, metadata(weights, content_sha256(weights))


def _example(weights: Weights) -> torch.Tensor:
    side = weights.preprocess.crop_size
    return torch.zeros(2, 3, side, side, dtype=torch.uint8)  # 2, not 1: a batch of 1 would be traced as a constant


@contextlib.contextmanager
def _exporting() -> Iterator[None]:
    """The exporters print their progress, log their passes and warn about their own internals; a library keeps
    quiet."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _quiet(
            "onnx_ir", "onnxscript", "torch.onnx", "torch.export", "executorch", "torchao"):
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    saved = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def write_atomically(path: str | os.PathLike[str], data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class Verification:
    images: int
    top1_equal: int
    max_abs_logit_diff: float
    max_abs_logit: float
    tolerance: float = LOGIT_TOLERANCE

    @property
    def relative_diff(self) -> float:
        return self.max_abs_logit_diff / max(self.max_abs_logit, 1e-30)

    @property
    def passed(self) -> bool:
        return self.top1_equal == self.images and self.relative_diff <= self.tolerance

    def __str__(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (f"{verdict}: top-1 equal on {self.top1_equal} of {self.images} images; largest logit difference "
                f"{self.max_abs_logit_diff:.2g}, {self.relative_diff:.2g} of the largest logit "
                f"{self.max_abs_logit:.3g} (tolerance {self.tolerance:g})")


def verify(reference: ImageClassifier, forward: Callable[[torch.Tensor], Any], images: Sequence[torch.Tensor],
           batch_size: int = 8) -> Verification:
    """An exported model (`forward`: a uint8 batch in, logits out, as a tensor or an array) against the PyTorch
    model it came from, on uint8 CHW images of the model's input size."""
    top1_equal, largest, scale = 0, 0.0, 0.0
    for start in range(0, len(images), batch_size):
        batch = torch.stack(list(images[start:start + batch_size]))
        with torch.inference_mode():
            expected = reference(batch).numpy()
        got = np.asarray(forward(batch))
        top1_equal += int((expected.argmax(1) == got.argmax(1)).sum())
        largest = max(largest, float(np.abs(expected - got).max()))
        scale = max(scale, float(np.abs(expected).max()))
    return Verification(len(images), top1_equal, largest, scale)


def onnxruntime_forward(session: Any) -> Callable[[torch.Tensor], np.ndarray]:
    return lambda batch: session.run([OUTPUT_NAME], {INPUT_NAME: batch.numpy()})[0]


def executorch_forward(path: str | os.PathLike[str]) -> Callable[[torch.Tensor], torch.Tensor]:
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(Path(path)).load_method("forward")
    return lambda batch: method.execute([batch])[0]
