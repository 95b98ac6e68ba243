"""The whole GPU measurement in one run, for a lent GPU machine (at most 8 minutes there; everything under `--out`):

0. the GPU path's correctness (`python -m load gpu-check`): pipelined batches against synchronous ones while staging
   slots are made and a model is swapped, finite logits under autocast, first passes after warm-up, out-of-memory,
   copies overlapping kernels. If it fails, nothing is measured: speeds of wrong answers mean nothing;
1. the bare VGG16-BCNN at 448 per batch size for each forward-pass variant (`load.variants`), each checked against
   the eager float32 model, with its build time;
2. the Classifier alone with the real GPU (`load.classifier`): images/s against the bare model's rate at the
   batch sizes it was given, and its CPU per image;
3. the full node with the production file at 64, 256 and 1,024 users, then the 2019 design at the same points
   (`load.gpu`), loaded by `wrk`, with the GPU's busy fraction, the replica counts, and py-spy's profile of
   the Classifier at 256 users;
4. a whole collection (`load.collection`): `waterbirds-classify` over 2,000 and 20,000 links to the photos against
   `bcnn predict`, with the same checkpoint, where Ray Data is installed (the GPU kit may lack its pyarrow);
5. if time is left, `torch.compile` (its build may take minutes), then the same node with two Classifier replicas
   sharing the GPU (Ray's fractional GPUs) at 256 users.

Each step runs as a process of its own and its output goes to `<out>/<step>.log`; a step that fails is recorded and
the next one runs. `summary.json` says what ran, how long each took and what failed. With the offline kit
(../shared/gpu-kit/README.md):

    source .gpu/install.sh .gpu && python3 -m load.gpu_run --out "$OUT"

`--short` runs the same steps on this CPU in seconds (a logical GPU, the simulated device, a VGG16-BCNN at 64x64),
which the suite does so that the script cannot rot between GPU runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BUDGET_S = 480.0
# Steps that need a module the GPU machine's kit may not hold: skipped, saying so, where it is missing.
REQUIRES = {"collection": "pyarrow"}


def steps(out: Path, checkpoint: Path, short: bool) -> list[tuple[str, list[str], float]]:
    """(name, command, the least time left for it to start) in order."""
    python = [sys.executable, "-m"]
    if short:
        size, users, gpu_args = "64", "8", ["--logical-gpus", "1", "--logical-cpus", "8", "--seed-workers", "1"]
        timing = ["--seconds", "2", "--warmup", "2", "--cooldown", "3", "--limit-seconds", "0.5"]
        bare = ["--variants", "eager,cuda_graphs", "--batch-sizes", "1,2", "--seconds", "0.5"]
        # At the production input size, where staging a batch costs the host what it costs on a GPU node, against
        # a simulated device 4x slower than an H200: the pipelined Classifier kept it 0.998 busy here, the serial
        # one before it 0.77-0.81 (docs/performance.md, "The Classifier alone").
        classifier = ["--simulate", "--time-scale", "4", "--seconds", "5", "--warmup", "2", "--idle", "1"]
        py_spy = "8"
    else:
        size, users, gpu_args = "448", "64,256,1024", []
        timing = ["--seconds", "12", "--warmup", "20", "--cooldown", "5", "--limit-seconds", "2"]
        bare = ["--seconds", "2", "--batch-sizes", "32,64,128", "--variants",
                "eager,cudnn_benchmark,cuda_graphs,onnxruntime_cuda,tensorrt"]
        classifier = ["--seconds", "15", "--warmup", "5"]
        py_spy = "256"
    node = [*python, "load", "gpu", "--models", f"vgg16_{size}",
            "--batch-sizes", "32,64,128" if not short else "1,2", *gpu_args, *timing]
    bare_model = [*python, "load", "variants", "--checkpoint", str(checkpoint)]
    collection = [*python, "load", "collection", "--checkpoint", str(checkpoint), "--out", str(out / "collection.json"),
                  *(["--photos", "16", "--predict-photos", "8"] if short else ["--photos", "2000",
                                                                               "--predict-photos", "300"])]
    return [
        ("correctness", [*python, "load", "gpu-check", *(["--short"] if short else []), "--trace-dir", str(out),
                         "--out", str(out / "gpu-check.json")], 60),
        ("bare_model", [*bare_model, *bare, "--out", str(out / "bare_model.json")], 60),
        ("classifier", [*python, "load", "classifier", *classifier,
                        "--out", str(out / "classifier.json")], 60),
        ("node", [*node, "--users", users, "--py-spy-users", py_spy, "--py-spy-dir", str(out / "node"),
                  "--out", str(out / "node" / "gpu.json")], 150),
        ("collection", collection, 120),
        # Last, with what time is left: torch.compile may take minutes to build; the same code as `node` but for
        # the Classifier's share of a GPU. The short form leaves both out.
        *([] if short else [
            ("bare_model_compile", [*bare_model, "--seconds", "2", "--batch-sizes", "32,64,128", "--variants",
                                    "compile", "--out", str(out / "bare_model_compile.json")], 90),
            ("node_two_classifiers", [*node, "--users", "256", "--classifiers-per-gpu", "2",
                                      "--out", str(out / "node-two-classifiers" / "gpu.json")], 120)]),
    ]


def run(out: Path, *, short: bool, budget_s: float) -> dict[str, Any]:
    from load.bare_model import model_checkpoint

    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    summary: dict[str, Any] = {"budget_s": budget_s, "short": short, "steps": {}}
    checkpoint = Path(model_checkpoint("vgg16_64" if short else "vgg16_448"))
    for name, command, needs_s in steps(out, checkpoint, short):
        left = budget_s - (time.monotonic() - start)
        if summary["steps"].get("correctness", {}).get("exit", 0) != 0:
            summary["steps"][name] = {"skipped": "the GPU path is not correct (gpu-check.json)"}
            continue
        if REQUIRES.get(name) and importlib.util.find_spec(REQUIRES[name]) is None:
            summary["steps"][name] = {"skipped": f"{REQUIRES[name]} is not installed"}
            continue
        if left < needs_s:
            summary["steps"][name] = {"skipped": f"{left:.0f} s left, {needs_s:g} s wanted"}
            continue
        began = time.monotonic()
        with open(out / f"{name}.log", "w") as log:
            try:
                code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=left).returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
        summary["steps"][name] = {"exit": code, "seconds": round(time.monotonic() - began, 1)}
        print(f"{name}: exit {code} in {summary['steps'][name]['seconds']} s", flush=True)
    summary["seconds"] = round(time.monotonic() - start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--short", action="store_true", help="the same steps in seconds on a CPU")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for everything")
    args = parser.parse_args(argv)
    summary = run(args.out, short=args.short, budget_s=args.budget)
    return 0 if all(s.get("exit") == 0 for s in summary["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
