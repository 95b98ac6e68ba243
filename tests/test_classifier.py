"""The Classifier deployment in process (its class, no Ray cluster): a device that fails is seen by the health check
and a batch that ran out of memory is not; a batch stuck on the device is seen too; warm-up covers every batch size.
Batches go through the replica's device path (`_launch` on its inference thread, the wait on its completion thread):
Serve's `@serve.batch` in front of it needs a replica of a running application (tests/test_serving.py)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from bcnn.backends import Backend, InFlight
from bcnn.models import get_weights
from bcnn.predict import Predictor
from deployments.classifier import BATCHES_IN_FLIGHT, Classifier, _Images
from deployments.device_watch import DeviceWatch
from deployments.messages import ModelUnavailable, PreparedBatch
from load.bare_model import random_bcnn_checkpoint
from load.devices import DeviceTiming, SimulatedDevice

SIDE = 32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_bcnn_checkpoint(tmp_path_factory.mktemp("classifier") / "vgg.pt", num_classes=6, input_size=SIDE)


class Faulty:
    """A backend that raises what it is told to, at launch or at the wait, then works again (where the error lets
    a real device work again)."""

    def __init__(self, backend: Backend) -> None:
        self.backend, self.name = backend, backend.name
        self.at_launch: list[BaseException] = []
        self.at_wait: list[BaseException] = []

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.backend(images)

    def launch(self, batches: Sequence[np.ndarray]) -> InFlight:
        if self.at_launch:
            raise self.at_launch.pop(0)
        in_flight, error = self.backend.launch(batches), self.at_wait.pop(0) if self.at_wait else None
        return in_flight if error is None else _Raises(error)


class _Raises:
    def __init__(self, error: BaseException) -> None:
        self.error = error

    def wait(self) -> torch.Tensor:
        raise self.error


def _pixels(n: int) -> np.ndarray:
    return np.random.default_rng(n).integers(0, 256, (n, SIDE, SIDE, 3), dtype=np.uint8)


@pytest.fixture
def classifier(checkpoint: Path) -> Iterator[tuple[Classifier, asyncio.Runner]]:
    with asyncio.Runner() as runner:  # its close cancels the replica's own tasks
        replica = Classifier.func_or_class()
        runner.run(replica.reconfigure({"checkpoint": str(checkpoint), "backend": "torch"}))
        yield replica, runner


async def _batch(replica: Classifier, n: int) -> list[dict[str, object]]:
    assert replica.predictor is not None
    launched = await replica._inference.run(replica._launch, replica.predictor, [_pixels(n)], (3,) * n)
    return await asyncio.wrap_future(launched)


def _classify(replica: Classifier, runner: asyncio.Runner, n: int = 2) -> list[dict[str, object]]:
    return runner.run(_batch(replica, n))


def test_every_configured_model_is_served_by_name_and_one_that_fails_to_load_fails_alone(checkpoint: Path) -> None:
    """#37: the default and the models beside it are loaded in each replica; a new model that does not load is
    listed as failed and answered for with ModelUnavailable while the others serve; a swap of one that does not load
    keeps the old one serving and fails the update; a model no longer configured is dropped."""
    good = {"checkpoint": str(checkpoint), "backend": "torch"}
    with asyncio.Runner() as runner:
        replica = Classifier.func_or_class()
        runner.run(replica.reconfigure({**good, "name": "first", "models": {
            "second": {**good, "waterbird_threshold": 0.9}, "broken": {"checkpoint": "/nonexistent.pt"}}}))
        catalog = replica.catalog()
        assert (catalog.default, list(catalog.cards)) == ("first", ["first", "second"])
        assert list(catalog.failed) == ["broken"]
        assert catalog.cards["second"].preprocess.crop_size == SIDE and catalog.cards["second"].parameter_bytes > 0
        part = _Images("second", _pixels(3), (2,) * 3, (0.0,) * 3)
        [answers] = runner.run(replica._classify_model("second", [part]))
        assert [(a.model_name, len(a.answer["predictions"])) for a in answers] == [("second", 2)] * 3
        batch = PreparedBatch(_pixels(2), (0.0, 0.0), {}, ("r1", "r2"))
        refused = runner.run(replica(batch, (1, 1), "broken"))
        assert all(isinstance(o, ModelUnavailable) and "nonexistent" in str(o) for o in refused)

        with pytest.raises(RuntimeError, match="'second'.*failed to load"):
            runner.run(replica.reconfigure({**good, "name": "first", "models": {
                "second": {"checkpoint": "/nonexistent.pt"}}}))
        assert list(replica.catalog().cards) == ["first", "second"]  # the old second serves on
        runner.run(replica.reconfigure({**good, "name": "first"}))
        assert list(replica.catalog().cards) == ["first"] and not replica.catalog().failed


def test_out_of_memory_fails_its_batch_only_and_a_device_failure_fails_the_health_check(
        classifier: tuple[Classifier, asyncio.Runner]) -> None:
    replica, runner = classifier
    assert replica.predictor is not None
    faulty = replica.predictor.backend = Faulty(replica.predictor.backend)
    assert len(_classify(replica, runner)) == 2
    replica.check_health()

    faulty.at_launch.append(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.06 GiB"))
    with pytest.raises(torch.OutOfMemoryError):
        _classify(replica, runner)
    replica.check_health()  # the next batch may fit
    assert len(_classify(replica, runner, 3)) == 3

    faulty.at_wait.append(ValueError("a bug of ours in one batch"))
    with pytest.raises(ValueError):
        _classify(replica, runner)
    replica.check_health()

    faulty.at_wait.append(torch.AcceleratorError("CUDA error: an illegal memory access was encountered"))
    with pytest.raises(torch.AcceleratorError):
        _classify(replica, runner)
    with pytest.raises(RuntimeError, match="the device failed .*illegal memory access"):
        replica.check_health()
    _classify(replica, runner)  # whatever a batch does now, the replica stays marked for replacement
    with pytest.raises(RuntimeError, match="the device failed"):
        replica.check_health()


def test_a_batch_stuck_on_the_device_fails_the_health_check(
        classifier: tuple[Classifier, asyncio.Runner]) -> None:
    replica, runner = classifier
    assert replica.predictor is not None
    now = [0.0]
    replica.device_watch = DeviceWatch(min_stall_s=30.0, stall_factor=10.0, clock=lambda: now[0])
    released = threading.Event()
    hung = _Hangs(replica.predictor.backend, released)
    replica.predictor.backend = hung  # type: ignore[assignment]
    task = runner.get_loop().create_task(_batch(replica, 2))
    runner.run(asyncio.wait_for(asyncio.to_thread(hung.waiting.wait), 30))
    now[0] = 29.0
    replica.check_health()
    now[0] = 31.0
    with pytest.raises(RuntimeError, match="on the device for 31 s"):
        replica.check_health()
    released.set()
    assert len(runner.get_loop().run_until_complete(task)) == 2
    replica.check_health()


class _Hangs:
    """Every batch waits on the device until `released` (a hung kernel, until the test lets it go)."""

    def __init__(self, backend: Backend, released: threading.Event) -> None:
        self.backend, self.name, self.released = backend, backend.name, released
        self.waiting = threading.Event()

    def launch(self, batches: Sequence[np.ndarray]) -> InFlight:
        in_flight, hang = self.backend.launch(batches), self

        class Hung:
            def wait(self) -> torch.Tensor:
                hang.waiting.set()
                hang.released.wait()
                return in_flight.wait()

        return Hung()


def test_the_stuck_bound_grows_with_the_slowest_batch() -> None:
    now = [0.0]
    watch = DeviceWatch(min_stall_s=30.0, stall_factor=10.0, clock=lambda: now[0])
    token = watch.launched()
    now[0] = 5.0
    watch.finished(token)
    assert watch.stall_s == 50.0
    token = watch.launched()
    now[0] = 45.0
    watch.check()
    now[0] = 56.0
    with pytest.raises(RuntimeError, match="stuck past 50 s"):
        watch.check()
    watch.finished(token, torch.OutOfMemoryError("CUDA out of memory"))
    watch.check()
    assert watch.stall_s == 50.0  # a failed batch says nothing of how long one takes


class _Recording:
    """A simulated device that records each launch's size and how many batches were in flight at once."""

    name = "recording"

    def __init__(self, device: SimulatedDevice) -> None:
        self.device, self.sizes, self.in_flight, self.most_in_flight = device, [], 0, 0

    def launch(self, batches: Sequence[np.ndarray]) -> InFlight:
        self.sizes.append(sum(len(b) for b in batches))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        in_flight, recording = self.device.launch(batches), self

        class Done:
            def wait(self) -> torch.Tensor:
                recording.in_flight -= 1
                return in_flight.wait()

        return Done()


def test_on_cuda_every_batch_size_is_warmed_up_and_the_largest_in_flight_together(checkpoint: Path) -> None:
    """cuDNN plans per shape: a batch of any size up to the largest meets a warmed-up shape. The largest first, as
    many at once as the Classifier keeps in flight, so its staging buffers exist before traffic."""
    weights = get_weights(str(checkpoint))
    recording = _Recording(SimulatedDevice(len(weights.categories), SIDE, DeviceTiming(0.0, 0.0)))
    predictor = Predictor(weights, device="cuda", backend=recording)  # type: ignore[arg-type]
    rounds = predictor.warm_up_rounds(64, in_flight=BATCHES_IN_FLIGHT)
    for sizes in rounds:
        predictor.warm_up(sizes)
    assert recording.sizes[:BATCHES_IN_FLIGHT] == [64] * BATCHES_IN_FLIGHT
    assert sorted(set(recording.sizes)) == list(range(1, 65))
    assert recording.most_in_flight == BATCHES_IN_FLIGHT and recording.in_flight == 0

    on_cpu = Predictor(weights, device="cpu", backend=recording)  # type: ignore[arg-type]
    assert on_cpu.warm_up_rounds(64, in_flight=BATCHES_IN_FLIGHT) == [(1,)]
