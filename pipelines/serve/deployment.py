"""The Ray Serve deployment: one base model, one engine and one adapter cache per replica.

A user's adapter is a few small tensors, loaded from the store through `@serve.multiplexed` (an
LRU per replica keyed by user id, which also lets Serve route a user's requests to a replica
that has the adapter when the `serve_multiplexed_model_id` header names the user) and checked
against the committed manifest on use, so a nightly refresh is picked up without a restart.
Generation is the continuous-batching `Engine` (p2p/engine.py) on its own thread: requests from
any users join the running decode loop at the next step. Store reads, tokenization and adapter
builds run in threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import time
import weakref

import pyarrow as pa
from ray import serve

from p2p import logs
from p2p.adapted_model import AdaptedModel
from p2p.data.schemas import USERS, DataError, validate
from p2p.engine import Engine
from p2p.errors import P2PError
from p2p.models import load_base_model
from p2p.store import UserDeleted
from pipelines.serve.api import build_api
from pipelines.serve.auth import Keys
from pipelines.serve.completions import Completions, Target
from pipelines.serve.errors import APIError
from pipelines.serve.schemas import AdapterRequest, Limits
from pipelines.serve.store_access import StoreAccess, StoreDown
from pipelines.serve.users import KeyedLocks, Slot, resolve_user

log = logging.getLogger("ray.serve")
CACHE_SIZE = int(os.environ.get("P2P_ADAPTER_CACHE", "256"))


@serve.deployment(max_ongoing_requests=64)
@serve.ingress()
class P2PServer:
    def __init__(self, store: str, hypernet_id: str | None = None, base: str | None = None,
                 unknown_user: str = "base", recheck_s: float = 5.0, max_batch_size: int = 16,
                 batching: str = "continuous", batch_wait_s: float = 0.05, keys: Keys | None = None,
                 limits: Limits | None = None):
        self.store = StoreAccess(store, hypernet_id)
        self.hypernet_id = self.store.hypernet_id
        self.hypernet = self.store.load_hypernet()
        config = self.hypernet.config
        self.base_name = base or config.base_model
        model, self.tokenizer = load_base_model(self.base_name)
        self.adapted = AdaptedModel(model, self.tokenizer, config)
        context = int(getattr(model.config, "max_position_embeddings", 2048))
        self.engine = Engine(self.adapted, max_batch_size, batching, batch_wait_s)
        self.keys, self.limits = keys or Keys(), limits or Limits()
        self.completions = Completions(self.engine, self.tokenizer, self.limits, context)
        self.unknown_user, self.recheck_s = unknown_user, recheck_s
        self.started = int(time.time())
        self.requests: collections.Counter[str] = collections.Counter()
        self.personalizer = None  # loaded on the first on-demand adapter (it loads the encoder)
        self._personalizer_lock = threading.Lock()
        self._user_locks = KeyedLocks()
        self._slots: weakref.WeakValueDictionary[str, Slot] = weakref.WeakValueDictionary()

    def __serve_build_asgi_app__(self):
        return build_api(self)

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()

    def count(self, what: str) -> None:
        self.requests[what] += 1

    # --- users and their adapters ----------------------------------------------------------------

    @serve.multiplexed(max_num_models_per_replica=CACHE_SIZE)
    async def get_slot(self, user_id: str) -> Slot:
        slot = Slot(user_id, await self._store(self.store.load, user_id), time.monotonic())
        self._slots[user_id] = slot
        return slot

    async def slot_for(self, user_id: str) -> Slot:
        slot = await self.get_slot(user_id)
        if time.monotonic() - slot.checked_at >= self.recheck_s:
            row = await self._store(self.store.row, user_id)
            slot.checked_at = time.monotonic()
            if (row or {}).get("sha256") != (slot.loaded.row or {}).get("sha256"):
                await self._reload(slot)  # a refresh, an on-demand build or a delete moved it on
        return slot

    async def _reload(self, slot: Slot) -> None:
        slot.loaded, slot.checked_at = await self._store(self.store.load, slot.user_id), time.monotonic()

    async def target(self, model: str | None, user: str | None, header: str | None) -> Target:
        """The adapter and response fields for a request, from whichever of model / user / header names it."""
        user_id = resolve_user(self.base_name, model, user, header)
        if user_id is None:
            return Target(model or self.base_name)
        slot = await self.slot_for(user_id)
        if slot.loaded.adapter is None and slot.loaded.error is None and self.unknown_user == "error":
            raise APIError(404, f"user {user_id!r} has no adapter", "user", "user_not_found")
        return Target(model or self.base_name, slot.loaded.adapter, slot.extras)

    async def build_adapter(self, user_id: str, req: AdapterRequest) -> dict:
        """Make (or, with `replace`, remake) a user's adapter; one build per user at a time in this replica."""
        if len(req.history) > self.limits.max_history_items:
            raise APIError(400, f"history has {len(req.history)} items; the limit is {self.limits.max_history_items}",
                           "history", "history_too_long")
        history = [h.model_dump() for h in req.history]
        row = {"user_id": user_id, "history": history, "updated_at": req.updated_at or int(time.time())}
        try:
            validate(pa.Table.from_pylist([row], schema=USERS), "users", "request")
        except (DataError, pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise APIError(400, str(exc), "history") from None
        async with self._user_locks.hold(user_id):
            existing = await self._store(self.store.row, user_id)
            if existing is not None and not req.replace:
                raise APIError(409, f"user {user_id!r} already has an adapter (run {existing.get('run_id')}); "
                                    "send \"replace\": true to replace it", "replace", "adapter_exists")
            try:
                record, seconds = await asyncio.to_thread(self._personalize, user_id, history)
            except StoreDown as exc:
                raise APIError(503, f"adapter store unavailable: {exc}", code="store_unavailable") from None
            except UserDeleted as exc:
                raise APIError(409, str(exc), "user_id", "user_deleted") from None
            except P2PError as exc:
                raise APIError(400, str(exc), "history") from None
            await self._refresh_cached(user_id)
        return {"user_id": user_id, "adapter": record, "seconds": seconds, "replaced": existing is not None}

    def _personalize(self, user_id: str, history: list[dict]) -> tuple[dict, dict]:
        """History -> profile -> embedding -> adapter -> store. Blocking: runs in a thread."""
        from p2p.personalizer import Personalizer

        t0 = time.perf_counter()
        with self._personalizer_lock:
            if self.personalizer is None:
                self.personalizer = Personalizer(self.hypernet, self.hypernet_id)
        [profile] = self.personalizer.embedder.profiles([history])
        emb = self.personalizer.embedder.embed([profile])
        t1 = time.perf_counter()
        [adapter] = self.personalizer.from_embeddings(emb)
        files = self.personalizer.files(adapter)
        t2 = time.perf_counter()
        record = self.store.write_on_demand(user_id, files, profile.hash, emb[0])
        t3 = time.perf_counter()
        return record, {"profile_and_embed": t1 - t0, "generate": t2 - t1, "store": t3 - t2}

    async def user_record(self, user_id: str) -> dict:
        row = await self._store(self.store.row, user_id)
        if row is None:
            raise APIError(404, f"user {user_id!r} has no adapter", "user_id", "user_not_found")
        return {"user_id": user_id, "personalized": True, "adapter": row}

    async def delete_user(self, user_id: str) -> dict:
        async with self._user_locks.hold(user_id):
            existed = await self._store(self.store.row, user_id) is not None
            removed = await self._store(self.store.delete, user_id)
            await self._refresh_cached(user_id)
        if not existed and not removed:
            raise APIError(404, f"user {user_id!r} has no adapter", "user_id", "user_not_found")
        return {"user_id": user_id, "deleted": True, "manifest_rows_removed": removed}

    async def _refresh_cached(self, user_id: str) -> None:
        """This replica uses the store's new state from the next request (others within `recheck_s`)."""
        slot = self._slots.get(user_id)
        if slot is not None:
            await self._reload(slot)

    async def _store(self, fn, *args):
        """A blocking store call in a thread; an unreachable store is 503."""
        try:
            return await asyncio.to_thread(fn, *args)
        except StoreDown as exc:
            raise APIError(503, f"adapter store unavailable: {exc}", code="store_unavailable") from None

    # --- models and health -----------------------------------------------------------------------

    def model_card(self, model: str) -> dict:
        resolve_user(self.base_name, model, None, None)  # 404 for anything but the base or <base>:<user>
        return {"id": model, "object": "model", "created": self.started, "owned_by": "p2p",
                "root": self.base_name, "parent": None if model == self.base_name else self.base_name}

    def health(self, detailed: bool) -> dict:
        if not detailed:
            return {"status": "ok"}
        return {"status": "ok", "base": self.base_name, "hypernet_id": self.hypernet_id,
                "auth": "open" if self.keys.open else "keys", "batching": self.engine.batching,
                "requests": dict(self.requests), "engine": self.engine.snapshot()}


def build_app(store: str, hypernet_id: str | None = None, base: str | None = None, unknown_user: str = "base",
              replicas: int = 1, recheck_s: float = 5.0, max_batch_size: int = 16, batching: str = "continuous",
              batch_wait_s: float = 0.05, service_key: str | None = None, admin_key: str | None = None,
              limits: Limits | None = None, cpus_per_replica: float = 1):
    """The bound application: `serve.run(build_app(...))`.

    Keys: the arguments, else `P2P_SERVICE_KEY` / `P2P_ADMIN_KEY` (see pipelines/serve/auth.py),
    read here in the driver and passed to the replicas. Replicas get the driver's store settings.
    """
    from pipelines.ray_setup import store_remote_args

    options = {**store_remote_args(), "num_cpus": cpus_per_replica}  # torch uses this many threads
    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "P2P_CACHE") if os.environ.get(k)}
    if env:
        options.setdefault("runtime_env", {}).setdefault("env_vars", {}).update(env)
    deployment = P2PServer.options(num_replicas=replicas, ray_actor_options=options)
    keys = Keys.resolve(service_key, admin_key)
    return deployment.bind(store, hypernet_id, base, unknown_user, recheck_s, max_batch_size, batching, batch_wait_s,
                           keys, limits or Limits())


