"""Which user a request is for, the replica's per-user cache entry, and per-user serialization.

A request may name its user three ways: `model` as `<base>:<user id>` (vLLM's and Ray Serve
LLM's adapter naming), the OpenAI `user` field, or the `serve_multiplexed_model_id` header (Ray
Serve's routing key). None of them silently wins: when several are given they must name the same
user, else 400, so a client can never override the user a gateway put in the header. Each is
compared in NFC, the one form the store holds (p2p/userkey.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from p2p.userkey import canonical_user_id
from pipelines.serve.errors import APIError
from pipelines.serve.store_access import Loaded

MULTIPLEX_HEADER = "serve_multiplexed_model_id"


def resolve_user(base: str, model: str | None, user: str | None, header: str | None) -> str | None:
    """The one user id the request names (None: the base model), or a 400/404 `APIError`."""
    from_model = None
    if model not in (None, base):
        prefix = base + ":"
        if not model.startswith(prefix) or len(model) == len(prefix):
            raise APIError(404, f"model {model!r} does not exist; this server serves {base!r} and "
                                f"'{base}:<user id>'", "model", "model_not_found")
        from_model = model[len(prefix):]
    named = {source: canonical_user_id(value)
             for source, value in (("model", from_model), ("user", user), (MULTIPLEX_HEADER, header)) if value}
    if len(set(named.values())) > 1:
        sources = ", ".join(f"{k}={v!r}" for k, v in named.items())
        raise APIError(400, f"the request names different users ({sources}); name one", "user", "user_conflict")
    return next(iter(named.values()), None)


ADAPTER_ERROR = ("the user's stored adapter is unreadable (missing, or it fails its sha256 check); the base model "
                 "answered; `p2p refresh --full` rewrites it")


@dataclass
class Slot:
    """One user's entry in the replica's adapter cache; refreshed in place when the store moves on."""

    user_id: str
    loaded: Loaded
    checked_at: float = 0.0

    @property
    def extras(self) -> dict:
        """The p2p fields of a response for this user."""
        row = self.loaded.row
        adapter = None if row is None else {k: row.get(k) for k in ("hypernet_id", "created_at", "run_id", "source")}
        out = {"user": self.user_id, "personalized": self.loaded.adapter is not None, "adapter": adapter}
        if self.loaded.error is not None:  # the detail (paths, digests) is in the replica's log, not the answer
            out["adapter_error"] = ADAPTER_ERROR
        return out


class KeyedLocks:
    """An asyncio lock per key, kept only while someone holds or waits for it."""

    def __init__(self):
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (None, 0))
        lock = lock or asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)
