"""Accuracy of a checkpoint on a labelled data set: top-1, top-5, per class, a confusion matrix, and how its species
rule tells the species it knows from those it does not (`bcnn.species`), with its calibration."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bcnn.answers import DEFAULT_WATERBIRD_THRESHOLD
from bcnn.data import Split, load_split
from bcnn.models import build_model, get_weights, prepare_for_inference
from bcnn.predict import pick_device, rank_logits
from bcnn.species import ASSURANCE, KEEP_KNOWN, auroc, auroc_interval, fit, platt, reliability, species_score, wilson
from bcnn.train import predict_split
from bcnn.weights import Weights


def evaluate(data: str, checkpoint: str, out: str, *, classes_file: str | None = None, split: str = "val",
             workers: int = 2, device: str | None = None, image_root: str | None = None,
             label_column: str = "label", species_threshold: float | None = None,
             waterbird_threshold: float = DEFAULT_WATERBIRD_THRESHOLD) -> dict[str, Any]:
    """Write `metrics.json`, `confusion.csv`, `confusion.png`, `species_rule.json` and `reliability.png` to `out`;
    return the metrics. `data`: a folder (ImageFolder or CUB layout), or a CSV of photos (`file` and
    `label_column`, files under `image_root`) where a row with no label is a photo of a species the model does not
    know, which the species figures need."""
    weights = get_weights(checkpoint, classes_file=classes_file)
    if data.endswith(".csv"):
        dataset, unknown = labelled_photos(data, label_column, image_root)
    else:
        dataset, unknown = load_split(data), []
        if split == "all":
            dataset = Split(dataset.classes, [], dataset.train + dataset.val)
    not_known = [c for c in dataset.classes if c not in weights.labels]
    if not_known:
        raise ValueError(f"{data}: classes the checkpoint does not know: {', '.join(not_known[:5])}")
    torch_device = pick_device(device)
    model = prepare_for_inference(build_model(weights)).to(torch_device)
    # The classifier's input (the penultimate features), kept for the scores that reshape or compare them.
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    features: list[Tensor] = []
    hook = head.register_forward_hook(lambda _m, inputs, _out: features.append(inputs[0].detach().float().cpu()))
    logits, labels = predict_split(model, dataset, weights.preprocess, workers, torch_device)
    answer = list(weights.answer_indices or range(len(weights.categories)))
    # Columns of the data set's classes, in its order: a 1000-way model is scored on the classes asked about.
    columns = [answer[weights.labels.index(c)] for c in dataset.classes]
    scores = logits[:, columns]
    top5 = scores.topk(min(5, scores.shape[1]), dim=1).indices
    top1 = top5[:, 0]
    n = len(dataset.classes)
    confusion = torch.zeros(n, n, dtype=torch.long)
    for truth, guess in zip(labels.tolist(), top1.tolist(), strict=True):
        confusion[truth, guess] += 1
    per_class = {name: (confusion[i, i] / confusion[i].sum()).item() if confusion[i].sum() else None
                 for i, name in enumerate(dataset.classes)}
    metrics: dict[str, Any] = {
        "checkpoint": checkpoint,
        "model_version": weights.version,
        "images": len(labels),
        "top1": (top1 == labels).float().mean().item(),
        "top5": (top5 == labels[:, None]).any(1).float().mean().item(),
        "per_class_accuracy": per_class,
    }
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if unknown:
        unknown_split = Split(dataset.classes, [], [(path, 0) for path in unknown])
        unknown_logits = predict_split(model, unknown_split, weights.preprocess, workers, torch_device)[0]
    else:
        unknown_logits = logits[:0]
    hook.remove()
    truth = torch.tensor([weights.labels.index(dataset.classes[i]) for i in labels.tolist()] + [-1] * len(unknown))
    all_logits = torch.cat([logits, unknown_logits])
    metrics["species"] = species_figures(weights, all_logits, truth, out_dir,
                                         species_threshold=species_threshold, waterbird_threshold=waterbird_threshold)
    known, answer_index = (truth >= 0).numpy(), torch.tensor(answer)
    metrics["species"]["feature_scores"] = {
        name: {"auroc": round(auroc(other, known), 4), "interval": auroc_interval(other, known)}
        for name, other in feature_scores(torch.cat(features), head, answer_index).items()}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False))
    with open(out_dir / "confusion.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *dataset.classes])
        for name, row in zip(dataset.classes, confusion.tolist(), strict=True):
            writer.writerow([name, *row])
    _plot_confusion(confusion, dataset.classes, out_dir / "confusion.png")
    return metrics


def labelled_photos(table: str, label_column: str, image_root: str | None) -> tuple[Split, list[Path]]:
    """The photos a CSV lists (`file`, `label_column`), under `image_root` (default: the CSV's folder): the labelled
    ones as a split, and those with no label, photos of species the model does not know."""
    root = Path(image_root) if image_root else Path(table).parent
    with open(table, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if rows and label_column not in rows[0]:
        raise ValueError(f"{table}: no column {label_column!r} (columns: {', '.join(rows[0])})")
    classes = tuple(sorted({r[label_column] for r in rows if r[label_column]}))
    known = [(root / r["file"], classes.index(r[label_column])) for r in rows if r[label_column]]
    return Split(classes, [], known), [root / r["file"] for r in rows if not r[label_column]]


def species_figures(weights: Weights, logits: Tensor, truth: Tensor, out: Path, *,
                    species_threshold: float | None, waterbird_threshold: float) -> dict[str, Any]:
    """How well the species rule tells the species the model knows from those it does not, and how calibrated its
    confidence is. `truth`: each photo's position in the model's labels, -1 for a species it does not know. The rule
    judged is the model's own (its threshold or `species_threshold`); a model without one is judged with the rule
    fitted here. Writes `species_rule.json` (the rule these photos support) and `reliability.png`."""
    answer_index = torch.tensor(list(weights.answer_indices or range(len(weights.categories))))
    known = (truth >= 0).numpy()
    scores = species_score(logits, answer_index).numpy()
    untuned = rank_logits(logits, answer_index, top_k=1, threshold=waterbird_threshold)
    waterbird = untuned.is_waterbird
    right = known & (untuned.indices[:, 0] == truth.numpy())
    # The rule these photos support: fitted on the waterbird answers to photos of species the model knows.
    taught = known & waterbird
    fitted = fit(scores[taught], right[taught], threshold=species_threshold,
                 fitted_on=f"{int(known.sum())} photos of species the model knows")
    (out / "species_rule.json").write_text(json.dumps(fitted.to_dict(), indent=2) + "\n")
    rule = weights.species_rule or fitted
    threshold = species_threshold if species_threshold is not None else rule.threshold
    birds = None if weights.bird_indices is None else torch.tensor(weights.bird_indices)
    ranked = rank_logits(logits, answer_index, top_k=1, threshold=waterbird_threshold, rule=rule,
                         species_threshold=species_threshold, bird_index=birds)
    named = ranked.species_known  # answered with a species' name
    figures: dict[str, Any] = {
        "rule": {**rule.to_dict(), "threshold": threshold},
        "fitted_here": {**fitted.to_dict(), "keep_known": KEEP_KNOWN, "assurance": ASSURANCE},
        "photos": {"known_species": int(known.sum()), "unknown_species": int((~known).sum())},
        "auroc_known_vs_unknown": round(auroc(scores, known), 4),
        "auroc_interval": auroc_interval(scores, known),
        "auroc_of_other_scores": {name: round(auroc(other, known), 4)
                                  for name, other in candidate_scores(logits, answer_index).items()},
        "auroc_intervals_of_other_scores": {name: auroc_interval(other, known)
                                            for name, other in candidate_scores(logits, answer_index).items()},
        "known": {"named": _share(named, known), "named_and_right": _share(named & right, known),
                  "named_interval": wilson(int((named & known).sum()), int(known.sum()))},
        "unknown": {"named_wrongly": _share(named, ~known),
                    "waterbird_species_unknown": _share(ranked.is_waterbird & ~named, ~known),
                    "not_a_waterbird": _share(~ranked.is_waterbird, ~known),
                    "rolled_up_to_a_bird": _share(~ranked.is_waterbird & ranked.is_bird, ~known),
                    "not_a_bird": _share(~ranked.is_bird, ~known),
                    "not_named_interval": wilson(int((~named & ~known).sum()), int((~known).sum()))},
    }
    # Calibration over the answers judged known to photos of species the model knows, the confidence's question:
    # before, the share among the answer classes that the page showed; after, the rule's confidence; and each
    # photo's confidence from a rule fitted without it (leave one out).
    judged = named & known
    j_scores, j_right = scores[judged], right[judged]
    held_out = np.array([_leave_one_out(j_scores, j_right, i) for i in range(len(j_scores))])
    figures["calibration"] = {
        "answers": int(judged.sum()), "right": int(j_right.sum()),
        "right_interval": wilson(int(j_right.sum()), int(judged.sum())),
        "before": reliability(untuned.scores[judged, 0], j_right),
        "after": reliability(ranked.species_confidence[judged], j_right),
        "after_left_out": reliability(held_out, j_right),
    }
    _plot_reliability(figures["calibration"], out / "reliability.png")
    return figures


def candidate_scores(logits: Tensor, answer_index: Tensor) -> dict[str, np.ndarray]:
    """Scores compared with the rule's (the largest logit among the answer classes) for telling known species from
    unknown ones: the top answer class's probability in the full softmax, the softmax mass on the answer classes,
    the top class's share among them (the score the page showed before), and the energy (log-sum-exp of all
    logits)."""
    probs = logits.softmax(dim=1)
    answer = probs[:, answer_index]
    return {"max_softmax": answer.max(dim=1).values.numpy(), "answer_mass": answer.sum(dim=1).numpy(),
            "top_share": (answer.max(dim=1).values / answer.sum(dim=1).clamp_min(1e-12)).numpy(),
            "energy": torch.logsumexp(logits, dim=1).numpy()}


def feature_scores(features: Tensor, head: torch.nn.Linear, answer_index: Tensor) -> dict[str, np.ndarray]:
    """Scores that need the penultimate features, to compare with the largest answer logit: the logits of features
    clipped at their 90th percentile over every photo (ReAct; label-free, but from the photos measured), or of each
    photo's top 35% and top 10% kept and rescaled (ASH-S), and the largest cosine of the features to an answer
    class's weights."""
    weight, bias = head.weight.detach().float().cpu(), head.bias.detach().float().cpu()

    def largest(h: Tensor) -> np.ndarray:
        return (h @ weight.T + bias)[:, answer_index].max(dim=1).values.numpy()

    def ash_s(h: Tensor, keep: float) -> Tensor:
        kept = torch.where(h >= torch.quantile(h, 1 - keep, dim=1, keepdim=True), h, torch.zeros_like(h))
        return kept * torch.exp(h.sum(1, keepdim=True) / kept.sum(1, keepdim=True).clamp_min(1e-12))

    unit = weight[answer_index] / weight[answer_index].norm(dim=1, keepdim=True)
    return {"react_p90": largest(features.clamp(max=float(np.percentile(features.numpy(), 90)))),
            "ash_s_keep_35": largest(ash_s(features, 0.35)), "ash_s_keep_10": largest(ash_s(features, 0.10)),
            "cosine": (features / features.norm(dim=1, keepdim=True) @ unit.T).max(dim=1).values.numpy()}


