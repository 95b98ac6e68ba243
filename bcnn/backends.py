"""Where the forward pass runs: PyTorch, or ONNX Runtime on a file exported once per model and cached by content.

Both take uint8 images [N, 3, H, W] and return float32 logits [N, C] on the CPU. `auto` is ONNX Runtime on the
CPU, where `python -m bcnn bench` measured it faster for every model and batch size we serve (docs/model.md,
"Backends"), and PyTorch on CUDA (half precision, float32 head) until a GPU run shows otherwise.

A server keeps a device busy with `launch`: it stages a batch and queues its forward pass, and returns at once where
the device works on its own (CUDA), so that the next batch can be staged while this one computes; `wait()` on what
it returns blocks, holding no GIL, until the logits are on the host. On the CPU `launch` computes them there and then.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
from torch import Tensor

from bcnn.backend_names import BACKENDS, BackendName
from bcnn.export import INPUT_NAME, OUTPUT_NAME, OnnxModelError, content_sha256, export_onnx, write_atomically
from bcnn.models import ImageClassifier, build_model, prepare_for_inference
from bcnn.weights import Weights

log = logging.getLogger(__name__)


class InFlight(Protocol):
    def wait(self) -> Tensor:
        """Blocks, holding no GIL, until the batch's float32 logits [N, C] are on the host."""
        ...


class Backend(Protocol):
    name: str

    def __call__(self, images: Tensor) -> Tensor: ...

    def launch(self, batches: Sequence[np.ndarray]) -> InFlight:
        """The forward pass of uint8 [n, H, W, 3] arrays (channels last, as the preprocessing writes them), as one
        batch in their order."""
        ...


class Computed:
    """A batch whose logits were computed when it was launched (a backend on the CPU)."""

    def __init__(self, logits: Tensor) -> None:
        self._logits = logits

    def wait(self) -> Tensor:
        return self._logits


def channels_last_batch(batches: Sequence[np.ndarray]) -> Tensor:
    """uint8 [n, H, W, 3] arrays as one uint8 [N, 3, H, W] tensor laid out channels last (one copy where several)."""
    tensors = [torch.from_numpy(b) for b in batches]
    images = torch.cat(tensors) if len(tensors) > 1 else tensors[0]
    return images.permute(0, 3, 1, 2)


class TorchBackend:
    name = "torch"

    def __init__(self, model: ImageClassifier, device: torch.device, threads: int | None = None) -> None:
        self.device = device
        self.threads = threads
        memory_format = torch.channels_last if device.type == "cuda" else torch.preserve_format
        self.model = model.to(device, memory_format=memory_format)
        self._staging = _CudaStaging(device) if device.type == "cuda" else None

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def __call__(self, images: Tensor) -> Tensor:
        """The images run channels last on every device (a copy only where they are not already, as pixels from
        `bcnn.preprocess.load_image` are): Lite0 is faster so on a CPU too (docs/performance.md, "Results")."""
        if self.threads is not None and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)  # OpenMP's thread count belongs to the calling thread
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with self._autocast():
            return self.model(images).float().cpu()

    @torch.inference_mode()
    def launch(self, batches: Sequence[np.ndarray]) -> InFlight:
        if self._staging is None:
            return Computed(self(channels_last_batch(batches)))
        slot = self._staging.stage(batches)
        try:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(slot.copied)
            with self._autocast():
                logits = self.model(slot.images)
            slot.logits_buffer(logits.shape[1]).copy_(logits.float(), non_blocking=True)
            slot.done.record(compute)
        except BaseException:
            self._staging.release(slot)
            raise
        return _CudaInFlight(self._staging, slot)


