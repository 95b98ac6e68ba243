"""The production file, unchanged, on a machine with one GPU: it must deploy to RUNNING, not wait forever for a
second GPU. Its own Ray (one logical GPU), so this module runs before the session's service starts."""

from __future__ import annotations

import contextlib
from pathlib import Path

import httpx
import pytest

from tests import images
from tests.service import load_config, start_service

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.long]


def test_production_config_deploys_to_running_on_one_gpu(tmp_path: Path) -> None:
    with contextlib.contextmanager(start_service)(tmp_path, load_config(min_classifiers=None), num_gpus=1) as service:
        app = service.status()["applications"]["waterbirds"]  # start_service waited for RUNNING and HEALTHY
        assert app["status"] == "RUNNING"
        assert service.running_replicas("Classifier") and len(service.running_replicas("Classifier")) == 1
        response = httpx.post(service.url + "/classify", content=images.jpeg(320, 240),
                              headers={"Content-Type": "image/jpeg"}, timeout=60)
        assert response.status_code == 200, response.text
