"""Devices the benchmarks and tests put in place of the model's forward pass, and the application that serves with
one: a GPU's speed on machines without one.

- **skipped**: the Classifier answers zero logits at once; what remains of a request's cost is what a GPU's speed
  would leave of it (the serving path alone).
- **simulated**: a stand-in for a GPU whose host's share of a batch is real and whose device's share is a wait. What
  the host does for a batch on a GPU, it does here too: the batch's images are copied once into a buffer of the
  device's (on a GPU: pinned staging memory, from which the copy engine takes them). The forward pass is then a wait
  of `fixed_ms + per_image_ms x n` (times `time_scale`) that holds no GIL, as a CUDA synchronisation does. Batches
  run one after another, each starting when the one before it ends, as kernels on one CUDA stream do; processes that
  share a GPU (Ray's fractional GPUs) share its timeline, kept in a small file, as contexts time-slicing one GPU do
  (the switches between them cost nothing here: an optimistic model of sharing). The default timing is fitted to
  one NVIDIA H200 running the VGG16-BCNN at 448 (eager, float16 autocast, channels last), as measured in
  docs/performance.md ("The Classifier alone").

Either is handed to the Classifier as a backend factory when the application is built (`build_app`, the import path
`on_device` writes into a serve config): the production configuration has no setting for them.

No `from __future__ import annotations` here: Serve reads `build_app`'s annotation at run time (serve_app/app.py).
"""


import copy
import dataclasses
import fcntl
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from ray.serve import Application
from torch import Tensor

from bcnn.backends import Backend, Computed
from bcnn.weights import Weights
from serve_app.app import AppArgs, compose


@dataclass(frozen=True)
class DeviceTiming:
    fixed_ms: float = 1.6
    per_image_ms: float = 0.55
    time_scale: float = 1.0
    """multiplies both: a device slower by this factor, which a small CPU can keep busy"""

    def seconds(self, images: int) -> float:
        return (self.fixed_ms + self.per_image_ms * images) * self.time_scale / 1000

    def images_per_s(self, batch_size: int) -> float:
        """What the device does at one batch size, all the time busy."""
        return batch_size / self.seconds(batch_size)


class Timeline:
    """When the device will have finished the work queued on it (`time.monotonic()`, the same clock in every
    process of a machine): in memory, or in a file shared by every process that simulates the same device."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self._lock = threading.Lock()
        self._free_at = 0.0
        self._fd: int | None = None
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)

    def queue(self, seconds: float) -> float:
        """Queue `seconds` of work after everything queued before it; returns when it will be done."""
        with self._lock:
            if self._fd is None:
                self._free_at = max(time.monotonic(), self._free_at) + seconds
                return self._free_at
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                raw = os.pread(self._fd, 8, 0)
                free_at = float(np.frombuffer(raw, dtype=np.float64)[0]) if len(raw) == 8 else 0.0
                done_at = max(time.monotonic(), free_at) + seconds
                os.pwrite(self._fd, np.float64(done_at).tobytes(), 0)
                return done_at
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _InFlight:
    def __init__(self, done_at: float, logits: Tensor, release: list[np.ndarray], buffer: np.ndarray) -> None:
        self._done_at, self._logits, self._release, self._buffer = done_at, logits, release, buffer

    def wait(self) -> Tensor:
        try:
            time.sleep(max(0.0, self._done_at - time.monotonic()))  # holds no GIL, as a CUDA synchronisation
            return self._logits
        finally:
            self._release.append(self._buffer)


class SimulatedDevice:
    """A backend (`bcnn.backends.Backend`) whose forward pass is a wait on a `Timeline`; its logits are zeros."""

    name = "simulated"

    def __init__(self, classes: int, side: int, timing: DeviceTiming = DeviceTiming(),
                 timeline: Timeline | None = None) -> None:  # noqa: B008 (frozen, so one default is safe)
        self.classes, self.side, self.timing = classes, side, timing
        self.timeline = timeline or Timeline()
        self._buffers: list[np.ndarray] = []  # the device's input buffers not in use; list.pop/append are atomic

    def launch(self, batches: Sequence[np.ndarray]) -> _InFlight:
        """Copy the images (uint8 [n, H, W, 3] arrays) into a device buffer and queue their forward pass."""
        n = sum(len(b) for b in batches)
        buffer = self._buffer(n)
        offset = 0
        for b in batches:
            np.copyto(buffer[offset:offset + len(b)], b)
            offset += len(b)
        done_at = self.timeline.queue(self.timing.seconds(n))
        return _InFlight(done_at, torch.zeros(n, self.classes), self._buffers, buffer)

    def __call__(self, images: Tensor) -> Tensor:
        """uint8 [N, 3, H, W] -> zero logits [N, C], after the device's time."""
        return self.launch([images.permute(0, 2, 3, 1).numpy()]).wait()

    def _buffer(self, n: int) -> np.ndarray:
        try:
            buffer = self._buffers.pop()
        except IndexError:
            buffer = np.empty((0, self.side, self.side, 3), dtype=np.uint8)
        if len(buffer) < n:
            buffer = np.empty((max(n, 2 * len(buffer)), self.side, self.side, 3), dtype=np.uint8)
        return buffer


