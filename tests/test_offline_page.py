"""The page as an offline web app (docs/offline.md), in a real headless Chromium on a phone-sized viewport: saved
for offline use, reloaded from the cache with the network cut (DevTools' offline emulation), photos answered by
ONNX Runtime Web on the device and compared with the service's answers, a redeploy replacing the saved model,
large photos shrunk before upload."""

from __future__ import annotations

import base64
import json
import statistics
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from bcnn.weights import WATERBIRD_NAMES
from load.runner import deployment
from serve_app.offline import STATIC
from tests.conftest import OUTPUT, Photo
from tests.service import Service, load_config

pytestmark = [pytest.mark.chromium, pytest.mark.slow]

PHONE = {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True, "device_scale_factor": 2}
SAVED = "document.querySelector('#offline-status').textContent.startsWith('Saved on this device')"
RESULT_READY = "document.querySelector('#busy').textContent.startsWith('Result ready')"
MIN_TOP1_AGREEMENT = 0.97
MAX_WATERBIRD_DISAGREEMENTS = 3


@pytest.fixture(scope="module")
def runtime_installed() -> None:
    if not STATIC.joinpath("ort", "ort-wasm-simd-threaded.wasm").is_file():
        pytest.skip("ONNX Runtime Web is not installed (npm missing when `make` ran): the page works online only; "
                    "`make web-runtime` with npm installed runs these tests")


@pytest.fixture
def phone(browser, service: Service, runtime_installed: None) -> Iterator[object]:  # noqa: ANN001
    """A phone's browser that opened the page online and saved it for offline use."""
    context = browser.new_context(**PHONE)
    page = context.new_page()
    page.goto(service.url + "/")
    page.evaluate("navigator.serviceWorker.ready.then(() => true)")
    page.locator("#save-offline").wait_for(state="visible", timeout=60_000)
    yield page
    context.close()


def _save(page) -> None:  # noqa: ANN001
    page.locator("#save-offline").click()
    page.wait_for_function(SAVED, timeout=120_000)


def _cached_urls(page) -> list[str]:  # noqa: ANN001
    """What "save for offline" keeps: the runtime's files and the model (the service worker keeps other answers
    in the same cache, such as /labels)."""
    urls = page.evaluate("caches.open('waterbirds-offline').then((c) => c.keys()).then((k) => k.map((r) => r.url))")
    return [u for u in urls if "/assets/" in u or "/model/" in u]


def _classify_offline(page, path: Path) -> None:  # noqa: ANN001
    page.get_by_label("Take a photo with the camera").set_input_files(str(path))
    page.wait_for_function(RESULT_READY, timeout=60_000)


def test_saved_for_offline_the_page_opens_and_answers_with_no_network(phone, service: Service,  # noqa: ANN001
                                                                     mapped_photos: list[Photo]) -> None:
    page = phone
    OUTPUT.mkdir(exist_ok=True)
    # Installable: Chromium's own check of the manifest, icons and service worker finds nothing but that a test
    # browser is a private window.
    cdp = page.context.new_cdp_session(page)
    assert cdp.send("Page.getAppManifest")["errors"] == []
    errors = {e["errorId"] for e in cdp.send("Page.getInstallabilityErrors")["installabilityErrors"]}
    assert errors <= {"in-incognito"}, errors
    cdp.detach()
    offered = httpx.get(service.url + "/offline.json", timeout=60).json()
    megabytes = f"{offered['bytes'] / 1e6:.1f} MB"
    assert page.locator("#save-offline").inner_text() == f"Save for offline use ({megabytes})"
    page.screenshot(path=str(OUTPUT / "offline-1-save.png"), full_page=True)
    # Every status the page shows while it saves, and the progress bar's largest value.
    page.evaluate("""() => {
        window.seen = {statuses: [], progress: 0};
        new MutationObserver(() => window.seen.statuses.push(document.querySelector('#offline-status').textContent))
            .observe(document.querySelector('#offline-status'), {childList: true, characterData: true, subtree: true});
        const bar = document.querySelector('#offline-progress');
        new MutationObserver(() => { window.seen.progress = Math.max(window.seen.progress, bar.value / bar.max); })
            .observe(bar, {attributes: true});
    }""")
    _save(page)
    seen = page.evaluate("window.seen")
    saving = [s for s in seen["statuses"] if s.startswith("Saving for offline use: ")]
    assert saving and saving[-1].endswith(f"of {megabytes}…"), seen["statuses"][-5:]
    assert seen["progress"] == 1
    assert page.locator("#offline-progress").is_hidden()
    cached = _cached_urls(page)
    assert sorted(cached) == sorted(service.url + "/" + f["path"]
                                    for f in [*offered["runtime"].values(), offered["model"]])
    page.screenshot(path=str(OUTPUT / "offline-2-saved.png"), full_page=True)

    page.context.set_offline(True)
    page.reload()
    assert page.evaluate("navigator.onLine") is False
    assert page.evaluate("navigator.serviceWorker.controller !== null")  # the page came from the service worker
    photo = mapped_photos[0]
    _classify_offline(page, photo.path)
    assert page.locator("#answered-by").inner_text() == "On this device"
    assert page.locator("#species").inner_text() == WATERBIRD_NAMES[photo.imagenet_label]
    meta = page.locator("#meta").inner_text()
    assert meta.startswith(f"Answered on this device by model {offered['model']['name']}"), meta
    assert page.locator("#fewer-species").is_hidden()  # the phone has the service's own model
    page.screenshot(path=str(OUTPUT / "offline-3-answered-on-the-phone.png"), full_page=True)


