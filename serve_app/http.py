"""The HTTP face: the routes, an upload read within its limits, every error an exception type with its status in
one table (`ERRORS`), and the access log. The pipeline behind it is the ingress deployment (`serve_app.ingress`),
seen here only through the `Pipeline` protocol. Nothing here loads torch: every Ingress replica runs it."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from ray.serve.exceptions import BackPressureError
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bcnn.images import EmptyImage, ImageTooLarge, InvalidImage, UnsupportedFormat
from deployments.config import IngressConfig
from deployments.messages import Catalog, Classified, ModelUnavailable, UnknownModel
from deployments.metrics import IngressMetrics
from serve_app.admission import Overloaded, OverShare
from serve_app.candidates import Comparisons, resolve
from serve_app.offline import IMMUTABLE, ISOLATION, REVALIDATE, WebApp
from serve_app.openapi import OPENAPI

log = logging.getLogger("ray.serve")


class Pipeline(Protocol):
    """What the routes need of the ingress deployment."""

    @property
    def config(self) -> IngressConfig:
        """The settings now in force (they change with `serve deploy`)."""
        ...

    def client_of(self, scope: Scope) -> str: ...

    async def admit(self, client: str) -> None:
        """A place for one upload of `client`, waiting at the door for one, or `Overloaded`; `release` it."""
        ...

    def release(self, client: str, *, answered: bool) -> None: ...

    async def classify(self, data: bytes, top_k: int, request_id: str, deadline: float, client: str,
                       model: str | None = None) -> Classified:
        """The answer of `model` (None: the default), or of the candidate routed to in its place."""
        ...

    async def catalog(self, *, refresh: bool = False) -> Catalog: ...

    @property
    def comparisons(self) -> Comparisons:
        """Shadow answers compared with shown ones, in this replica."""
        ...

    async def phone_model_info(self, model: str | None = None) -> dict[str, object] | None: ...

    async def phone_model_file(self, sha256: str, model: str | None = None) -> bytes | None: ...

    async def health(self) -> dict[str, object]: ...


class ApiError(Exception):
    """A refusal of the HTTP face's own; its status and code are in `ERRORS`."""


class BodyTooLarge(ApiError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"The upload is larger than the {limit / 2**20:g} MiB limit.")


class UploadTimeout(ApiError):
    pass


class UploadInterrupted(ApiError):
    pass


class UnsupportedMediaType(ApiError):
    pass


class BadMultipart(ApiError):
    pass


class MissingFile(ApiError):
    pass


class BadTopK(ApiError):
    pass


class NotFound(ApiError):
    pass


class ModelReplaced(ApiError):
    pass


ERRORS: tuple[tuple[type[BaseException], int, str], ...] = (
    (BodyTooLarge, 413, "body_too_large"),
    (UploadTimeout, 408, "upload_timeout"),
    (UploadInterrupted, 400, "client_disconnected"),
    (UnsupportedMediaType, 415, "unsupported_media_type"),
    (BadMultipart, 400, "bad_multipart"),
    (MissingFile, 400, "missing_file"),
    (BadTopK, 400, "bad_top_k"),
    (NotFound, 404, "not_found"),
    (ModelReplaced, 404, "model_replaced"),
    (UnknownModel, 404, "unknown_model"),
    # An image refused by the Preprocessor arrives from its replica as an instance of its own type too.
    *((kind, status, kind.code) for kind, status in ((EmptyImage, 400), (InvalidImage, 400),
                                                     (UnsupportedFormat, 415), (ImageTooLarge, 413))),
    (OverShare, 429, "too_many_requests"),
    (ModelUnavailable, 503, "model_unavailable"),
    (Overloaded, 503, "overloaded"),
    (BackPressureError, 503, "overloaded"),  # Serve's own queue limits, above admission's
    (TimeoutError, 504, "timeout"),
)
"""Every error the API answers, by exception type (the first that matches): anything else is a 500."""

_MESSAGES = {
    "overloaded": "The service is at capacity; try again in {retry_after} s.",
    "too_many_requests": "This client has more uploads in progress than its share of the service while others are "
                         "waiting; try again in {retry_after} s.",
    "timeout": "The request took too long and was abandoned; try again.",
    "internal_error": "Something went wrong on our side; the request id identifies it.",
}


@dataclass(frozen=True)
class ErrorAnswer:
    status: int
    code: str
    message: str
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def body(self) -> bytes:
        return json.dumps({"error": {"code": self.code, "message": self.message}}, separators=(",", ":")).encode()

    def response(self) -> Response:
        return Response(self.body, status_code=self.status, headers=self.headers, media_type="application/json")


