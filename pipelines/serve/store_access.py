"""Every call the server makes to the adapter store, and the one place its errors are classified.

The server needs three outcomes from a read: the user has no adapter (serve the base model or
404; a deleted user is one), the adapter is there but broken (serve the base model and say so:
one bad object must not take a user offline), or the store is unreachable (503, the replica
stays up). `classify` maps the store's typed errors onto those. An embeddings-only row is turned
into an adapter by `StoredAdapters` (one hypernet pass, the row's hypernet id and digest checked).
Each method blocks: callers run it with `asyncio.to_thread`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from p2p.errors import P2PError
from p2p.model.lora import UserAdapter
from p2p.model.peft_format import adapter_from_files
from p2p.personalize import Personalizer, StoredAdapters
from p2p.store import AdapterNotFound, AdapterStore, StoreError, StoreUnavailable
from p2p.store.errors import LeaseHeld
from p2p.store.tombstones import user_hash

NOT_FOUND, BROKEN, UNAVAILABLE = "not found", "broken", "unavailable"
DELETE_WAIT_S = 5.0  # a delete waits this long for a refresh's lease, then is 503 with the user tombstoned
TOMBSTONES_RECHECK_S = 5.0  # how stale this replica's view of the deleted users may be


class StoreBusy(P2PError):
    """Another job (a refresh, gc) holds the store's lease: the request is 503 with Retry-After."""


class StoreDown(P2PError):
    """The store cannot be reached (or answers nonsense): the request is 503, the replica stays up."""


@dataclass
class Loaded:
    """One user's adapter as the server uses it: tensors and manifest row, or why there is none."""

    adapter: UserAdapter | None = None
    row: dict | None = None
    error: str | None = None  # set when the adapter exists but cannot be used (digest mismatch, missing file)


def classify(exc: StoreError) -> str:
    """NOT_FOUND (no adapter, or the user was deleted), UNAVAILABLE (the storage failed), else BROKEN."""
    if isinstance(exc, AdapterNotFound):
        return NOT_FOUND
    if isinstance(exc, StoreUnavailable):
        return UNAVAILABLE
    return BROKEN  # AdapterCorrupt, StoreDamaged, a row made by another hypernet: this user only


class StoreAccess:
    def __init__(self, uri: str, hypernet_id: str | None = None):
        self.store = AdapterStore(uri, index_in_background=True)  # a new commit never stalls requests
        self.adapters = StoredAdapters(self.store)
        self.uri = uri
        self.hypernet_id = hypernet_id or self._default_hypernet()
        self._deleted: set[str] = set()
        self._deleted_at = -float("inf")
        self._deleted_lock = threading.Lock()

    def _default_hypernet(self) -> str:
        committed = self._call(self.store.current)
        if committed is not None:
            return committed.hypernet_id
        ids = self._call(self.store.hypernet_ids)
        if len(ids) == 1:
            return ids[0]
        raise P2PError(f"{self.uri}: no committed manifest; pass --hypernet (stored: {', '.join(ids) or 'none'})")

    def personalizer(self) -> Personalizer:
        """The served hypernet (loaded once; its encoder only when a history is first embedded)."""
        return self._call(self.adapters.personalizer, self.hypernet_id)

    def load(self, user_id: str) -> Loaded:
        """The user's adapter; a missing one is `Loaded()`, a broken one `Loaded(error=...)`."""
        if self.is_deleted(user_id):
            return Loaded()
        try:
            files, row = self.adapters.read(user_id, self.hypernet_id)
            adapter, _ = adapter_from_files(files)
            return Loaded(adapter, row)
        except StoreError as exc:
            kind = classify(exc)
            if kind == NOT_FOUND:
                return Loaded()
            if kind == BROKEN:
                return Loaded(error=str(exc))
            raise StoreDown(str(exc)) from None

    def row(self, user_id: str) -> dict | None:
        """The manifest or on-demand row the server would use for this user, or None."""
        if self.is_deleted(user_id):
            return None
        try:
            return self._call(self.store.adapter_row, user_id, self.hypernet_id)
        except StoreError:  # an unreadable on-demand record: `load` reports it as this user's broken adapter
            return None

    def write_on_demand(self, user_id: str, files: dict[str, bytes], profile_hash: str,
                        embedding: np.ndarray) -> dict:
        return self._call(self.store.write_on_demand, self.hypernet_id, user_id, files, profile_hash, embedding)

    def history(self, user_id: str) -> list[dict] | None:
        return self._call(self.store.histories.read, user_id)

    def put_history(self, user_id: str, items: list[dict]) -> None:
        self._call(self.store.histories.put, user_id, items)

    def extend_history(self, user_id: str, items: list[dict]) -> tuple[list[dict], int] | None:
        return self._call(self.store.histories.extend, user_id, items)

    def delete(self, user_id: str) -> int:
        """Forget the user in the store (every adapter version, every hypernet); manifest rows removed.

        While a refresh holds the lease the rows cannot be rewritten: the user is tombstoned at once
        (no replica serves them from the next tombstone check, no refresh or build brings them back)
        and the caller retries for the rest (`StoreBusy`).
        """
        try:
            removed = self._call(self.store.delete_users, [user_id], DELETE_WAIT_S)
        except LeaseHeld:
            self._call(self.store.tombstones.add, [user_id])
            self._deleted.add(user_hash(user_id))
            raise StoreBusy("the user is deleted (no longer served), but another job (a refresh or gc) holds the "
                            "store; retry to remove their stored rows") from None
        self._deleted.add(user_hash(user_id))
        return removed

    def is_deleted(self, user_id: str) -> bool:
        """Whether the user is tombstoned, as of at most `TOMBSTONES_RECHECK_S` ago (one listing per period)."""
        with self._deleted_lock:
            if time.monotonic() - self._deleted_at >= TOMBSTONES_RECHECK_S:
                self._deleted = self._call(self.store.tombstones.hashes)
                self._deleted_at = time.monotonic()
            return user_hash(user_id) in self._deleted

    def ping(self) -> None:
        """Fail here, in one line, if the store cannot be read."""
        self._call(self.store.current, self.hypernet_id)

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except StoreError as exc:
            if classify(exc) == UNAVAILABLE:
                raise StoreDown(str(exc)) from None
            raise
        except OSError as exc:  # fsspec errors outside the store's own wrapping (permissions, network)
            raise StoreDown(f"store {self.uri}: {type(exc).__name__}: {exc}") from None
