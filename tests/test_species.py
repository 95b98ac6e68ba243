"""`bcnn.species`: the rule's arithmetic, on data whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bcnn.species import (
    SpeciesRule,
    auroc,
    auroc_interval,
    fit,
    platt,
    reliability,
    species_score,
    tolerance_threshold,
    wilson,
)


def test_the_score_is_the_largest_logit_among_the_answer_classes() -> None:
    logits = torch.tensor([[9.0, 1.0, 3.0, 2.0], [0.0, 5.0, 4.0, 7.0]])
    assert species_score(logits, torch.tensor([1, 2])).tolist() == [3.0, 5.0]  # class 0 and 3 are not answers


def test_auroc_counts_the_pairs_ordered_rightly() -> None:
    scores = np.array([0.9, 0.8, 0.4, 0.3, 0.8])
    positive = np.array([True, True, False, False, False])
    assert auroc(scores, positive) == pytest.approx((3 + 2.5) / 6)  # 0.8 against 0.8 counts half


def test_the_aurocs_interval_holds_it_and_narrows_with_more_photos() -> None:
    rng = np.random.default_rng(2)
    def sample(n_pos: int, n_neg: int) -> tuple[np.ndarray, np.ndarray]:
        scores = np.concatenate([rng.normal(1.5, 1, n_pos), rng.normal(0, 1, n_neg)])
        return scores, np.arange(n_pos + n_neg) < n_pos
    few, many = sample(10, 233), sample(400, 2000)
    (low, high), (low_many, high_many) = auroc_interval(*few, resamples=500), auroc_interval(*many, resamples=200)
    assert low <= auroc(*few) <= high and low_many <= auroc(*many) <= high_many
    assert high - low > 3 * (high_many - low_many)


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


def test_a_fitted_threshold_keeps_90_percent_of_unseen_known_answers_nine_times_in_ten() -> None:
    """The tolerance bound's promise, checked where it can be: thresholds fitted on 10 scores drawn from a normal
    keep at least 90% of that normal in about 90% of the draws (a quantile of the 10 would in about a third)."""
    rng = np.random.default_rng(1)
    kept = []
    for _ in range(4000):
        threshold = tolerance_threshold(rng.normal(9.0, 0.7, 10))
        kept.append(0.5 * math.erfc((threshold - 9.0) / (0.7 * math.sqrt(2))) >= 0.9)
    assert np.mean(kept) == pytest.approx(0.9, abs=0.02)
    rule = fit(rng.normal(9.0, 0.7, 10), np.ones(10, dtype=bool))
    assert not rule.species_known(torch.tensor([80.0]), threshold=90.0)  # the service's own threshold wins


def test_a_few_answers_all_right_give_a_confidence_below_certainty() -> None:
    """Platt's smoothed targets: 10 right answers of 10 say 'about 11 in 12', not 'always', and no slope."""
    slope, intercept = platt(np.linspace(8.4, 10.6, 10), np.ones(10))
    assert slope == pytest.approx(0.0, abs=1e-9) and 1 / (1 + math.exp(-intercept)) == pytest.approx(11 / 12)
    assert wilson(10, 10)[0] == pytest.approx(0.7225, abs=1e-3) and wilson(10, 10)[1] == pytest.approx(1.0)


def test_a_rule_round_trips_as_plain_data_and_refuses_a_score_it_does_not_know() -> None:
    rule = SpeciesRule(8.0, 0.9, -10.0, "photos")
    assert SpeciesRule.from_dict(rule.to_dict()) == rule
    assert all(type(v) in (str, float) for v in rule.to_dict().values())
    with pytest.raises(ValueError, match="unknown species score"):
        SpeciesRule.from_dict({**rule.to_dict(), "score": "energy"})
