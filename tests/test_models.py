from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bcnn.backbones import Conv2dSame, EfficientNetLite0
from bcnn.images import Preprocess
from bcnn.models import BCNN, bcnn, bilinear_pool, build_model, prepare_for_inference, signed_sqrt
from bcnn.weights import WEIGHTS


def test_bilinear_pool_matches_an_explicit_loop_over_locations() -> None:
    f = torch.randn(2, 5, 3, 4)
    expected = torch.zeros(2, 5, 5)
    for n in range(2):
        for i in range(3):
            for j in range(4):
                v = f[n, :, i, j]
                expected[n] += torch.outer(v, v)
    expected /= 12
    assert torch.allclose(bilinear_pool(f), expected.reshape(2, 25), atol=1e-5)


def test_signed_sqrt_keeps_the_sign() -> None:
    out = signed_sqrt(torch.tensor([4.0, -9.0, 0.0]))
    assert torch.allclose(out, torch.tensor([2.0, -3.0, 0.0]), atol=1e-4)


def test_bcnn_feature_vector_is_l2_normalised_before_the_classifier() -> None:
    net = BCNN(torch.nn.Conv2d(3, 4, 3), 4, 2)
    seen = {}
    net.fc.register_forward_pre_hook(lambda _m, args: seen.setdefault("z", args[0]))
    net(torch.randn(3, 3, 9, 9))
    assert seen["z"].shape == (3, 16)
    assert torch.allclose(seen["z"].norm(dim=1), torch.ones(3), atol=1e-5)


@pytest.mark.parametrize("size", [64, 97, 160])
def test_bcnn_takes_any_input_size(size: int) -> None:
    model = bcnn("efficientnet_lite0", num_classes=7, preprocess=Preprocess(64, 64)).eval()
    with torch.inference_mode():
        out = model(torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_vgg16_bcnn_has_the_papers_shape() -> None:
    model = bcnn("vgg16", num_classes=3, preprocess=Preprocess(64, 64))
    assert model.network.fc.in_features == 512 * 512
    assert len(model.network.features) == 30  # conv1_1 ... relu5_3, pool5 removed


@pytest.mark.parametrize("size", [224, 225, 64])
@pytest.mark.parametrize(("kernel", "stride"), [(3, 2), (5, 2), (3, 1), (5, 1)])
def test_static_same_padding_matches_tensorflow(size: int, kernel: int, stride: int) -> None:
    conv = Conv2dSame(3, 4, kernel, stride=stride, input_size=size)
    x = torch.randn(1, 3, size, size)
    out_size = -(-size // stride)
    total = max((out_size - 1) * stride + kernel - size, 0)
    reference = F.conv2d(F.pad(x, (total // 2, total - total // 2) * 2), conv.weight, stride=stride)
    assert torch.allclose(conv(x), reference, atol=1e-5)


def test_folding_batchnorm_keeps_the_outputs() -> None:
    torch.manual_seed(0)
    net = EfficientNetLite0(10).eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        before = net(x)
        after = net.fold_batchnorm()(x)
    assert torch.allclose(before, after, atol=1e-4)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())


@pytest.mark.parametrize("name", sorted(WEIGHTS))
def test_every_registered_weights_entry_builds_and_classifies(name: str) -> None:
    weights = WEIGHTS[name]
    model = prepare_for_inference(build_model(weights))
    size = weights.preprocess.crop_size
    with torch.inference_mode():
        logits = model(torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8))
    assert logits.shape == (2, len(weights.categories))
    assert len(weights.labels) == len(weights.answer_indices or weights.categories)
    assert weights.version and weights.source


def test_packaged_imagenet_names_match_torchvision() -> None:
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    from bcnn.weights import IMAGENET_CATEGORIES

    assert list(IMAGENET_CATEGORIES) == list(_IMAGENET_CATEGORIES)


def test_serving_a_lite0_model_never_imports_torchvision() -> None:
    import subprocess
    import sys

    code = ("import sys, torch; from bcnn.predict import Predictor; from bcnn.models import get_weights; "
            "p = Predictor(get_weights()); p(torch.zeros(1, 3, 224, 224, dtype=torch.uint8)); "
            "print('torchvision' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bilinear_head_runs_in_float32_under_autocast(dtype: torch.dtype) -> None:
    """relu5_3 activations of a trained VGG-16 reach a few tens: summed over 28x28 locations, their products
    overflow float16 unless pooling, square root, normalisation and classifier stay in float32."""
    torch.manual_seed(0)
    net = BCNN(torch.nn.Identity(), 512, 10).eval()
    features = torch.rand(4, 512, 28, 28) * 60
    with torch.inference_mode():
        expected = net(features)
        with torch.autocast("cpu", dtype=dtype):
            logits = net(features.to(dtype))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert torch.allclose(logits, expected, atol=2e-3, rtol=1e-2)


def test_bilinear_head_trains_with_finite_gradients_under_autocast() -> None:
    net = BCNN(torch.nn.Conv2d(3, 64, 3, padding=1), 64, 5)
    with torch.no_grad():
        net.features.weight.mul_(200)  # large activations, as a trained backbone's
    with torch.autocast("cpu", dtype=torch.float16):
        loss = F.cross_entropy(net(torch.rand(2, 3, 28, 28)), torch.tensor([1, 3]))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in net.parameters())