class _Slot:
    """One batch's buffers on a CUDA device: pinned host memory the batch is staged in, its copy on the device, and
    pinned host memory the logits come back to; events mark the copy in and the whole pass done."""

    def __init__(self, device: torch.device, capacity: int, side: int) -> None:
        self.capacity, self.side = capacity, side
        self.host = torch.empty((capacity, side, side, 3), dtype=torch.uint8, pin_memory=True)
        self.device_images = torch.empty((capacity, side, side, 3), dtype=torch.uint8, device=device)
        self.host_logits = torch.empty(0, pin_memory=True)
        self.copied = torch.cuda.Event()
        # Waited on by the completion thread: a blocking event yields its core while it waits, where the default
        # one spins on it (the GIL is released either way).
        self.done = torch.cuda.Event(blocking=True)
        self.n = 0

    def fits(self, n: int, side: int) -> bool:
        return n <= self.capacity and side == self.side

    @property
    def images(self) -> Tensor:
        """The staged batch on the device, uint8 [n, 3, H, W] channels last."""
        return self.device_images[:self.n].permute(0, 3, 1, 2)

    @property
    def logits(self) -> Tensor:
        return self.host_logits[:self.n]

    def logits_buffer(self, classes: int) -> Tensor:
        if self.host_logits.shape != (self.capacity, classes):
            self.host_logits = torch.empty((self.capacity, classes), dtype=torch.float32, pin_memory=True)
        return self.logits


class _CudaStaging:
    """Reused slots, as many as batches are in flight at once: a batch is copied once, from the preprocessors' arrays
    into pinned memory, and from there to the device on a stream of its own, so the copy overlaps the forward pass
    of the batch before it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.copy_stream = torch.cuda.Stream(device)
        self._free: list[_Slot] = []
        self._lock = threading.Lock()

    def stage(self, batches: Sequence[np.ndarray]) -> _Slot:
        n, side = sum(len(b) for b in batches), batches[0].shape[1]
        with self._lock:
            slot = self._free.pop() if self._free else None
        if slot is None or not slot.fits(n, side):
            capacity = max(n, slot.capacity if slot is not None and slot.side == side else 0)
            slot = _Slot(self.device, 1 << (capacity - 1).bit_length(), side)  # a power of two: few reallocations
            # The caching allocator gave `device_images` on the compute stream, where it may hand back a block that
            # kernels queued there still use; nothing else orders the copy stream after them.
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        slot.n = n
        try:
            offset = 0
            for b in batches:
                slot.host[offset:offset + len(b)].copy_(torch.from_numpy(b))
                offset += len(b)
            with torch.cuda.stream(self.copy_stream):
                slot.device_images[:n].copy_(slot.host[:n], non_blocking=True)
                slot.copied.record(self.copy_stream)
        except BaseException:
            self.release(slot)
            raise
        return slot

    def release(self, slot: _Slot) -> None:
        with self._lock:
            self._free.append(slot)


class _CudaInFlight:
    def __init__(self, staging: _CudaStaging, slot: _Slot) -> None:
        self._staging, self._slot = staging, slot

    def wait(self) -> Tensor:
        try:
            self._slot.done.synchronize()  # releases the GIL while it waits
            return self._slot.logits.clone()  # the slot's memory goes to the next batch
        finally:
            self._staging.release(self._slot)


# What a sticky CUDA error says, from torch (`torch.AcceleratorError` where it has it, RuntimeError before) or ONNX
# Runtime: the context is lost, and every later call on it fails the same way.
_DEVICE_FAILURES = ("CUDA error", "CUDA failure", "cudaError", "CUBLAS_STATUS", "CUDNN_STATUS", "cuDNN error",
                    "illegal memory access", "illegal address", "device-side assert", "unspecified launch failure",
                    "uncorrectable ECC")


def is_device_failure(error: BaseException) -> bool:
    """Whether `error` says the device itself failed (an illegal address, a fallen-off or faulty GPU, an ECC error),
    so that no later pass on it can succeed. Running out of memory is not: it fails the batch that asked for too
    much, and the next one may fit."""
    if isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(error, accelerator_error):
        return True
    return any(marker in str(error) for marker in _DEVICE_FAILURES)


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, session: object, source: str) -> None:
        self.session = session
        self.source = source
        """the file the session was built from, or `memory`"""

    def __call__(self, images: Tensor) -> Tensor:
        pixels = images.cpu().contiguous().numpy()  # ONNX Runtime wants NCHW laid out as such
        return torch.from_numpy(self.session.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0])  # type: ignore[attr-defined]

    def launch(self, batches: Sequence[np.ndarray]) -> InFlight:
        return Computed(self(channels_last_batch(batches)))


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
    session = ort.InferenceSession(source, options, providers=providers)
    check_provider(session, providers[0] if isinstance(providers[0], str) else providers[0][0])
    return session


def check_provider(session: object, wanted: str) -> None:
    """ONNX Runtime lists its CUDA provider whenever its package has one, and where the provider's libraries fail to
    load it runs the session on the CPU without raising: a GPU replica would serve at a CPU's speed, unseen."""
    running = session.get_providers()  # type: ignore[attr-defined]
    if not running or running[0] != wanted:
        raise ValueError(f"ONNX Runtime did not start {wanted} (the session runs on {', '.join(running) or 'nothing'}"
                         f"): check its CUDA and cuDNN libraries, or use backend torch")


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


