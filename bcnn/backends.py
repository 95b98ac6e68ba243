"""Where the forward pass runs: PyTorch, or ONNX Runtime on a file exported once per model and cached by content.

Both take uint8 images [N, 3, H, W] and return float32 logits [N, C] on the CPU. `auto` is ONNX Runtime on the
CPU, where `python -m bcnn bench` measured it faster for every model and batch size we serve (docs/model.md,
"Backends"), and PyTorch on CUDA (half precision, float32 head) until a GPU run shows otherwise.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from pathlib import Path
from typing import Literal, Protocol

import torch
from torch import Tensor

from bcnn.export import INPUT_NAME, OUTPUT_NAME, OnnxModelError, content_sha256, export_onnx, write_atomically
from bcnn.models import ImageClassifier, build_model, prepare_for_inference
from bcnn.weights import Weights

log = logging.getLogger(__name__)

BackendName = Literal["auto", "torch", "onnxruntime"]
BACKENDS: tuple[BackendName, ...] = ("auto", "torch", "onnxruntime")


class Backend(Protocol):
    name: str

    def __call__(self, images: Tensor) -> Tensor: ...


class TorchBackend:
    name = "torch"

    def __init__(self, model: ImageClassifier, device: torch.device, threads: int | None = None) -> None:
        self.device = device
        self.threads = threads
        memory_format = torch.channels_last if device.type == "cuda" else torch.preserve_format
        self.model = model.to(device, memory_format=memory_format)

    @torch.inference_mode()
    def __call__(self, images: Tensor) -> Tensor:
        """The images run channels last on every device (a copy only where they are not already, as pixels from
        `bcnn.preprocess.load_image` are): on the development CPU Lite0 is 15-20% faster so than in NCHW."""
        if self.threads is not None and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)  # OpenMP's thread count belongs to the calling thread
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        if self.device.type == "cuda":
            autocast: contextlib.AbstractContextManager[object] = torch.autocast("cuda", dtype=torch.float16)
        else:
            autocast = contextlib.nullcontext()
        with autocast:
            return self.model(images).float().cpu()


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, session: object, source: str) -> None:
        self.session = session
        self.source = source
        """the file the session was built from, or `memory`"""

    def __call__(self, images: Tensor) -> Tensor:
        pixels = images.cpu().contiguous().numpy()  # ONNX Runtime wants NCHW laid out as such
        return torch.from_numpy(self.session.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0])  # type: ignore[attr-defined]


def onnxruntime_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def resolve(requested: BackendName, device: torch.device) -> Literal["torch", "onnxruntime"]:
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}; choose one of {', '.join(BACKENDS)}")
    if requested != "auto":
        return requested
    return "onnxruntime" if device.type == "cpu" and onnxruntime_available() else "torch"


def build_backend(weights: Weights, *, device: torch.device, backend: BackendName = "auto",
                  threads: int | None = None, cache_dir: str | os.PathLike[str] | None = None) -> Backend:
    """None `threads`: the calling thread's torch setting."""
    name = resolve(backend, device)
    if name == "torch":
        return TorchBackend(prepare_for_inference(build_model(weights)), device, threads)
    return onnxruntime_backend(weights, device=device, threads=threads or torch.get_num_threads(),
                               cache_dir=cache_dir)


def default_cache_dir() -> Path:
    """`WATERBIRDS_CACHE_DIR`, else `$XDG_CACHE_HOME/waterbirds`, else `~/.cache/waterbirds`."""
    if configured := os.environ.get("WATERBIRDS_CACHE_DIR"):
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "waterbirds"


def open_session(model: bytes | str | os.PathLike[str], *, threads: int = 1,
                 device: torch.device | None = None) -> object:
    """An ONNX Runtime session with `threads` intra-op threads that never spin: an idle spinning pool takes the
    CPU from the other replicas of a node, as OpenMP's does (serve_config.yaml sets OMP_NUM_THREADS=1 for that)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: its warnings about unused initializers mean nothing to an operator
    providers = ["CPUExecutionProvider"]
    if device is not None and device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ValueError("this ONNX Runtime has no CUDA provider (install onnxruntime-gpu), or use backend torch")
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
    source = os.fspath(model) if isinstance(model, (str, os.PathLike)) else model
    return ort.InferenceSession(source, options, providers=providers)


def check_session(session: object, path: str | os.PathLike[str], *, content: str, weights: Weights) -> None:
    """Refuse a file that was not exported from these tensors, or that does not take and give what the model does."""
    meta = session.get_modelmeta().custom_metadata_map  # type: ignore[attr-defined]
    if meta.get("content_sha256") != content:
        raise OnnxModelError(path, f"exported from other weights (content {meta.get('content_sha256', 'missing')!r}, "
                                   f"expected {content!r})")
    (inp,), (out,) = session.get_inputs(), session.get_outputs()  # type: ignore[attr-defined]
    side = weights.preprocess.crop_size
    if (inp.name, inp.type, inp.shape[1:]) != (INPUT_NAME, "tensor(uint8)", [3, side, side]):
        raise OnnxModelError(path, f"takes {inp.name} {inp.type} {inp.shape}, the model takes uint8 [N, 3, {side}, "
                                   f"{side}]")
    if (out.name, out.shape[-1]) != (OUTPUT_NAME, len(weights.categories)):
        raise OnnxModelError(path, f"gives {out.name} {out.shape}, the model gives logits of "
                                   f"{len(weights.categories)} classes")


def onnxruntime_backend(weights: Weights, *, device: torch.device, threads: int = 1,
                        cache_dir: str | os.PathLike[str] | None = None) -> OnnxRuntimeBackend:
    """From the cache (`<cache>/onnx/<content>.onnx`) when a file there was exported from these tensors, with no
    torch model built (less memory, a faster load); else exported now and written there. A cached file
    that fails to load or does not match is refused (logged, with the reason) and replaced; a cache that cannot be
    written leaves the model in memory only."""
    content = content_sha256(weights)
    path = Path(cache_dir or default_cache_dir()) / "onnx" / f"{weights.arch}-{content[:32]}.onnx"
    if path.is_file():
        try:
            session = open_session(path, threads=threads, device=device)
            check_session(session, path, content=content, weights=weights)
            return OnnxRuntimeBackend(session, str(path))
        except OnnxModelError as e:
            log.warning("refusing the cached ONNX model: %s; exporting it again", e)
        except Exception as e:  # onnxruntime raises its own types for a truncated or corrupt file
            log.warning("refusing the cached ONNX model: %s: %s; exporting it again", path,
                        f"{type(e).__name__}: {e}".splitlines()[0])
    data, _ = export_onnx(weights)
    try:
        write_atomically(path, data)
        source: bytes | Path = path
    except OSError as e:
        log.warning("could not cache the ONNX model at %s (%s); keeping it in memory", path, e)
        source = data
    session = open_session(source, threads=threads, device=device)
    return OnnxRuntimeBackend(session, str(path) if isinstance(source, Path) else "memory")
