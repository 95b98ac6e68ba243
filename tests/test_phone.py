"""The model a phone saves (bcnn.phone): the served model's export with the service's rules in its metadata, or
the embedded default where the served model is too large."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import onnx
import pytest

from bcnn.answers import DEFAULT_WATERBIRD_THRESHOLD
from bcnn.checkpoint import save_checkpoint
from bcnn.models import build_model, get_weights
from bcnn.phone import parameter_bytes, phone_model


def _metadata(data: bytes) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load_model_from_string(data).metadata_props}


@pytest.fixture(scope="module")
def default():  # noqa: ANN201
    return get_weights("default")


def test_the_served_model_carries_the_services_thresholds(default) -> None:  # noqa: ANN001
    model = phone_model(default, max_bytes=2**30, waterbird_threshold=0.35, species_threshold=9.5)
    meta = _metadata(model.data)
    assert (model.name, model.species, model.same_as_service) == (default.name, len(default.labels), True)
    assert model.sha256 == hashlib.sha256(model.data).hexdigest()
    assert float(meta["waterbird_threshold"]) == 0.35
    assert json.loads(meta["species_rule"]) == {**default.species_rule.to_dict(), "threshold": 9.5}
    assert [json.loads(meta["categories"])[i] for i in json.loads(meta["answer_indices"])] == list(default.labels)
    # Other thresholds, another file: the URL a phone caches it under changes with it.
    again = phone_model(default, max_bytes=2**30, waterbird_threshold=0.35, species_threshold=9.5)
    other = phone_model(default, max_bytes=2**30, waterbird_threshold=0.3)
    assert again.sha256 == model.sha256 != other.sha256


def test_a_model_too_large_for_a_phone_is_answered_for_by_the_default(default, tmp_path: Path) -> None:  # noqa: ANN001
    checkpoint = tmp_path / "lite0-large.pt"
    save_checkpoint(checkpoint, build_model(default), arch=default.arch, categories=default.categories,
                    preprocess=default.preprocess, answer_indices=default.answer_indices)
    served = get_weights(str(checkpoint))
    model = phone_model(served, max_bytes=parameter_bytes(served) - 1, waterbird_threshold=0.35)
    assert (model.name, model.same_as_service) == (default.name, False)
    # The default keeps its own rules: the served model's threshold was set for the served model.
    assert float(_metadata(model.data)["waterbird_threshold"]) == DEFAULT_WATERBIRD_THRESHOLD
