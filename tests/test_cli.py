from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests import images
from tests.conftest import Photo


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bcnn", *args], capture_output=True, text=True, timeout=300)


def test_predict_json_answers_good_files_and_reports_bad_ones(tmp_path: Path, mapped_photos: list[Photo]) -> None:
    bad = tmp_path / "notes.jpg"
    bad.write_bytes(images.TEXT)
    good = mapped_photos[0].path
    result = _cli("predict", "--json", "--top-k", "3", str(good), str(bad))
    assert result.returncode == 1
    first, second = (json.loads(line) for line in result.stdout.splitlines())
    assert first["file"] == str(good) and first["is_waterbird"] is True
    assert [set(p) for p in first["predictions"]] == [{"label", "score", "index"}] * 3
    assert first["predictions"][0]["label"] == mapped_photos[0].imagenet_label
    assert second == {"file": str(bad), "error": {"code": "invalid_image", "message": second["error"]["message"]}}


def test_bench_writes_json_for_both_backends(tmp_path: Path) -> None:
    result = _cli("bench", "--batch-sizes", "1,2", "--threads", "1", "--seconds", "0.3", "--backend", "both",
                  "--out", str(tmp_path / "b.json"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "b.json").read_text())
    assert [(r["backend"], r["batch_size"]) for r in report["results"]] == [
        ("torch", 1), ("torch", 2), ("onnxruntime", 1), ("onnxruntime", 2)]
    assert report["best"]["images_per_s"] > 0 and report["peak_rss_mb"] > 0


def test_bad_checkpoint_is_a_clear_error_not_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "nonsense.pt"
    path.write_bytes(b"not a checkpoint")
    result = _cli("predict", "--checkpoint", str(path), "x.jpg")
    assert result.returncode == 2
    assert "nonsense.pt: is not a readable PyTorch file" in result.stderr and "Traceback" not in result.stderr
