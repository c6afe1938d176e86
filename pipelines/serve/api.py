"""The HTTP API of one replica: OpenAI's endpoints, p2p's user endpoints, health.

Built per replica (`P2PServer.__serve_build_asgi_app__`, pipelines/serve/deployment.py) so its keys and limits are that
deployment's. `Guard` (pipelines/serve/auth.py) sits in front of the routes: a request without
the right key, or announcing a body over the limit, is refused before its body is read.

No `from __future__ import annotations` here: FastAPI reads the endpoint annotations at runtime.
"""

from typing import Annotated

from fastapi import FastAPI, Path, Request, Security
from fastapi.security import HTTPBearer
from pydantic import AfterValidator, BaseModel

from p2p.userkey import canonical_user_id
from pipelines.serve import errors
from pipelines.serve.auth import ADMIN, ADMIN_ENV, SERVICE, SERVICE_ENV, Guard
from pipelines.serve.errors import SafeJSONResponse
from pipelines.serve.replica import Replica
from pipelines.serve.schemas import (
    AdapterRequest,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    EventsRequest,
    ResponsesRequest,
    TokenRequest,
    check_utf8,
)
from pipelines.serve.users import MULTIPLEX_HEADER

DESCRIPTION = f"""Personalized completions: one LoRA adapter per user, made by a hypernetwork.

OpenAI-compatible `/v1/completions`, `/v1/chat/completions` (streaming with `stream: true`) and
`/v1/models`. Name the user with `user`, the `{MULTIPLEX_HEADER}` header, or `model` as
`<base>:<user id>`. Keys: `Authorization: Bearer $SERVICE_KEY` ({SERVICE_ENV}) for the OpenAI
endpoints, `$ADMIN_KEY` ({ADMIN_ENV}) for `/v1/users` and `/v1/tokens`; with neither set the server
is open. An end-user token (`POST /v1/tokens`, `p2p token issue`) answers as its one user only:
the OpenAI endpoints with that user's adapter, and `/v1/users/<that user>`."""


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


ERRORS = {status: {"model": ErrorBody, "description": text} for status, text in (
    (400, "invalid request"), (401, "missing or invalid key or token"),
    (403, "key lacks the scope, or the token is another user's"),
    (404, "no such model or user"), (413, "body too large"), (503, "store or engine unavailable"))}
USER_ERRORS = {**ERRORS, 409: {"model": ErrorBody, "description": "the user already has an adapter"}}
UserId = Annotated[str, Path(min_length=1, max_length=512), AfterValidator(check_utf8),
                   AfterValidator(canonical_user_id)]


def build_api(server: Replica) -> FastAPI:
    """The routes, each a thin call into `server`.

    Long because: one short route per endpoint, read together as the API's table of contents.
    """
    app = FastAPI(title="p2p", description=DESCRIPTION, default_response_class=SafeJSONResponse)
    app.add_middleware(Guard, keys=server.keys, max_body_bytes=server.limits.max_body_bytes)
    errors.install(app)
    bearer = Security(HTTPBearer(auto_error=False, description=f"{SERVICE_ENV} or {ADMIN_ENV}"))
    service = {"dependencies": [bearer], "responses": ERRORS, "response_model": None}
    admin = {"dependencies": [bearer], "responses": USER_ERRORS, "response_model": None, "tags": ["users (admin key)"]}

    @app.post("/v1/completions", **service)
    async def completions(req: CompletionRequest, request: Request):
        """OpenAI completions: `prompt` is a string, a list of strings, token ids or lists of token ids."""
        server.count("completions")
        target = await server.target(req.model, req.user, request.headers.get(MULTIPLEX_HEADER), request.state.user)
        return await server.completions.completion(req, target)

    @app.post("/v1/chat/completions", **service)
    async def chat(req: ChatRequest, request: Request):
        """OpenAI chat completions through the base model's chat template."""
        server.count("chat")
        target = await server.target(req.model, req.user, request.headers.get(MULTIPLEX_HEADER), request.state.user)
        return await server.completions.chat(req, target)

    @app.post("/v1/responses", **service)
    async def responses(req: ResponsesRequest, request: Request):
        """OpenAI's Responses API for text: `input` (a string or messages), `instructions`, streaming events."""
        server.count("responses")
        target = await server.target(req.model, req.user, request.headers.get(MULTIPLEX_HEADER), request.state.user)
        return await server.completions.response(req, target)

    @app.get("/v1/models", **service)
    async def models():
        """The base model (users' adapters are `<base>:<user id>`; they are not listed)."""
        return {"object": "list", "data": [server.model_card(server.base_name)]}

    @app.get("/v1/models/{model:path}", **service)
    async def model(model: Annotated[str, Path(max_length=1024), AfterValidator(check_utf8)]):
        return server.model_card(model)

    @app.post("/v1/users/{user_id}/adapter", **admin)
    async def make_adapter(user_id: UserId, req: AdapterRequest, request: Request):
        """Build a user's adapter from a history now (profile, encoder, hypernet, store).

        An existing user's adapter is replaced only with `"replace": true` (else 409).
        """
        server.count("adapters_built")
        return await server.build_adapter(server.own(request.state.user, user_id), req)

    @app.post("/v1/users/{user_id}/events", **admin)
    async def add_events(user_id: UserId, req: EventsRequest, request: Request):
        """New history items for a user: the adapter is rebuilt now and served from the next request.

        Items are merged by `item_id` into the history recorded by the user's last build (409
        `no_history` when there is none); an item sent twice is added once.
        """
        server.count("events")
        return await server.add_events(server.own(request.state.user, user_id), req)

    @app.post("/v1/users/{user_id}/embedding", **admin)
    async def adapter_from_embedding(user_id: UserId, req: EmbeddingRequest, request: Request):
        """Make a user's adapter from the profile embedding their device computed: the history stays there.

        An existing user's adapter is replaced only with `"replace": true` (else 409).
        """
        server.count("adapters_from_embeddings")
        return await server.adapter_from_embedding(server.own(request.state.user, user_id), req)

    @app.get("/v1/users/{user_id}", **admin)
    async def user_info(user_id: UserId, request: Request):
        """The user's adapter record (manifest or on-demand row)."""
        return await server.user_record(server.own(request.state.user, user_id))

    @app.delete("/v1/users/{user_id}", **admin)
    async def delete_user(user_id: UserId, request: Request):
        """Forget the user: every adapter version in the store, the manifest rows, this replica's cache."""
        server.count("users_deleted")
        return await server.delete_user(server.own(request.state.user, user_id))

    @app.post("/v1/tokens", **admin)
    async def issue_token(req: TokenRequest):
        """An end-user token for `user` (admin key; needs P2P_TOKEN_SECRET on the server)."""
        server.count("tokens_issued")
        return server.issue_token(req.user, req.ttl_s)

    @app.get("/healthz")
    async def healthz(request: Request):
        """Liveness for anyone; the details (model, hypernet, engine counters) only with a service or admin key."""
        return server.health(detailed=bool(request.state.scopes & {SERVICE, ADMIN}))

    return app
