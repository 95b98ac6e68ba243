"""Which model answers an upload (`serve_app.candidates.route`) and how a shadow's answers are tallied."""

from __future__ import annotations

import random

import pytest

from bcnn.images import Preprocess
from deployments.config import Candidate
from deployments.messages import Catalog, ModelCard, ModelUnavailable, UnknownModel
from serve_app.candidates import Comparisons, resolve, route


def _catalog(*names: str, failed: dict[str, str] | None = None) -> Catalog:
    cards = {n: ModelCard(n, "1", ("a", "b"), Preprocess(), "cpu", "onnxruntime", 1) for n in names}
    return Catalog(names[0], cards, failed or {})


def test_a_name_is_resolved_or_refused_with_the_names_served() -> None:
    catalog = _catalog("lite0", "vgg", failed={"broken": "no such file"})
    assert resolve(None, catalog) == "lite0" and resolve("vgg", catalog) == "vgg"
    with pytest.raises(UnknownModel, match="lite0, vgg, broken"):
        resolve("nope", catalog)
    with pytest.raises(ModelUnavailable, match="no such file"):
        resolve("broken", catalog)


def test_a_canary_takes_its_share_of_the_uploads_and_a_shadow_its_fraction_of_the_rest() -> None:
    catalog = _catalog("lite0", "vgg")
    draw = random.Random(0).random
    canary = [route(None, catalog, {"lite0": Candidate(model="vgg", share=0.2)}, draw) for _ in range(10_000)]
    assert 0.19 < sum(r.model == "vgg" for r in canary) / 10_000 < 0.21
    assert all(r.shadow is None for r in canary)
    shadow = [route("lite0", catalog, {"lite0": Candidate(model="vgg", shadow=0.5)}, draw) for _ in range(10_000)]
    assert all(r.model == "lite0" for r in shadow)
    assert 0.48 < sum(r.shadow == "vgg" for r in shadow) / 10_000 < 0.52
    assert route("vgg", catalog, {"lite0": Candidate(model="vgg", share=1.0)}, draw).model == "vgg"  # named: itself
    everything = route(None, catalog, {"lite0": Candidate(model="vgg", shadow=1.0)}, draw)
    assert (everything.model, everything.shadow) == ("lite0", "vgg")


def test_a_candidate_not_served_is_passed_over() -> None:
    catalog = _catalog("lite0", failed={"vgg": "out of memory"})
    candidates = {"lite0": Candidate(model="vgg", share=1.0, shadow=1.0)}
    assert route(None, catalog, candidates).model == "lite0" and route(None, catalog, candidates).shadow is None


def test_comparisons_count_each_measure_and_what_was_dropped() -> None:
    comparisons = Comparisons()
    shown = {"is_waterbird": True, "species_known": True, "predictions": [{"label": "goose"}]}
    comparisons.compare("lite0", "vgg", shown, {**shown}, 10.0)
    comparisons.compare("lite0", "vgg", shown, {**shown, "species_known": False,
                                                "predictions": [{"label": "swan"}]}, 30.0)
    comparisons.compare("lite0", "vgg", shown, {"is_waterbird": False, "species_known": False, "predictions": []},
                        20.0)
    comparisons.dropped("lite0", "vgg")
    report = comparisons.report()[("lite0", "vgg")]
    assert report["compared"] == 3 and report["dropped"] == 1
    assert report["agreement"] == {"top1": round(1 / 3, 4), "is_waterbird": round(2 / 3, 4),
                                   "species_known": round(1 / 3, 4)}
    assert report["candidate_latency_ms_p50"] == 20.0
