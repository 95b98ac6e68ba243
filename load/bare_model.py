"""The bare model's speed per batch size (uint8 images on the host in, float32 logits on the host out), for each way
of running its forward pass, each checked against the eager float32 model.

Variants (CUDA ones are skipped, saying so, where there is no GPU):

- `eager`: what the Classifier runs today (`bcnn.backends.TorchBackend`: float16 autocast, float32 bilinear head,
  channels last);
- `cudnn_benchmark`: the same with `torch.backends.cudnn.benchmark` (cuDNN times its algorithms per input shape);
- `cuda_graphs`: the same forward pass captured once per batch size as a CUDA graph and replayed (a batch padded up
  to the next captured size would use it in serving);
- `compile`: `torch.compile` (Inductor, default mode), once per batch size;
- `onnxruntime_cuda` / `tensorrt`: the project's ONNX export on ONNX Runtime's CUDA provider (float32), or its
  TensorRT provider in float16 with the CUDA provider for what TensorRT does not take (needs `onnxruntime-gpu`);
  a provider that does not start is reported as skipped, never measured on the CPU.

    python -m load.bare_model --checkpoint default --variants eager,cuda_graphs --batch-sizes 32,64,128
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import multiprocessing as mp
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

VARIANTS = ("eager", "cudnn_benchmark", "cuda_graphs", "compile", "onnxruntime_cuda", "tensorrt")
_NEEDS_CUDA = {"cudnn_benchmark", "cuda_graphs", "onnxruntime_cuda", "tensorrt"}

Forward = Callable[[Any], Any]  # uint8 [N, 3, H, W] on the host -> float32 logits [N, C] on the host


def in_subprocess(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` in a fresh process, so the GPU memory it takes is given back when it returns."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def model_rates(checkpoint: str, batch_sizes: tuple[int, ...], seconds: float) -> dict[str, float]:
    """Images per second of the serving backend (`Predictor`) per batch size; run it `in_subprocess`."""
    from bcnn.models import get_weights
    from bcnn.predict import Predictor

    predictor = Predictor(get_weights(checkpoint))
    return _rates(predictor.logits, predictor.weights.preprocess.crop_size, batch_sizes, seconds)


def _rates(forward: Forward, side: int, batch_sizes: tuple[int, ...], seconds: float) -> dict[str, float]:
    import torch

    rates = {}
    for n in batch_sizes:
        images = torch.randint(0, 256, (n, side, side, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
        forward(images)  # warm up this size
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            forward(images)  # returns on the host, so the device has finished
            done += n
        rates[str(n)] = round(done / (time.perf_counter() - start), 1)
    return rates


def _torch_model(weights: Any, device: Any) -> Any:
    import torch

    from bcnn.models import build_model, prepare_for_inference

    memory_format = torch.channels_last if device.type == "cuda" else torch.preserve_format
    return prepare_for_inference(build_model(weights)).to(device, memory_format=memory_format)


def _autocast(device: Any, **kwargs: Any) -> contextlib.AbstractContextManager[object]:
    import torch

    return torch.autocast("cuda", dtype=torch.float16, **kwargs) if device.type == "cuda" else contextlib.nullcontext()


def _eager(weights: Any, device: Any) -> Forward:
    from bcnn.backends import TorchBackend
    from bcnn.models import build_model, prepare_for_inference

    return TorchBackend(prepare_for_inference(build_model(weights)), device)


def _cudnn_benchmark(weights: Any, device: Any) -> Forward:
    import torch

    torch.backends.cudnn.benchmark = True
    return _eager(weights, device)


def _cuda_graphs(weights: Any, device: Any) -> Forward:
    import torch

    model = _torch_model(weights, device)
    graphs: dict[int, tuple[Any, Any, Any]] = {}

    def capture(n: int, side: int) -> tuple[Any, Any, Any]:
        static_in = torch.zeros((n, side, side, 3), dtype=torch.uint8, device=device).permute(0, 3, 1, 2)
        side_stream = torch.cuda.Stream(device)
        side_stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side_stream), torch.inference_mode(), _autocast(device, cache_enabled=False):
            for _ in range(3):
                model(static_in)
        torch.cuda.current_stream(device).wait_stream(side_stream)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph), _autocast(device, cache_enabled=False):
            static_out = model(static_in).float()
        return graph, static_in, static_out

    def forward(images: Any) -> Any:
        n = len(images)
        if n not in graphs:
            graphs[n] = capture(n, images.shape[-1])
        graph, static_in, static_out = graphs[n]
        static_in.copy_(images, non_blocking=True)
        graph.replay()
        return static_out.cpu()

    return forward


def _compile(weights: Any, device: Any) -> Forward:
    import torch

    compiled = torch.compile(_torch_model(weights, device))

    @torch.inference_mode()
    def forward(images: Any) -> Any:
        with _autocast(device):
            return compiled(images.to(device, non_blocking=True)).float().cpu()

    return forward


def _onnxruntime(provider: str) -> Callable[[Any, Any], Forward]:
    def build(weights: Any, device: Any) -> Forward:
        import onnxruntime as ort
        import torch

        from bcnn.export import INPUT_NAME, OUTPUT_NAME, export_onnx

        if provider not in ort.get_available_providers():
            raise _Skip(f"this onnxruntime has no {provider} (install onnxruntime-gpu)")
        data, _ = export_onnx(weights)
        cuda = ("CUDAExecutionProvider", {"device_id": device.index or 0})
        providers: list[tuple[str, dict[str, object]]] = [cuda]
        if provider == "TensorrtExecutionProvider":
            # float16 as the eager variant runs; the CUDA provider takes the nodes TensorRT does not
            providers = [(provider, {"device_id": device.index or 0, "trt_fp16_enable": True}), cuda]
        session = ort.InferenceSession(data, providers=providers)
        if session.get_providers()[0] != provider:
            raise _Skip(f"{provider} did not start (the session runs on {', '.join(session.get_providers())})")
        return lambda images: torch.from_numpy(
            session.run([OUTPUT_NAME], {INPUT_NAME: images.contiguous().numpy()})[0])

    return build


_BUILDERS: dict[str, Callable[[Any, Any], Forward]] = {
    "eager": _eager, "cudnn_benchmark": _cudnn_benchmark, "cuda_graphs": _cuda_graphs, "compile": _compile,
    "onnxruntime_cuda": _onnxruntime("CUDAExecutionProvider"), "tensorrt": _onnxruntime("TensorrtExecutionProvider"),
}


class _Skip(Exception):
    pass


def variant_rates(checkpoint: str, variant: str, batch_sizes: tuple[int, ...], seconds: float,
                  photos: str | None = None) -> dict[str, Any]:
    """One variant: its build time, first pass per batch size included (what a model swap would cost), images per
    second per batch size, and its logits against the eager float32 model on up to 8 photos (the export check's
    tolerance). Run it `in_subprocess`: a variant may change process-wide settings."""
    import torch

    from bcnn.export import verify
    from bcnn.models import get_weights

    if variant in _NEEDS_CUDA and not torch.cuda.is_available():
        return {"skipped": "needs a CUDA GPU"}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    weights = get_weights(checkpoint)
    side = weights.preprocess.crop_size
    start = time.perf_counter()
    try:
        forward = _BUILDERS[variant](weights, device)
        for n in batch_sizes:
            forward(torch.zeros((n, side, side, 3), dtype=torch.uint8).permute(0, 3, 1, 2))
    except _Skip as e:
        return {"skipped": str(e)}
    except Exception as e:  # noqa: BLE001 - a variant that fails here is a finding to report, not a crash
        return {"failed": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    build_s = time.perf_counter() - start
    result: dict[str, Any] = {"build_and_first_passes_s": round(build_s, 1),
                              "images_per_s": _rates(forward, side, batch_sizes, seconds)}
    images = _photos(photos, weights.preprocess) if photos else [
        torch.randint(0, 256, (3, side, side), dtype=torch.uint8) for _ in range(8)]
    # The reference is float32 throughout: Hopper runs float32 convolutions in TF32 unless told not to.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    reference = _torch_model(weights, device).float()
    check = verify(lambda batch: reference(batch.to(device)).cpu(), forward, images)
    result["check"] = {"passed": check.passed, "top1_equal": check.top1_equal, "images": check.images,
                       "relative_logit_diff": round(check.relative_diff, 6), "tolerance": check.tolerance}
    return result


def _photos(folder: str, preprocess: Any, limit: int = 8) -> list[Any]:
    from bcnn.preprocess import preprocess_image
    from load.loadgen import load_uploads

    return [preprocess_image(u.data, preprocess) for u in load_uploads(folder, limit=limit)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="default")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--batch-sizes", default="32,64,128")
    parser.add_argument("--seconds", type=float, default=3.0, help="per batch size")
    parser.add_argument("--photos", type=Path, help="photos to check the logits on (default: random images)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    import torch

    report: dict[str, Any] = {}
    for variant in args.variants.split(","):
        if variant in _NEEDS_CUDA and not torch.cuda.is_available():
            report[variant] = {"skipped": "needs a CUDA GPU"}  # said here: no process started to find out
        else:
            report[variant] = in_subprocess(variant_rates, args.checkpoint, variant, sizes, args.seconds,
                                            str(args.photos) if args.photos else None)
        print(f"{variant}: {json.dumps(report[variant])}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