def _photo_payload(photo: Photo) -> dict[str, str]:
    kind = "image/png" if photo.path.suffix.lower() == ".png" else "image/jpeg"
    return {"name": photo.path.name, "type": kind, "data": base64.b64encode(photo.path.read_bytes()).decode()}


ON_DEVICE = """async (photos) => {
    const classifier = await window.waterbirds.phoneClassifier();
    const answers = [];
    for (const photo of photos) {
        const bytes = Uint8Array.from(atob(photo.data), (c) => c.charCodeAt(0));
        const body = await classifier.classify(new Blob([bytes], {type: photo.type}), 1);
        answers.push({name: photo.name, label: body.predictions[0].label, is_waterbird: body.is_waterbird,
                      species_known: body.species_known, level: body.level, timing_ms: body.timing_ms});
    }
    return answers;
}"""


def test_on_device_answers_agree_with_the_service_on_the_shared_photos(phone, service: Service,  # noqa: ANN001
                                                                      photos: list[Photo]) -> None:
    page = phone
    _save(page)
    on_device: list[dict] = []
    for start in range(0, len(photos), 40):
        on_device += page.evaluate(ON_DEVICE, [_photo_payload(p) for p in photos[start:start + 40]])

    def served(photo: Photo) -> dict:
        response = httpx.post(service.url + "/classify?top_k=1", timeout=60,
                              files={"file": (photo.path.name, photo.path.read_bytes())})
        assert response.status_code == 200, response.text
        return response.json()

    with ThreadPoolExecutor(4) as pool:
        by_service = list(pool.map(served, photos))
    top1 = [d["label"] == s["predictions"][0]["label"] for d, s in zip(on_device, by_service, strict=True)]
    waterbird = [d["is_waterbird"] == s["is_waterbird"] for d, s in zip(on_device, by_service, strict=True)]
    levels = [d["level"] == s["level"] for d, s in zip(on_device, by_service, strict=True)]
    disagreements = [{"photo": d["name"], "phone": [d["label"], d["is_waterbird"]],
                      "service": [s["predictions"][0]["label"], s["is_waterbird"]]}
                     for d, s, same_top, same_wb in zip(on_device, by_service, top1, waterbird, strict=True)
                     if not (same_top and same_wb)]
    totals = sorted(d["timing_ms"]["total"] for d in on_device[1:])  # the first pays for the session's warm-up
    report = {"photos": len(photos), "top1_agreement": sum(top1) / len(photos),
              "is_waterbird_disagreements": len(waterbird) - sum(waterbird), "disagreements": disagreements,
              "level_disagreements": len(levels) - sum(levels),
              "ms_per_photo": {"median": statistics.median(totals), "p90": totals[int(0.9 * len(totals))],
                               "preprocess_median": statistics.median(d["timing_ms"]["preprocess"] for d in on_device),
                               "inference_median": statistics.median(d["timing_ms"]["inference"] for d in on_device)},
              "threads": page.evaluate("self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency) : 1")}
    OUTPUT.mkdir(exist_ok=True)
    (OUTPUT / "offline-agreement.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    assert report["top1_agreement"] >= MIN_TOP1_AGREEMENT, disagreements
    assert report["is_waterbird_disagreements"] <= MAX_WATERBIRD_DISAGREEMENTS, disagreements
    assert report["level_disagreements"] <= 2 * MAX_WATERBIRD_DISAGREEMENTS, report  # the rolled-up answer too


def _large_photo(path: Path, tmp_path: Path) -> Path:
    """A 12-megapixel JPEG of about 6 MB, as a phone camera writes it: the photo enlarged, with sensor noise."""
    import numpy as np

    image = Image.open(path).convert("RGB").resize((4032, 3024), Image.Resampling.BICUBIC)
    noisy = np.asarray(image, dtype=np.int16) + np.random.default_rng(0).integers(-16, 17, (3024, 4032, 3))
    large = tmp_path / f"large-{path.stem}.jpg"
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(large, quality=95)
    return large


def _longer_side(path: Path) -> int:
    with Image.open(path) as image:
        return max(image.size)


def test_a_large_photo_is_shrunk_before_upload_and_answered_the_same(browser, service: Service,  # noqa: ANN001
                                                                     mapped_photos: list[Photo],
                                                                     tmp_path: Path) -> None:
    context = browser.new_context(**PHONE)
    page = context.new_page()
    sent: list[int] = []
    page.on("request", lambda r: sent.append(len(r.post_data_buffer or b"")) if r.method == "POST" else None)
    try:
        page.goto(service.url + "/")
        photo = mapped_photos[1]
        large = _large_photo(photo.path, tmp_path)
        assert 5e6 < large.stat().st_size < 8e6
        _classify_offline(page, large)
        assert page.locator("#answered-by").inner_text() == "Server"
        assert len(sent) == 1 and sent[0] < 1e6, sent  # a 1024-px JPEG, not the 6 MB photo
        full_size = httpx.post(service.url + "/classify", files={"file": (large.name, large.read_bytes())},
                               timeout=60).json()
        shown = page.locator("#species").inner_text()
        assert shown == full_size["predictions"][0]["name"] == WATERBIRD_NAMES[photo.imagenet_label]
        small = next(p.path for p in mapped_photos if _longer_side(p.path) <= 1024)  # sent as it is
        _classify_offline(page, small)
        assert sent[1] < small.stat().st_size + 1000  # the form's few hundred bytes of framing
    finally:
        context.close()


def test_a_redeploy_replaces_the_saved_model(phone, service: Service, mapped_photos: list[Photo],  # noqa: ANN001
                                            tmp_path: Path) -> None:
    """A new model served replaces the one saved on the phone at its next visit online; a model too large for
    phones is answered for offline by the embedded default, and the page says it knows fewer species."""
    from bcnn.checkpoint import save_checkpoint
    from bcnn.models import build_model, get_weights

    page = phone
    _save(page)
    before = _cached_urls(page)
    default = get_weights("default")
    checkpoint = tmp_path / "lite0-thirty.pt"
    # The default's 23 waterbirds and 7 other birds (ImageNet classes 7-13): a model that knows 30 species.
    save_checkpoint(checkpoint, build_model(default), arch=default.arch, categories=default.categories,
                    preprocess=default.preprocess, answer_indices=(*default.answer_indices, *range(7, 14)),
                    meta={"species_rule": default.species_rule.to_dict()})
    config = load_config()
    deployment(config, "Classifier")["user_config"]["checkpoint"] = str(checkpoint)
    try:
        service.deploy(config)
        page.reload()
        page.wait_for_function("document.querySelector('#offline-status').textContent.includes('lite0-thirty')",
                               timeout=120_000)
        page.wait_for_function(SAVED, timeout=120_000)
        assert "lite0-thirty (30 species" in page.locator("#offline-status").inner_text()
        after = _cached_urls(page)
        model_urls = [u for u in after if "/model/" in u]
        assert len(model_urls) == 1 and model_urls[0] not in before  # the old model is gone from the phone

        # The service's model now counts as too large for a phone: the phone gets the embedded default instead.
        deployment(config, "Ingress")["user_config"]["phone_model_max_mb"] = 1
        service.deploy(config)
        page.reload()
        page.wait_for_function("document.querySelector('#offline-status').textContent.includes('waterbirds-imagenet')",
                               timeout=120_000)
        page.wait_for_function(SAVED, timeout=120_000)
        page.context.set_offline(True)
        page.reload()
        photo = mapped_photos[2]
        _classify_offline(page, photo.path)
        assert page.locator("#species").inner_text() == WATERBIRD_NAMES[photo.imagenet_label]
        assert page.locator("#fewer-species").inner_text().startswith(
            "Answered by the model saved on this device, which knows 23 species; the service's model knows 30.")
        page.screenshot(path=str(OUTPUT / "offline-4-fewer-species.png"), full_page=True)
    finally:
        page.context.set_offline(False)
        service.deploy(load_config())


def test_a_busy_service_is_answered_for_on_the_phone_until_its_own_answer_comes(phone,  # noqa: ANN001
                                                                                 mapped_photos: list[Photo]) -> None:
    """The first upload is refused with the service's own 503 (Retry-After: 2): the phone answers meanwhile, and
    the service's answer to the retry replaces the phone's."""
    from serve_app.admission import Overloaded
    from serve_app.http import error_answer

    page = phone
    _save(page)
    refused = error_answer(Overloaded("test", 2))
    body = json.dumps({"error": {"code": refused.code, "message": refused.message}})
    sent: list[str] = []

    def first_refused(route) -> None:  # noqa: ANN001
        sent.append(route.request.url)
        if len(sent) == 1:
            route.fulfill(status=503, headers=refused.headers, content_type="application/json", body=body)
        else:
            route.continue_()

    page.route("**/classify*", first_refused)
    photo = mapped_photos[0]
    page.get_by_label("Take a photo with the camera").set_input_files(str(photo.path))
    page.wait_for_function("document.querySelector('#answered-by').textContent === 'On this device'", timeout=30_000)
    assert page.locator("#species").inner_text() == WATERBIRD_NAMES[photo.imagenet_label]
    assert len(sent) == 1  # the phone answered before the retry
    page.wait_for_function("document.querySelector('#answered-by').textContent === 'Server'", timeout=30_000)
    page.wait_for_function(RESULT_READY, timeout=30_000)
    assert len(sent) == 2
    assert page.locator("#meta").inner_text().startswith("Answered by the server")
