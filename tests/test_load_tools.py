"""The measuring tools' own logic: which serving role a process plays, wrk's figures in the load generator's
summary shape, that a benchmark loads Ray only after setting its environment, the benchmark models' names, and the
collection's sections."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from load.cpu_watch import role_of
from load.loadgen import wrk_summary


def test_a_replica_is_known_by_its_deployment_whatever_task_it_runs() -> None:
    # Ray titles an actor's process with the task it runs, when that is not a request.
    assert role_of(["ray::ServeReplica:waterbirds:Classifier"]) == "Classifier"
    assert role_of(["ray::ServeReplica:waterbirds:Classifier.initialize_and_get_metadata"]) == "Classifier"
    assert role_of(["ray::ServeReplica:classifier-profile:Classifier.reconfigure"]) == "Classifier"
    assert role_of(["/usr/bin/wrk", "-t2", "-c64"]) == "load generator"
    assert role_of(["ray::HAProxyManager"]) == "HAProxy"
    assert role_of(["/usr/bin/python3", "something else"]) is None


def test_wrk_figures_take_the_load_generators_shape() -> None:
    raw = {"duration_us": 10_000_000, "requests": 1003, "statuses": {"200": 990, "503": 10},
           "errors": {"connect": 0, "read": 2, "write": 0, "timeout": 1},
           "latency_us": {"p50": 12_345, "p90": 20_000, "p99": 45_000, "mean": 13_000.0, "max": 90_000}}
    got = wrk_summary(raw, users=64, cpu_s=0.5)
    assert got["statuses"] == {"200": 990, "503": 10, "0": 3}  # connections that got no answer: status 0
    assert (got["ok"], got["overloaded_503"], got["failed"], got["requests"]) == (990, 10, 3, 1003)
    assert got["throughput_rps"] == 99.0 and got["latency_ms_p50"] == 12.3 and got["latency_ms_p99"] == 45.0
    assert got["generator"] == "wrk" and got["generator_cpu_cores"] == 0.05


def test_the_benchmarks_load_ray_only_once_they_have_set_its_environment() -> None:
    """Ray reads RAY_AUTH_MODE when it is imported; a benchmark that imported it before setting the variable could
    not connect to the token-authenticated cluster it starts (`load.classifier.run`). (`python -m load` sets it before
    any scenario runs: `make bench` imports Ray with the benchmark devices before the Classifier alone connects.)"""
    from load.__main__ import SCENARIOS

    modules = ", ".join(m for m in SCENARIOS.values() if m != "load.__main__")
    code = f"import sys, load.__main__, load.gpu_run, {modules}\nprint('ray' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert loaded.stdout == "False\n", loaded.stderr[-2000:]


def test_a_benchmark_model_is_named_by_its_input_size(tmp_path: Path) -> None:
    from bcnn.models import get_weights
    from load.bare_model import model_checkpoint

    assert model_checkpoint("default") == "default"
    assert model_checkpoint(str(tmp_path / "mine.pt")) == str(tmp_path / "mine.pt")  # a path, as bcnn reads it
    weights = get_weights(model_checkpoint("vgg16_32", classes=3))
    assert weights.preprocess.crop_size == 32 and len(weights.categories) == 3


def test_each_collection_model_writes_its_own_section() -> None:
    """`make bench` runs the collection at 224 and at 448: each run's section goes under its own marker of
    docs/performance.md, so that the second does not replace the first."""
    from load import collection

    run = {"photos": 24, "seconds": 40.0, "photos_per_s": 0.6, "peak_rss_mb": 1430.0}
    report = {"date": "2026-12-07 02:10Z", "machine_cpus": 2, "checkpoint": "default",
              "bcnn_predict": {**run, "start_up_seconds": 5.6, "steady_photos_per_s": 0.73},
              "classify": {**run, "classifying_photos_per_s": 0.8}, "classify_10x": {**run, "photos": 240,
                                                                                     "classifying_photos_per_s": 1.3},
              "speedup": 0.91, "speedup_10x": 1.74, "speedup_classifying": 1.78, "memory_10x_over_1x": 1.01}
    default = collection.sections(report)
    assert list(default) == ["bench-collection"] and "the embedded default" in default["bench-collection"]
    vgg = collection.sections({**report, "checkpoint": "vgg16_448"})
    assert list(vgg) == ["bench-collection-vgg16_448"]
    assert "`--checkpoint vgg16_448`" in vgg["bench-collection-vgg16_448"] and "1.74x at 240" in vgg[
        "bench-collection-vgg16_448"]
    performance = (Path(__file__).resolve().parents[1] / "docs" / "performance.md").read_text()
    assert all(f"<!-- {marker}:start -->" in performance for marker in (*default, *vgg))
