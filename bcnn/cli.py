"""`python -m bcnn predict | train | evaluate | bench | convert | export`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import fields
from pathlib import Path

from bcnn.answers import Answer
from bcnn.backend_names import BACKENDS
from bcnn.images import DEFAULT_MAX_PIXELS, ImageError


def _predict(args: argparse.Namespace) -> int:
    import torch

    from bcnn.models import get_weights
    from bcnn.predict import Predictor
    from bcnn.preprocess import preprocess_image

    torch.set_num_threads(args.threads)
    weights = get_weights(args.checkpoint, classes_file=args.classes)
    predictor = Predictor(weights, threshold=args.threshold, device=args.device, backend=args.backend,
                          threads=args.threads)
    failed = 0
    for name in args.images:
        try:
            image = preprocess_image(Path(name).read_bytes(), weights.preprocess, max_pixels=args.max_pixels)
        except (OSError, ImageError) as e:
            failed += 1
            code = e.code if isinstance(e, ImageError) else "unreadable_file"
            message = str(e) if isinstance(e, ImageError) else (e.strerror or str(e))
            if args.json:
                print(json.dumps({"file": name, "error": {"code": code, "message": message}}, ensure_ascii=False))
            else:
                print(f"{name}: error: {message}", file=sys.stderr)
            continue
        answer = predictor(image[None], top_k=args.top_k)[0]
        if args.json:
            print(json.dumps({"file": name, "level": answer.level, "is_bird": answer.is_bird,
                              "is_waterbird": answer.is_waterbird, "species_known": answer.species_known,
                              "species_confidence": answer.species_confidence,
                              "predictions": [{"label": p.label, "name": p.name, "score": p.score, "index": p.index}
                                              for p in answer.predictions]}, ensure_ascii=False), flush=True)
        else:
            print(f"{name}: {verdict(answer, len(predictor.labels))}", flush=True)
    return 1 if failed else 0


def verdict(answer: Answer, species: int) -> str:
    """One line a birdwatcher reads: the species with its confidence, or why there is none; then the others ranked."""
    names = [p.name for p in answer.predictions]
    if answer.level == "not_a_bird":
        return f"probably not a bird (closest waterbirds: {', '.join(names)})"
    if answer.level == "bird":
        return (f"a bird: the model cannot tell whether it is a waterbird, and it may be one it was not taught "
                f"(closest waterbirds: {', '.join(names)})")
    if answer.level == "waterbird":
        return (f"a waterbird, species uncertain: the model cannot tell, and it may be one it was not taught "
                f"(closest of the {species} it knows: {', '.join(names)})")
    return f"{names[0]}, confidence {answer.species_confidence:.0%}" + (f"; next: {', '.join(names[1:])}"
                                                                        if len(names) > 1 else "")


def _train(args: argparse.Namespace) -> int:
    from bcnn.train import TrainConfig, train

    names = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in names and v is not None})
    best = train(cfg)
    print(f"best checkpoint: {best}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from bcnn.evaluate import evaluate

    metrics = evaluate(args.data, args.checkpoint, args.out, classes_file=args.classes, split=args.split,
                       workers=args.workers, device=args.device, image_root=args.image_root,
                       label_column=args.label_column, species_threshold=args.species_threshold)
    species = metrics["species"]
    print(f"top-1 {metrics['top1']:.3f}  top-5 {metrics['top5']:.3f}  over {metrics['images']} images; "
          f"details in {args.out}/")
    if species["photos"]["unknown_species"]:
        print(f"species it does not know: {species['photos']['unknown_species']} photos, "
              f"{species['unknown']['named_wrongly']:.1%} named wrongly "
              f"({species['unknown']['waterbird_species_unknown']:.1%} answered 'a waterbird, species uncertain', "
              f"{species['unknown']['rolled_up_to_a_bird']:.1%} 'a bird', {species['unknown']['not_a_bird']:.1%} "
              f"'probably not a bird'); AUROC known vs unknown "
              f"{species['auroc_known_vs_unknown']:.3f}")
    print(f"species it knows: {species['known']['named']:.1%} named ({species['known']['named_and_right']:.1%} "
          f"rightly) at threshold {species['rule']['threshold']:g}; calibration error (ECE) "
          f"{species['calibration']['before']['ece']:.3f} before, {species['calibration']['after']['ece']:.3f} "
          f"after; the rule these photos support: {args.out}/species_rule.json")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from bcnn.bench import bench_model

    backends = ("torch", "onnxruntime") if args.backend == "both" else (args.backend,)
    result = bench_model(args.checkpoint, batch_sizes=tuple(args.batch_sizes), threads=tuple(args.threads),
                         seconds=args.seconds, classes_file=args.classes, device=args.device, backends=backends)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from bcnn.checkpoint import save_checkpoint
    from bcnn.models import build_model, get_weights

    weights = get_weights(args.checkpoint, classes_file=args.classes)
    meta: dict[str, object] = {"converted_from": weights.source}
    if weights.species_rule is not None:
        meta["species_rule"] = weights.species_rule.to_dict()
    save_checkpoint(args.out, build_model(weights), arch=weights.arch, categories=weights.categories,
                    preprocess=weights.preprocess, answer_indices=weights.answer_indices, meta=meta)
    print(f"wrote {args.out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from bcnn import export
    from bcnn.backends import open_session
    from bcnn.data import IMAGE_SUFFIXES
    from bcnn.models import build_model, get_weights, prepare_for_inference
    from bcnn.preprocess import preprocess_image

    weights = get_weights(args.checkpoint, classes_file=args.classes)
    model = prepare_for_inference(build_model(weights))
    if args.format == "onnx":
        data, _ = export.export_onnx(weights, model)
        out = export.write_atomically(args.out, data)
        runtime, forward = "ONNX Runtime", lambda: export.onnxruntime_forward(open_session(data))
    else:
        data, meta = export.export_pte(weights, model)
        out = export.write_atomically(args.out, data)
        export.write_atomically(f"{out}.json", (json.dumps(meta, indent=1, ensure_ascii=False) + "\n").encode())
        runtime, forward = "ExecuTorch (XNNPACK)", lambda: export.executorch_forward(out)
    side = weights.preprocess.crop_size
    beside = f"; its metadata in {out}.json" if args.format == "pte" else ""
    print(f"wrote {out}: {len(data) / 1e6:.1f} MB, {weights.name} {weights.version}, uint8 [N, 3, {side}, {side}] "
          f"in, {len(weights.categories)} logits out{beside}")
    paths = [p for name in args.verify for p in (sorted(Path(name).rglob("*")) if Path(name).is_dir() else [Path(name)])
             if p.suffix.lower() in IMAGE_SUFFIXES]
    if not paths:
        print(f"not verified: pass --verify with photos (files or folders) to check {runtime} against PyTorch")
        return 0
    images = []
    for path in paths:
        try:
            images.append(preprocess_image(path.read_bytes(), weights.preprocess))
        except ImageError as e:
            print(f"{path}: skipped: {e}", file=sys.stderr)
    result = export.verify(model, forward(), images)
    print(f"{runtime} against PyTorch on {len(images)} photos: {result}")
    return 0 if result.passed else 1


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def build_parser() -> argparse.ArgumentParser:
    from bcnn.answers import DEFAULT_WATERBIRD_THRESHOLD
    from bcnn.weights import BACKBONES

    parser = argparse.ArgumentParser(prog="python -m bcnn", description="Bilinear CNN waterbird recognition")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_options(p: argparse.ArgumentParser, default: str | None = "default") -> None:
        p.add_argument("--checkpoint", default=default, required=default is None,
                       help="a checkpoint file, or 'default' for the embedded EfficientNet-Lite0 model")
        p.add_argument("--classes", help="class list ('index name' lines) for a 2019 service checkpoint")
        p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")

    def backend_option(p: argparse.ArgumentParser, *extra: str) -> None:
        p.add_argument("--backend", choices=(*BACKENDS, *extra), default="auto",
                       help="where the forward pass runs; auto: ONNX Runtime on the CPU, torch on CUDA")

    p = sub.add_parser("predict", help="name the species in photos")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    model_options(p)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--threshold", type=float, default=DEFAULT_WATERBIRD_THRESHOLD,
                   help="waterbird probability mass below which a photo is 'not a waterbird'")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    backend_option(p)
    p.set_defaults(run=_predict)

    p = sub.add_parser("train", help="train a BCNN on your photos (ImageFolder or CUB-200-2011 layout)")
    p.add_argument("--data", required=True)
    p.add_argument("--backbone", choices=BACKBONES, default="efficientnet_lite0")
    p.add_argument("--out", default="runs/bcnn", help="folder for last.pt (resumable) and best.pt")
    p.add_argument("--image-size", type=int, help="input size (default: 448 for vgg16, 224 for Lite0)")
    p.add_argument("--init", help="vgg16: torchvision VGG-16 ImageNet state dict to start from")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    for name in ("fc_epochs", "ft_epochs", "fc_batch_size", "ft_batch_size", "workers", "seed"):
        p.add_argument("--" + name.replace("_", "-"), type=int)
    for name in ("fc_lr", "ft_lr", "fc_weight_decay", "ft_weight_decay", "momentum"):
        p.add_argument("--" + name.replace("_", "-"), type=float)
    p.add_argument("--device")
    p.set_defaults(run=_train)

    p = sub.add_parser("evaluate", help="top-1, top-5, per-class accuracy, a confusion matrix, and the species rule "
                                        "(unknown species flagged, calibration)")
    p.add_argument("--data", required=True, help="a folder of photos by class, or a CSV (file, label; no label: a "
                                                 "species the model does not know)")
    p.add_argument("--image-root", help="CSV: the folder its files are in (default: the CSV's)")
    p.add_argument("--label-column", default="label", help="CSV: the column with each photo's class name")
    p.add_argument("--species-threshold", type=float, help="judge this threshold instead of the model's own")
    model_options(p, default=None)
    p.add_argument("--out", default="runs/evaluate")
    p.add_argument("--split", choices=("val", "all"), default="val")
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(run=_evaluate)

    p = sub.add_parser("bench", help="images/s and latency of the bare model per batch size, as JSON")
    model_options(p)
    p.add_argument("--batch-sizes", type=_int_list, default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--threads", type=_int_list, default=[1, 2])
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--out", help="also write the JSON here")
    backend_option(p, "both")
    p.set_defaults(run=_bench)

    p = sub.add_parser("convert", help="write any model (a 2019 service checkpoint, 'default') in this "
                                       "project's checkpoint format")
    p.add_argument("checkpoint")
    p.add_argument("--classes", help="class list, for a 2019 service checkpoint")
    p.add_argument("--out", required=True)
    p.set_defaults(run=_convert)

    p = sub.add_parser("export", help="write the model for ONNX Runtime or ExecuTorch (phones, edge devices, other "
                                      "languages) and check it against PyTorch")
    model_options(p)
    p.add_argument("--format", choices=("onnx", "pte"), default="onnx",
                   help="pte: an ExecuTorch program for XNNPACK (needs the mobile extra), metadata beside it as JSON")
    p.add_argument("--out", required=True)
    p.add_argument("--verify", nargs="*", default=[], metavar="PHOTO",
                   help="photos or folders of photos: top-1 must match PyTorch on all, logits within tolerance")
    p.set_defaults(run=_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose or args.command == "train" else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from bcnn.weights import CheckpointError

    try:
        return int(args.run(args))
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