class SkippedForward:
    """A backend that answers zero logits at launch: the forward pass skipped."""

    name = "skipped"

    def __init__(self, classes: int) -> None:
        self.classes = classes

    def launch(self, batches: Sequence[np.ndarray]) -> Computed:
        return Computed(torch.zeros(sum(len(b) for b in batches), self.classes))

    def __call__(self, images: Tensor) -> Tensor:
        return torch.zeros(len(images), self.classes)


@dataclass(frozen=True)
class BenchBackend:
    """What stands in for the forward pass (the timing: the simulated device's; defaults: one H200, VGG16-BCNN at
    448), named by the application's arguments; the factory the Classifier calls for each model it loads
    (`backend_factory`). A frozen dataclass: Serve hashes a deployment's bound arguments into its version, and a
    pydantic model's pickle holds a set, whose order changes from process to process, so every deploy would have
    restarted the Classifiers."""

    kind: Literal["skipped", "simulated"] = "skipped"
    timing: DeviceTiming = DeviceTiming()

    def __call__(self, weights: Weights) -> Backend:
        if self.kind == "skipped":
            return SkippedForward(len(weights.categories))
        return SimulatedDevice(len(weights.categories), weights.preprocess.crop_size, self.timing, _timeline())


def _timeline() -> Timeline:
    """One timeline for every replica given the same GPU of the same node (Ray's fractional GPUs); a replica given
    no GPU has one of its own."""
    import ray

    gpus = ray.get_gpu_ids()
    if not gpus:
        return Timeline()
    node = ray.get_runtime_context().get_node_id()
    return Timeline(Path(tempfile.gettempdir()) / "waterbirds-simulated-device" /
                    f"{node}-gpu{'-'.join(map(str, gpus))}")


class BenchAppArgs(AppArgs):
    device: BenchBackend = BenchBackend()


def build_app(args: BenchAppArgs) -> Application:
    """The service of serve_app/app.py with `args.device` in place of every Classifier's forward pass."""
    return compose(args, backend_factory=args.device)


def on_device(config: dict[str, Any], device: BenchBackend = BenchBackend()) -> dict[str, Any]:  # noqa: B008
    """A copy of the serve config `config` whose application serves with `device` (default: the forward pass
    skipped) in place of the model's forward pass. Its replicas import this module, so the Ray cluster must have the
    repository on its PYTHONPATH (`load.runner.serve_env`, `tests/service.py`)."""
    config = copy.deepcopy(config)
    [app] = config["applications"]
    app["import_path"] = "load.devices:build_app"
    app["args"] = {**app.get("args", {}), "device": dataclasses.asdict(device)}
    return config
