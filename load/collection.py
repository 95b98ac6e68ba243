"""Whole collections: `waterbirds-classify` (batch/classify.py, Ray Data) against `bcnn predict` on the same machine,
photos per second, and the memory of every process of the run at a collection and at ten times its size.

The shared photos are linked over and over into a folder of `--photos` files (and of ten times as many); each command
runs alone on the machine, in a process of its own; memory is the largest sum of resident memory over the command's
processes and Ray's, sampled every half second.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from load.bare_model import model_checkpoint
from load.cpu_watch import role_of
from load.runner import PHOTOS, ROOT


@dataclass(frozen=True)
class Settings:
    photos: int = 2000
    predict_photos: int = 2000  # bcnn predict's reference: one of a few seconds reads as noisy as the host
    checkpoint: str = "default"  # or vgg16_<size>: a VGG16-BCNN at that size, random weights (`model_checkpoint`)


def replicate(folder: Path, count: int) -> Path:
    """`count` links to the shared photos, cycling through them, in `folder`."""
    sources = sorted(PHOTOS.glob("*.jpg"))
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (folder / f"{i:06d}-{sources[i % len(sources)].name}").symlink_to(sources[i % len(sources)])
    return folder


class MemoryPeak:
    """The largest sum of resident memory of a process tree and of every Ray process, sampled while it runs."""

    def __init__(self, root: int) -> None:
        self.root, self.peak_mb, self._stop = root, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            total = 0
            for p in psutil.process_iter(["pid", "cmdline", "memory_info"]):
                ours = p.info["pid"] == self.root or role_of(p.info["cmdline"] or []) is not None
                if ours and p.info["memory_info"]:
                    total += p.info["memory_info"].rss
            self.peak_mb = max(self.peak_mb, total / 2**20)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return round(self.peak_mb, 1)


def _timed(command: list[str]) -> tuple[float, float, str]:
    start = time.monotonic()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    memory = MemoryPeak(process.pid)
    stdout, stderr = process.communicate()
    peak = memory.stop()
    if process.returncode != 0:
        raise RuntimeError(f"{command[:3]} failed: {stderr[-2000:]}")
    return time.monotonic() - start, peak, stdout + stderr


def bcnn_predict(folder: Path, count: int, checkpoint: str) -> dict[str, Any]:
    files = sorted(str(p) for p in folder.iterdir())[:count]
    seconds, peak, _ = _timed([sys.executable, "-m", "bcnn", "predict", "--json", "--checkpoint", checkpoint, *files])
    return {"photos": count, "seconds": round(seconds, 1), "photos_per_s": round(count / seconds, 2),
            "peak_rss_mb": peak}


def waterbirds_classify(folder: Path, out: Path, extra: list[str]) -> dict[str, Any]:
    seconds, peak, output = _timed([sys.executable, "-m", "batch", str(folder), "--out", str(out), "--address",
                                    "local", "--no-progress", *extra])
    classified = re.search(r"(\d+) photos classified in ([\d.]+) s \(([\d.]+) photos/s\)", output)
    assert classified, output[-2000:]
    photos, work_s, rate = int(classified[1]), float(classified[2]), float(classified[3])
    return {"photos": photos, "seconds": round(seconds, 1), "photos_per_s": round(photos / seconds, 2),
            "classifying_seconds": work_s, "classifying_photos_per_s": rate, "peak_rss_mb": peak}


def run(s: Settings) -> dict[str, Any]:
    photos, predict_photos, checkpoint = s.photos, s.predict_photos, model_checkpoint(s.checkpoint)
    extra = ["--checkpoint", checkpoint]
    with tempfile.TemporaryDirectory(prefix="collection-") as tmp:
        small = replicate(Path(tmp) / "small", photos)
        large = replicate(Path(tmp) / "large", photos * 10)
        report: dict[str, Any] = {"machine_cpus": psutil.cpu_count(), "checkpoint": s.checkpoint,
                                  "date": time.strftime("%Y-%m-%d %H:%MZ", time.gmtime())}
        report["bcnn_predict"] = bcnn_predict(small, predict_photos, checkpoint)
        # One photo at a time, so its time grows linearly after its start-up, which one photo's run measures: its
        # time for any number of photos follows, to compare runs of the same size.
        start_up = bcnn_predict(small, 1, checkpoint)["seconds"]
        report["bcnn_predict"]["start_up_seconds"] = start_up
        report["bcnn_predict"]["steady_photos_per_s"] = round(
            predict_photos / max(report["bcnn_predict"]["seconds"] - start_up, 1e-9), 2)
        print("bcnn predict:", report["bcnn_predict"], flush=True)
        report["classify"] = waterbirds_classify(small, Path(tmp) / "small.jsonl", extra)
        print("waterbirds-classify:", report["classify"], flush=True)
        report["classify_10x"] = waterbirds_classify(large, Path(tmp) / "large.jsonl", extra)
        print("waterbirds-classify, 10x:", report["classify_10x"], flush=True)
    predict = report["bcnn_predict"]
    for key in ("classify", "classify_10x"):  # against bcnn predict over as many photos, start-up included in both
        count = report[key]["photos"]
        predict_rate = count / (predict["start_up_seconds"] + count / predict["steady_photos_per_s"])
        report[f"speedup{key.removeprefix('classify')}"] = round(report[key]["photos_per_s"] / predict_rate, 2)
    report["speedup_classifying"] = round(report["classify_10x"]["classifying_photos_per_s"]
                                          / predict["steady_photos_per_s"], 2)
    report["memory_10x_over_1x"] = round(report["classify_10x"]["peak_rss_mb"] / report["classify"]["peak_rss_mb"],
                                         2)
    return report


def sections(report: dict[str, Any]) -> dict[str, str]:
    rows = [("`bcnn predict`", report["bcnn_predict"]), ("`waterbirds-classify`", report["classify"]),
            ("`waterbirds-classify`, ten times the photos", report["classify_10x"])]
    checkpoint = report["checkpoint"]
    model = "the embedded default" if checkpoint == "default" else f"`--checkpoint {checkpoint}`"
    lines = [f"`python -m load collection` ({report['date']}, {report['machine_cpus']} CPUs, {model}; "
             "`make bench` writes this anew):", "",
             "| run | photos | seconds | photos/s | of which classifying | peak memory |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, r in rows:
        classifying = f"{r['classifying_photos_per_s']} photos/s" if "classifying_photos_per_s" in r else ""
        lines.append(f"| {name} | {r['photos']:,} | {r['seconds']} | {r['photos_per_s']} | {classifying} | "
                     f"{r['peak_rss_mb']:,.0f} MB |")
    lines += ["", f"Against `bcnn predict` over as many photos, start-up included in both (its start-up "
              f"{report['bcnn_predict']['start_up_seconds']} s and {report['bcnn_predict']['steady_photos_per_s']} "
              f"photos/s after it): {report['speedup']}x at {report['classify']['photos']:,} photos, "
              f"{report['speedup_10x']}x at {report['classify_10x']['photos']:,}; classifying against its steady "
              f"rate: {report['speedup_classifying']}x. Memory at ten times the photos: "
              f"{report['memory_10x_over_1x']}x."]
    marker = "bench-collection" if checkpoint == "default" else f"bench-collection-{Path(checkpoint).stem}"
    return {marker: "\n".join(lines)}

