from __future__ import annotations

import csv
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "waterbirds"


@dataclass(frozen=True)
class Photo:
    path: Path
    species_zh: str
    imagenet_index: int | None
    imagenet_label: str | None


def _photos() -> list[Photo]:
    with open(SHARED / "photos.csv", encoding="utf-8") as f:
        return [Photo(SHARED / "photos" / r["file"], r["species_zh"],
                      int(r["imagenet_index"]) if r["imagenet_index"] else None, r["imagenet_label"] or None)
                for r in csv.DictReader(f)]


@pytest.fixture(scope="session")
def photos() -> list[Photo]:
    if not (SHARED / "photos.csv").is_file():
        pytest.skip(f"the shared waterbird photos are not here ({SHARED}); CI has them")
    return _photos()


@pytest.fixture(scope="session")
def mapped_photos(photos: list[Photo]) -> list[Photo]:
    return [p for p in photos if p.imagenet_index is not None]


NON_BIRD_PHOTOS = ("chelsea.png", "astronaut.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                   "camera.png", "horse.png", "hubble_deep_field.jpg", "grass.png", "brick.png")
"""Real photos shipped inside scikit-image's wheel: a cat, a person, a cup, a rocket, a horse, textures."""


@pytest.fixture(scope="session")
def non_bird_photos() -> list[Path]:
    data = files("skimage") / "data"
    return [Path(str(data / name)) for name in NON_BIRD_PHOTOS]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Headless, and nothing that phones home: this machine's network is closed.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
OUTPUT = Path(__file__).resolve().parents[1] / "test-output"


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Debian's Chromium, headless, driven by Playwright (tests/test_page.py, tests/test_offline_page.py). One per
    module: Playwright's sync API keeps an event loop running on the main thread while it is open, and the tests
    that run the Python load generator need that thread's `asyncio.run`."""
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed: `apt-get install chromium` (as .ci/run does) runs the page tests")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """The production serve_config.yaml deployed with `serve deploy` on a real local Ray cluster that declares
    two logical GPUs. Started once for every test that asks for it."""
    from tests.service import load_config, start_service

    yield from start_service(tmp_path_factory.mktemp("service"), load_config())


@pytest.fixture(scope="session")
def local_profile(service):  # noqa: ANN001, ANN201
    """The same service with serve_config.local.yaml (`make serve`'s profile, whose settings are this CPU's)
    deployed instead, for the tests that measure it under overload. Those run last (see below), so the production
    file is never deployed again after them: a deploy that replaces every replica costs about a minute."""
    from tests.service import load_config

    config = load_config("serve_config.local.yaml")
    service.deploy(config)
    return config


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests on the local profile last, in their order (a stable sort)."""
    items.sort(key=lambda item: "local_profile" in getattr(item, "fixturenames", ()))


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ANN001, ARG001
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if "chromium" in r.keywords]
    if skipped:
        terminalreporter.write_line(
            f"NOTE: {len(skipped)} browser tests were skipped: Chromium is not installed. "
            "Install Debian's chromium (`apt-get install chromium`, as .ci/run does) to run them.", yellow=True)
