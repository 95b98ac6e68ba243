"""Accuracy of a checkpoint on a labelled data set: top-1, top-5, per class, and a confusion matrix."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import torch

from bcnn.data import Split, load_split
from bcnn.models import build_model, prepare_for_inference
from bcnn.predict import pick_device
from bcnn.train import predict_split
from bcnn.weights import get_weights


def evaluate(data: str, checkpoint: str, out: str, *, classes_file: str | None = None, split: str = "val",
             workers: int = 2, device: str | None = None) -> dict[str, Any]:
    """Write `metrics.json`, `confusion.csv` and `confusion.png` to `out`; return the metrics."""
    weights = get_weights(checkpoint, classes_file=classes_file)
    dataset = load_split(data)
    if split == "all":
        dataset = Split(dataset.classes, [], dataset.train + dataset.val)
    unknown = [c for c in dataset.classes if c not in weights.labels]
    if unknown:
        raise ValueError(f"{data}: classes the checkpoint does not know: {', '.join(unknown[:5])}")
    torch_device = pick_device(device)
    model = prepare_for_inference(build_model(weights)).to(torch_device)
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
    metrics = {
        "checkpoint": checkpoint,
        "model_version": weights.version,
        "images": len(labels),
        "top1": (top1 == labels).float().mean().item(),
        "top5": (top5 == labels[:, None]).any(1).float().mean().item(),
        "per_class_accuracy": per_class,
    }
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False))
    with open(out_dir / "confusion.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *dataset.classes])
        for name, row in zip(dataset.classes, confusion.tolist(), strict=True):
            writer.writerow([name, *row])
    _plot_confusion(confusion, dataset.classes, out_dir / "confusion.png")
    return metrics


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
