"""The Bilinear CNN (Lin, RoyChowdhury & Maji, ICCV 2015) and the builders that make every model we serve.

Every built model has one contract: a uint8 batch [N, 3, H, W] in, logits [N, C] out. Normalisation is the
model's first layer, so it runs on the model's device and the data crossing process boundaries stays uint8.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bcnn.backbones import EfficientNetLite0, vgg16_relu5_3
from bcnn.checkpoint import load_checkpoint
from bcnn.images import Preprocess, default_preprocess
from bcnn.weights import BACKBONES, DEFAULT, WEIGHTS, CheckpointError, Weights


class Normalize(nn.Module):
    """uint8 images to float, (x - mean) / std with mean and std on the 0-255 scale."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        # Not persistent: they come from the weights' preprocessing, so checkpoints need not carry them.
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("inv_std", 1.0 / torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x.to(self.mean.dtype) - self.mean) * self.inv_std


def bilinear_pool(features: Tensor) -> Tensor:
    """Outer product of each location's feature vector with itself, averaged over all locations: [N, C*C]."""
    n, c, h, w = features.shape
    x = features.reshape(n, c, h * w)
    return torch.bmm(x, x.transpose(1, 2)).div_(h * w).reshape(n, c * c)


def signed_sqrt(x: Tensor, eps: float = 1e-10) -> Tensor:
    """sign(x) * sqrt(|x|); eps keeps the gradient finite at zero."""
    return torch.sign(x) * torch.sqrt(x.abs() + eps)


class BCNN(nn.Module):
    """features -> bilinear pooling -> signed square root -> L2 normalisation -> linear classifier.

    Works on any input size: pooling averages over however many locations the backbone produces.
    Attribute names (`features`, `fc`) match the replaced 2019 service's checkpoints.
    """

    def __init__(self, features: nn.Module, feature_channels: int, num_classes: int) -> None:
        super().__init__()
        self.features = features
        self.fc = nn.Linear(feature_channels * feature_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        f = self.features(x)
        # The head runs in float32 whatever autocast is active (the convolutions above keep half precision):
        # autocast would cast bmm's inputs down again, and the sum of products over all locations overflows
        # float16 (max 65504) once features reach a few tens, as relu5_3 of a trained VGG-16 does.
        with torch.autocast(f.device.type, enabled=False):
            z = bilinear_pool(f.float())
            z = F.normalize(signed_sqrt(z), dim=1)
            return self.fc(z)


class ImageClassifier(nn.Module):
    """What every builder returns: `Normalize` then a network. uint8 in, logits out."""

    def __init__(self, network: nn.Module, preprocess: Preprocess) -> None:
        super().__init__()
        self.normalize = Normalize(preprocess.mean, preprocess.std)
        self.network = network

    def forward(self, x: Tensor) -> Tensor:
        return self.network(self.normalize(x))


class _Lite0Features(nn.Module):
    """EfficientNet-Lite0 up to its last MBConv block, registered under `features.*` with the weights' names."""

    def __init__(self, input_size: int) -> None:
        super().__init__()
        self.body = EfficientNetLite0(num_classes=None, input_size=input_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.body.forward_features(x)


def bcnn_network(backbone: str, num_classes: int, *, input_size: int) -> BCNN:
    if backbone == "vgg16":
        return BCNN(vgg16_relu5_3(), 512, num_classes)
    if backbone == "efficientnet_lite0":
        return BCNN(_Lite0Features(input_size), 320, num_classes)
    raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")


def efficientnet_lite0(*, weights: Weights | None = None, num_classes: int = 1000,
                       preprocess: Preprocess | None = None) -> ImageClassifier:
    """EfficientNet-Lite0 image classifier; with `weights`, their classes and preprocessing win."""
    if weights is not None:
        num_classes, preprocess = len(weights.categories), weights.preprocess
    preprocess = preprocess or Preprocess()
    model = ImageClassifier(EfficientNetLite0(num_classes, input_size=preprocess.crop_size), preprocess)
    if weights is not None:
        _load(model, weights)
    return model


def bcnn(backbone: str, *, weights: Weights | None = None, num_classes: int | None = None,
         preprocess: Preprocess | None = None) -> ImageClassifier:
    """A bilinear CNN on `backbone` ("vgg16" or "efficientnet_lite0")."""
    if weights is not None:
        num_classes, preprocess = len(weights.categories), weights.preprocess
    if num_classes is None:
        raise ValueError("bcnn() needs weights or num_classes")
    preprocess = preprocess or default_preprocess(backbone)
    model = ImageClassifier(bcnn_network(backbone, num_classes, input_size=preprocess.crop_size), preprocess)
    if weights is not None:
        _load(model, weights)
    return model


def prepare_for_inference(model: ImageClassifier) -> ImageClassifier:
    """eval mode and BatchNorm folded into convolutions wherever the backbone has them."""
    model.eval()
    for module in model.modules():
        if isinstance(module, EfficientNetLite0):
            module.fold_batchnorm()
    return model


def get_weights(spec: str = "default", *, classes_file: str | None = None) -> Weights:
    """A registry name, "default", or the path of a checkpoint file (ours or the 2019 service's)."""
    if spec in ("default", ""):
        spec = DEFAULT
    if spec in WEIGHTS:
        return WEIGHTS[spec]
    return load_checkpoint(spec, classes_file=classes_file)


def build_model(weights: Weights) -> ImageClassifier:
    """The model a weights entry describes (`weights.arch`, one of `bcnn.weights.ARCHS`), with the weights loaded."""
    if weights.arch == "efficientnet_lite0":
        return efficientnet_lite0(weights=weights)
    return bcnn(weights.arch.removeprefix("bcnn_"), weights=weights)


def _load(model: nn.Module, weights: Weights) -> None:
    state = weights.load()
    expected = model.state_dict()
    problems = [f"{key} has shape {tuple(value.shape)}, the model expects {tuple(expected[key].shape)}"
                for key, value in state.items() if key in expected and value.shape != expected[key].shape]
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing:
        problems.append(f"{len(missing)} parameters missing (first: {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unknown parameters (first: {unexpected[0]})")
    if problems:
        raise CheckpointError(weights.source, f"does not fit architecture {weights.arch}: " + "; ".join(problems[:3]))
    model.load_state_dict(state)