def start(store: str, host: str = "127.0.0.1", port: int = 8000, **kwargs) -> str:
    """Start Serve's HTTP proxy on host:port and deploy the app; returns the base URL once it answers."""
    from pipelines.ray_setup import ensure_ray

    StoreAccess(store, kwargs.get("hypernet_id"))  # an unreachable or empty store fails here, in one line
    ensure_ray()
    serve.start(http_options={"host": host, "port": port})
    logs.to_file("ray.serve")  # Serve configured its driver logger just now
    serve.run(build_app(store, **kwargs), name="p2p", route_prefix="/", blocking=False)
    return f"http://{host}:{port}"


def run_server(store: str, host: str = "127.0.0.1", port: int = 8000, **kwargs) -> None:
    """`p2p serve`: serve until Ctrl-C, then shut Serve down."""
    url = start(store, host, port, **kwargs)
    keys = Keys.resolve(kwargs.get("service_key"), kwargs.get("admin_key"))
    auth = ("OPEN: no keys set (P2P_SERVICE_KEY, P2P_ADMIN_KEY), anyone can call every endpoint" if keys.open
            else f"service key {'set' if keys.service else 'NOT set'}, admin key {'set' if keys.admin else 'NOT set'}")
    print(f"p2p serve: {url}/v1 (OpenAI API; health {url}/healthz; docs {url}/docs); auth: {auth}; Ctrl-C stops",
          flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()

