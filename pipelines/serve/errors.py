"""Every error the API returns, in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Clients built for OpenAI (the `openai` package, LangChain) read `error.message` and raise a
typed exception from the status code; FastAPI's own `{"detail": ...}` reaches them as an
unreadable blob. So one exception type carries the four fields, and handlers turn FastAPI's
validation errors, Starlette's HTTP errors (404 route, 405, 413 body limit) and anything
unexpected into the same shape. Validation errors are 400, as OpenAI and vLLM answer them.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger("ray.serve")

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error", 413: "invalid_request_error",
         422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}


class SafeJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: a lone surrogate echoed from a request can never fail the encoding."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


class APIError(Exception):
    """An answer other than 200, with OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or TYPES.get(status, "server_error")
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return SafeJSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def install(app: FastAPI) -> None:
    """Route every error of `app` through the OpenAI shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc.errors()).response()

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                             str(exc.detail))
        code = "request_too_large" if exc.status_code == 413 else None
        return APIError(exc.status_code, message, code=code, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("p2p serve: unexpected error on %s %s", request.method, request.url.path)
        return APIError(500, f"internal error: {type(exc).__name__}", type="server_error").response()


def validation_error(errors: list[dict]) -> APIError:
    """The most telling validation error as a 400 naming its parameter.

    A union field (content: string or parts) fails once per member; our own checks ("value_error",
    e.g. "content part type 'image_url' is not supported") say more than "Input should be a string".
    """
    first = next((e for e in errors if e.get("type") == "value_error"), errors[0] if errors else
                 {"loc": (), "msg": "invalid request", "type": ""})
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header") and not _is_tag(p)]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        error = (first.get("ctx") or {}).get("error", "")
        return APIError(400, f"the request body is not valid JSON: {error}".rstrip(": "), code="invalid_json")
    if kind == "extra_forbidden":
        return APIError(400, f"unsupported parameter {param!r}: this server does not implement it", param,
                        code="unsupported_parameter")
    if kind == "missing":
        return APIError(400, f"missing required parameter {param!r}", param, code="missing_parameter")
    where = f"{param}: " if param else ""
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return APIError(400, f"{where}{message}", param, code="invalid_value")


def _is_tag(part) -> bool:
    """Union-member tags pydantic puts in error locations (`str`, `list[int]`, `function-after[...]`)."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "dict", "list") or "[" in part)
