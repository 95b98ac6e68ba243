"""The model off PyTorch: ONNX export with its self-check, and ONNX Runtime as a backend answering as torch does."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from bcnn.backends import check_provider, check_session, is_device_failure, open_session, resolve
from bcnn.checkpoint import save_checkpoint
from bcnn.cli import main as bcnn_cli
from bcnn.export import OnnxModelError, content_sha256
from bcnn.models import get_weights
from bcnn.predict import Predictor, rank_logits
from bcnn.preprocess import load_image, preprocess_image
from bcnn.species import SpeciesRule
from bcnn.train import TrainConfig, build_for_training
from load.bare_model import random_bcnn_checkpoint
from tests.conftest import Photo


def _bcnn_lite0_checkpoint(path: Path) -> Path:
    """What `bcnn train` starts from: ImageNet Lite0 features, a new bilinear classifier for 172 species."""
    torch.manual_seed(0)
    model, preprocess = build_for_training(TrainConfig(data="unused"), 172)
    save_checkpoint(path, model, arch="bcnn_efficientnet_lite0", categories=tuple(f"s{i}" for i in range(172)),
                    preprocess=preprocess, meta={"version": "untrained"})
    return path


def _checkpoint(kind: str, tmp_path: Path) -> str:
    if kind == "default":
        return "default"
    if kind == "bcnn_efficientnet_lite0":
        return str(_bcnn_lite0_checkpoint(tmp_path / "bcnn-lite0.pt"))
    return str(random_bcnn_checkpoint(tmp_path / "vgg.pt", input_size=112, num_classes=20))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["default", "bcnn_efficientnet_lite0", "bcnn_vgg16"])
def test_export_checks_itself_on_real_photos_and_the_file_carries_what_an_app_needs(
        kind: str, tmp_path: Path, photos: list[Photo], capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint, out = _checkpoint(kind, tmp_path), tmp_path / "model.onnx"
    sample = [str(p.path) for p in photos[::10]]
    assert bcnn_cli(["export", "--checkpoint", checkpoint, "--out", str(out), "--verify", *sample]) == 0
    printed = capsys.readouterr().out
    assert f"top-1 equal on {len(sample)} of {len(sample)} images" in printed and "passed" in printed, printed

    weights = get_weights(checkpoint)
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["name"] == weights.name and meta["arch"] == weights.arch
    assert json.loads(meta["categories"]) == list(weights.categories)
    assert [json.loads(meta["categories"])[i] for i in json.loads(meta["answer_indices"])] == list(weights.labels)
    assert json.loads(meta["preprocess"]) == weights.preprocess.to_dict()
    assert float(meta["waterbird_threshold"]) == 0.2

    # Only onnxruntime and the file: any batch size, uint8 pixels in, the model's logits out.
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    side = weights.preprocess.crop_size
    batch = np.stack([preprocess_image(Path(p).read_bytes(), weights.preprocess).numpy() for p in sample[:3]])
    assert batch.shape == (3, 3, side, side) and batch.dtype == np.uint8
    logits = session.run(None, {"images": batch})[0]
    assert logits.shape == (3, len(weights.categories)) and logits.dtype == np.float32

    # The species rule travels in the file, and applied there gives the service's answers.
    rule = json.loads(meta["species_rule"])
    assert rule == (weights.species_rule.to_dict() if weights.species_rule else None)
    if rule is not None:
        answer_index = torch.tensor(json.loads(meta["answer_indices"]))
        from_file = rank_logits(torch.from_numpy(logits), answer_index, rule=SpeciesRule.from_dict(rule))
        served = Predictor(weights, backend="torch").rank(torch.from_numpy(logits))
        assert (from_file.species_known == served.species_known).all()
        assert np.allclose(from_file.species_confidence, served.species_confidence)


@pytest.mark.long  # 20 s of ExecuTorch's export on two cores: `make test-long`
def test_an_executorch_program_for_phones_checks_itself_the_same_way(
        tmp_path: Path, photos: list[Photo], capsys: pytest.CaptureFixture[str]) -> None:
    from executorch.runtime import Runtime

    out, sample = tmp_path / "waterbirds.pte", [str(p.path) for p in photos[::10]]
    assert bcnn_cli(["export", "--format", "pte", "--out", str(out), "--verify", *sample]) == 0
    printed = capsys.readouterr().out
    assert f"ExecuTorch (XNNPACK) against PyTorch on {len(sample)} photos: passed" in printed, printed
    meta = json.loads(Path(f"{out}.json").read_text())
    weights = get_weights("default")
    assert json.loads(meta["categories"]) == list(weights.categories) and meta["name"] == weights.name

    method = Runtime.get().load_program(out).load_method("forward")
    batch = torch.stack([preprocess_image(Path(p).read_bytes(), weights.preprocess) for p in sample[:3]])
    assert tuple(method.execute([batch])[0].shape) == (3, 1000)


def test_the_exported_graph_is_float32_throughout(tmp_path: Path) -> None:
    """The bilinear head must never run in half precision: its sums of products overflow float16."""
    checkpoint = random_bcnn_checkpoint(tmp_path / "vgg.pt", input_size=64, num_classes=5)
    assert bcnn_cli(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "m.onnx")]) == 0
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    half = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    assert not [i.name for i in graph.initializer if i.data_type in half]
    assert not [n.name for n in graph.node if n.op_type == "Cast"
                and any(a.name == "to" and a.i in half for a in n.attribute)]


@pytest.fixture(scope="module")
def default_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache holding the embedded default's export (seconds each); tests that spoil it copy it first."""
    cache = tmp_path_factory.mktemp("onnx-cache")
    Predictor(get_weights("default"), backend="onnxruntime", cache_dir=cache)
    return cache


