"""The GPU benchmark profile's whole code path, in a short form on this CPU (one logical GPU, a VGG16-BCNN at
64x64 with four classes; the embedded default goes through the same per-model loop on a GPU), so that it cannot
rot between runs on a GPU machine. Its own Ray, so this module runs before the session's service starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.service import ENV, ROOT

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def test_gpu_profile_runs_end_to_end_in_short(tmp_path: Path, photos: list) -> None:  # noqa: ARG001 - needs them
    command = [sys.executable, "-m", "load.bench", "--profile", "gpu", "--logical-gpus", "1", "--logical-cpus", "8",
               "--users", "1,8", "--seconds", "2", "--warmup", "2", "--cooldown", "3", "--limit-seconds", "1",
               "--batch-sizes", "1,2", "--vgg-size", "64", "--vgg-classes", "4", "--seed-workers", "1",
               "--models", "vgg16_64", "--out", str(tmp_path), "--no-readme"]
    run = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    [result] = tmp_path.glob("gpu-*.json")
    assert result.with_suffix(".png").stat().st_size > 10_000
    report = json.loads(result.read_text())
    assert report["models"] == ["vgg16_64"] and report["machine"]["gpus"] == 1
    for model in report["models"]:
        limits = report["limits"][model]
        assert set(limits["model_images_per_s"]) == {"1", "2"} and limits["decode_per_core"] > 0
        ours, seed = report["ours"][model], report["seed_baseline"][model]["points"]
        assert set(ours["points"]) == set(seed) == {"1", "8"}
        for point in [*ours["points"].values(), *seed.values()]:
            assert point["ok"] > 0 and set(point["statuses"]) <= {"200", "503"}, point
        for point in ours["points"].values():
            replicas = point["replicas"]
            assert replicas["Classifier"]["max"] == 1  # one replica per GPU
            assert replicas["Ingress"]["min"] >= 2 and replicas["Preprocessor"]["min"] >= 2
        assert ours["cooldown"]["replicas"]["Preprocessor"]["last"] >= 2
    assert report["targets"]["only_200_and_503"] is True
    assert "| vgg16_64 | 8 |" in run.stdout and "Targets:" in run.stdout
