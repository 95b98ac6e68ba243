"""Several models side by side (docs/serving.md, "Several models"): what serving two models, and shadowing one,
costs against one model on the same replicas.

On the local profile, back to back in one cluster (each phase a `serve deploy` that reconfigures in place): the
embedded default alone; the default and a copy of it as a second model (`bcnn convert`: the same work per image,
so any difference is the cost of serving two), the uploads spread over both by a canary share of 0.5; the default
alone with a 10% shadow to the copy; the default alone again, to bracket the host's drift. Then, in this process,
what adding a model costs a replica: its load and warm-up at 224 (the embedded default) and at 448 (a VGG16-BCNN).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from load import runner
from load.bare_model import model_checkpoint

COPY = "lite0-copy"


@dataclass(frozen=True)
class Settings:
    users: int = 16
    seconds: float = 20.0
    shadow: float = 0.1


def _phases(default: str, copy: Path, shadow: float) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(name, Classifier settings added, Ingress settings added) of each phase."""
    second = {"models": {COPY: {"checkpoint": str(copy)}}}
    return [("one model", {}, {}),
            ("two models, uploads spread over both", second,
             {"candidates": {default: {"model": COPY, "share": 0.5}}}),
            (f"one model, {shadow:.0%} shadowed", second, {"candidates": {default: {"model": COPY, "shadow": shadow}}}),
            ("one model, again", {}, {})]


def load_seconds(checkpoint: str, backend: str = "auto") -> float:
    """A Classifier replica's load and warm-up of `checkpoint` beside what it serves: what adding a model costs."""
    from deployments.classifier import Classifier

    with asyncio.Runner() as loop:
        replica = Classifier.func_or_class()
        loop.run(replica.reconfigure({"checkpoint": "default"}))
        start = time.perf_counter()
        loop.run(replica.reconfigure({"checkpoint": "default", "models": {"new": {"checkpoint": checkpoint,
                                                                                   "backend": backend}}}))
        return round(time.perf_counter() - start, 2)


def run(s: Settings) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="models-"))
    copy = folder / f"{COPY}.pt"
    subprocess.run([sys.executable, "-m", "bcnn", "convert", "default", "--out", str(copy)], check=True,
                   capture_output=True)
    uploads, url = runner.uploads(), runner.CLASSIFY_URL
    default = runner.model_name("default")
    report: dict[str, Any] = {"users": s.users, "seconds": s.seconds, "phases": []}
    with runner.Cluster() as cluster:
        for name, classifier, ingress in _phases(default, copy, s.shadow):
            config = runner.serve_config("local")
            runner.deployment(config, "Classifier")["user_config"].update(classifier)
            runner.deployment(config, "Ingress")["user_config"].update(ingress)
            cluster.deploy(config, uploads[0])
            print(f"models: {name}", flush=True)
            point = runner.point(url, uploads, s.users, s.seconds, warm_s=5)
            models = httpx.get(runner.SERVICE_URL + "/models", timeout=30).json()
            report["phases"].append({"phase": name, **point, "models": models})
    report["load_seconds"] = {"224, embedded default": load_seconds("default"),
                              "448, VGG16-BCNN": load_seconds(model_checkpoint("vgg16_448"))}
    return report


def sections(report: dict[str, Any]) -> dict[str, str]:
    phases = report["phases"]
    base = (phases[0]["throughput_rps"] + phases[-1]["throughput_rps"]) / 2
    base_p99 = (phases[0]["latency_ms_p99"] + phases[-1]["latency_ms_p99"]) / 2
    lines = [f"Measured {runner.now()} on {runner.machine()['cpus']} CPUs (`make bench`, or alone: `python -m load "
             f"models`), local profile (two Classifier replicas), {report['users']} users for {report['seconds']:g} s "
             "a phase, back to back; the second model is the default converted (`bcnn convert`), so it costs the "
             "same per image and the difference is what serving two costs. Against one model: the mean of the first "
             "and last phases.", "",
             "| phase | answered/s | vs one model | p99 (ms) | vs one model | statuses |",
             "| --- | --- | --- | --- | --- | --- |"]
    for p in phases:
        lines.append(f"| {p['phase']} | {p['throughput_rps']} | {p['throughput_rps'] / base:.2f} | "
                     f"{p['latency_ms_p99']:.0f} | {p['latency_ms_p99'] / base_p99:.2f} | {p['statuses']} |")
    loads = ", ".join(f"{size}: {seconds:.2f} s" for size, seconds in report["load_seconds"].items())
    lines += ["", f"Adding a model to a replica (loaded and warmed up beside the one it serves, on this CPU): {loads}. "
              "Every replica holds every model, so no request waits for a load; a deploy that adds one does."]
    return {"bench-models": "\n".join(lines)}
