"""Locust profile of real users: upload photos (mostly multipart, some raw bodies), now and then load the page.

    make load USERS=64 SECONDS=60          # headless, against a running `make serve`
    WATERBIRD_PHOTOS=/path/to/jpegs make load

Every answer's shape is checked. 503s (deliberate backpressure) are counted apart from failures, under the
name "/classify [503 overloaded]", and the user then waits the Retry-After it was given.
"""

from __future__ import annotations

import itertools
import os
import random
import time
from pathlib import Path

from locust import HttpUser, between, events, task

PHOTOS = Path(os.environ.get("WATERBIRD_PHOTOS", Path(__file__).resolve().parents[2] / "shared" / "waterbirds"
                             / "photos"))
_FILES = sorted(p for p in PHOTOS.glob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"}) if PHOTOS.is_dir() else []
ANSWER_KEYS = {"request_id", "model", "level", "is_waterbird", "predictions", "timing_ms"}


@events.init.add_listener
def _check_photos(environment, **_kwargs) -> None:  # noqa: ANN001
    if not _FILES:
        raise SystemExit(f"no photos in {PHOTOS}; set WATERBIRD_PHOTOS to a folder of JPEG or PNG files")


class Birdwatcher(HttpUser):
    wait_time = between(0.5, 2.0)

    def on_start(self) -> None:
        self.photos = itertools.cycle(random.sample(_FILES, len(_FILES)))

    @task(6)
    def upload_multipart(self) -> None:
        path = next(self.photos)
        with self.client.post("/classify", files={"file": (path.name, path.read_bytes(), "image/jpeg")},
                              name="/classify multipart", catch_response=True) as response:
            self._check(response)

    @task(3)
    def upload_raw(self) -> None:
        path = next(self.photos)
        with self.client.post("/classify", data=path.read_bytes(), headers={"Content-Type": "image/jpeg"},
                              name="/classify raw", catch_response=True) as response:
            self._check(response)

    @task(1)
    def open_page(self) -> None:
        with self.client.get("/", catch_response=True) as response:
            if response.status_code != 200 or "<html" not in response.text:
                response.failure(f"page: status {response.status_code}")

    def _check(self, response) -> None:  # noqa: ANN001
        if response.status_code == 503:
            response.success()  # backpressure, not a failure: recorded on its own line below
            events.request.fire(request_type="POST", name="/classify [503 overloaded]",
                                response_time=response.elapsed.total_seconds() * 1000, response_length=0,
                                exception=None, context={})
            retry = response.headers.get("Retry-After", "1")
            time.sleep(min(float(retry), 5.0) if retry.isdigit() else 1.0)  # cooperative: Locust patches time
            return
        if response.status_code != 200:
            response.failure(f"status {response.status_code}: {response.text[:200]}")
            return
        body = response.json()
        if not ANSWER_KEYS <= body.keys() or not body["predictions"]:
            response.failure(f"answer shape: {sorted(body)}")
        elif not all({"label", "name", "score"} <= p.keys() for p in body["predictions"]):
            response.failure("prediction shape")
        else:
            response.success()