def error_answer(exc: BaseException, *, retry_after_s: int = 1) -> ErrorAnswer:
    """The one way from an exception to what the client is told."""
    if isinstance(exc, HTTPException) and exc.status_code < 500:  # Starlette's own: no route, a form it refused
        codes = {404: "not_found", 405: "method_not_allowed"}
        return ErrorAnswer(exc.status_code, codes.get(exc.status_code, "bad_request"), str(exc.detail),
                           dict(exc.headers or {}))
    status, code = next(((s, c) for kind, s, c in ERRORS if isinstance(exc, kind)), (500, "internal_error"))
    retry_after = exc.retry_after_s if isinstance(exc, Overloaded) else retry_after_s
    message = _MESSAGES[code].format(retry_after=retry_after) if code in _MESSAGES else _message(exc)
    return ErrorAnswer(status, code, message, {"Retry-After": str(retry_after)} if status in (429, 503) else {})


def _message(exc: BaseException) -> str:
    """The user-facing message of an exception that may have crossed a process boundary."""
    cause = getattr(exc, "cause", None)  # RayTaskError keeps the original exception here
    text = str(cause if isinstance(cause, BaseException) else exc)
    return text.strip().splitlines()[-1] if text.strip() else type(exc).__name__


def outcome_of(status: int) -> str:
    """How the metrics count a response: ok, over_share (429), overloaded (503), client_error, server_error."""
    if status < 400:
        return "ok"
    return {429: "over_share", 503: "overloaded"}.get(status, "client_error" if status < 500 else "server_error")


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


async def read_upload(request: Request, config: IngressConfig) -> tuple[bytes, str | None]:
    """The image bytes from `multipart/form-data` field `file` (with the form's `model` field, if any), or from a
    raw `image/*` or `application/octet-stream` body."""
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
                return await request.body(), None
    except TimeoutError:
        raise UploadTimeout(f"The upload did not arrive within {config.upload_read_timeout_s:g} s.") from None
    except ClientDisconnect:
        raise UploadInterrupted("The upload was interrupted.") from None
    raise UnsupportedMediaType("Send the photo as multipart/form-data in a field named 'file', or as the raw request "
                               "body with an image/* or application/octet-stream content type.")


async def _form_file(request: Request, limit: int) -> tuple[bytes, str | None]:
    parser = MultiPartParser(request.headers, request.stream(), max_files=1, max_fields=20)
    # Starlette spools a file over 1 MB to disk, each write and the read back on a worker thread; the body is
    # bounded by `limit` and read into memory right after anyway, so a phone photo stays in memory.
    parser.spool_max_size = limit
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise BadMultipart(f"The form could not be read: {e.message}") from None
    try:
        upload, model = form.get("file"), form.get("model")
        if not isinstance(upload, UploadFile):
            raise MissingFile("The form has no file in a field named 'file'.")
        return await upload.read(), model if isinstance(model, str) and model else None
    finally:
        await form.close()


def _top_k(request: Request, default: int) -> int:
    raw = request.query_params.get("top_k")
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= 100:
        raise BadTopK("top_k must be a whole number from 1 to 100.")
    return int(raw)


def answer_body(request_id: str, result: Classified, total_ms: float) -> dict[str, object]:
    return {
        "request_id": request_id,
        "model": {"name": result.model_name, "version": result.model_version},
        **result.answer,
        "timing_ms": {"preprocess": round(result.preprocess_ms, 2), "inference": round(result.inference_ms, 2),
                      "total": round(total_ms, 2)},
    }


def models_body(catalog: Catalog, config: IngressConfig,
                comparisons: dict[tuple[str, str], dict[str, object]]) -> dict[str, object]:
    """/models: every model configured, the default first, with what a client or the page needs to choose one, its
    candidate (if any) and how that candidate has agreed with it so far in this replica."""
    listed: list[dict[str, object]] = []
    for name, card in catalog.cards.items():
        entry: dict[str, object] = {
            "name": name, "version": card.version, "default": name == catalog.default, "ready": True,
            "species": len(card.labels), "input_size": card.preprocess.crop_size, "backend": card.backend,
            "device": card.device, "phone": 0 < card.parameter_bytes <= config.phone_model_max_bytes}
        candidate = config.candidates.get(name)
        if candidate is not None:
            entry["candidate"] = {**candidate.model_dump(), "served": candidate.model in catalog.cards,
                                  **comparisons.get((name, candidate.model), {"compared": 0})}
        listed.append(entry)
    listed += [{"name": name, "ready": False, "default": False, "error": reason}
               for name, reason in catalog.failed.items()]
    return {"default": catalog.default, "models": listed}