def _share(mask: np.ndarray, of: np.ndarray) -> float | None:
    return round(float(mask[of].mean()), 4) if of.any() else None


def _leave_one_out(scores: np.ndarray, right: np.ndarray, i: int) -> float:
    slope, intercept = platt(np.delete(scores, i), np.delete(right, i).astype(np.float64))
    return float(1 / (1 + np.exp(-(slope * scores[i] + intercept))))


def _plot_reliability(calibration: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 5))
    ax.plot([0, 1], [0, 1], color="gray", linestyle=":", label="calibrated")
    for key, name, style in (("before", "before: share among the species it knows", "s--"),
                             ("after", "after: the rule's confidence", "o-"),
                             ("after_left_out", "after, each photo left out of the fit", "^:")):
        bins = calibration[key]["bins"]
        ax.plot([b["confidence"] for b in bins], [b["right"] for b in bins], style,
                label=f"{name} (ECE {calibration[key]['ece']:.3f})")
    ax.set_xlabel("confidence shown")
    ax.set_ylabel("share of those answers that were right")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)  # a bin of answers all right sits on the top edge
    ax.set_title(f"Reliability: {calibration['answers']} answers judged known, {calibration['right']} right\n"
                 "(photos of species the model knows)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_confusion(confusion: torch.Tensor, classes: tuple[str, ...], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    size = min(4 + n * 0.3, 40)
    fig, ax = plt.subplots(figsize=(size, size))
    rows = confusion.sum(1, keepdim=True).clamp_min(1)
    ax.imshow((confusion / rows).numpy(), cmap="Blues", vmin=0, vmax=1)
    if n <= 60:
        ax.set_xticks(range(n), classes, rotation=90, fontsize=8)
        ax.set_yticks(range(n), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (row-normalised)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
