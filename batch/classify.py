"""Whole photo collections: every photo of a folder, a list of files or a bucket classified with Ray Data, one
record per photo, resumable.

On GPU nodes the photos are read and decoded by a pool of CPU actors and classified by a pool of model actors (one
GPU each); on CPUs each model actor (ONNX Runtime, as the service's `auto` backend) decodes its own batches, one per
core, since decoding elsewhere would take the same cores and add a hop. In batches, streaming: memory stays flat
whatever the collection's size. Each record is written the moment its batch is done, flushed, so the output file
is the checkpoint: the same command again skips every photo it holds and classifies the rest. The answers are the
service's: the same preprocessing (`bcnn.preprocess.load_image`), model, thresholds and species rule
(`bcnn.predict.Predictor`), the same record (`bcnn.answers.Answer.to_dict`), and for a photo that cannot be read the
error code the API gives.

    waterbirds-classify PHOTOS --out predictions.jsonl [--format csv] [--checkpoint default] [--top-k 5]

PHOTOS is a folder (recursive, the image types the service accepts), a .txt or .csv list of paths (its first
column), or a URI Ray Data reads (`s3://bucket/survey/`, where the cluster has credentials). It runs on the Ray
cluster `ray.init()` finds (`RAY_ADDRESS`, or one started on this machine with `ray start`), else on one it starts
here; on a cluster, submit it as a job (docs/batch.md).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from bcnn.answers import DEFAULT_WATERBIRD_THRESHOLD
from bcnn.backend_names import BACKENDS, BackendName
from bcnn.data import IMAGE_SUFFIXES
from bcnn.images import DEFAULT_MAX_PIXELS, ImageError, Preprocess
from bcnn.preprocess import load_image

Format = Literal["jsonl", "csv"]
DECODE_CPUS = 0.25
ACTOR_SHARE_OF_CORES = 0.75
CPU_BATCH_AT_224 = 32
# ONNX Runtime on a CPU core runs this model fastest per image a few images a pass, while each of Ray Data's batches
# costs its scheduling and a trip through the object store: batches of 32, passes of 2 (docs/performance.md, "Whole
# collections").
CPU_PASS_SIZE = 2
CSV_FIELDS = ("file", "model", "model_version", "level", "is_waterbird", "waterbird_score", "species_known",
              "species_confidence", "species", "species_name", "species_score", "predictions", "error_code",
              "error_message")


def find_photos(source: str) -> list[str] | None:
    """The photos of a folder (recursive, sorted) or of a .txt/.csv list; None for a URI that Ray Data lists."""
    if "://" in source:
        return None
    path = Path(source)
    if path.is_dir():
        return sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if path.is_file() and path.suffix.lower() in (".txt", ".csv"):
        with path.open(newline="", encoding="utf-8") as f:
            rows = [row[0].strip() for row in csv.reader(f) if row and row[0].strip()]
        if rows and rows[0].lower() in ("file", "path", "filename"):
            rows = rows[1:]
        base = path.parent
        return [row if os.path.isabs(row) or "://" in row else str(base / row) for row in rows]
    raise ValueError(f"{source}: not a folder, a .txt or .csv list of photos, or a URI")


class Decode:
    """Actor: each photo's bytes (read here, or as Ray Data read them) to uint8 pixels at the model's input size, or
    the API's error code for it. An actor rather than a task: each process imports torch once (its resize), where
    short-lived decoding tasks spread over many workers paid that import again and again."""

    def __init__(self, preprocess: Preprocess, max_pixels: int) -> None:
        torch.set_num_threads(1)  # one image at a time: no thread pool to keep spinning
        self.preprocess, self.max_pixels = preprocess, max_pixels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = batch["path"]
        side = self.preprocess.crop_size
        pixels = np.zeros((len(paths), side, side, 3), dtype=np.uint8)
        codes, messages = [""] * len(paths), [""] * len(paths)
        for i, path in enumerate(paths):
            try:
                data = batch["bytes"][i] if "bytes" in batch else Path(path).read_bytes()
                pixels[i] = load_image(data, self.preprocess, max_pixels=self.max_pixels).pixels
            except ImageError as e:
                codes[i], messages[i] = e.code, str(e)
            except OSError as e:
                codes[i], messages[i] = "unreadable_file", e.strerror or str(e)
        return {"path": paths, "pixels": pixels, "error_code": np.array(codes),
                "error_message": np.array(messages)}


class Classify:
    """Actor: the model, loaded once; a batch of decoded photos to one JSON record each, in forward passes of
    `pass_size` photos (0: the whole batch in one)."""

    def __init__(self, checkpoint: str, classes_file: str | None, threshold: float, backend: BackendName,
                 threads: int, top_k: int, pass_size: int = 0) -> None:
        from bcnn.models import get_weights
        from bcnn.predict import Predictor

        self.predictor = Predictor(get_weights(checkpoint, classes_file=classes_file), threshold=threshold,
                                   backend=backend, threads=threads)
        self.top_k, self.pass_size = top_k, pass_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        predictor, weights = self.predictor, self.predictor.weights
        usable = np.flatnonzero(batch["error_code"] == "")
        records: list[str] = []
        kinds: list[str] = []
        answers = iter(())
        if len(usable):
            pixels, step = batch["pixels"][usable], self.pass_size or len(usable)
            logits = [predictor.launch([pixels[i:i + step]]).wait() for i in range(0, len(pixels), step)]
            ranked = predictor.rank(torch.cat(logits), self.top_k)
            answers = (ranked.answer(row, predictor.labels, self.top_k, predictor.names)
                       for row in range(len(usable)))
        for path, code, message in zip(batch["path"], batch["error_code"], batch["error_message"], strict=True):
            if code:
                record: dict[str, object] = {"file": str(path), "error": {"code": str(code), "message": str(message)}}
            else:
                record = {"file": str(path), **next(answers).to_dict(), "model": weights.name,
                          "model_version": weights.version}
            records.append(json.dumps(record, ensure_ascii=False))
            kinds.append(kind(record))
        return {"record": np.array(records, dtype=object), "kind": np.array(kinds, dtype=object)}


class DecodeAndClassify:
    """Actor, on CPUs: a batch of paths decoded and classified in one process. The decoding and the forward pass
    share the cores anyway, and a stage between them cost each photo a trip through the object store and Ray Data's
    scheduling of one more operator (docs/performance.md, "Whole collections")."""

    def __init__(self, preprocess: Preprocess, max_pixels: int, **model: Any) -> None:
        self.decode, self.classify = Decode(preprocess, max_pixels), Classify(**model)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.classify(self.decode(batch))


@dataclass
class Summary:
    out: Path
    already_done: int
    written: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    interrupted: bool = False

    def line(self) -> str:
        done = sum(self.written.values())
        rate = done / self.seconds if self.seconds else 0.0
        state = "interrupted: run the same command again to go on" if self.interrupted else "done"
        return (f"{state}. {done} photos classified in {self.seconds:.1f} s ({rate:.1f} photos/s): "
                f"{self.written['species']} species named, {self.written['species_unknown']} waterbirds of a "
                f"species not told apart, {self.written['not_waterbird']} not waterbirds, {self.written['failed']} "
                f"unreadable; {self.already_done} were done before. Records in {self.out}.")


def kind(record: dict[str, Any]) -> str:
    if "error" in record:
        return "failed"
    if not record["is_waterbird"]:
        return "not_waterbird"
    return "species" if record["species_known"] else "species_unknown"


class Output:
    """The output file, which is also the checkpoint: records appended and flushed as they come; on opening, the
    files it already holds are done, and a record cut short by a crash is dropped."""

    def __init__(self, path: Path, fmt: Format) -> None:
        self.path, self.fmt = path, fmt
        self.done: set[str] = set()
        if path.exists():
            text = path.read_text(encoding="utf-8")
            if text and not text.endswith("\n"):  # the last record was cut short: it is classified again
                text = text[:text.rfind("\n") + 1]
                path.write_text(text, encoding="utf-8")
            lines = text.splitlines()
            if fmt == "csv":
                self.done = {row["file"] for row in csv.DictReader(lines)}
            else:
                self.done = {json.loads(line)["file"] for line in lines if line.strip()}
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists() or path.stat().st_size == 0
        self.file = path.open("a", encoding="utf-8", newline="")
        self.csv = csv.DictWriter(self.file, CSV_FIELDS) if fmt == "csv" else None
        if self.csv is not None and new:
            self.csv.writeheader()

    def write(self, record: str) -> None:
        """One record, as the JSON line the model actor wrote."""
        if self.csv is None:
            self.file.write(record + "\n")
        else:
            self.csv.writerow(csv_row(json.loads(record)))

    def flush(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.flush()
        self.file.close()


def csv_row(record: dict[str, Any]) -> dict[str, object]:
    if "error" in record:
        return {"file": record["file"], "error_code": record["error"]["code"],
                "error_message": record["error"]["message"]}
    top = record["predictions"][0]
    return {"file": record["file"], "model": record["model"], "model_version": record["model_version"],
            "level": record["level"], "is_waterbird": record["is_waterbird"],
            "waterbird_score": record["waterbird_score"], "species_known": record["species_known"],
            "species_confidence": record["species_confidence"], "species": top["label"], "species_name": top["name"],
            "species_score": top["score"],
            "predictions": "; ".join(f"{p['label']} {p['score']}" for p in record["predictions"])}


@dataclass(frozen=True)
class Settings:
    checkpoint: str = "default"
    classes_file: str | None = None
    top_k: int = 5
    threshold: float = DEFAULT_WATERBIRD_THRESHOLD
    backend: BackendName = "auto"
    batch_size: int = 0
    """photos per Ray Data batch; 0: 64 on a GPU, on a CPU 32 at 224 and fewer in proportion to larger inputs"""
    pass_size: int = 0
    """photos per forward pass within a batch; 0: the whole batch on a GPU, 2 on a CPU"""
    actors: int = 0
    """model replicas; 0: one per GPU of the cluster, else one per `threads` CPUs"""
    threads: int = 1
    max_pixels: int = DEFAULT_MAX_PIXELS


def classify(source: str, out: Path, fmt: Format = "jsonl", settings: Settings = Settings(),  # noqa: B008
             progress: bool = True) -> Summary:
    """Classify every photo of `source` not yet in `out` into it. Ray must be initialised (`main` does)."""
    import ray
    import ray.data

    from bcnn.models import get_weights

    photos = find_photos(source)
    weights = get_weights(settings.checkpoint, classes_file=settings.classes_file)
    output = Output(out, fmt)
    todo_paths: list[str] = []
    if photos is None:
        dataset = ray.data.read_binary_files(source, include_paths=True,
                                             file_extensions=sorted(s.lstrip(".") for s in IMAGE_SUFFIXES))
        dataset = dataset.filter(lambda row, done=frozenset(output.done): row["path"] not in done)
        todo: int | None = None
    else:
        todo_paths = [p for p in photos if p not in output.done]
        todo = len(todo_paths)
    summary = Summary(out, len(output.done))
    if todo == 0:
        output.close()
        return summary
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = ray.cluster_resources().get("CPU", 1.0)
    # On CPUs one model actor per `threads` cores: the forward pass is most of the work, and more actors than cores
    # only took turns on them. Each holds three quarters of its cores, so that Ray Data's reading tasks (a bucket's
    # files) still find a CPU: a run whose readers cannot start would wait forever.
    actor_cpus = 0 if gpus else settings.threads * ACTOR_SHARE_OF_CORES
    room = gpus if gpus else int(cpus // settings.threads)
    actors = settings.actors or room
    if actors > max(room, 1) or room < 1:
        raise ValueError(f"{actors} model actors do not fit this cluster ({cpus:g} CPUs, {gpus} GPUs); ask for at "
                         f"most {max(room, 1)}")
    decoders = max(1, int(cpus - actors * actor_cpus))
    # On a CPU a batch's memory grows with its pixels: 32 photos at 224, fewer in proportion at larger inputs, so
    # that a model actor's memory stays about the same.
    side = weights.preprocess.crop_size
    batch_size = settings.batch_size or (64 if gpus else max(1, CPU_BATCH_AT_224 * 224**2 // side**2))
    if todo is not None:
        # A block per batch (Ray Data would make one per photo of a short list, which costs more to schedule than
        # to decode), and no more actors than blocks.
        blocks = max(1, min(-(-todo // batch_size), 1000))
        actors, decoders = min(actors, blocks), min(decoders, blocks)
        dataset = ray.data.from_items([{"path": p} for p in todo_paths], override_num_blocks=blocks)
    # Pools that start at their size and keep a minimum of 1: Ray Data warns where a small collection cannot keep a
    # minimum of several actors busy. Decoders beyond the first start as their queue grows.
    decoding = {"preprocess": weights.preprocess, "max_pixels": settings.max_pixels}
    model = {"checkpoint": settings.checkpoint, "classes_file": settings.classes_file,
             "threshold": settings.threshold, "backend": settings.backend, "threads": settings.threads,
             "top_k": settings.top_k, "pass_size": settings.pass_size or (0 if gpus else CPU_PASS_SIZE)}
    models = ray.data.ActorPoolStrategy(min_size=1, max_size=actors, initial_size=actors)
    if gpus:
        dataset = dataset.map_batches(
            Decode, batch_size=batch_size, num_cpus=DECODE_CPUS,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=decoders, initial_size=1),
            fn_constructor_kwargs=decoding)
        dataset = dataset.map_batches(Classify, batch_size=batch_size, compute=models, num_gpus=1,
                                      num_cpus=actor_cpus, fn_constructor_kwargs=model)
    else:
        dataset = dataset.map_batches(DecodeAndClassify, batch_size=batch_size, compute=models, num_cpus=actor_cpus,
                                      fn_constructor_kwargs=decoding | model)
    ray.data.DataContext.get_current().enable_progress_bars = False  # ours says photos/s and the time left
    bar = _progress(todo) if progress else None
    start = time.monotonic()
    try:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for record, record_kind in zip(batch["record"], batch["kind"], strict=True):
                output.write(record)
                summary.written[record_kind] += 1
            output.flush()
            if bar is not None:
                bar.update(len(batch["record"]))
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        summary.seconds = time.monotonic() - start
        output.close()
        if bar is not None:
            bar.close()
    return summary


def _progress(total: int | None) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="photo", desc="classified", smoothing=0.1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="waterbirds-classify", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("photos", metavar="PHOTOS", help="a folder, a .txt/.csv list of paths, or a URI")
    parser.add_argument("--out", type=Path, required=True, help="the records (the same file resumes a run)")
    parser.add_argument("--format", choices=("jsonl", "csv"), default=None, help="default: from --out's suffix")
    parser.add_argument("--checkpoint", "--model", default="default",
                        help="'default', a registry name or a checkpoint file, as for bcnn predict")
    parser.add_argument("--classes", default=None, help="class list for a 2019 service checkpoint")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--threshold", type=float, default=DEFAULT_WATERBIRD_THRESHOLD)
    parser.add_argument("--backend", choices=BACKENDS, default="auto")
    parser.add_argument("--batch-size", type=int, default=0,
                        help="photos per Ray Data batch (0: 64 on GPUs, else 32 at 224 and fewer at larger inputs)")
    parser.add_argument("--pass-size", type=int, default=0,
                        help="photos per forward pass within a batch (0: the whole batch on GPUs, else 2)")
    parser.add_argument("--actors", type=int, default=0,
                        help="model replicas (0: one per GPU, else one per --threads CPUs)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per model replica on a CPU")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    parser.add_argument("--address", default=None, help="the Ray cluster (default: as ray.init() finds one)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--dashboard", action="store_true",
                        help="start Ray's dashboard with the Ray instance the run starts (a cluster has its own)")
    args = parser.parse_args(argv)
    fmt: Format = args.format or ("csv" if args.out.suffix.lower() == ".csv" else "jsonl")
    settings = Settings(checkpoint=args.checkpoint, classes_file=args.classes, top_k=args.top_k,
                        threshold=args.threshold, backend=args.backend, batch_size=args.batch_size,
                        pass_size=args.pass_size, actors=args.actors, threads=args.threads,
                        max_pixels=args.max_pixels)
    import ray

    # A Ray instance started for the run has no dashboard unless asked: on a laptop the progress bar says what it
    # would, and its processes take a share of the run's CPU (docs/performance.md, "Whole collections"). A cluster's
    # dashboard is the cluster's own, there whatever this says.
    ray.init(address=args.address, logging_level="ERROR", log_to_driver=False, include_dashboard=args.dashboard)
    try:
        summary = classify(args.photos, args.out, fmt, settings, progress=not args.no_progress)
    except ValueError as e:
        print(f"waterbirds-classify: {e}", file=sys.stderr)
        return 2
    print(summary.line(), file=sys.stderr)
    return 130 if summary.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
