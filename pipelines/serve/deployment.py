"""`p2p serve`: a Ray Serve app that answers each user with that user's adapter.

One base model per replica, wrapped once with batched per-row LoRA. A user's adapter is a few
small tensors, loaded from the store through `@serve.multiplexed` (an LRU per replica, keyed by
user id) and checked against the committed manifest on use, so a nightly refresh is picked up
without a restart. `@serve.batch` gathers concurrent requests, from any users, into one decode
loop where row i uses adapter i. A user the store lacks gets the base model (or 404), and
`POST /v1/users/{id}/adapter` makes a brand-new user's adapter from a history in one forward pass.

Ray Serve splits a batch by multiplexed model id, so requests that name the user only in the
`serve_multiplexed_model_id` header are batched per user; name it in the body (`user`) to batch
users together.

No `from __future__ import annotations` here: FastAPI reads the endpoint annotations at runtime.
"""

import asyncio
import logging
import os
import secrets
import time
from dataclasses import dataclass

import pyarrow as pa
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from ray import serve

from p2p.adapted_model import AdaptedModel
from p2p.data.schemas import DataError, validate
from p2p.errors import P2PError
from p2p.generate import adapter_files, generate_user_adapters
from p2p.lora import adapter_from_files
from p2p.models import chat_prompt, load_base_model
from p2p.profile import ProfileConfig, build_profile, profile_hash
from p2p.store import AdapterNotFound, AdapterStore, StoreError

log = logging.getLogger("ray.serve")
CACHE_SIZE = int(os.environ.get("P2P_ADAPTER_CACHE", "256"))

app = FastAPI(title="p2p", description="Personalized completions: one LoRA adapter per user, made by a hypernetwork.")


class Sampling(BaseModel):
    """What both completion endpoints take besides the prompt."""

    max_tokens: int = Field(32, ge=1, le=2048)
    temperature: float = Field(0.0, ge=0.0, le=5.0)
    user: str | None = None
    seed: int = 0


class CompletionRequest(Sampling):
    prompt: str


class Message(BaseModel):
    role: str
    content: str


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)


class HistoryItem(BaseModel):
    item_id: str
    text: str
    label: str | None = None
    ts: int


class AdapterRequest(BaseModel):
    history: list[HistoryItem] = Field(min_length=1)
    updated_at: int | None = None


@dataclass
class Slot:
    """One user's entry in the replica's adapter cache; refreshed in place when the store moves on."""

    user_id: str
    adapter: dict | None = None
    row: dict | None = None
    error: str | None = None
    checked_at: float = 0.0


@dataclass
class Job:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    seed: int
    adapter: dict | None


