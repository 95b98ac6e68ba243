"""The GPU run (`python -m load.gpu_run`) in its short form on this CPU, so that it cannot rot between runs on a GPU
machine: the GPU path's correctness check (what a CPU can run of it), the bare model per variant, the Classifier
alone against the simulated device, and the GPU profile of the whole node (one logical GPU, a VGG16-BCNN at 64x64
with the 2019 design beside it, wrk where it is installed, py-spy on the Classifier). The Classifier step holds the
short form of the overlap target: at the production input size it keeps a device four times slower than an H200 at
least 0.9 busy (the serial Classifier before it: 0.77). Its own Ray, so this module runs before the session's
service starts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.service import ENV, ROOT

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.long]


def test_the_gpu_run_in_short(tmp_path: Path, photos: list) -> None:  # noqa: ARG001 - needs them
    command = [sys.executable, "-m", "load.gpu_run", "--short", "--out", str(tmp_path)]
    run = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    logs = {p.name: p.read_text()[-3000:] for p in tmp_path.glob("*.log")}
    assert run.returncode == 0, (run.stdout[-2000:], logs)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["steps"]) == {"correctness", "bare_model", "classifier", "node", "collection"}

    check = json.loads((tmp_path / "gpu-check.json").read_text())
    assert check["passed"] and check["pipelined"]["passed"] and check["lite0_autocast"]["passed"], check
    assert check["pipelined"]["swapped_at_round"] is not None and check["pipelined"]["worst_relative_diff"] <= 1e-3
    assert set(check["first_passes"]["first_ms"]) == {"1", "2", "3", "4"}
    assert check["out_of_memory"] == check["overlap"] == {"skipped": "needs a CUDA GPU"}

    bare = json.loads((tmp_path / "bare_model.json").read_text())
    assert set(bare["eager"]["images_per_s"]) == {"1", "2"} and bare["eager"]["check"]["passed"], bare
    assert bare["cuda_graphs"] == {"skipped": "needs a CUDA GPU"}

    classifier = json.loads((tmp_path / "classifier.json").read_text())
    assert classifier["device"] == "simulated" and classifier["input_size"] == 448
    assert classifier["device_busy"] >= 0.9, classifier
    assert classifier["images_per_s"] >= 0.9 * classifier["device_limit_images_per_s"], classifier
    assert 0 < classifier["classifier_cpu_ms_per_image"] and classifier["driver_cpu_cores"] < 1
    assert f"| {classifier['images_per_s']:,} |" in (tmp_path / "classifier.log").read_text()  # its section

    result = tmp_path / "node" / "gpu.json"
    assert result.with_suffix(".png").stat().st_size > 10_000
    report = json.loads(result.read_text())
    assert report["models"] == ["vgg16_64"] and report["machine"]["gpus"] == 1
    assert report["generator"] == ("wrk" if shutil.which("wrk") else "python")
    model = "vgg16_64"
    limits = report["limits"][model]
    assert set(limits["model_images_per_s"]) == {"1", "2"} and limits["decode_per_core"] > 0
    ours, seed = report["ours"][model], report["seed_baseline"][model]["points"]
    assert set(ours["points"]) == set(seed) == {"8"}
    for point in [*ours["points"].values(), *seed.values()]:
        assert point["ok"] > 0 and set(point["statuses"]) <= {"200", "503"}, point
        assert point["generator_cpu_cores"] is not None
    for point in ours["points"].values():
        replicas = point["replicas"]
        assert replicas["Classifier"]["max"] == 1  # one replica per GPU
        assert replicas["Ingress"]["min"] >= 2 and replicas["Preprocessor"]["min"] >= 2
    assert ours["cooldown"]["replicas"]["Preprocessor"]["last"] >= 2
    [profile] = ours["points"]["8"]["py_spy"]
    assert "deployments/classifier.py" in (tmp_path / "node" / profile).read_text()  # stacks of the Classifier
    assert report["targets"]["only_200_and_503"] is True
    assert "| vgg16_64 | 8 |" in (tmp_path / "node.log").read_text()

    collection = json.loads((tmp_path / "collection.json").read_text())
    assert collection["classify_10x"]["photos"] == 160 and collection["bcnn_predict"]["photos"] == 8, collection
    assert collection["speedup_10x"] > 0 and collection["memory_10x_over_1x"] > 0
