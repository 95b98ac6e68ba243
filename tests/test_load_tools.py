"""The measuring tools' own logic: which serving role a process plays, wrk's figures in the load generator's
summary shape, and that a benchmark loads Ray only after setting its environment."""

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
