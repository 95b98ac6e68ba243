"""Which model answers an upload, and how a candidate compares with the model it may replace.

An upload names a model (`?model=`) or gets the default. A model may have a *candidate* (`IngressConfig.candidates`):
the candidate answers a `share` of the model's uploads instead (a canary), and a `shadow` fraction of them is also
sent to it in the background once the shown answer is ready, its answer compared with the shown one and never shown.
The comparisons are counted per pair here (for /models) and exported as metrics (for Prometheus and Grafana).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from deployments.config import Candidate
from deployments.messages import Catalog, ModelUnavailable, UnknownModel
from deployments.metrics import IngressMetrics

# Candidate latencies kept per pair for /models' running median.
LATENCY_WINDOW = 512
MEASURES = ("top1", "is_waterbird", "species_known")


@dataclass(frozen=True)
class Route:
    model: str
    """the model that answers"""
    shadow: str | None = None
    """a candidate also asked in the background"""


def resolve(requested: str | None, catalog: Catalog) -> str:
    """The model named (or the default): `UnknownModel` for a name the service does not serve, `ModelUnavailable`
    for one configured that did not load."""
    name = requested or catalog.default
    if name in catalog.failed:
        raise ModelUnavailable(name, catalog.failed[name])
    if name not in catalog.cards:
        raise UnknownModel(name, catalog.names)
    return name


def route(requested: str | None, catalog: Catalog, candidates: dict[str, Candidate],
          draw: Callable[[], float] = random.random) -> Route:
    """Where one upload goes: the model `resolve` says, or its candidate for a `share` of its uploads, with a
    `shadow` to the candidate for a fraction of the rest. A candidate that is not served is passed over."""
    name = resolve(requested, catalog)
    candidate = candidates.get(name)
    if candidate is None or candidate.model == name or candidate.model not in catalog.cards:
        return Route(name)
    if candidate.share and draw() < candidate.share:
        return Route(candidate.model)
    return Route(name, candidate.model if candidate.shadow and draw() < candidate.shadow else None)


@dataclass
class Agreement:
    """One pair's running tally in this ingress replica."""

    compared: int = 0
    agreed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MEASURES, 0))
    dropped: int = 0
    latency_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))

    def to_dict(self) -> dict[str, object]:
        shares = {m: round(n / self.compared, 4) if self.compared else None for m, n in self.agreed.items()}
        ordered = sorted(self.latency_ms)
        return {"compared": self.compared, "agreement": shares, "dropped": self.dropped,
                "candidate_latency_ms_p50": round(ordered[len(ordered) // 2], 1) if ordered else None}


class Comparisons:
    """Shadow answers against shown ones, per (model, candidate)."""

    def __init__(self, metrics: IngressMetrics | None = None) -> None:
        self.metrics = metrics
        self.pairs: dict[tuple[str, str], Agreement] = {}

    def compare(self, model: str, candidate: str, shown: dict[str, object], shadow: dict[str, object],
                latency_ms: float) -> None:
        tally = self.pairs.setdefault((model, candidate), Agreement())
        tally.compared += 1
        tally.latency_ms.append(latency_ms)
        same = {"top1": _top1(shown) == _top1(shadow),
                "is_waterbird": shown["is_waterbird"] == shadow["is_waterbird"],
                "species_known": shown["species_known"] == shadow["species_known"]}
        for measure, agreed in same.items():
            tally.agreed[measure] += agreed
        if self.metrics is not None:
            tags = {"model": model, "candidate": candidate}
            self.metrics.shadow_latency.observe(latency_ms, tags=tags)
            for measure, agreed in same.items():
                self.metrics.shadow_compared.inc(tags={**tags, "measure": measure, "agreed": str(agreed).lower()})

    def dropped(self, model: str, candidate: str) -> None:
        self.pairs.setdefault((model, candidate), Agreement()).dropped += 1
        if self.metrics is not None:
            self.metrics.shadow_dropped.inc(tags={"model": model, "candidate": candidate})

    def report(self) -> dict[tuple[str, str], dict[str, object]]:
        return {pair: tally.to_dict() for pair, tally in self.pairs.items()}


def _top1(answer: dict[str, object]) -> object:
    predictions = answer["predictions"]
    return predictions[0]["label"] if predictions else None  # type: ignore[index]