@serve.deployment(max_ongoing_requests=64)
@serve.ingress(app)
class P2PServer:
    def __init__(self, store: str, hypernet_id: str | None = None, base: str | None = None,
                 unknown_user: str = "base", recheck_s: float = 5.0, max_batch_size: int = 16,
                 batch_wait_s: float = 0.05, api_key: str | None = None):
        self.store = AdapterStore(store)
        self.hypernet_id = hypernet_id or self._default_hypernet()
        self.hypernet, _ = self.store.load_hypernet(self.hypernet_id)
        c = self.hypernet.config
        model, self.tokenizer = load_base_model(base or c.base_model)
        self.adapted = AdaptedModel(model, self.tokenizer, c)
        self.model = model
        self.context = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.unknown_user, self.recheck_s = unknown_user, recheck_s
        self.encoder = None  # loaded on the first on-demand adapter
        self.stats = {"requests": 0, "batches": 0, "rows": 0, "forward_passes": 0, "adapter_loads": 0}
        self._batched.set_max_batch_size(max_batch_size)
        self._batched.set_batch_wait_timeout_s(batch_wait_s)
        self.api_key = api_key or None

    def _default_hypernet(self) -> str:
        committed = self.store.current()
        if committed is not None:
            return committed.hypernet_id
        ids = self.store.hypernet_ids()
        if len(ids) == 1:
            return ids[0]
        raise P2PError(f"{self.store.uri}: no committed manifest; pass --hypernet (stored: {', '.join(ids) or 'none'})")

    # --- adapters --------------------------------------------------------------------------------

    @serve.multiplexed(max_num_models_per_replica=CACHE_SIZE)
    async def get_slot(self, user_id: str) -> Slot:
        slot = Slot(user_id)
        await asyncio.to_thread(self._load, slot)
        return slot

    def _load(self, slot: Slot) -> None:
        """Fill the slot from the store. Not found: no adapter. Corrupted: no adapter, error kept."""
        slot.checked_at = time.monotonic()
        self.stats["adapter_loads"] += 1
        try:
            files, row = self.store.read_adapter(slot.user_id, self.hypernet_id)
            slot.adapter, _ = adapter_from_files(files)
            slot.row, slot.error = row, None
        except AdapterNotFound:
            slot.adapter = slot.row = slot.error = None
        except StoreError as exc:
            if "sha256" not in str(exc) and "missing" not in str(exc):
                raise  # unreachable: the caller answers 503, the replica stays up
            log.error("p2p: serving user %r with the base model: %s", slot.user_id, exc)
            slot.adapter, slot.row, slot.error = None, None, str(exc)

    async def slot_for(self, user_id: str) -> Slot:
        slot = await self.get_slot(user_id)
        if time.monotonic() - slot.checked_at >= self.recheck_s:
            row = await asyncio.to_thread(self.store.adapter_row, user_id, self.hypernet_id)
            slot.checked_at = time.monotonic()
            if (row or {}).get("sha256") != (slot.row or {}).get("sha256") or (row is None) != (slot.row is None):
                await asyncio.to_thread(self._load, slot)  # a refresh or an on-demand adapter moved it on
        return slot

    # --- batching --------------------------------------------------------------------------------

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def _batched(self, jobs: list[Job]) -> list[dict]:
        return await asyncio.to_thread(self._decode, jobs)

    def _decode(self, jobs: list[Job]) -> list[dict]:
        out = self.adapted.decode([j.prompt_ids for j in jobs], [j.max_tokens for j in jobs],
                                  [j.adapter for j in jobs], [j.temperature for j in jobs], seed=jobs[0].seed)
        self.stats["batches"] += 1
        self.stats["rows"] += len(jobs)
        self.stats["forward_passes"] += out.forward_passes
        return [{"tokens": t, "finish_reason": r, "batch_size": len(jobs)}
                for t, r in zip(out.tokens, out.finish_reasons, strict=True)]

    async def complete(self, request: Request, text: str, max_tokens: int, temperature: float, seed: int,
                       user: str | None) -> dict:
        self._authorize(request)
        user = user or request.headers.get("serve_multiplexed_model_id") or None
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) + max_tokens > self.context:
            raise HTTPException(400, f"prompt is {len(ids)} tokens; with max_tokens {max_tokens} it exceeds the "
                                     f"context of {self.context} tokens")
        slot = None
        if user is not None:
            try:
                slot = await self.slot_for(user)
            except StoreError as exc:
                raise HTTPException(503, f"adapter store unavailable: {exc}") from None
            if slot.adapter is None and slot.error is None and self.unknown_user == "error":
                raise HTTPException(404, f"user {user!r} has no adapter")
        self.stats["requests"] += 1
        result = await self._batched(Job(ids, max_tokens, temperature, seed, slot.adapter if slot else None))
        text_out = self.tokenizer.decode(result["tokens"], skip_special_tokens=True)
        adapter = None
        if slot is not None and slot.row is not None:
            adapter = {"hypernet_id": slot.row["hypernet_id"], "created_at": slot.row["created_at"],
                       "run_id": slot.row["run_id"], "source": slot.row["source"]}
        body = {
            "id": f"cmpl-{secrets.token_hex(8)}", "created": int(time.time()), "model": self.hypernet.config.base_model,
            "user": user, "personalized": adapter is not None, "adapter": adapter,
            "text": text_out, "tokens": result["tokens"], "finish_reason": result["finish_reason"],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": len(result["tokens"]),
                      "total_tokens": len(ids) + len(result["tokens"])},
            "batch_size": result["batch_size"],
        }
        if slot is not None and slot.error is not None:
            body["adapter_error"] = slot.error
        return body

    # --- HTTP API --------------------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(self, req: CompletionRequest, request: Request) -> dict:
        body = await self.complete(request, req.prompt, req.max_tokens, req.temperature, req.seed, req.user)
        body["object"] = "text_completion"
        body["choices"] = [{"index": 0, "text": body["text"], "finish_reason": body["finish_reason"]}]
        return body

    @app.post("/v1/chat/completions")
    async def chat(self, req: ChatRequest, request: Request) -> dict:
        system = next((m.content for m in req.messages if m.role == "system"), None)
        turns = [m for m in req.messages if m.role != "system"]
        if not turns or turns[-1].role != "user":
            raise HTTPException(400, "the last message must have role 'user'")
        if getattr(self.tokenizer, "chat_template", None):
            msgs = ([{"role": "system", "content": system}] if system else []) + [m.model_dump() for m in turns]
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        else:
            text = chat_prompt(self.tokenizer, turns[-1].content, system)
        body = await self.complete(request, text, req.max_tokens, req.temperature, req.seed, req.user)
        body["object"] = "chat.completion"
        body["choices"] = [{"index": 0, "message": {"role": "assistant", "content": body["text"]},
                            "finish_reason": body["finish_reason"]}]
        return body

    @app.post("/v1/users/{user_id}/adapter")
    async def make_adapter(self, user_id: str, req: AdapterRequest, request: Request) -> dict:
        self._authorize(request)
        history = [h.model_dump() for h in req.history]
        try:
            row = {"user_id": user_id, "history": history, "updated_at": req.updated_at or int(time.time())}
            from p2p.data.schemas import USERS

            validate(pa.Table.from_pylist([row], schema=USERS), "users", "request")
        except (DataError, pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise HTTPException(422, str(exc)) from None
        try:
            record, seconds = await asyncio.to_thread(self._personalize, user_id, history)
        except AdapterNotFound as exc:
            raise HTTPException(422, str(exc)) from None
        except StoreError as exc:
            raise HTTPException(503, f"adapter store unavailable: {exc}") from None
        except P2PError as exc:
            raise HTTPException(422, str(exc)) from None
        slot = await self.get_slot(user_id)
        await asyncio.to_thread(self._load, slot)  # this replica uses it from the next request
        return {"user_id": user_id, "adapter": record, "seconds": seconds}

    def _personalize(self, user_id: str, history: list[dict]) -> tuple[dict, dict]:
        from p2p.encoder import ProfileEncoder

        c = self.hypernet.config
        t0 = time.perf_counter()
        if self.encoder is None:
            self.encoder = ProfileEncoder(c.encoder)
        text = build_profile(history, ProfileConfig(**c.profile))
        emb = self.encoder.encode([text])
        t1 = time.perf_counter()
        [adapter] = generate_user_adapters(self.hypernet, emb)
        files = adapter_files(self.hypernet, self.hypernet_id, adapter)
        t2 = time.perf_counter()
        record = self.store.write_on_demand(self.hypernet_id, user_id, files, profile_hash(text, c.encoder), emb[0])
        t3 = time.perf_counter()
        return record, {"profile_and_embed": t1 - t0, "generate": t2 - t1, "store": t3 - t2}

    @app.get("/v1/users/{user_id}")
    async def user_info(self, user_id: str, request: Request) -> dict:
        self._authorize(request)
        try:
            row = await asyncio.to_thread(self.store.adapter_row, user_id, self.hypernet_id)
        except StoreError as exc:
            raise HTTPException(503, f"adapter store unavailable: {exc}") from None
        if row is None:
            raise HTTPException(404, f"user {user_id!r} has no adapter")
        return {"user_id": user_id, "personalized": True, "adapter": row}

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "hypernet_id": self.hypernet_id, "base": self.hypernet.config.base_model,
                "stats": dict(self.stats)}

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise HTTPException(401, "missing or wrong bearer token (Authorization: Bearer $P2P_API_KEY)")


