"""The offline page's files as the service serves them (serve_app/offline.py): URLs that change with the content,
the service worker's list of what it keeps, and a service without ONNX Runtime Web saying why it offers nothing."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from serve_app.offline import RUNTIME_DIR, STATIC, WebApp

PHONE_MODEL = {"sha256": "ab" * 32, "bytes": 1000, "name": "m", "version": "1", "species": 23, "same_as_service": True}


@pytest.fixture
def static(tmp_path: Path) -> Path:
    """A copy of the page's folder, without ONNX Runtime Web."""
    folder = tmp_path / "static"
    shutil.copytree(str(STATIC), folder, ignore=shutil.ignore_patterns(RUNTIME_DIR))
    return folder


def _config(app: WebApp) -> dict:
    page = app.page.decode()
    return json.loads(re.search(r'<script id="app-config" type="application/json">(.*?)</script>', page).group(1))


def test_every_file_the_page_names_is_served_and_the_worker_keeps_them(static: Path) -> None:
    app = WebApp(static)
    config = _config(app)
    assert set(config["shell"]) == {"photo.js", "ondevice.js", "icon.svg", "icon-192.png", "icon-512.png"}
    assert all(path in app.assets for path in config["shell"].values())
    assert len({path.rsplit("/", 1)[0] for path in config["shell"].values()}) == 1  # one folder: relative imports
    kept = json.loads(re.search(r"const SHELL = (\[.*\]);", app.service_worker.decode()).group(1))
    assert kept == ["./", "manifest.webmanifest", *config["shell"].values()]
    manifest = json.loads(app.manifest)
    assert {icon["sizes"] for icon in manifest["icons"]} >= {"192x192", "512x512"}
    assert all(icon["src"] in app.assets for icon in manifest["icons"])


def test_a_changed_file_gets_new_urls_and_a_new_service_worker(static: Path) -> None:
    before = WebApp(static)
    (static / "photo.js").write_text((static / "photo.js").read_text() + "\n// changed\n")
    after = WebApp(static)
    assert set(_config(before)["shell"].values()).isdisjoint(_config(after)["shell"].values())
    assert after.service_worker != before.service_worker


def test_without_onnx_runtime_web_nothing_is_offered_and_the_reason_is_given(static: Path) -> None:
    app = WebApp(static)
    assert app.runtime == {} and _config(app)["runtime"] == {}
    offered = app.offline_files(PHONE_MODEL)
    assert offered["available"] is False and "make web-runtime" in offered["reason"]


@pytest.mark.skipif(not STATIC.joinpath(RUNTIME_DIR, "ort-wasm-simd-threaded.wasm").is_file(),
                    reason="ONNX Runtime Web is not installed (make web-runtime needs npm)")
def test_with_the_runtime_a_save_downloads_it_and_the_model() -> None:
    app = WebApp()
    offered = app.offline_files(PHONE_MODEL)
    assert offered["model"]["path"] == f"model/{PHONE_MODEL['sha256']}.onnx"
    assert offered["bytes"] == sum(f["bytes"] for f in offered["runtime"].values()) + PHONE_MODEL["bytes"]
    assert all(f["path"] in app.assets for f in offered["runtime"].values())
    assert app.offline_files(None)["available"] is False
