"""Checkpoint files: the project's own format and the replaced 2019 service's.

Ours is one file holding the architecture, class names, preprocessing and state dict. The 2019 service saved
`torch.nn.DataParallel(BCNN()).state_dict()` (keys `module.features.N.*`, `module.fc.*`) and kept its class
names in a text file of `index name` lines. Both are read with `weights_only=True`: no pickled code runs.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bcnn.images import Preprocess, default_preprocess
from bcnn.species import SpeciesRule
from bcnn.weights import ARCHS, CheckpointError, Weights

FORMAT = "waterbirds-bcnn"
FORMAT_VERSION = 1


def save_checkpoint(path: str | os.PathLike[str], model: nn.Module, *, arch: str, categories: tuple[str, ...],
                    preprocess: Preprocess, answer_indices: tuple[int, ...] | None = None,
                    meta: Mapping[str, Any] | None = None, train_state: Mapping[str, Any] | None = None) -> None:
    """Write atomically (temp file, then rename) so a crash mid-save never leaves a half-written checkpoint."""
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "categories": list(categories),
        "answer_indices": list(answer_indices) if answer_indices is not None else None,
        "preprocess": preprocess.to_dict(),
        "meta": dict(meta or {}),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    if train_state is not None:
        payload["train_state"] = dict(train_state)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def read_checkpoint_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The raw dictionary in a checkpoint file, or a CheckpointError saying why it cannot be read."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(path, "no such file")
    try:
        data = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" in str(e).lower():  # the weights-only unpickler met a class or function: pickled code
            raise CheckpointError(path, "holds Python objects other than tensors and plain data; refused, "
                                        "since loading them could run code") from None
        raise CheckpointError(path, "is not a readable PyTorch file (truncated or corrupt)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(path, f"is not a readable PyTorch file (truncated or corrupt): {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(path, f"holds a {type(data).__name__}, expected a dictionary")
    return data


def load_checkpoint(path: str | os.PathLike[str], *, classes_file: str | os.PathLike[str] | None = None) -> Weights:
    data = read_checkpoint_file(path)
    version = _file_version(path)
    if data.get("format") == FORMAT:
        return _ours(path, data, version)
    if "module.fc.weight" in data:
        return _legacy(path, data, classes_file, version)
    raise CheckpointError(path, "is neither a waterbirds-bcnn checkpoint nor a 2019 service state dict "
                                "(no 'format' entry and no 'module.fc.weight')")


def _ours(path: str | os.PathLike[str], data: dict[str, Any], version: str) -> Weights:
    if data.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(path, f"format version {data.get('format_version')} is not {FORMAT_VERSION}")
    arch = data.get("arch")
    if arch not in ARCHS:
        raise CheckpointError(path, f"unknown architecture {arch!r}; expected one of {', '.join(ARCHS)}")
    categories = tuple(str(c) for c in data.get("categories") or ())
    if not categories:
        raise CheckpointError(path, "has no class names")
    state = data.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(path, "has no state_dict")
    answer = data.get("answer_indices")
    if answer is not None and any(not 0 <= i < len(categories) for i in answer):
        raise CheckpointError(path, "answer_indices point outside the class list")
    try:
        preprocess = Preprocess.from_dict(data["preprocess"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(path, f"has no usable preprocessing entry ({e})") from None
    meta = {**data.get("meta", {}), "version": version}
    try:
        rule = SpeciesRule.from_dict(meta["species_rule"]) if meta.get("species_rule") else None
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(path, f"has an unusable species rule ({e})") from None
    return Weights(name=Path(path).stem, arch=arch, load=lambda: state, preprocess=preprocess,
                   categories=categories, answer_indices=tuple(answer) if answer is not None else None,
                   source=str(path), meta=meta, species_rule=rule)


def _legacy(path: str | os.PathLike[str], data: dict[str, Tensor], classes_file: str | os.PathLike[str] | None,
            version: str) -> Weights:
    if classes_file is None:
        raise CheckpointError(path, "is a 2019 service checkpoint; give its class list (a file of "
                                    "'index name' lines) with --classes or classes_file")
    categories = read_classes_file(classes_file)
    fc = data["module.fc.weight"]
    if fc.ndim != 2 or fc.shape[1] != 512 * 512:
        raise CheckpointError(path, f"module.fc.weight has shape {tuple(fc.shape)}, expected [C, 262144] "
                                    "(VGG-16 relu5_3 bilinear features)")
    if fc.shape[0] != len(categories):
        raise CheckpointError(path, f"has {fc.shape[0]} classes but {classes_file} names {len(categories)}")
    state = {"network." + k.removeprefix("module."): v for k, v in data.items()}
    return Weights(name=Path(path).stem, arch="bcnn_vgg16", load=lambda: state,
                   preprocess=default_preprocess("vgg16"), categories=categories, source=str(path),
                   meta={"version": version, "origin": "2019 service checkpoint"})


def read_classes_file(path: str | os.PathLike[str]) -> tuple[str, ...]:
    """Class names from `index name` lines; indices must run 0.. or 1.. without gaps."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(path, f"cannot read the class list: {e}") from None
    entries: dict[int, str] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        index, _, name = line.strip().partition(" ")
        if not index.isdigit() or not name.strip():
            raise CheckpointError(path, f"line {number} is not 'index name': {line!r}")
        entries[int(index)] = name.strip()
    if not entries:
        raise CheckpointError(path, "the class list is empty")
    first = min(entries)
    if first not in (0, 1) or sorted(entries) != list(range(first, first + len(entries))):
        raise CheckpointError(path, "class indices must run from 0 or 1 without gaps")
    return tuple(entries[i] for i in sorted(entries))


def _file_version(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]
