"""Checkpoints with random weights, for measuring speed and sizes: a forward pass costs the same whatever the
weights, so benchmarks and tests need no trained model (and nothing is downloaded)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from bcnn.checkpoint import save_checkpoint
from bcnn.images import default_preprocess
from bcnn.models import bcnn


def random_bcnn_checkpoint(path: str | Path, *, backbone: str = "vgg16", num_classes: int = 200,
                           input_size: int | None = None, seed: int = 0) -> Path:
    """A BCNN checkpoint in our format; `input_size` overrides the backbone's default (448 for VGG-16)."""
    preprocess = default_preprocess(backbone)
    if input_size is not None:
        preprocess = dataclasses.replace(preprocess, crop_size=input_size, resize_size=input_size)
    torch.manual_seed(seed)
    model = bcnn(backbone, num_classes=num_classes, preprocess=preprocess)
    categories = tuple(f"species {i:03d}" for i in range(num_classes))
    save_checkpoint(path, model, arch=f"bcnn_{backbone}", categories=categories, preprocess=preprocess,
                    meta={"version": f"random-{backbone}-{preprocess.crop_size}-seed{seed}"})
    return Path(path)
