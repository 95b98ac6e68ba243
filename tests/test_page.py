"""The upload page in a real headless Chromium (Debian's), driven by Playwright, against the running service."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bcnn.weights import WATERBIRD_NAMES
from serve_app.run import DASHBOARD_URL, dashboard_headers
from tests.conftest import OUTPUT, Photo
from tests.service import Service

pytestmark = [pytest.mark.chromium, pytest.mark.slow]


@pytest.fixture
def page(browser, service: Service):  # noqa: ANN001, ANN201
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    page = context.new_page()
    page.goto(service.url + "/")
    yield page
    context.close()


def _answered(page, path: Path, picker: str = "Drop a photo here or choose one") -> None:  # noqa: ANN001
    """Choose a photo with the page's picker and wait until its answer is shown."""
    page.get_by_label(picker).set_input_files(str(path))
    page.wait_for_function("document.querySelector('#busy').textContent.startsWith('Result ready')", timeout=60_000)


def _api_answer(service: Service, path: Path) -> dict:
    return httpx.post(service.url + "/classify", files={"file": (path.name, path.read_bytes(), "image/jpeg")},
                      timeout=60).json()


def test_upload_shows_the_same_species_as_the_api(page, service: Service, mapped_photos: list[Photo]) -> None:  # noqa: ANN001
    OUTPUT.mkdir(exist_ok=True)
    for photo in mapped_photos[:3]:  # several photos in a row, no reload
        _answered(page, photo.path)
        api = _api_answer(service, photo.path)
        assert api["predictions"][0]["label"] == photo.imagenet_label and api["level"] == "species"
        name = WATERBIRD_NAMES[photo.imagenet_label]  # a birder's name, not ImageNet's class name
        assert page.locator("#species").inner_text() == api["predictions"][0]["name"] == name
        bars = page.locator("#bars li")
        assert bars.count() == 5
        assert bars.first.get_attribute("aria-label") == name
        assert page.locator("#not-waterbird").is_hidden() and page.locator("#unknown-species").is_hidden()
        confidence = page.locator("#confidence").inner_text()
        assert confidence.startswith(f"Confidence {round(api['species_confidence'] * 100)}%"), confidence
        assert page.locator("#result").inner_text().count("%") == 1  # one number per answer: the confidence
        meta = page.locator("#meta").inner_text()
        assert api["model"]["name"] in meta and api["model"]["version"] in meta and " ms" in meta
    page.screenshot(path=str(OUTPUT / "page-result.png"), full_page=True)


def test_a_waterbird_it_does_not_know_is_said_so_in_words(page, photos: list[Photo]) -> None:  # noqa: ANN001
    kittiwake = next(p for p in photos if p.path.name == "wb-002.jpg")  # a gull: none of the 23 species
    _answered(page, kittiwake.path)
    assert page.locator("#species").inner_text() == "A waterbird, species uncertain"
    assert page.locator("#unknown-species").inner_text() == (
        "The model cannot tell which species this is; it may be one it was not taught (it knows 23). "
        "The closest species it knows: Dunlin.")
    assert page.locator("#confidence").is_hidden() and page.locator("#not-waterbird").is_hidden()
    assert page.locator("#bars li").count() == 5
    assert "%" not in page.locator("#result").inner_text()  # never a bare percentage for a species it does not know
    OUTPUT.mkdir(exist_ok=True)
    page.screenshot(path=str(OUTPUT / "page-unknown-species.png"), full_page=True)


def test_a_bird_it_cannot_tell_is_a_waterbird_is_answered_a_bird(page, photos: list[Photo]) -> None:  # noqa: ANN001
    """A red-legged crake (a rail, none of the 23) puts 0.003 on the waterbird classes and 0.96 on ImageNet's bird
    classes: "a bird", never "probably not a waterbird"."""
    crake = next(p for p in photos if p.path.name == "wb-167.jpg")
    _answered(page, crake.path)
    assert page.locator("#species").inner_text() == "A bird"
    assert page.locator("#not-waterbird").inner_text() == (
        "The model sees a bird but cannot tell whether it is a waterbird; it may be one it was not taught. Below are "
        "the closest waterbirds it knows, for what they are worth.")
    assert page.locator("#unknown-species").is_hidden() and page.locator("#confidence").is_hidden()
    assert "%" not in page.locator("#result").inner_text()


def test_the_page_loads_with_no_missing_file_and_no_camera_button_on_a_computer(browser, service: Service) -> None:  # noqa: ANN001
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    page = context.new_page()
    failed: list[str] = []
    page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    page.on("console", lambda m: failed.append(m.text) if m.type == "error" else None)
    try:
        page.goto(service.url + "/", wait_until="networkidle")
        assert failed == []  # the favicon too
        assert page.evaluate("document.querySelector('link[rel=icon]').href.startsWith('data:image/svg+xml')")
        assert page.get_by_text("Take a photo").is_hidden()  # a second file picker on a computer
        assert page.get_by_text("Choose a photo").is_visible()
    finally:
        context.close()


def test_a_text_file_named_jpg_shows_the_error_in_words(page, tmp_path: Path) -> None:  # noqa: ANN001
    fake = tmp_path / "heron.jpg"
    fake.write_text("this is not a photo of a heron\n")
    page.get_by_label("Drop a photo here or choose one").set_input_files(str(fake))
    error = page.get_by_role("alert")
    error.wait_for(state="visible", timeout=60_000)
    text = error.inner_text()
    assert "not an image we can read" in text and "request id" in text
    assert text.count("we can read") == 1  # the service's message, said once
    assert page.locator("#result").is_hidden()
    page.screenshot(path=str(OUTPUT / "page-error.png"))


