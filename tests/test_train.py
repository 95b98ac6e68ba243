from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bcnn.checkpoint import read_checkpoint_file
from bcnn.data import load_split
from bcnn.evaluate import evaluate
from bcnn.models import get_weights
from bcnn.train import TrainConfig, train

CLASSES = ("horizontal", "vertical", "rings")


def _pattern(kind: str, rng: np.random.Generator, size: int = 96) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    period = rng.uniform(8, 16)
    phase = rng.uniform(0, 2 * np.pi)
    if kind == "horizontal":
        wave = np.sin(y / period * 2 * np.pi + phase)
    elif kind == "vertical":
        wave = np.sin(x / period * 2 * np.pi + phase)
    else:
        r = np.hypot(x - rng.uniform(30, 66), y - rng.uniform(30, 66))
        wave = np.sin(r / period * 2 * np.pi + phase)
    colour_a, colour_b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    mix = (wave[..., None] + 1) / 2
    rgb = mix * colour_a + (1 - mix) * colour_b + rng.normal(0, 12, (size, size, 3))
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def patterns(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("patterns")
    rng = np.random.default_rng(0)
    for kind in CLASSES:
        (root / kind).mkdir()
        for i in range(16):
            _pattern(kind, rng).save(root / kind / f"{i}.png")
    return root


@pytest.mark.slow
def test_training_reaches_well_above_chance_and_resumes(patterns: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(data=str(patterns), out=str(tmp_path / "run"), image_size=64, fc_epochs=6, ft_epochs=0,
                      fc_batch_size=8, workers=0)
    history: list[dict[str, float]] = []
    best = train(cfg, on_epoch=history.append)
    assert max(h["val_accuracy"] for h in history) >= 0.75  # chance is 1/3
    saved = read_checkpoint_file(best)
    assert saved["categories"] == sorted(CLASSES) and saved["preprocess"]["crop_size"] == 64
    # The species rule measured on the validation split travels with the checkpoint and is what serving applies.
    rule = get_weights(str(best)).species_rule
    assert rule is not None and rule.to_dict() == saved["meta"]["species_rule"] and rule.slope >= 0
    assert "validation split" in rule.fitted_on

    # One more stage of fine-tuning every layer, resumed from last.pt: it must not redo the first stage.
    resumed: list[dict[str, float]] = []
    train(TrainConfig(**{**cfg.__dict__, "ft_epochs": 1, "ft_batch_size": 8, "resume": True}),
          on_epoch=resumed.append)
    assert [(h["stage"], h["epoch"]) for h in resumed] == [(1, 0)]

    metrics = evaluate(str(patterns), str(best), str(tmp_path / "eval"), workers=0)
    assert metrics["top1"] >= 0.75 and metrics["top5"] == 1.0
    assert set(metrics["per_class_accuracy"]) == set(CLASSES)
    assert (tmp_path / "eval" / "confusion.png").stat().st_size > 1000
    rows = (tmp_path / "eval" / "confusion.csv").read_text().splitlines()
    assert len(rows) == 4 and sum(int(v) for row in rows[1:] for v in row.split(",")[1:]) == metrics["images"]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["top1"] == metrics["top1"]
    species = metrics["species"]  # a validation split of known classes only: no unknown species to flag
    assert species["photos"]["unknown_species"] == 0 and species["unknown"]["named_wrongly"] is None
    assert species["known"]["named"] >= 0.75 and (tmp_path / "eval" / "reliability.png").is_file()


def test_cub_layout_is_read(tmp_path: Path) -> None:
    (tmp_path / "images" / "001.Heron").mkdir(parents=True)
    (tmp_path / "images" / "002.Coot").mkdir(parents=True)
    for rel in ["001.Heron/a.jpg", "001.Heron/b.jpg", "002.Coot/c.jpg", "002.Coot/d.jpg"]:
        Image.new("RGB", (8, 8)).save(tmp_path / "images" / rel)
    (tmp_path / "images.txt").write_text("1 001.Heron/a.jpg\n2 001.Heron/b.jpg\n3 002.Coot/c.jpg\n4 002.Coot/d.jpg\n")
    (tmp_path / "image_class_labels.txt").write_text("1 1\n2 1\n3 2\n4 2\n")
    (tmp_path / "train_test_split.txt").write_text("1 1\n2 0\n3 1\n4 0\n")
    (tmp_path / "classes.txt").write_text("1 001.Heron\n2 002.Coot\n")
    split = load_split(tmp_path)
    assert split.classes == ("001.Heron", "002.Coot")
    assert [(p.name, label) for p, label in split.train] == [("a.jpg", 0), ("c.jpg", 1)]
    assert [(p.name, label) for p, label in split.val] == [("b.jpg", 0), ("d.jpg", 1)]