def onnx_cache_path(weights: Weights, cache_dir: str | os.PathLike[str] | None = None,
                    content: str | None = None) -> Path:
    """Where the ONNX export of `weights` is kept: `<cache>/onnx/<arch>-<content>.onnx`."""
    content = content or content_sha256(weights)
    return Path(cache_dir or default_cache_dir()) / "onnx" / f"{weights.arch}-{content[:32]}.onnx"


def export_to_cache(weights: Weights, path: Path) -> bytes | Path:
    """The ONNX export of `weights`, written to `path` (the file), or kept in memory (the bytes) where the cache
    cannot be written."""
    data, _ = export_onnx(weights)
    try:
        return write_atomically(path, data)
    except OSError as e:
        log.warning("could not cache the ONNX model at %s (%s); keeping it in memory", path, e)
        return data


def onnx_file(weights: Weights, cache_dir: str | os.PathLike[str] | None = None) -> bytes | Path:
    """The cached export of `weights` where one was exported from these tensors (checked as `onnxruntime_backend`
    checks it), else exported now and cached."""
    content = content_sha256(weights)
    path = onnx_cache_path(weights, cache_dir, content)
    session = _cached_session(path, content=content, weights=weights, threads=1, device=None)
    return path if session is not None else export_to_cache(weights, path)


def _cached_session(path: Path, *, content: str, weights: Weights, threads: int,
                    device: torch.device | None) -> object | None:
    """A session on the cached file, or None where there is none or it is refused (logged, with the reason)."""
    if not path.is_file():
        return None
    try:
        session = open_session(path, threads=threads, device=device)
        check_session(session, path, content=content, weights=weights)
        return session
    except OnnxModelError as e:
        log.warning("refusing the cached ONNX model: %s; exporting it again", e)
    except Exception as e:  # onnxruntime raises its own types for a truncated or corrupt file
        log.warning("refusing the cached ONNX model: %s: %s; exporting it again", path,
                    f"{type(e).__name__}: {e}".splitlines()[0])
    return None


def onnxruntime_backend(weights: Weights, *, device: torch.device, threads: int = 1,
                        cache_dir: str | os.PathLike[str] | None = None) -> OnnxRuntimeBackend:
    """From the cache (`onnx_cache_path`) when a file there was exported from these tensors, with no torch model
    built (less memory, a faster load); else exported now and written there. A cached file that fails to load or
    does not match is refused (logged, with the reason) and replaced; a cache that cannot be written leaves the
    model in memory only."""
    content = content_sha256(weights)
    path = onnx_cache_path(weights, cache_dir, content)
    session = _cached_session(path, content=content, weights=weights, threads=threads, device=device)
    if session is not None:
        return OnnxRuntimeBackend(session, str(path))
    source = export_to_cache(weights, path)
    session = open_session(source, threads=threads, device=device)
    return OnnxRuntimeBackend(session, str(path) if isinstance(source, Path) else "memory")