ROUTES = ("/", "/classify", "/healthz", "/labels", "/models", "/openapi.json", "/offline.json", "/sw.js",
          "/manifest.webmanifest")
PREFIXED_ROUTES = ("/assets/", "/model/")


def route_of(path: str) -> str:
    """The route a path counts under in the metrics: one per route, never one per file."""
    if path in ROUTES:
        return path
    return next((prefix + "*" for prefix in PREFIXED_ROUTES if path.startswith(prefix)), "other")


def observed(app: ASGIApp, metrics: IngressMetrics) -> ASGIApp:
    """Count every response by route and outcome, and write the access line of each that `/classify` does not
    write itself (its answers and errors: `access_log`; its refusals at the door: `RefusalLog`). The Ingress's
    deployment turns Serve's own access log off (serve_config.yaml), so that each request has one line, not two."""

    async def wrapper(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        route = route_of(scope["path"])
        start = time.perf_counter()
        logged_by_route = route == "/classify" and scope["method"] == "POST"

        async def send_observed(message: Message) -> None:
            if message["type"] == "http.response.start":
                status = message["status"]
                metrics.requests.inc(tags={"route": route, "outcome": outcome_of(status)})
                if not logged_by_route:
                    total_ms = (time.perf_counter() - start) * 1000
                    log.info("%s %s %d %.1f ms", scope["method"], scope["path"], status, total_ms,
                             extra={"access": {"route": route, "method": scope["method"], "status": status,
                                               "latency_ms": round(total_ms, 2)}})
            await send(message)

        await app(scope, receive, send_observed)

    return wrapper


ARRIVED = "waterbirds.arrived"  # scope key: time.monotonic() when an upload reached the door
CLIENT = "waterbirds.client"  # scope key: the client's address (serve_app.client_identity)


def admitted(app: ASGIApp, pipeline: Pipeline) -> ASGIApp:
    """Admission of uploads, outside everything else: a refusal is answered from here, before the upload is read
    and without Starlette's routing, with a body made once per status and Retry-After, so that refusing costs little
    even when thousands of clients retry at once."""
    bodies: dict[tuple[int, int], tuple[ErrorAnswer, bytes]] = {}

    async def wrapper(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/classify" or scope["method"] != "POST":
            await app(scope, receive, send)
            return
        scope[ARRIVED] = time.monotonic()  # the request's deadline counts from here, the wait at the door included
        client = scope[CLIENT] = pipeline.client_of(scope)
        try:
            await pipeline.admit(client)
        except Overloaded as refused:
            key = (refused.status, refused.retry_after_s)
            if key not in bodies:
                error = error_answer(refused)
                bodies[key] = (error, error.body)
            error, body = bodies[key]
            await send({"type": "http.response.start", "status": error.status,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode()),
                                    *((k.lower().encode(), v.encode()) for k, v in error.headers.items())]})
            await send({"type": "http.response.body", "body": body})
            return
        answered = False
        try:
            await app(scope, receive, send)
            answered = True
        finally:
            pipeline.release(client, answered=answered)

    return wrapper


def access_log(request_id: str, client: str, status: int, total_ms: float, result: Classified | None,
               code: str = "") -> None:
    """One structured line per /classify request (JSON through Serve's logging; never image bytes)."""
    fields: dict[str, object] = {"route": "/classify", "client": client, "status": status,
                                 "latency_ms": round(total_ms, 2)}
    if result is not None:
        top = result.answer["predictions"][0]  # type: ignore[index]
        fields.update(preprocess_ms=round(result.preprocess_ms, 2), inference_ms=round(result.inference_ms, 2),
                      batch_size=result.batch_size, species=top["label"], score=top["score"],
                      is_waterbird=result.answer["is_waterbird"], model=result.model_name,
                      model_version=result.model_version)
    if code:
        fields["error_code"] = code
    log.info("classify %s %d %.1f ms", request_id, status, total_ms, extra={"access": fields})


