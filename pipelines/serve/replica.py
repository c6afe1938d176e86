"""One serving replica's logic: the base model, the engine, users' adapters, builds and deletes.

A user's adapter is a few small tensors, loaded from the store and checked against the committed
manifest on use (every `recheck_s`), so a nightly refresh is picked up without a restart.
Generation is the continuous-batching `Engine` (p2p/generation/engine.py) on its own thread:
requests from any users join the running decode loop at the next step. Store reads,
tokenization and adapter builds run in threads, never on the event loop.

A plain class: the Ray Serve deployment (pipelines/serve/deployment.py) adds the multiplexed
adapter cache and the HTTP app; the routes (pipelines/serve/api.py) are typed against this.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import time
import weakref

import numpy as np
import pyarrow as pa

from p2p.data.schemas import USERS, DataError, validate
from p2p.errors import P2PError
from p2p.generation.engine import Engine, EngineDead
from p2p.model.adapted import AdaptedModel
from p2p.model.base import load_base_model
from p2p.store import UserDeleted
from pipelines.serve.auth import Keys
from pipelines.serve.completions import Completions, Target
from pipelines.serve.errors import APIError
from pipelines.serve.schemas import AdapterRequest, EmbeddingRequest, EventsRequest, Limits
from pipelines.serve.store_access import DELETE_WAIT_S, StoreAccess, StoreBusy, StoreDown
from pipelines.serve.users import KeyedLocks, Slot, resolve_user

log = logging.getLogger("ray.serve")
STORE_UNAVAILABLE = "adapter store unavailable; retry (the replica's log has the error)"  # no store paths to callers


class Replica:
    """What one serving replica does, with no Ray in it: users' adapters, builds, deletes, health.

    `pipelines.serve.deployment.P2PServer` is this class as a Ray Serve deployment; the routes
    (`pipelines.serve.api`) call these methods.
    """

    def __init__(self, store: str, hypernet_id: str | None = None, base: str | None = None,
                 unknown_user: str = "base", recheck_s: float = 5.0, max_batch_size: int = 16,
                 batching: str = "continuous", batch_wait_s: float = 0.05, keys: Keys | None = None,
                 limits: Limits | None = None):
        self.store = StoreAccess(store, hypernet_id)
        self.hypernet_id = self.store.hypernet_id
        self.personalizer = self.store.personalizer()  # its encoder loads with the first on-demand build
        config = self.personalizer.hypernet.config
        self.base_name = base or config.base_model
        model, self.tokenizer = load_base_model(self.base_name)
        self.adapted = AdaptedModel(model, self.tokenizer, config)
        context = int(getattr(model.config, "max_position_embeddings", 2048))
        self.keys, self.limits = keys or Keys(), limits or Limits()
        self.engine = Engine(self.adapted, max_batch_size, batching, batch_wait_s, max_waiting=self.limits.max_waiting)
        self.completions = Completions(self.engine, self.tokenizer, self.limits, context)
        self.unknown_user, self.recheck_s = unknown_user, recheck_s
        self.started = int(time.time())
        self.requests: collections.Counter[str] = collections.Counter()
        self._user_locks = KeyedLocks()
        self._slots: weakref.WeakValueDictionary[str, Slot] = weakref.WeakValueDictionary()

    def close(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()

    def count(self, what: str) -> None:
        self.requests[what] += 1

    # --- users and their adapters ----------------------------------------------------------------

    async def get_slot(self, user_id: str) -> Slot:
        """A user's cache entry (the deployment puts Serve's multiplexed LRU in front of this)."""
        return await self.load_slot(user_id)

    async def load_slot(self, user_id: str) -> Slot:
        slot = Slot(user_id, await self._store(self.store.load, user_id), time.monotonic())
        if slot.loaded.error is not None:
            log.warning("p2p serve: adapter of user %r unreadable: %s", user_id, slot.loaded.error)
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

    async def target(self, model: str | None, user: str | None, header: str | None,
                     token_user: str | None = None) -> Target:
        """The adapter and response fields for a request, from whichever of model / user / header names it.

        With an end-user token (`token_user`) the request is that user's: naming no user means them,
        naming anyone else is 403; `model` as the base alone still means them.
        """
        user_id = resolve_user(self.base_name, model, user, header)
        if token_user is not None:
            user_id = self.own(token_user, user_id or token_user, "user")
        if user_id is None:
            return Target(model or self.base_name)
        slot = await self.slot_for(user_id)
        if slot.loaded.adapter is None and slot.loaded.error is None and self.unknown_user == "error":
            raise APIError(404, f"user {user_id!r} has no adapter", "user", "user_not_found")
        return Target(model or self.base_name, slot.loaded.adapter, slot.extras)

    @staticmethod
    def own(token_user: str | None, user_id: str, param: str = "user_id") -> str:
        """`user_id`, if the caller may act on it: anyone with a key, or the one user a token is for (else 403)."""
        if token_user is not None and user_id != token_user:
            raise APIError(403, "this token is for another user; it reaches only its own user", param, "wrong_user")
        return user_id

    async def build_adapter(self, user_id: str, req: AdapterRequest) -> dict:
        """Make (or, with `replace`, remake) a user's adapter from a history; one build per user at a time here."""
        if len(req.history) > self.limits.max_history_items:
            raise APIError(400, f"history has {len(req.history)} items; the limit is {self.limits.max_history_items}",
                           "history", "history_too_long")
        history = [h.model_dump() for h in req.history]
        row = {"user_id": user_id, "history": history, "updated_at": req.updated_at or int(time.time())}
        try:
            validate(pa.Table.from_pylist([row], schema=USERS), "users", "request")
        except (DataError, pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise APIError(400, str(exc), "history") from None
        def build() -> tuple[dict, dict]:
            record, seconds = self._personalize(user_id, history)
            self.store.put_history(user_id, history)  # the base later events extend
            return record, seconds

        return await self._store_adapter(user_id, req.replace, "history", build)

    async def add_events(self, user_id: str, req: EventsRequest) -> dict:
        """New history items: merged by item_id into the user's recorded history, the adapter rebuilt now.

        Serialized per user in this replica by the user lock, and across replicas by the history
        record's conditional write; an item sent twice is added once.
        """
        items = [h.model_dump() for h in req.items]
        if len(items) > self.limits.max_history_items:
            raise APIError(400, f"{len(items)} items; the limit is {self.limits.max_history_items}", "items",
                           "history_too_long")
        async with self._user_locks.hold(user_id):
            t0 = time.perf_counter()
            extended = await self._store(self.store.extend_history, user_id, items)
            if extended is None:
                raise APIError(409, f"no history is recorded for user {user_id!r}; send it once with "
                                    f"POST /v1/users/{{id}}/adapter", "user_id", "no_history")
            history, added = extended
            if len(history) > self.limits.max_history_items:
                raise APIError(400, f"the history would have {len(history)} items; the limit is "
                                    f"{self.limits.max_history_items}", "items", "history_too_long")
            record, seconds = await self._store(self._personalize, user_id, history)
            await self._refresh_cached(user_id)
        return {"user_id": user_id, "added": added, "duplicates": len(items) - added, "history_items": len(history),
                "adapter": record, "seconds": {**seconds, "total": time.perf_counter() - t0}}

    async def adapter_from_embedding(self, user_id: str, req: EmbeddingRequest) -> dict:
        """The private path: the device sends only its profile embedding (features), never the history."""
        dim = self.personalizer.hypernet.config.embed_dim
        if len(req.embedding) != dim:
            raise APIError(400, f"embedding has {len(req.embedding)} values; this hypernet reads {dim}", "embedding",
                           "embedding_dimension")
        embedding = np.asarray(req.embedding, np.float32)
        if not np.isfinite(embedding).all():  # finite as JSON, but beyond float32's range
            raise APIError(400, "embedding values must fit in float32", "embedding")
        return await self._store_adapter(user_id, req.replace, "embedding",
                                         lambda: self._from_embedding(user_id, embedding, req.store))

    async def _store_adapter(self, user_id: str, replace: bool, param: str, make) -> dict:
        async with self._user_locks.hold(user_id):
            existing = await self._store(self.store.row, user_id)
            if existing is not None and not replace:
                raise APIError(409, f"user {user_id!r} already has an adapter (run {existing.get('run_id')}); "
                                    "send \"replace\": true to replace it", "replace", "adapter_exists")
            record, seconds = await self._store(make, bad_input=param)
            await self._refresh_cached(user_id)
        return {"user_id": user_id, "adapter": record, "seconds": seconds, "replaced": existing is not None}

    def _personalize(self, user_id: str, history: list[dict]) -> tuple[dict, dict]:
        """History -> profile -> embedding -> adapter -> store. Blocking: runs in a thread."""
        t0 = time.perf_counter()
        [profile] = self.personalizer.embedder.profiles([history])
        emb = self.personalizer.embedder.embed([profile])
        t1 = time.perf_counter()
        [adapter] = self.personalizer.from_embeddings(emb)
        files = self.personalizer.files(adapter)
        t2 = time.perf_counter()
        record = self.store.write_on_demand(user_id, files, profile.hash, emb[0])
        t3 = time.perf_counter()
        return record, {"profile_and_embed": t1 - t0, "generate": t2 - t1, "store": t3 - t2}

    def _from_embedding(self, user_id: str, embedding: np.ndarray, keep: str) -> tuple[dict, dict]:
        """Embedding -> adapter -> store (or the embedding alone, made into an adapter on each load)."""
        t0 = time.perf_counter()
        profile_hash = "device:" + hashlib.sha256(embedding.tobytes()).hexdigest()[:32]
        files = None
        if keep == "adapter":
            [adapter] = self.personalizer.from_embeddings(embedding[None])
            files = self.personalizer.files(adapter)
        t1 = time.perf_counter()
        record = self.store.write_on_demand(user_id, files, profile_hash, embedding)
        return record, {"generate": t1 - t0, "store": time.perf_counter() - t1}

    async def user_record(self, user_id: str) -> dict:
        row = await self._store(self.store.row, user_id)
        if row is None:
            raise APIError(404, f"user {user_id!r} has no adapter", "user_id", "user_not_found")
        return {"user_id": user_id, "personalized": True, "adapter": row}

    async def delete_user(self, user_id: str) -> dict:
        async with self._user_locks.hold(user_id):
            existed = await self._store(self.store.row, user_id) is not None
            try:
                removed = await self._store(self.store.delete, user_id)
            finally:  # a 503 while a refresh holds the store has still tombstoned the user: stop serving them
                await self._refresh_cached(user_id)
        if not existed and not removed:
            raise APIError(404, f"user {user_id!r} has no adapter", "user_id", "user_not_found")
        return {"user_id": user_id, "deleted": True, "manifest_rows_removed": removed}

    async def _refresh_cached(self, user_id: str) -> None:
        """This replica uses the store's new state from the next request (others within `recheck_s`)."""
        slot = self._slots.get(user_id)
        if slot is not None:
            await self._reload(slot)

    async def _store(self, fn, *args, bad_input: str | None = None):
        """A blocking store call (or build) in a thread, its failures as API errors: an unreachable store
        503, a busy one 503 with Retry-After, a deleted user 409, and with `bad_input` any other P2PError a
        400 naming that parameter."""
        try:
            return await asyncio.to_thread(fn, *args)
        except StoreDown as exc:
            log.warning("p2p serve: adapter store unavailable: %s", exc)
            raise APIError(503, STORE_UNAVAILABLE, code="store_unavailable") from None
        except StoreBusy as exc:
            raise APIError(503, str(exc), code="store_busy", headers={"Retry-After": str(int(DELETE_WAIT_S * 6))}) from None
        except UserDeleted as exc:
            raise APIError(409, str(exc), "user_id", "user_deleted") from None
        except P2PError as exc:
            if bad_input is None:
                raise
            raise APIError(400, str(exc), bad_input) from None

    # --- models and health -----------------------------------------------------------------------

    def model_card(self, model: str) -> dict:
        resolve_user(self.base_name, model, None, None)  # 404 for anything but the base or <base>:<user>
        return {"id": model, "object": "model", "created": self.started, "owned_by": "p2p",
                "root": self.base_name, "parent": None if model == self.base_name else self.base_name}

    def issue_token(self, user: str, ttl_s: int) -> dict:
        if not self.keys.tokens.secrets:
            raise APIError(403, "token issuing is disabled: no P2P_TOKEN_SECRET is configured", code="tokens_disabled")
        token, expires = self.keys.tokens.issue(user, ttl_s)
        return {"object": "token", "token": token, "user": user, "expires_at": expires}

    def check_health(self) -> None:
        """Ray Serve calls this every few seconds; raising has the replica replaced (a dead or stuck engine)."""
        self.engine.check()

    def health(self, detailed: bool) -> dict:
        try:
            self.engine.check()
        except EngineDead as exc:
            raise APIError(503, "unhealthy: " + (str(exc) if detailed else "the engine is not running"),
                           type="server_error", code="unhealthy") from None
        if not detailed:
            return {"status": "ok"}
        return {"status": "ok", "base": self.base_name, "hypernet_id": self.hypernet_id,
                "auth": "open" if self.keys.open else "keys",
                "user_tokens": self.keys.tokens.enabled, "batching": self.engine.batching,
                "requests": dict(self.requests), "engine": self.engine.snapshot()}
