"""The HTTP API: routes, upload reading with limits, and the JSON answers. The pipeline behind it is the
ingress deployment (`serve_app.ingress`), seen here only through the `Pipeline` protocol."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Protocol

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.config import IngressConfig
from deployments.messages import Classified, ModelCard
from deployments.metrics import IngressMetrics
from serve_app.admission import Admission, Overloaded
from serve_app.client_identity import ClientIdentity
from serve_app.errors import (
    ApiError,
    error_response,
    handle_http_exception,
    handle_unexpected,
    refusal,
    to_api_error,
)
from serve_app.offline import IMMUTABLE, ISOLATION, REVALIDATE, WebApp
from serve_app.openapi import OPENAPI

log = logging.getLogger("ray.serve")


class Pipeline(Protocol):
    config: IngressConfig
    admission: Admission
    identity: ClientIdentity

    async def classify(self, data: bytes, top_k: int, request_id: str, deadline: float) -> Classified: ...

    async def model_card(self, *, refresh: bool = False) -> ModelCard: ...

    async def phone_model_info(self) -> dict[str, object] | None: ...

    async def phone_model_file(self, sha256: str) -> bytes | None: ...

    async def health(self) -> dict[str, object]: ...


class BodyTooLarge(ApiError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, "body_too_large", f"The upload is larger than the {limit / 2**20:g} MiB limit.")


def _limited(receive: Receive, limit: int) -> Receive:
    """Count body bytes as they stream in, whatever Content-Length said."""
    received = 0

    async def wrapped() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise BodyTooLarge(limit)
        return message

    return wrapped


async def read_upload(request: Request, config: IngressConfig) -> bytes:
    """The image bytes from `multipart/form-data` field `file`, or from a raw `image/*` body."""
    limit = int(config.max_body_mb * 2**20)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit)
    request = Request(request.scope, _limited(request.receive, limit))
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        async with asyncio.timeout(config.upload_read_timeout_s):
            if content_type == "multipart/form-data":
                return await _form_file(request, limit)
            if content_type.startswith("image/") or content_type == "application/octet-stream":
                return await request.body()
    except TimeoutError:
        raise ApiError(408, "upload_timeout",
                       f"The upload did not arrive within {config.upload_read_timeout_s:g} s.") from None
    except ClientDisconnect:
        raise ApiError(400, "client_disconnected", "The upload was interrupted.") from None
    raise ApiError(415, "unsupported_media_type",
                   "Send the photo as multipart/form-data in a field named 'file', or as the raw request body "
                   "with an image/* content type.")


async def _form_file(request: Request, limit: int) -> bytes:
    parser = MultiPartParser(request.headers, request.stream(), max_files=1, max_fields=20)
    # Starlette spools a file over 1 MB to disk, each write and the read back on a worker thread; the body is
    # bounded by `limit` and read into memory right after anyway, so a phone photo stays in memory.
    parser.spool_max_size = limit
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise ApiError(400, "bad_multipart", f"The form could not be read: {e.message}") from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "missing_file", "The form has no file in a field named 'file'.")
        return await upload.read()
    finally:
        await form.close()


def _top_k(request: Request, default: int) -> int:
    raw = request.query_params.get("top_k")
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= 100:
        raise ApiError(400, "bad_top_k", "top_k must be a whole number from 1 to 100.")
    return int(raw)


def answer_body(request_id: str, result: Classified, total_ms: float) -> dict[str, object]:
    return {
        "request_id": request_id,
        "model": {"name": result.model_name, "version": result.model_version},
        "is_waterbird": result.answer.is_waterbird,
        "waterbird_score": result.answer.waterbird_score,
        "species_known": result.answer.species_known,
        "species_confidence": result.answer.species_confidence,
        "predictions": [{"label": p.label, "score": p.score} for p in result.answer.predictions],
        "timing_ms": {"preprocess": round(result.preprocess_ms, 2), "inference": round(result.inference_ms, 2),
                      "total": round(total_ms, 2)},
    }


ROUTES = ("/", "/classify", "/healthz", "/labels", "/openapi.json", "/offline.json", "/sw.js",
          "/manifest.webmanifest")
PREFIXED_ROUTES = ("/assets/", "/model/")


def route_of(path: str) -> str:
    """The route a path counts under in the metrics: one per route, never one per file."""
    if path in ROUTES:
        return path
    return next((prefix + "*" for prefix in PREFIXED_ROUTES if path.startswith(prefix)), "other")


def observed(app: ASGIApp, metrics: IngressMetrics) -> ASGIApp:
    """Count every response by route and outcome."""

    async def wrapper(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        route = route_of(scope["path"])

        async def send_observed(message: Message) -> None:
            if message["type"] == "http.response.start":
                metrics.request(route, message["status"])
            await send(message)

        await app(scope, receive, send_observed)

    return wrapper


ARRIVED = "waterbirds.arrived"  # scope key: time.monotonic() when an upload reached the door
CLIENT = "waterbirds.client"  # scope key: the client's address (serve_app.client_identity)


def admitted(app: ASGIApp, admission: Admission, identity: ClientIdentity) -> ASGIApp:
    """Admission of uploads, outside everything else: a refusal is answered from here with a body made once, before
    the upload is read and without Starlette's routing, so that refusing costs little even when thousands of
    clients retry at once. Refusals are logged once a second in one line, not one line each."""
    refusals = RefusalLog()

    async def wrapper(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/classify" or scope["method"] != "POST":
            await app(scope, receive, send)
            return
        scope[ARRIVED] = time.monotonic()  # the request's deadline counts from here, the wait at the door included
        client = scope[CLIENT] = identity.client_of(scope)
        try:
            await admission.enter(client)
        except Overloaded as e:
            refusals.refused(e, admission)
            await _send_refusal(send, e)
            return
        answered = False
        try:
            await app(scope, receive, send)
            answered = True
        finally:
            admission.release(client, answered=answered)

    return wrapper


_REFUSAL_BODIES: dict[tuple[int, int], bytes] = {}


async def _send_refusal(send: Send, refused: Overloaded) -> None:
    key = (refused.status, refused.retry_after_s)
    body = _REFUSAL_BODIES.get(key)
    if body is None:
        error = refusal(refused)
        body = _REFUSAL_BODIES[key] = json.dumps({"error": {"code": error.code, "message": error.message}},
                                                 separators=(",", ":")).encode()
    await send({"type": "http.response.start", "status": refused.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"retry-after", str(refused.retry_after_s).encode())]})
    await send({"type": "http.response.body", "body": body})


class RefusalLog:
    """One line a second at most, saying how many uploads were refused and why, instead of a line per refusal. The
    count of a storm's last second is written with the next refusal; every refusal is counted in the metrics."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.count = 0
        self.over_share = 0
        self.since = time.monotonic()

    def refused(self, error: Overloaded, admission: Admission) -> None:
        self.count += 1
        self.over_share += error.status == 429
        now = time.monotonic()
        if now - self.since >= self.interval_s:
            log.info("refused %d uploads in %.1f s, %d of them 429 (last: %s; %d held by %d clients, %d at the "
                     "door, Retry-After %d s)", self.count, now - self.since, self.over_share, error, admission.held,
                     admission.clients, admission.waiting, error.retry_after_s,
                     extra={"access": {"route": "/classify", "status": error.status,
                                       "error_code": refusal(error).code, "refused": self.count,
                                       "refused_429": self.over_share}})
            self.count, self.over_share, self.since = 0, 0, now


