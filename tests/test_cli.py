from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bcnn.weights import DEFAULT_SPECIES_RULE
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
    assert [set(p) for p in first["predictions"]] == [{"label", "name", "score", "index"}] * 3
    assert first["predictions"][0]["label"] == mapped_photos[0].imagenet_label
    assert second == {"file": str(bad), "error": {"code": "invalid_image", "message": second["error"]["message"]}}


def test_predict_says_when_the_species_is_not_one_it_knows(photos: list[Photo]) -> None:
    by_name = {p.path.name: p for p in photos}
    kittiwake, stork = by_name["wb-002.jpg"].path, by_name["wb-005.jpg"].path
    result = _cli("predict", "--top-k", "2", str(kittiwake), str(stork))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == (f"{kittiwake}: a waterbird, species uncertain: the model cannot tell, and it may be one it "
                        "was not taught (closest of the 23 it knows: Dunlin, Ruddy turnstone)")
    assert lines[1].startswith(f"{stork}: White stork, confidence ") and lines[1].endswith("; next: Black stork")
    answer = json.loads(_cli("predict", "--json", str(kittiwake)).stdout)
    assert answer["is_waterbird"] is True and answer["species_known"] is False and answer["level"] == "waterbird"
    assert answer["predictions"][0]["label"] == "red-backed sandpiper" and answer["predictions"][0]["name"] == "Dunlin"
    assert answer["species_confidence"] is None  # no number where it cannot tell the species


def test_evaluate_measures_the_species_rule_on_labelled_photos(tmp_path: Path, photos: list[Photo]) -> None:
    """A CSV of photos, the ten of species the model knows labelled and 40 of other species not; the figures on all
    243 are docs/model.md's (test_predict checks them in process)."""
    sample = [p for p in photos if p.imagenet_label] + [p for p in photos if not p.imagenet_label][:40]
    table = tmp_path / "photos.csv"
    table.write_text("file,imagenet_label\n" + "".join(f"{p.path.name},{p.imagenet_label or ''}\n" for p in sample))
    result = _cli("evaluate", "--checkpoint", "default", "--data", str(table), "--image-root",
                  str(photos[0].path.parent), "--label-column", "imagenet_label", "--workers", "0",
                  "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-2000:]
    species = json.loads((tmp_path / "out" / "metrics.json").read_text())["species"]
    assert species["photos"] == {"known_species": 10, "unknown_species": 40}
    assert species["known"]["named_and_right"] == 1.0 and species["unknown"]["named_wrongly"] <= 0.4
    assert species["auroc_known_vs_unknown"] > 0.8 and set(species["auroc_of_other_scores"]) == {
        "max_softmax", "answer_mass", "top_share", "energy"}
    features = species["feature_scores"]  # from the penultimate features: none of them is the rule's score
    assert set(features) == {"react_p90", "ash_s_keep_35", "ash_s_keep_10", "cosine"}
    assert all(0.5 < f["auroc"] <= 1 and f["interval"][0] <= f["auroc"] <= f["interval"][1] for f in features.values())
    calibration = species["calibration"]
    assert calibration["after"]["ece"] < calibration["before"]["ece"]
    rule = json.loads((tmp_path / "out" / "species_rule.json").read_text())
    # The rule the ten known-species photos support is the embedded default's (fitted the same way, docs/model.md).
    assert rule["score"] == "max_logit" and (rule["threshold"], rule["slope"], rule["intercept"]) == (
        DEFAULT_SPECIES_RULE.threshold, DEFAULT_SPECIES_RULE.slope, DEFAULT_SPECIES_RULE.intercept)
    assert (tmp_path / "out" / "reliability.png").stat().st_size > 10_000
    assert "species it does not know: 40 photos" in result.stdout


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
