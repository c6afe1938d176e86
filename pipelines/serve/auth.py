"""Who may call what, and how much they may send: checked from the headers, before the body is read.

- The **service key** (`P2P_SERVICE_KEY`) is for the OpenAI endpoints: completions, chat, models.
- The **admin key** (`P2P_ADMIN_KEY`) is for `/v1/users/...`: building, replacing, deleting and
  reading users' adapter records. It also works wherever the service key does.
- Both unset: open development mode, every endpoint without a key (say so in the startup line).
- `P2P_API_KEY` (the single key of earlier versions) still works: when neither new variable is
  set it becomes both keys, so an upgraded deployment never silently turns open.
- An **end-user token** (pipelines/serve/tokens.py: `P2P_TOKEN_SECRET` or `P2P_TOKEN_PUBLIC_KEY`) is
  the `user` scope for one user id: the OpenAI endpoints answer that user only, and `/v1/users/<id>`
  acts on that user's own id only (both checked where the user is known: replica.py, api.py).

Each variable may hold several keys separated by commas (rotation). A missing or wrong key is
401; a valid key without the scope is 403; admin endpoints with no admin key configured are
403 for everyone. `/healthz`, `/openapi.json` and the docs need no key; `/healthz` shows its
details only to a valid key.

`Guard` is an ASGI middleware: keys first (from `Authorization` alone), then the body limit
(from `Content-Length`, then by counting the bytes as the route reads them). A refused request
is answered before a single byte of its body is read. The body limit lives here rather than in
FastAPI's `max_body_size` because Starlette's limiter replaces any response to an oversized
request, a 401 included, with a plain-text 413; here every refusal has OpenAI's error shape.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipelines.serve.errors import APIError
from pipelines.serve.tokens import TokenError, Tokens

SERVICE_ENV, ADMIN_ENV, LEGACY_ENV = "P2P_SERVICE_KEY", "P2P_ADMIN_KEY", "P2P_API_KEY"
SERVICE, ADMIN, USER = "service", "admin", "user"
TOKENS_PATH = "/v1/tokens"
PUBLIC_PATHS = frozenset({"/healthz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
ADMIN_PREFIX = "/v1/users"


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(k.strip() for k in (value or "").split(",") if k.strip())


@dataclass(frozen=True)
class Keys:
    service: tuple[str, ...] = ()
    admin: tuple[str, ...] = ()
    tokens: Tokens = Tokens()

    @classmethod
    def resolve(cls, service_key: str | None = None, admin_key: str | None = None,
                env: Mapping[str, str] = os.environ) -> Keys:
        """Arguments win over the environment; `P2P_API_KEY` fills both only when neither is set."""
        service = _split(service_key if service_key is not None else env.get(SERVICE_ENV))
        admin = _split(admin_key if admin_key is not None else env.get(ADMIN_ENV))
        if not service and not admin and service_key is None and admin_key is None:
            service = admin = _split(env.get(LEGACY_ENV))
        return cls(service, admin, Tokens.resolve(env))

    @property
    def open(self) -> bool:
        return not self.service and not self.admin and not self.tokens.enabled

    def scopes(self, authorization: str | None) -> frozenset[str]:
        """The scopes the `Authorization` header grants (all of them in open mode)."""
        return self.grant(authorization)[0]

    def grant(self, authorization: str | None) -> tuple[frozenset[str], str | None]:
        """(scopes, the user an end-user token is for). A token that does not verify is a `TokenError`."""
        if self.open:
            return frozenset({SERVICE, ADMIN}), None
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return frozenset(), None
        # compare_digest against every key: the time taken says nothing about which one matched
        admin = any([secrets.compare_digest(token.encode(), k.encode()) for k in self.admin])
        service = any([secrets.compare_digest(token.encode(), k.encode()) for k in self.service])
        if admin or service:
            return (frozenset({SERVICE, ADMIN}) if admin else frozenset({SERVICE})), None
        if self.tokens.enabled and token.count(".") == 2:  # a JWT: header.claims.signature
            return frozenset({USER}), self.tokens.user_of(token)
        return frozenset(), None


def required_scope(path: str) -> str | None:
    if path in PUBLIC_PATHS:
        return None
    if path in (ADMIN_PREFIX, TOKENS_PATH) or path.startswith(ADMIN_PREFIX + "/"):
        return ADMIN
    return SERVICE


def allowed(need: str, granted: frozenset[str], path: str) -> bool:
    """Whether the scopes allow the path. A user token is a user-level service key, and an admin key for
    `/v1/users/<id>` (the route then checks that the id is the token's user)."""
    if need in granted:
        return True
    if USER in granted:
        return need == SERVICE or path.startswith(ADMIN_PREFIX + "/")
    return False


class BodyTooLarge(HTTPException):
    """Raised from `receive` when a body without (or with a false) Content-Length passes the limit."""

    def __init__(self):
        super().__init__(413, "request body too large")


class Guard:
    """ASGI middleware: the route's scope against the bearer key, then the body limit; see the module."""

    def __init__(self, app: ASGIApp, keys: Keys, max_body_bytes: int):
        self.app, self.keys, self.max_body_bytes = app, keys, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        try:
            granted, user = self.keys.grant(headers.get(b"authorization", b"").decode("latin-1"))
        except TokenError as exc:
            await APIError(401, str(exc), code="invalid_token", headers={"WWW-Authenticate": "Bearer"}
                           ).response()(scope, receive, send)
            return
        scope.setdefault("state", {}).update(scopes=granted, user=user)
        path, root = scope.get("path", ""), scope.get("root_path", "")
        path = path[len(root):] if root and path.startswith(root) else path
        need = required_scope(path)
        if need is not None and not allowed(need, granted, path):
            await self._refusal(need, granted).response()(scope, receive, send)
            return
        declared = headers.get(b"content-length", b"0").decode("latin-1")
        if not declared.isdigit() or int(declared) > self.max_body_bytes:
            await self._too_large(declared).response()(scope, receive, send)
            return
        await self.app(scope, self._counting(receive), send)

    def _counting(self, receive: Receive) -> Receive:
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body_bytes:
                raise BodyTooLarge()
            return message

        return limited

    def _too_large(self, declared: str) -> APIError:
        if not declared.isdigit():
            return APIError(400, f"invalid Content-Length {declared!r}", code="invalid_content_length")
        return APIError(413, f"request body is {int(declared)} bytes; the limit is {self.max_body_bytes}",
                        code="request_too_large")

    def _refusal(self, need: str, granted: frozenset[str]) -> APIError:
        if need == ADMIN and not self.keys.admin:
            return APIError(403, f"admin endpoints are disabled: no admin key is configured ({ADMIN_ENV})",
                            code="admin_disabled")
        if not granted:
            return APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                            code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if USER in granted:
            return APIError(403, "an end-user token reaches only its own user's endpoints", code="insufficient_scope")
        return APIError(403, f"this key has no {need!r} scope; this endpoint needs the {need} key",
                        code="insufficient_scope")