def build_http_app(pipeline: Pipeline, metrics: IngressMetrics | None = None) -> ASGIApp:
    web = WebApp()
    openapi = json.dumps(OPENAPI).encode()

    def failed(path: str, exc: BaseException) -> Response:
        error = error_answer(exc, retry_after_s=pipeline.config.retry_after_s)
        if error.status >= 500 and error.status != 503:
            log.error("%s failed (%s): %s: %s", path, error.code, type(exc).__name__, exc)
        return error.response()

    def answering_errors(route: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def answered(request: Request) -> Response:
            try:
                return await route(request)
            except Exception as e:  # noqa: BLE001 - every failure becomes a JSON error through the one table
                return failed(request.url.path, e)

        return answered

    async def index(_request: Request) -> Response:
        return HTMLResponse(web.page, headers={"Cache-Control": REVALIDATE, **ISOLATION})

    async def service_worker(_request: Request) -> Response:
        return Response(web.service_worker, media_type="text/javascript", headers={"Cache-Control": REVALIDATE})

    async def manifest(_request: Request) -> Response:
        return Response(web.manifest, media_type="application/manifest+json", headers={"Cache-Control": REVALIDATE})

    @answering_errors
    async def asset(request: Request) -> Response:
        found = web.assets.get("assets/{version}/{name}".format(**request.path_params))
        if found is None:
            raise NotFound("No such file: the page may be older than the service; reload it.")
        return Response(found.data, media_type=found.content_type, headers={"Cache-Control": IMMUTABLE, **ISOLATION})

    @answering_errors
    async def offline(request: Request) -> Response:
        model = request.query_params.get("model")
        phone = await pipeline.phone_model_info(model) if web.runtime else None
        return JSONResponse(web.offline_files(phone, model), headers={"Cache-Control": "no-store"})

    @answering_errors
    async def phone_model(request: Request) -> Response:
        sha256 = request.path_params["sha256"]
        data = await pipeline.phone_model_file(sha256, request.query_params.get("model"))
        if data is None:
            raise ModelReplaced("The service now offers another model for phones: fetch offline.json again.")
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
                data, form_model = await read_upload(request, config)
                model = request.query_params.get("model") or form_model
                result = await pipeline.classify(data, top_k, request_id, deadline, client, model)
        except Exception as e:  # noqa: BLE001 - every failure becomes a JSON error through the one table
            error = error_answer(e, retry_after_s=config.retry_after_s)
            if error.status >= 500 and error.status != 503:
                log.exception("classify failed (%s)", error.code)
            access_log(request_id, client, error.status, (time.perf_counter() - start) * 1000, None, error.code)
            return error.response()
        total_ms = (time.perf_counter() - start) * 1000
        access_log(request_id, client, 200, total_ms, result)
        if metrics is not None:
            metrics.latency.observe(total_ms)
            top = result.answer["predictions"][0]  # type: ignore[index]
            metrics.predictions.inc(tags={"model": result.model_name, "species": top["label"],
                                          "is_waterbird": str(result.answer["is_waterbird"])})
        return JSONResponse(answer_body(request_id, result, total_ms))

    async def healthz(_request: Request) -> Response:
        report = await pipeline.health()
        return JSONResponse(report, status_code=503 if report["status"] == "unavailable" else 200)

    @answering_errors
    async def labels(request: Request) -> Response:
        catalog = await pipeline.catalog(refresh=True)
        card = catalog.cards[resolve(request.query_params.get("model"), catalog)]
        return JSONResponse({"model": {"name": card.name, "version": card.version, "device": card.device,
                                       "backend": card.backend}, "labels": list(card.labels)})

    @answering_errors
    async def models(_request: Request) -> Response:
        catalog = await pipeline.catalog(refresh=True)
        return JSONResponse(models_body(catalog, pipeline.config, pipeline.comparisons.report()))

    async def openapi_json(_request: Request) -> Response:
        return Response(openapi, media_type="application/json")

    async def on_error(request: Request, exc: Exception) -> Response:  # Starlette's own, and what nothing caught
        return failed(request.url.path, exc)

    app = Starlette(
        routes=[
            Route("/", index, methods=["GET"]),
            Route("/classify", classify, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/labels", labels, methods=["GET"]),
            Route("/models", models, methods=["GET"]),
            Route("/openapi.json", openapi_json, methods=["GET"]),
            Route("/sw.js", service_worker, methods=["GET"]),
            Route("/manifest.webmanifest", manifest, methods=["GET"]),
            Route("/offline.json", offline, methods=["GET"]),
            Route("/assets/{version:str}/{name:str}", asset, methods=["GET"]),
            Route("/model/{sha256:str}.onnx", phone_model, methods=["GET"]),
        ],
        exception_handlers={HTTPException: on_error, Exception: on_error},
    )
    guarded = admitted(app, pipeline)
    return observed(guarded, metrics) if metrics is not None else guarded
