"""The model a phone runs offline: the served model's ONNX export (`bcnn.export`) where it is small enough for a
phone, else the embedded default's.

The graph is the export the ONNX Runtime backend caches (`bcnn.backends.onnx_file`), so it is made once per model;
its metadata (labels, preprocessing, the rules of an answer with the thresholds the service applies) is written anew
in memory, so that it says what the service says now. The bytes' SHA-256 names the file in its URL, so a phone never
keeps a stale one.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from bcnn.answers import DEFAULT_WATERBIRD_THRESHOLD
from bcnn.backends import onnx_file
from bcnn.export import content_sha256, metadata
from bcnn.models import get_weights
from bcnn.weights import Weights

DEFAULT_MAX_MB = 40.0
"""Largest float32 model sent to a phone: the embedded default is 19 MB, a BCNN on Lite0 about 21 MB, the
VGG16-BCNN at 448 269 MB."""


@dataclass(frozen=True)
class PhoneModel:
    data: bytes
    """the ONNX file"""
    sha256: str
    name: str
    version: str
    species: int
    """classes it answers with"""
    same_as_service: bool
    """False where the service's model was too large and the phone gets the embedded default"""


def parameter_bytes(weights: Weights) -> int:
    """The size of the weights' tensors, which an ONNX export's size follows within a few percent."""
    return sum(t.numel() * t.element_size() for t in weights.load().values())


def phone_model(weights: Weights, *, max_bytes: int, waterbird_threshold: float,
                species_threshold: float | None = None,
                cache_dir: str | os.PathLike[str] | None = None) -> PhoneModel:
    """The phone's model for a service serving `weights` with these thresholds. Exports (seconds) on the first call
    for a model; reads the cached file after."""
    import onnx

    same = parameter_bytes(weights) <= max_bytes
    chosen = weights if same else get_weights("default")
    source = onnx_file(chosen, cache_dir)
    proto = onnx.load_model_from_string(source.read_bytes() if isinstance(source, Path) else source)
    # The graph comes from the cache; the metadata is written now, as the service applies it (the default keeps its
    # own rules where it stands in for a larger model).
    props = metadata(chosen, content_sha256(chosen), waterbird_threshold if same else DEFAULT_WATERBIRD_THRESHOLD)
    if same and species_threshold is not None and chosen.species_rule is not None:
        props["species_rule"] = json.dumps({**chosen.species_rule.to_dict(), "threshold": species_threshold})
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, props)
    data = proto.SerializeToString()
    return PhoneModel(data, hashlib.sha256(data).hexdigest(), chosen.name, chosen.version, len(chosen.labels), same)