def _copy_of(cache: Path, tmp_path: Path) -> Path:
    shutil.copytree(cache, tmp_path / "cache")
    return tmp_path / "cache"


def test_onnxruntime_answers_as_torch_on_real_photos(photos: list[Photo], default_cache: Path) -> None:
    weights = get_weights("default")
    torch_predictor = Predictor(weights, backend="torch", threads=1)
    onnx_predictor = Predictor(weights, backend="onnxruntime", threads=1, cache_dir=default_cache)
    assert onnx_predictor.backend.name == "onnxruntime"
    images = torch.stack([preprocess_image(p.path.read_bytes(), weights.preprocess) for p in photos[:64]])
    expected, got = torch_predictor(images, top_k=3), onnx_predictor(images, top_k=3)
    for a, b in zip(expected, got, strict=True):
        assert [p.index for p in a.predictions] == [p.index for p in b.predictions]
        assert a.is_waterbird == b.is_waterbird
        assert max(abs(x.score - y.score) for x, y in zip(a.predictions, b.predictions, strict=True)) < 1e-4


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_a_batch_launched_in_parts_gives_the_logits_of_the_whole(photos: list[Photo], default_cache: Path,
                                                                  backend: str) -> None:
    """What the Classifier sends: the preprocessors' arrays (uint8, channels last) as they came, one forward pass."""
    weights = get_weights("default")
    predictor = Predictor(weights, backend=backend, threads=1, cache_dir=default_cache)  # type: ignore[arg-type]
    pixels = [load_image(p.path.read_bytes(), weights.preprocess).pixels for p in photos[:5]]
    parts = [np.stack(pixels[:2]), np.stack(pixels[2:])]
    whole = predictor.logits(torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2))
    torch.testing.assert_close(predictor.launch(parts).wait(), whole, rtol=1e-4, atol=1e-4)


def test_auto_is_onnxruntime_on_the_cpu_and_torch_on_cuda() -> None:
    assert resolve("auto", torch.device("cpu")) == "onnxruntime"
    assert resolve("auto", torch.device("cuda", 0)) == "torch"
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'"):
        resolve("tensorrt", torch.device("cpu"))  # type: ignore[arg-type]


def _cached_file(cache: Path) -> Path:
    (path,) = (cache / "onnx").glob("*.onnx")
    return path


def test_a_broken_cached_file_is_refused_with_its_reason_and_replaced(
        default_cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    weights, cache = get_weights("default"), _copy_of(default_cache, tmp_path)
    path = _cached_file(cache)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="bcnn.backends"):
        predictor = Predictor(weights, cache_dir=cache)
    assert any("refusing the cached ONNX model" in r.message and str(path) in r.message for r in caplog.records)
    assert predictor.backend.name == "onnxruntime"
    predictor.logits(torch.zeros(1, 3, 224, 224, dtype=torch.uint8))
    open_session(path)  # whole again


def test_a_cached_file_from_other_weights_is_refused(default_cache: Path, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    weights, cache = get_weights("default"), _copy_of(default_cache, tmp_path)
    path = _cached_file(cache)
    model = onnx.load(str(path))
    for prop in model.metadata_props:
        if prop.key == "content_sha256":
            prop.value = "0" * 64
    onnx.save(model, str(path))

    content = content_sha256(weights)
    with pytest.raises(OnnxModelError, match="exported from other weights") as refused:
        check_session(open_session(path), path, content=content, weights=weights)
    assert str(path) in str(refused.value) and content in str(refused.value)
    with caplog.at_level(logging.WARNING, logger="bcnn.backends"):
        Predictor(weights, cache_dir=cache)
    assert any("exported from other weights" in r.message for r in caplog.records)
    check_session(open_session(path), path, content=content, weights=weights)  # replaced by a good export


def test_a_session_not_running_on_the_provider_asked_for_is_refused(default_cache: Path) -> None:
    """ONNX Runtime runs a session on the CPU, without raising, where its CUDA provider's libraries fail to load."""
    session = open_session(_cached_file(default_cache))
    check_provider(session, "CPUExecutionProvider")
    with pytest.raises(ValueError, match="did not start CUDAExecutionProvider .*runs on CPUExecutionProvider"):
        check_provider(session, "CUDAExecutionProvider")


@pytest.mark.parametrize(("error", "device_failed"), [
    (torch.AcceleratorError("CUDA error: an illegal memory access was encountered"), True),
    (RuntimeError("CUDA error: unspecified launch failure"), True),
    (RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"), True),
    (RuntimeError("[ONNXRuntimeError] : 1 : FAIL : CUDA failure 700: an illegal memory access was encountered"), True),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.06 GiB"), False),
    (RuntimeError("CUDA error: out of memory"), False),
    (RuntimeError("Given groups=1, weight of size [64, 3, 3, 3], expected input to have 3 channels"), False),
    (ValueError("could not broadcast input array"), False),
])
def test_only_errors_that_leave_the_device_unusable_count_as_its_failure(error: Exception,
                                                                         device_failed: bool) -> None:
    assert is_device_failure(error) is device_failed
