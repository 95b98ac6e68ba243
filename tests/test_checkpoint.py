from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bcnn.checkpoint import load_checkpoint, read_classes_file, save_checkpoint
from bcnn.images import Preprocess
from bcnn.models import BCNN, bcnn, build_model, get_weights
from bcnn.weights import CheckpointError

SMALL = Preprocess(64, 72)


def _logits(model: torch.nn.Module, size: int) -> torch.Tensor:
    torch.manual_seed(1)
    x = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    with torch.inference_mode():
        return model.eval()(x)


def test_round_trip_keeps_architecture_classes_preprocessing_and_outputs(tmp_path: Path) -> None:
    model = bcnn("efficientnet_lite0", num_classes=3, preprocess=SMALL)
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, arch="bcnn_efficientnet_lite0", categories=("a", "b", "c"), preprocess=SMALL)
    weights = get_weights(str(path))
    assert weights.arch == "bcnn_efficientnet_lite0"
    assert weights.categories == ("a", "b", "c")
    assert weights.preprocess == SMALL
    assert len(weights.version) == 12
    assert torch.allclose(_logits(build_model(weights), 64), _logits(model, 64), atol=1e-6)


def _legacy_state(num_classes: int) -> dict[str, torch.Tensor]:
    """What the 2019 service saved: torch.nn.DataParallel(BCNN()).state_dict()."""
    model = BCNN(bcnn("vgg16", num_classes=num_classes, preprocess=SMALL).network.features, 512, num_classes)
    return torch.nn.DataParallel(model).state_dict()


def test_loads_the_replaced_services_layout(tmp_path: Path) -> None:
    state = _legacy_state(3)
    assert "module.features.28.weight" in state and state["module.fc.weight"].shape == (3, 262144)
    torch.save(state, tmp_path / "bcnn.pth")
    (tmp_path / "classes.txt").write_text("1 小天鹅\n2 黄头鹡鸰\n3 绿翅鸭\n", encoding="utf-8")
    weights = load_checkpoint(tmp_path / "bcnn.pth", classes_file=tmp_path / "classes.txt")
    assert weights.arch == "bcnn_vgg16" and weights.categories == ("小天鹅", "黄头鹡鸰", "绿翅鸭")
    model = build_model(weights)
    assert torch.equal(model.network.fc.weight, state["module.fc.weight"])
    assert _logits(model, 64).shape == (2, 3)


def test_legacy_checkpoint_with_the_wrong_class_list_names_both(tmp_path: Path) -> None:
    torch.save(_legacy_state(3), tmp_path / "bcnn.pth")
    (tmp_path / "classes.txt").write_text("1 a\n2 b\n", encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"bcnn\.pth: has 3 classes but .*classes\.txt names 2"):
        load_checkpoint(tmp_path / "bcnn.pth", classes_file=tmp_path / "classes.txt")
    with pytest.raises(CheckpointError, match="give its class list"):
        load_checkpoint(tmp_path / "bcnn.pth")


def test_shared_class_list_reads() -> None:
    path = Path(__file__).resolve().parents[2] / "shared" / "waterbirds" / "classes_172.txt"
    if not path.is_file():
        pytest.skip(f"{path} is not here; CI has it")
    classes = read_classes_file(path)
    assert len(classes) == 172 and classes[0] == "小天鹅"


def test_corrupt_file_gets_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.pt"
    model = bcnn("efficientnet_lite0", num_classes=2, preprocess=SMALL)
    save_checkpoint(path, model, arch="bcnn_efficientnet_lite0", categories=("a", "b"), preprocess=SMALL)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"broken\.pt: is not a readable PyTorch file"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "missing.pt")


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("code ran",))


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"format": "waterbirds-bcnn", "payload": _Evil()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)


def test_state_dict_that_does_not_fit_names_the_parameter(tmp_path: Path) -> None:
    path = tmp_path / "wrong.pt"
    model = bcnn("efficientnet_lite0", num_classes=2, preprocess=SMALL)
    save_checkpoint(path, model, arch="bcnn_vgg16", categories=("a", "b"), preprocess=SMALL)
    with pytest.raises(CheckpointError, match=r"wrong\.pt: does not fit architecture bcnn_vgg16: .*fc\.weight"):
        build_model(load_checkpoint(path))


def test_unknown_dictionary_is_not_mistaken_for_a_checkpoint(tmp_path: Path) -> None:
    torch.save({"hello": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="neither"):
        load_checkpoint(tmp_path / "other.pt")
