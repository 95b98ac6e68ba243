"""Every error the API returns, mapped to its status in one place. Bodies are `{"error": {"code", "message"}}`."""

from __future__ import annotations

from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from bcnn.images import EmptyImage, ImageError, ImageTooLarge, InvalidImage, UnsupportedFormat
from serve_app.admission import Overloaded, OverShare


class ApiError(Exception):
    """An error with its HTTP status; raised by the HTTP layer itself."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


IMAGE_ERROR_STATUS: dict[type[ImageError], int] = {
    EmptyImage: 400,
    InvalidImage: 400,
    UnsupportedFormat: 415,
    ImageTooLarge: 413,
}


def to_api_error(exc: BaseException, *, retry_after_s: int = 1) -> ApiError:
    """The one table from exception to status. Exceptions raised in another replica arrive as Ray task errors
    that are also instances of the original type, so the same checks cover every stage."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, HTTPException) and exc.status_code < 500:  # Starlette's own refusals, e.g. of a form
        return ApiError(exc.status_code, "bad_request", str(exc.detail))
    if isinstance(exc, ImageError):
        status = next((s for t, s in IMAGE_ERROR_STATUS.items() if isinstance(exc, t)), 400)
        return ApiError(status, exc.code, _message(exc))
    if isinstance(exc, Overloaded):
        return refusal(exc)
    if isinstance(exc, BackPressureError):
        return overloaded(retry_after_s)
    if isinstance(exc, TimeoutError):
        return ApiError(504, "timeout", "The request took too long and was abandoned; try again.")
    return ApiError(500, "internal_error", "Something went wrong on our side; the request id identifies it.")


def overloaded(retry_after_s: int) -> ApiError:
    return ApiError(503, "overloaded", f"The service is at capacity; try again in {retry_after_s} s.",
                    {"Retry-After": str(retry_after_s)})


def over_share(retry_after_s: int) -> ApiError:
    return ApiError(429, "too_many_requests", "This client has more uploads in progress than its share of the "
                    f"service while others are waiting; try again in {retry_after_s} s.",
                    {"Retry-After": str(retry_after_s)})


def refusal(exc: Overloaded) -> ApiError:
    """Admission's refusal: 429 for a client over its share, 503 when the service as a whole is full."""
    return (over_share if isinstance(exc, OverShare) else overloaded)(exc.retry_after_s)


def _message(exc: BaseException) -> str:
    """The user-facing message of an exception that may have crossed a process boundary."""
    cause = getattr(exc, "cause", None)  # RayTaskError keeps the original exception here
    text = str(cause if isinstance(cause, BaseException) else exc)
    return text.strip().splitlines()[-1] if text.strip() else type(exc).__name__


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse({"error": {"code": error.code, "message": error.message}}, status_code=error.status,
                        headers=error.headers)


async def handle_http_exception(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    codes = {404: "not_found", 405: "method_not_allowed"}
    return error_response(ApiError(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail),
                                   dict(exc.headers or {})))


async def handle_unexpected(_request: Request, exc: Exception) -> JSONResponse:
    return error_response(to_api_error(exc))

