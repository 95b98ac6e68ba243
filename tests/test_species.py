"""`bcnn.species`: the rule's arithmetic, on data whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bcnn.species import SpeciesRule, auroc, fit, reliability, species_score


def test_the_score_is_the_largest_logit_among_the_answer_classes() -> None:
    logits = torch.tensor([[9.0, 1.0, 3.0, 2.0], [0.0, 5.0, 4.0, 7.0]])
    assert species_score(logits, torch.tensor([1, 2])).tolist() == [3.0, 5.0]  # class 0 and 3 are not answers


def test_auroc_counts_the_pairs_ordered_rightly() -> None:
    scores = np.array([0.9, 0.8, 0.4, 0.3, 0.8])
    positive = np.array([True, True, False, False, False])
    assert auroc(scores, positive) == pytest.approx((3 + 2.5) / 6)  # 0.8 against 0.8 counts half


def test_a_fitted_confidence_matches_how_often_answers_are_right() -> None:
    rng = np.random.default_rng(0)
    scores = rng.uniform(0, 10, 20_000)
    truth = 1 / (1 + np.exp(-(0.8 * scores - 4)))  # answers at score s are right this often
    right = rng.random(scores.size) < truth
    rule = fit(scores, right, threshold=5.0)
    assert rule.slope == pytest.approx(0.8, rel=0.1) and rule.intercept == pytest.approx(-4, rel=0.1)
    confidence = rule.confidence(torch.from_numpy(scores)).numpy()
    assert reliability(confidence, right)["ece"] < 0.02
    assert reliability(np.full(scores.size, 0.99), right)["ece"] > 0.4  # "99%" for answers right half the time


def test_without_a_threshold_it_keeps_95_percent_of_the_right_answers() -> None:
    scores = np.arange(100, dtype=float)
    rule = fit(scores, np.ones(100, dtype=bool))
    assert rule.threshold == pytest.approx(np.quantile(scores, 0.05))
    assert rule.species_known(torch.from_numpy(scores)).float().mean() == pytest.approx(0.95, abs=0.01)
    assert not rule.species_known(torch.tensor([80.0]), threshold=90.0)  # the service's own threshold wins


def test_a_rule_round_trips_as_plain_data_and_refuses_a_score_it_does_not_know() -> None:
    rule = SpeciesRule(8.0, 0.9, -10.0, "photos")
    assert SpeciesRule.from_dict(rule.to_dict()) == rule
    assert all(type(v) in (str, float) for v in rule.to_dict().values())
    with pytest.raises(ValueError, match="unknown species score"):
        SpeciesRule.from_dict({**rule.to_dict(), "score": "energy"})