@app.exception_handler(torch.cuda.OutOfMemoryError)
async def _oom(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": "out of GPU memory; retry with a smaller max_tokens"}, status_code=503)


def build_app(store: str, hypernet_id: str | None = None, base: str | None = None, unknown_user: str = "base",
              replicas: int = 1, recheck_s: float = 5.0, max_batch_size: int = 16, batch_wait_s: float = 0.05,
              api_key: str | None = None, cpus_per_replica: float = 1):
    """The bound application: `serve.run(build_app(...))`. Replicas get the driver's store settings."""
    from pipelines.ray_setup import store_remote_args

    options = {**store_remote_args(), "num_cpus": cpus_per_replica}  # torch uses this many threads
    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "P2P_CACHE") if os.environ.get(k)}
    if env:
        options.setdefault("runtime_env", {}).setdefault("env_vars", {}).update(env)
    deployment = P2PServer.options(num_replicas=replicas, ray_actor_options=options)
    api_key = api_key if api_key is not None else os.environ.get("P2P_API_KEY")  # bearer auth when set
    return deployment.bind(store, hypernet_id, base, unknown_user, recheck_s, max_batch_size, batch_wait_s, api_key)


def start(store: str, host: str = "127.0.0.1", port: int = 8000, **kwargs) -> str:
    """Start Serve's HTTP proxy on host:port and deploy the app; returns the base URL once it answers."""
    from pipelines.ray_setup import ensure_ray

    ensure_ray()
    AdapterStore(store).current()  # an unreachable store fails here, in one line, not in a replica
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(store, **kwargs), name="p2p", route_prefix="/", blocking=False)
    return f"http://{host}:{port}"


def run_server(store: str, host: str = "127.0.0.1", port: int = 8000, **kwargs) -> None:
    """`p2p serve`: serve until Ctrl-C, then shut Serve down."""
    url = start(store, host, port, **kwargs)
    print(f"p2p serve: {url}/v1/completions (health: {url}/healthz); Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
