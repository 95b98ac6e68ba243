"""The HTTP contract in process: the real Starlette app (`serve_app.http`) over a pipeline of our own that implements
the ingress's interface with the real admission, decoding and model (tests/local_pipeline.py). Every status, its
JSON body and headers, the body limits, the refusals before an upload is read, the OpenAPI document. What needs a
cluster (replicas, batching across them, swaps, retries, HAProxy) is in tests/test_serving.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import jsonschema
import pytest

from deployments.config import IngressConfig
from serve_app.admission import Limits
from serve_app.http import ERRORS, build_http_app
from serve_app.openapi import OPENAPI
from tests import images
from tests.conftest import Photo
from tests.local_pipeline import LocalPipeline


@pytest.fixture(scope="module")
def pipeline() -> LocalPipeline:
    return LocalPipeline()


def _call(pipeline: LocalPipeline, scenario: Callable[[httpx.AsyncClient], Awaitable[Any]]) -> Any:
    async def run() -> Any:
        transport = httpx.ASGITransport(app=build_http_app(pipeline), client=("127.0.0.1", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://waterbirds", timeout=30) as client:
            try:
                return await scenario(client)
            finally:
                if pipeline.hold is not None:
                    pipeline.hold.set()  # nothing left held, whatever the scenario did

    return asyncio.run(run())


def _post(pipeline: LocalPipeline, content: Any, content_type: str = "image/jpeg", *,
          headers: dict[str, str] | None = None, **kwargs: Any) -> httpx.Response:
    return _call(pipeline, lambda c: c.post("/classify", content=content,
                                            headers={"Content-Type": content_type, **(headers or {})}, **kwargs))


def _schema(name: str) -> dict[str, Any]:
    return {**OPENAPI["components"]["schemas"][name], "components": OPENAPI["components"]}


def test_a_photo_is_named_as_multipart_and_as_a_raw_body(pipeline: LocalPipeline, mapped_photos: list[Photo]) -> None:
    photo = mapped_photos[0]
    data = photo.path.read_bytes()
    raw = _post(pipeline, data, headers={"X-Request-ID": "r-1"})
    form = _call(pipeline, lambda c: c.post("/classify", files={"file": ("bird.jpg", data, "image/jpeg")},
                                            params={"top_k": "3"}))
    assert raw.status_code == form.status_code == 200, (raw.text, form.text)
    answer = raw.json()
    jsonschema.validate(answer, _schema("Answer"))
    assert answer["request_id"] == "r-1" and answer["predictions"][0]["label"] == photo.imagenet_label
    assert len(answer["predictions"]) == 5 and len(form.json()["predictions"]) == 3
    assert form.json()["predictions"] == answer["predictions"][:3]


@pytest.mark.parametrize(("body", "content_type", "status", "code"), [
    (b"", "image/jpeg", 400, "empty_image"),
    (images.TEXT, "image/jpeg", 400, "invalid_image"),
    (images.truncated_jpeg(), "image/jpeg", 400, "invalid_image"),
    (images.zip_bytes(), "application/octet-stream", 400, "invalid_image"),
    (images.SVG, "image/svg+xml", 415, "unsupported_format"),
    (images.PDF, "application/octet-stream", 415, "unsupported_format"),
    (images.TEXT, "text/plain", 415, "unsupported_media_type"),
    (images.png_declaring(50_000, 50_000), "image/png", 413, "image_too_large"),
], ids=["empty", "text", "truncated", "zip", "svg", "pdf", "text-content-type", "pixel-bomb"])
def test_bad_input_gets_a_json_error_with_the_right_status(pipeline: LocalPipeline, body: bytes, content_type: str,
                                                          status: int, code: str) -> None:
    response = _post(pipeline, body, content_type)
    assert (response.status_code, response.json()["error"]["code"]) == (status, code), response.text
    jsonschema.validate(response.json(), _schema("Error"))
    message = response.json()["error"]["message"]
    assert "Traceback" not in response.text and not images.names_a_path(message)
    if code == "unsupported_media_type":  # it names every content type it takes, the raw bytes' included
        assert all(t in message for t in images.CONTENT_TYPES_NAMED), message


def test_form_errors_and_a_bad_top_k(pipeline: LocalPipeline) -> None:
    no_file = _call(pipeline, lambda c: c.post("/classify", files={"photo": ("b.jpg", images.jpeg(), "image/jpeg")}))
    assert (no_file.status_code, no_file.json()["error"]["code"]) == (400, "missing_file")
    ten = _call(pipeline, lambda c: c.post("/classify", files=[("file", (f"b{i}.jpg", images.jpeg(), "image/jpeg"))
                                                                for i in range(10)]))
    assert (ten.status_code, ten.json()["error"]["code"]) == (400, "bad_multipart")  # one file at most
    for top_k in ("0", "101", "lots", "-1"):
        bad = _post(pipeline, images.jpeg(), params={"top_k": top_k})
        assert (bad.status_code, bad.json()["error"]["code"]) == (400, "bad_top_k"), top_k


def test_a_body_over_the_limit_is_refused_whatever_its_content_length_said() -> None:
    pipeline = LocalPipeline(IngressConfig(max_body_mb=1))
    declared = _post(pipeline, b"\xff" * (2 << 20))
    assert (declared.status_code, declared.json()["error"]["code"]) == (413, "body_too_large")
    pulled = 0

    async def chunks() -> AsyncIterator[bytes]:  # chunked: no Content-Length to trust
        nonlocal pulled
        for _ in range(30):
            pulled += 1
            yield b"\xff" * (1 << 19)

    streamed = _post(pipeline, chunks())
    assert (streamed.status_code, streamed.json()["error"]["code"]) == (413, "body_too_large")
    assert pulled <= 4  # refused once past the limit, not after the whole body


def test_an_upload_that_drips_in_is_cut_off_and_a_request_past_its_timeout_answered_504() -> None:
    pipeline = LocalPipeline(IngressConfig(upload_read_timeout_s=0.3, request_timeout_s=2, max_queue_wait_s=1,
                                           door_wait_s=0.5))

    async def drip() -> AsyncIterator[bytes]:
        yield images.jpeg()[:10]
        await asyncio.Event().wait()  # never more

    dripped = _post(pipeline, drip())
    assert (dripped.status_code, dripped.json()["error"]["code"]) == (408, "upload_timeout")
    pipeline.hold = asyncio.Event()  # a stage that never answers
    stuck = _post(pipeline, images.jpeg())
    assert (stuck.status_code, stuck.json()["error"]["code"]) == (504, "timeout")
    assert pipeline.admission.held == 0 and pipeline.in_pipeline == 0  # its place given back


def test_other_routes(pipeline: LocalPipeline) -> None:
    async def scenario(client: httpx.AsyncClient) -> dict[str, httpx.Response]:
        paths = {"labels": "/labels", "spec": "/openapi.json", "page": "/", "health": "/healthz", "missing": "/nope",
                 "asset": "/assets/0/none.js", "phone_model": "/model/abc.onnx"}
        found = {name: await client.get(path) for name, path in paths.items()}
        found["get_classify"] = await client.get("/classify")
        return found

    got = _call(pipeline, scenario)
    labels = got["labels"].json()
    jsonschema.validate(labels, _schema("Labels"))
    assert len(labels["labels"]) == 23 and "crane bird" in labels["labels"]
    assert got["spec"].json() == OPENAPI
    assert got["page"].status_code == 200 and "text/html" in got["page"].headers["content-type"]
    assert got["health"].json()["status"] == "ok"
    for name, status, code in [("missing", 404, "not_found"), ("asset", 404, "not_found"),
                               ("phone_model", 404, "model_replaced"), ("get_classify", 405, "method_not_allowed")]:
        assert (got[name].status_code, got[name].json()["error"]["code"]) == (status, code), name


def test_a_model_is_chosen_by_name_and_an_unknown_name_is_a_404_that_lists_the_names() -> None:
    """#37: `?model=` and the form's `model` field choose; the default answers otherwise; a name not served is a
    404 listing the names, a model that failed to load a 503 for it alone; /models and /labels follow."""
    broken = "model 'broken' (/models/broken.pt) failed to load: no such file"
    pipeline = LocalPipeline(names=("waterbirds-imagenet", "second"), failed={"broken": broken})
    data = images.jpeg()

    async def scenario(client: httpx.AsyncClient) -> dict[str, httpx.Response]:
        post = {"default": {}, "query": {"params": {"model": "second"}},
                "form": {"files": {"file": ("bird.jpg", data, "image/jpeg")}, "data": {"model": "second"}},
                "unknown": {"params": {"model": "nope"}}, "broken": {"params": {"model": "broken"}}}
        got = {name: await client.post("/classify", **({"content": data, "headers": {"Content-Type": "image/jpeg"}}
                                                       if "files" not in kwargs else {}), **kwargs)
               for name, kwargs in post.items()}
        got["models"] = await client.get("/models")
        got["labels"] = await client.get("/labels", params={"model": "second"})
        got["labels_unknown"] = await client.get("/labels", params={"model": "nope"})
        return got

    got = _call(pipeline, scenario)
    for name, model in (("default", "waterbirds-imagenet"), ("query", "second"), ("form", "second")):
        assert got[name].status_code == 200, (name, got[name].text)
        jsonschema.validate(got[name].json(), _schema("Answer"))
        assert got[name].json()["model"]["name"] == model, name
    for name in ("unknown", "labels_unknown"):
        error = got[name].json()["error"]
        assert (got[name].status_code, error["code"]) == (404, "unknown_model"), name
        assert all(n in error["message"] for n in ("waterbirds-imagenet", "second", "broken")), error
    error = got["broken"].json()["error"]
    assert (got["broken"].status_code, error["code"]) == (503, "model_unavailable")
    assert "no such file" in error["message"]
    assert got["broken"].headers["Retry-After"]
    models = got["models"].json()
    jsonschema.validate(models, _schema("Models"))
    assert models["default"] == "waterbirds-imagenet"
    assert [(m["name"], m["ready"], m["default"]) for m in models["models"]] == [
        ("waterbirds-imagenet", True, True), ("second", True, False), ("broken", False, False)]
    assert models["models"][0]["species"] == 23 and models["models"][0]["input_size"] == 224
    assert models["models"][0]["phone"] is True  # the embedded default, 19 MB: under phone_model_max_mb
    assert models["models"][2]["error"] == broken
    assert got["labels"].json()["model"]["name"] == "second"


def test_a_canary_answers_its_share_and_a_candidate_not_served_is_passed_over() -> None:
    config = IngressConfig(candidates={"waterbirds-imagenet": {"model": "second", "share": 0.5},
                                       "second": {"model": "missing", "share": 1.0}})
    pipeline = LocalPipeline(config, names=("waterbirds-imagenet", "second"))

    async def scenario(client: httpx.AsyncClient) -> tuple[list[str], list[str], httpx.Response]:
        async def answered_by(**kwargs: Any) -> str:
            response = await client.post("/classify", content=images.jpeg(), headers={"Content-Type": "image/jpeg"},
                                         **kwargs)
            assert response.status_code == 200, response.text
            return response.json()["model"]["name"]

        unnamed = [await answered_by() for _ in range(40)]
        named = [await answered_by(params={"model": "second"}) for _ in range(5)]
        return unnamed, named, await client.get("/models")

    unnamed, named, models = _call(pipeline, scenario)
    assert 0 < unnamed.count("second") < 40 and set(unnamed) == {"waterbirds-imagenet", "second"}
    assert named == ["second"] * 5  # its own candidate is not served: it answers itself
    listed = {m["name"]: m for m in models.json()["models"]}
    assert listed["waterbirds-imagenet"]["candidate"]["share"] == 0.5
    assert listed["second"]["candidate"]["served"] is False


def test_every_status_the_table_gives_is_in_the_openapi_document() -> None:
    documented = set(OPENAPI["paths"]["/classify"]["post"]["responses"]) | {"404"}  # 404: other paths
    assert {str(status) for _, status, _ in ERRORS} <= documented


async def _held(client: httpx.AsyncClient, pipeline: LocalPipeline, count: int, **kwargs: Any) -> list[asyncio.Task]:
    """`count` uploads sent, each holding a place or waiting at the door for one."""
    headers = {"Content-Type": "image/jpeg", **kwargs.pop("headers", {})}
    target = pipeline.admission.held + pipeline.admission.waiting + count
    sent = [asyncio.create_task(client.post("/classify", content=images.jpeg(), headers=headers, **kwargs))
            for _ in range(count)]
    while pipeline.admission.held + pipeline.admission.waiting < target:
        await asyncio.sleep(0.01)
    return sent


def test_a_full_service_answers_503_with_retry_after_before_reading_the_upload() -> None:
    pipeline = LocalPipeline(limits=Limits(max_wait_s=20, max_pending=2, floor=2, min_retry_after_s=3))
    pipeline.hold = asyncio.Event()
    pulled = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal pulled
        pulled += 1
        yield images.jpeg()

    async def scenario(client: httpx.AsyncClient) -> tuple[httpx.Response, list[httpx.Response]]:
        held = await _held(client, pipeline, 2)
        refused = await client.post("/classify", content=body(), headers={"Content-Type": "image/jpeg"})
        pipeline.hold.set()
        return refused, [await t for t in held]

    refused, answered = _call(pipeline, scenario)
    assert (refused.status_code, refused.json()["error"]["code"]) == (503, "overloaded")
    assert refused.headers["retry-after"] == "3" and "3 s" in refused.json()["error"]["message"]
    assert pulled == 0  # refused before its body was read
    assert [r.status_code for r in answered] == [200, 200]


def test_an_upload_at_the_door_takes_the_first_place_freed() -> None:
    pipeline = LocalPipeline(limits=Limits(max_wait_s=20, max_pending=1, floor=1, door_wait_s=30))
    pipeline.hold = asyncio.Event()

    async def scenario(client: httpx.AsyncClient) -> list[httpx.Response]:
        held = await _held(client, pipeline, 1)
        waiting = await _held(client, pipeline, 1)  # at the door
        assert pipeline.admission.waiting == 1
        pipeline.hold.set()
        return [await t for t in held + waiting]

    assert [r.status_code for r in _call(pipeline, scenario)] == [200, 200]


def test_a_client_over_its_share_is_answered_429_while_another_is_admitted() -> None:
    pipeline = LocalPipeline(limits=Limits(max_wait_s=20, max_pending=4, floor=4, min_client_share=1))
    pipeline.hold = asyncio.Event()
    greedy, polite = {"X-Forwarded-For": "192.0.2.1"}, {"X-Forwarded-For": "192.0.2.2"}

    async def scenario(client: httpx.AsyncClient) -> tuple[httpx.Response, list[httpx.Response]]:
        held = await _held(client, pipeline, 1, headers=polite)
        held += await _held(client, pipeline, 2, headers=greedy)  # its share: half of 4 places
        refused = await client.post("/classify", content=images.jpeg(),
                                    headers={"Content-Type": "image/jpeg", **greedy})
        pipeline.hold.set()
        return refused, [await t for t in held]

    refused, answered = _call(pipeline, scenario)
    assert (refused.status_code, refused.json()["error"]["code"]) == (429, "too_many_requests"), refused.text
    assert int(refused.headers["retry-after"]) >= 1
    assert [r.status_code for r in answered] == [200] * 3
