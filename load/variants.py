"""Each way of running the bare model's forward pass, per batch size, with its build time, each checked against the
eager float32 model (CUDA ones are skipped, saying so, where there is no GPU):

- `eager`: what the Classifier runs (`bcnn.backends.TorchBackend`: float16 autocast, float32 bilinear head,
  channels last); `cudnn_benchmark`: the same with cuDNN timing its algorithms per input shape;
- `cuda_graphs`: the same forward pass captured once per batch size as a CUDA graph and replayed;
- `compile`: `torch.compile` (Inductor, default mode), once per batch size;
- `onnxruntime_cuda` / `tensorrt`: the project's ONNX export on ONNX Runtime's CUDA provider (float32), or its
  TensorRT provider in float16 with the CUDA provider for what TensorRT does not take (needs `onnxruntime-gpu`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from load.bare_model import Forward, in_subprocess, rates
from load.loadgen import load_uploads

VARIANTS = ("eager", "cudnn_benchmark", "cuda_graphs", "compile", "onnxruntime_cuda", "tensorrt")
_NEEDS_CUDA = {"cudnn_benchmark", "cuda_graphs", "onnxruntime_cuda", "tensorrt"}


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
                              "images_per_s": rates(forward, side, batch_sizes, seconds)}
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

    return [preprocess_image(u.data, preprocess) for u in load_uploads(folder, limit=limit)]


@dataclass(frozen=True)
class Settings:
    checkpoint: str = "default"
    variants: tuple[str, ...] = VARIANTS
    batch_sizes: tuple[int, ...] = (32, 64, 128)
    seconds: float = 3.0  # per batch size
    photos: str = ""  # photos to check the logits on (default: random images)


def run(s: Settings) -> dict[str, Any]:
    """Each variant in a process of its own (a variant may change process-wide settings)."""
    import torch

    report: dict[str, Any] = {}
    for variant in s.variants:
        if variant in _NEEDS_CUDA and not torch.cuda.is_available():
            report[variant] = {"skipped": "needs a CUDA GPU"}  # said here: no process started to find out
        else:
            report[variant] = in_subprocess(variant_rates, s.checkpoint, variant, s.batch_sizes, s.seconds,
                                            s.photos or None)
        print(f"{variant}: {report[variant]}", flush=True)
    return report
