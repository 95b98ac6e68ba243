"""Labelled photo collections: the ImageFolder layout and the CUB-200-2011 layout.

Samples go through `bcnn.preprocess.preprocess_image`, the same function serving uses, so a model is evaluated
on exactly the tensors it will see in production.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from bcnn.images import Preprocess
from bcnn.preprocess import preprocess_image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


@dataclass(frozen=True)
class Split:
    classes: tuple[str, ...]
    train: list[tuple[Path, int]]
    val: list[tuple[Path, int]]


def load_split(root: str | Path, *, val_fraction: float = 0.2, seed: int = 0) -> Split:
    """CUB-200-2011 when `images.txt` is present; else ImageFolder (`train/` and `val/` or `test/` subfolders,
    or one folder per class split `val_fraction` per class with a fixed seed)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such data folder")
    if (root / "images.txt").is_file():
        return _cub(root)
    val_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if (root / "train").is_dir() and val_dir is not None:
        classes = _class_dirs(root / "train")
        return Split(classes, _folder_samples(root / "train", classes), _folder_samples(val_dir, classes))
    classes = _class_dirs(root)
    samples = _folder_samples(root, classes)
    rng = random.Random(seed)
    train, val = [], []
    for label in range(len(classes)):
        items = [s for s in samples if s[1] == label]
        rng.shuffle(items)
        n_val = max(1, round(len(items) * val_fraction)) if len(items) > 1 else 0
        val += items[:n_val]
        train += items[n_val:]
    return Split(classes, train, val)


def _class_dirs(root: Path) -> tuple[str, ...]:
    classes = tuple(sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")))
    if not classes:
        raise ValueError(f"{root}: no class folders (expected one folder of photos per class)")
    return classes


def _folder_samples(root: Path, classes: tuple[str, ...]) -> list[tuple[Path, int]]:
    samples = []
    for label, name in enumerate(classes):
        folder = root / name
        if folder.is_dir():
            samples += [(p, label) for p in sorted(folder.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not samples:
        raise ValueError(f"{root}: no images found")
    return samples


def _cub(root: Path) -> Split:
    def table(name: str) -> dict[int, str]:
        lines = (root / name).read_text(encoding="utf-8").splitlines()
        return {int(k): v.strip() for k, _, v in (line.partition(" ") for line in lines if line.strip())}

    paths, labels, is_train = table("images.txt"), table("image_class_labels.txt"), table("train_test_split.txt")
    names = table("classes.txt") if (root / "classes.txt").is_file() else {int(v): v for v in set(labels.values())}
    class_ids = sorted(names)
    classes = tuple(names[i] for i in class_ids)
    position = {cid: i for i, cid in enumerate(class_ids)}
    train, val = [], []
    for image_id, rel in paths.items():
        sample = (root / "images" / rel, position[int(labels[image_id])])
        (train if is_train[image_id] == "1" else val).append(sample)
    return Split(classes, train, val)


class PhotoDataset(Dataset[tuple[Tensor, int]]):
    """uint8 [3, H, W] tensors and labels; `augment` adds the paper's random horizontal flip."""

    def __init__(self, samples: list[tuple[Path, int]], preprocess: Preprocess, *, augment: bool = False) -> None:
        self.samples = samples
        self.preprocess = preprocess
        self.augment = augment

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, label = self.samples[index]
        image = preprocess_image(path.read_bytes(), self.preprocess)
        if self.augment and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image, label
