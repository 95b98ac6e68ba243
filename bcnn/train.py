"""Training in the paper's two steps: the linear classifier alone on frozen features, then every layer.

Defaults are the usual BCNN fine-tuning hyper-parameters (SGD, momentum 0.9; step 1 lr 1.0, weight decay 1e-8;
step 2 lr 0.01, weight decay 1e-5). The large step-1 learning rate is not a typo: the L2-normalised bilinear
vector has unit norm over 100k+ dimensions, so its logits start tiny.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from bcnn.checkpoint import read_checkpoint_file, save_checkpoint
from bcnn.data import PhotoDataset, Split, load_split
from bcnn.images import Preprocess, default_preprocess
from bcnn.models import BCNN, ImageClassifier, bcnn
from bcnn.species import SpeciesRule, fit, species_score
from bcnn.weights import lite0_imagenet_state

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    data: str
    out: str = "runs/bcnn"
    backbone: str = "efficientnet_lite0"
    image_size: int | None = None
    fc_epochs: int = 55
    fc_lr: float = 1.0
    fc_weight_decay: float = 1e-8
    fc_batch_size: int = 64
    ft_epochs: int = 25
    ft_lr: float = 0.01
    ft_weight_decay: float = 1e-5
    ft_batch_size: int = 8
    momentum: float = 0.9
    workers: int = 2
    init: str | None = None
    """VGG-16 only: a torchvision VGG-16 state dict file to start from (the Lite0 backbone starts from the
    packaged ImageNet weights)."""
    resume: bool = False
    seed: int = 0
    device: str | None = None


@dataclass(frozen=True)
class Stage:
    name: str
    epochs: int
    lr: float
    weight_decay: float
    batch_size: int
    train_features: bool


def stages(cfg: TrainConfig) -> list[Stage]:
    return [Stage("classifier", cfg.fc_epochs, cfg.fc_lr, cfg.fc_weight_decay, cfg.fc_batch_size, False),
            Stage("all-layers", cfg.ft_epochs, cfg.ft_lr, cfg.ft_weight_decay, cfg.ft_batch_size, True)]


def build_for_training(cfg: TrainConfig, num_classes: int) -> tuple[ImageClassifier, Preprocess]:
    preprocess = default_preprocess(cfg.backbone)
    if cfg.image_size:
        preprocess = Preprocess(cfg.image_size, round(cfg.image_size * preprocess.resize_size / preprocess.crop_size),
                                preprocess.mean, preprocess.std)
    model = bcnn(cfg.backbone, num_classes=num_classes, preprocess=preprocess)
    network = model.network
    assert isinstance(network, BCNN)
    if cfg.backbone == "efficientnet_lite0":
        network.features.load_state_dict(lite0_imagenet_state("body.", include_head=False))
    elif cfg.init:
        state = read_checkpoint_file(cfg.init)
        network.features.load_state_dict({k.removeprefix("features."): v for k, v in state.items()
                                          if k.startswith("features.") and int(k.split(".")[1]) < 30})
    else:
        log.warning("training VGG-16 from random weights: pass --init with an ImageNet VGG-16 state dict")
    nn.init.kaiming_normal_(network.fc.weight)
    nn.init.zeros_(network.fc.bias)
    return model, preprocess


def train(cfg: TrainConfig, *, on_epoch: Callable[[dict[str, float]], None] | None = None) -> Path:
    """Train, writing `last.pt` (resumable) and `best.pt` to `cfg.out` each epoch. Returns the best checkpoint."""
    torch.manual_seed(cfg.seed)
    split = load_split(cfg.data, seed=cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, preprocess = build_for_training(cfg, len(split.classes))
    model.to(device)
    arch = f"bcnn_{cfg.backbone}"
    start_stage, start_epoch, best = 0, 0, -1.0
    optimizer_state = None
    if cfg.resume and (out / "last.pt").is_file():
        saved = read_checkpoint_file(out / "last.pt")
        model.load_state_dict(saved["state_dict"])
        state = saved["train_state"]
        start_stage, start_epoch, best = state["stage"], state["epoch"] + 1, state["best"]
        optimizer_state = state["optimizer"]
        log.info("resuming at stage %d epoch %d", start_stage, start_epoch)

    rule: SpeciesRule | None = None

    def save(name: str, stage_index: int, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        meta: dict[str, object] = {"train_config": asdict(cfg), "val_accuracy": best}
        if rule is not None:
            meta["species_rule"] = rule.to_dict()
        save_checkpoint(out / name, model, arch=arch, categories=split.classes, preprocess=preprocess, meta=meta,
                        train_state={"stage": stage_index, "epoch": epoch, "best": best,
                                     "optimizer": optimizer.state_dict()})

    for stage_index, stage in enumerate(stages(cfg)):
        if stage_index < start_stage or stage.epochs == 0:
            continue
        optimizer = _optimizer(model, stage, cfg.momentum)
        if optimizer_state is not None and stage_index == start_stage:
            optimizer.load_state_dict(optimizer_state)
        first = start_epoch if stage_index == start_stage else 0
        loader = _loader(split, preprocess, stage.batch_size, cfg.workers, train=True)
        for epoch in range(first, stage.epochs):
            loss = _train_epoch(model, loader, optimizer, stage, device, f"{stage.name} {epoch + 1}/{stage.epochs}")
            accuracy, epoch_rule = validate(model, split, preprocess, cfg.workers, device)
            if accuracy > best:
                best, rule = accuracy, epoch_rule
                save("best.pt", stage_index, epoch, optimizer)
            save("last.pt", stage_index, epoch, optimizer)
            log.info("%s epoch %d: loss %.4f, val accuracy %.3f (best %.3f)", stage.name, epoch + 1, loss,
                     accuracy, best)
            if on_epoch:
                on_epoch({"stage": stage_index, "epoch": epoch, "loss": loss, "val_accuracy": accuracy})
        start_epoch = 0
    return out / "best.pt"


def _optimizer(model: ImageClassifier, stage: Stage, momentum: float) -> torch.optim.Optimizer:
    network = model.network
    assert isinstance(network, BCNN)
    network.features.requires_grad_(stage.train_features)
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=stage.lr, momentum=momentum, weight_decay=stage.weight_decay)


def _loader(split: Split, preprocess: Preprocess, batch_size: int, workers: int, *, train: bool) -> DataLoader:
    samples = split.train if train else split.val
    return DataLoader(PhotoDataset(samples, preprocess, augment=train), batch_size=batch_size, shuffle=train,
                      num_workers=workers, persistent_workers=False)


def _train_epoch(model: ImageClassifier, loader: DataLoader, optimizer: torch.optim.Optimizer, stage: Stage,
                 device: torch.device, desc: str) -> float:
    model.train()
    network = model.network
    assert isinstance(network, BCNN)
    if not stage.train_features:
        network.features.eval()  # frozen features keep their BatchNorm statistics
    total, count = 0.0, 0
    for images, labels in tqdm(loader, desc=desc, leave=False):
        images, labels = images.to(device), labels.to(device)
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(labels)
        count += len(labels)
    return total / max(count, 1)


@torch.inference_mode()
def predict_split(model: ImageClassifier, split: Split, preprocess: Preprocess, workers: int,
                  device: torch.device) -> tuple[Tensor, Tensor]:
    """Logits and labels over the validation samples."""
    model.eval()
    logits, labels = [], []
    for images, batch_labels in tqdm(_loader(split, preprocess, 32, workers, train=False), desc="evaluate",
                                     leave=False):
        logits.append(model(images.to(device)).float().cpu())
        labels.append(batch_labels)
    return torch.cat(logits), torch.cat(labels)


def validate(model: ImageClassifier, split: Split, preprocess: Preprocess, workers: int,
             device: torch.device) -> tuple[float, SpeciesRule | None]:
    """Top-1 on the validation split, and the species rule it supports (`bcnn.species.fit`: a threshold that keeps
    at least 90% of known-species answers with 90% confidence, the confidence calibrated on the answers at or above
    it). A split of known species cannot measure how many unknown ones the threshold flags: `bcnn evaluate` with
    photos of other species can."""
    if not split.val:
        return 0.0, None
    logits, labels = predict_split(model, split, preprocess, workers, device)
    right = logits.argmax(1) == labels
    scores = species_score(logits, torch.arange(logits.shape[1]))
    rule = fit(scores.numpy(), right.numpy(), fitted_on=f"validation split, {len(labels)} photos")
    return right.float().mean().item(), rule