def access_log(request_id: str, client: str, status: int, total_ms: float, result: Classified | None,
               code: str = "") -> None:
    """One structured line per /classify request (JSON through Serve's logging; never image bytes)."""
    fields: dict[str, object] = {"route": "/classify", "client": client, "status": status,
                                 "latency_ms": round(total_ms, 2)}
    if result is not None:
        fields.update(preprocess_ms=round(result.preprocess_ms, 2), inference_ms=round(result.inference_ms, 2),
                      batch_size=result.batch_size, species=result.answer.predictions[0].label,
                      score=result.answer.predictions[0].score, is_waterbird=result.answer.is_waterbird,
                      model_version=result.model_version)
    if code:
        fields["error_code"] = code
    log.info("classify %s %d %.1f ms", request_id, status, total_ms, extra={"access": fields})


def build_http_app(pipeline: Pipeline, metrics: IngressMetrics | None = None) -> ASGIApp:
    web = WebApp()
    openapi = json.dumps(OPENAPI).encode()

    async def index(_request: Request) -> Response:
        return HTMLResponse(web.page, headers={"Cache-Control": REVALIDATE, **ISOLATION})

    async def service_worker(_request: Request) -> Response:
        return Response(web.service_worker, media_type="text/javascript", headers={"Cache-Control": REVALIDATE})

    async def manifest(_request: Request) -> Response:
        return Response(web.manifest, media_type="application/manifest+json", headers={"Cache-Control": REVALIDATE})

    async def asset(request: Request) -> Response:
        found = web.assets.get("assets/{version}/{name}".format(**request.path_params))
        if found is None:
            return error_response(ApiError(404, "not_found", "No such file: the page may be older than the service; "
                                                             "reload it."))
        return Response(found.data, media_type=found.content_type, headers={"Cache-Control": IMMUTABLE, **ISOLATION})

    async def offline(_request: Request) -> Response:
        try:
            model = await pipeline.phone_model_info() if web.runtime else None
        except Exception as e:  # noqa: BLE001
            return error_response(to_api_error(e))
        return JSONResponse(web.offline_files(model), headers={"Cache-Control": "no-store"})

    async def phone_model(request: Request) -> Response:
        sha256 = request.path_params["sha256"]
        try:
            data = await pipeline.phone_model_file(sha256)
        except Exception as e:  # noqa: BLE001
            return error_response(to_api_error(e))
        if data is None:
            return error_response(ApiError(404, "model_replaced", "The service now offers another model for phones: "
                                                                  "fetch offline.json again."))
        return Response(data, media_type="application/octet-stream",
                        headers={"Cache-Control": IMMUTABLE, "ETag": f'"{sha256}"', **ISOLATION})

    async def classify(request: Request) -> Response:
        start = time.perf_counter()
        config = pipeline.config
        deadline = request.scope.get(ARRIVED, time.monotonic()) + config.request_timeout_s
        request_id = request.headers.get("x-request-id", "")
        client = request.scope.get(CLIENT, "")
        try:
            top_k = _top_k(request, config.default_top_k)
            async with asyncio.timeout(deadline - time.monotonic()):
                data = await read_upload(request, config)
                async with pipeline.admission.turn(client):
                    result = await pipeline.classify(data, top_k, request_id, deadline)
        except Exception as e:  # noqa: BLE001 - every failure becomes a JSON error through the one table
            error = to_api_error(e, retry_after_s=config.retry_after_s)
            if error.status >= 500 and error.status != 503:
                log.exception("classify failed (%s)", error.code)
            access_log(request_id, client, error.status, (time.perf_counter() - start) * 1000, None, error.code)
            return error_response(error)
        total_ms = (time.perf_counter() - start) * 1000
        access_log(request_id, client, 200, total_ms, result)
        if metrics is not None:
            metrics.latency.observe(total_ms)
            top = result.answer.predictions[0]
            metrics.predictions.inc(tags={"species": top.label, "is_waterbird": str(result.answer.is_waterbird)})
        return JSONResponse(answer_body(request_id, result, total_ms))

    async def healthz(_request: Request) -> Response:
        report = await pipeline.health()
        return JSONResponse(report, status_code=503 if report["status"] == "unavailable" else 200)

    async def labels(_request: Request) -> Response:
        try:
            card = await pipeline.model_card(refresh=True)
        except Exception as e:  # noqa: BLE001
            return error_response(to_api_error(e))
        return JSONResponse({"model": {"name": card.name, "version": card.version, "device": card.device,
                                       "backend": card.backend}, "labels": list(card.labels)})

    async def openapi_json(_request: Request) -> Response:
        return Response(openapi, media_type="application/json")

    app = Starlette(
        routes=[
            Route("/", index, methods=["GET"]),
            Route("/classify", classify, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/labels", labels, methods=["GET"]),
            Route("/openapi.json", openapi_json, methods=["GET"]),
            Route("/sw.js", service_worker, methods=["GET"]),
            Route("/manifest.webmanifest", manifest, methods=["GET"]),
            Route("/offline.json", offline, methods=["GET"]),
            Route("/assets/{version:str}/{name:str}", asset, methods=["GET"]),
            Route("/model/{sha256:str}.onnx", phone_model, methods=["GET"]),
        ],
        exception_handlers={HTTPException: handle_http_exception, Exception: handle_unexpected},
    )
    guarded = admitted(app, pipeline.admission, pipeline.identity)
    return observed(guarded, metrics) if metrics is not None else guarded
