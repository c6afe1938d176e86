"""Users' histories as the server knows them: the base that new events (`POST .../events`) extend.

Why: an update in seconds needs the user's whole history at hand, and the nightly data is a table
nobody reads per user. A record is one JSON object per user (`histories/<shard>/<key>.json`),
written by an adapter build (the history it was built from) and extended by events. Extending is
a merge by `item_id` under a conditional write (retried when another writer moved it on), so
concurrent events for one user from any replicas all land, and an event sent twice lands once.
The nightly refresh unions each recorded history into the data's before profiling
(pipelines/refresh.py), so an event is never undone by a night whose data predates it.
A deleted user's record is deleted with them (p2p/store/deletion.py).
"""

from __future__ import annotations

import json
import time

from p2p.store import layout
from p2p.store.errors import StoreError
from p2p.store.objects import ObjectStore
from p2p.userkey import user_key

RETRIES = 20


def merged(base: list[dict], new: list[dict]) -> tuple[list[dict], int]:
    """(base + the items of `new` whose item_id it lacks, in order; how many were added)."""
    seen = {item["item_id"] for item in base}
    added = []
    for item in new:
        if item["item_id"] not in seen:
            seen.add(item["item_id"])
            added.append(item)
    return base + added, len(added)


class Histories:
    def __init__(self, objects: ObjectStore):
        self.objects = objects

    def read(self, user_id: str) -> list[dict] | None:
        found = self.objects.read_versioned(layout.history_record(user_id))
        return None if found is None else self._items(found[0], user_id)

    def put(self, user_id: str, items: list[dict]) -> None:
        """Replace the user's record (an adapter build from a whole history)."""
        self.objects.write(layout.history_record(user_id), self._encode(user_id, items))

    def extend(self, user_id: str, items: list[dict]) -> tuple[list[dict], int] | None:
        """Merge `items` into the record: (the whole history now, items added), or None when there is no record."""
        rel = layout.history_record(user_id)
        for _ in range(RETRIES):
            found = self.objects.read_versioned(rel)
            if found is None:
                return None
            history, added = merged(self._items(found[0], user_id), items)
            if not added:
                return history, 0
            if self.objects.replace(rel, self._encode(user_id, history), found[1]) is not None:
                return history, added
        raise StoreError(f"the history of user {user_id!r} kept changing under {RETRIES} attempts to extend it")

    def keys(self) -> set[str]:
        """The store keys of every user with a record (one listing): what a refresh merges."""
        return {rel.rsplit("/", 1)[-1].removesuffix(".json") for rel in self.objects.list(layout.HISTORIES)
                if rel.endswith(".json")}

    def delete(self, user_id: str) -> bool:
        return self.objects.delete(layout.history_record(user_id))

    @staticmethod
    def has(keys: set[str], user_id: str) -> bool:
        return user_key(user_id) in keys

    @staticmethod
    def _encode(user_id: str, items: list[dict]) -> bytes:
        return json.dumps({"user_id": user_id, "items": items, "updated_at": int(time.time())}).encode()

    @staticmethod
    def _items(data: bytes, user_id: str) -> list[dict]:
        try:
            record = json.loads(data)
        except ValueError:
            raise StoreError(f"the history record of user {user_id!r} is unreadable") from None
        if record.get("user_id") != user_id:  # another id under this key (case-folding disk, a copied object)
            raise StoreError(f"the history record under user {user_id!r} belongs to another user")
        return list(record["items"])