@pytest.fixture
def phone(browser, service: Service):  # noqa: ANN001, ANN201
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = context.new_page()
    page.goto(service.url + "/")
    yield page
    context.close()


def test_keyboard_and_phone_viewport(phone, non_bird_photos: list[Path]) -> None:  # noqa: ANN001
    page = phone
    assert page.get_by_text("Take a photo").is_visible()  # a phone's camera
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "file"  # the picker is the first stop
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    _answered(page, non_bird_photos[0], "Take a photo with the camera")  # the cat
    assert page.locator("#not-waterbird").inner_text().startswith("This photo does not look like a bird")
    assert page.locator("#species").inner_text() == "Probably not a bird"
    # The answer lands below the pickers and the preview: the page brings it into view.
    assert page.evaluate("(() => { const r = document.querySelector('#species').getBoundingClientRect();"
                         " return r.top >= 0 && r.bottom <= window.innerHeight; })()")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    page.screenshot(path=str(OUTPUT / "page-phone.png"), full_page=True)


def test_dashboard_serve_page_shows_the_application(browser, service: Service) -> None:  # noqa: ANN001
    context = browser.new_context(viewport={"width": 1400, "height": 900},
                                  extra_http_headers=dashboard_headers())
    page = context.new_page()
    try:
        page.goto(DASHBOARD_URL + "/#/serve", wait_until="networkidle", timeout=60_000)
        for name in ("waterbirds", "Ingress", "Preprocessor", "Classifier"):
            page.get_by_text(name, exact=True).first.wait_for(timeout=60_000)
        OUTPUT.mkdir(exist_ok=True)
        page.screenshot(path=str(OUTPUT / "dashboard-serve.png"), full_page=True)
    finally:
        context.close()


@pytest.mark.parametrize(("status", "saying"), [(503, "The service is busy. Trying"),
                                                (429, "busy with uploads from this device")])
def test_a_busy_service_is_waited_for_and_retried(page, service: Service, mapped_photos: list[Photo],  # noqa: ANN001
                                                  status: int, saying: str) -> None:
    """The first upload is answered with one of the service's own refusals (503: the service is full; 429: this
    client is over its share; Retry-After: 2); the page says which, waits, and the retry reaches the real service."""
    import json

    from serve_app.admission import Overloaded, OverShare
    from serve_app.http import error_answer

    refused = error_answer((OverShare if status == 429 else Overloaded)("test", 2))
    body = json.dumps({"error": {"code": refused.code, "message": refused.message}})
    sent: list[str] = []

    def first_refused(route) -> None:  # noqa: ANN001
        sent.append(route.request.url)
        if len(sent) == 1:
            route.fulfill(status=status, headers=refused.headers, content_type="application/json", body=body)
        else:
            route.continue_()

    page.route("**/classify*", first_refused)
    photo = mapped_photos[0]
    page.get_by_label("Drop a photo here or choose one").set_input_files(str(photo.path))
    page.wait_for_function(f"document.querySelector('#busy').textContent.includes({saying!r})", timeout=10_000)
    page.wait_for_function("document.querySelector('#busy').textContent.includes('again in 2 s')", timeout=10_000)
    page.wait_for_function("document.querySelector('#busy').textContent.startsWith('Result ready')", timeout=60_000)
    assert len(sent) == 2
    assert page.locator("#species").inner_text() == WATERBIRD_NAMES[photo.imagenet_label]
    assert page.get_by_role("alert").is_hidden()


@pytest.fixture
def two_models() -> Iterator[str]:
    """The HTTP face over tests/local_pipeline.py serving the embedded default under two names, on a port of its
    own (uvicorn on a thread): the page's model choice needs no cluster."""
    import socket
    import threading

    import uvicorn

    from serve_app.http import build_http_app
    from tests.local_pipeline import LocalPipeline

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_http_app(LocalPipeline(names=("waterbirds-imagenet", "second"))),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        thread.join(0.05)
        assert thread.is_alive(), "uvicorn did not start"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_where_several_models_are_served_a_person_chooses_one(browser, two_models: str,  # noqa: ANN001
                                                                mapped_photos: list[Photo]) -> None:
    """#37: the page offers the models /models lists, the default chosen; the choice goes with each photo, the
    answer says which model gave it, the offline files asked for are the chosen model's, and the choice is kept
    for the next visit."""
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    page = context.new_page()
    asked: list[str] = []
    page.on("request", lambda request: asked.append(request.url))
    page.goto(two_models + "/")
    choice = page.get_by_label("Model", exact=True)
    choice.wait_for()
    assert choice.input_value() == "waterbirds-imagenet"
    assert page.locator("#model option").all_inner_texts() == ["waterbirds-imagenet (23 species, default)",
                                                               "second (23 species)"]
    _answered(page, mapped_photos[0].path)
    assert "model waterbirds-imagenet " in page.locator("#meta").inner_text()
    choice.select_option("second")
    _answered(page, mapped_photos[0].path)
    assert "model second " in page.locator("#meta").inner_text()
    page.wait_for_function("performance.getEntriesByType('resource').some(e => e.name.endsWith('?model=second'))")
    assert any(url.endswith("/offline.json?model=second") for url in asked), asked
    page.reload()
    page.get_by_label("Model", exact=True).wait_for()
    assert page.get_by_label("Model", exact=True).input_value() == "second"  # kept on this device
    context.close()
