"""The simulated device stands in for a GPU only if it behaves like one where the host can tell: the batch is staged
once, a forward pass takes its modelled time, passes queue one after another (also across processes sharing it),
and waiting for one leaves the GIL to the host's other threads."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from load.devices import DeviceTiming, SimulatedDevice, Timeline

TIMING = DeviceTiming(fixed_ms=20.0, per_image_ms=10.0, time_scale=2.0)


def test_timing_is_fixed_plus_per_image_times_the_scale() -> None:
    assert TIMING.seconds(4) == (20.0 + 4 * 10.0) * 2.0 / 1000
    h200 = DeviceTiming()
    assert 1650 < h200.images_per_s(64) < 1800  # the H200's bare VGG16-BCNN at 448, batch 32-128: 1,661-1,793


def test_passes_queue_one_after_another() -> None:
    timeline = Timeline()
    first = timeline.queue(0.5)
    second = timeline.queue(0.25)
    assert second - first == 0.25
    assert first - time.monotonic() <= 0.5


def test_processes_sharing_a_device_share_its_timeline(tmp_path: Path) -> None:
    path = tmp_path / "gpu0"
    one, other = Timeline(path), Timeline(path)  # as two replicas given the same GPU open it
    first = one.queue(0.5)
    assert other.queue(0.5) - first >= 0.5 - 1e-9
    assert Timeline(tmp_path / "gpu1").queue(0.5) < first + 0.5  # another GPU is free


def test_a_batch_is_staged_and_its_pass_takes_the_modelled_time() -> None:
    device = SimulatedDevice(classes=7, side=8, timing=TIMING)
    parts = [np.full((3, 8, 8, 3), 1, dtype=np.uint8), np.full((2, 8, 8, 3), 2, dtype=np.uint8)]
    start = time.monotonic()
    in_flight = device.launch(parts)
    launched = time.monotonic() - start
    logits = in_flight.wait()
    assert time.monotonic() - start >= TIMING.seconds(5)
    assert launched < TIMING.seconds(5)  # launching does not wait for the device
    assert logits.shape == (5, 7) and logits.dtype == torch.float32
    [buffer] = device._buffers  # given back after the wait, holding the staged batch
    assert (buffer[:3] == 1).all() and (buffer[3:5] == 2).all()


def _cpu_while(wait: Callable[[], object]) -> tuple[float, float, float]:
    """(wall, this thread's CPU, a busy thread's CPU) in seconds while `wait()` runs on this thread and a pure-Python
    loop runs on another. CPU time per thread, not a count of iterations: the host's other processes change how
    fast the loop runs, not which thread holds the GIL."""
    stop, started = threading.Event(), threading.Event()
    busy_cpu = 0.0

    def busy() -> None:
        nonlocal busy_cpu
        started.set()
        begun = time.thread_time()
        while not stop.is_set():
            pass
        busy_cpu = time.thread_time() - begun

    other = threading.Thread(target=busy)
    other.start()
    started.wait()
    wall, cpu = time.monotonic(), time.thread_time()
    wait()
    wall, cpu = time.monotonic() - wall, time.thread_time() - cpu
    stop.set()
    other.join()
    return wall, cpu, busy_cpu


def test_waiting_for_the_device_leaves_the_gil_to_other_threads() -> None:
    device = SimulatedDevice(classes=2, side=4, timing=DeviceTiming(fixed_ms=300.0, per_image_ms=0.0))
    wall, waiting_cpu, busy_cpu = _cpu_while(device.launch([np.zeros((1, 4, 4, 3), dtype=np.uint8)]).wait)
    assert wall >= 0.25  # launched just before the clock started
    # A spin would burn the waiting thread's CPU (about half the wait, sharing the GIL); a wait that blocked with
    # the GIL held would leave the busy thread no more than one switch interval (5 ms) of it.
    assert waiting_cpu < 0.1 * wall, (wall, waiting_cpu)
    assert busy_cpu > 0.25 * wall, (wall, busy_cpu)


def test_a_spinning_wait_is_told_apart() -> None:
    """The check above can fail: a wait that spins in Python is caught by it."""
    def spin() -> None:
        until = time.monotonic() + 0.3
        while time.monotonic() < until:
            pass

    wall, waiting_cpu, _ = _cpu_while(spin)
    assert waiting_cpu >= 0.1 * wall, (wall, waiting_cpu)
