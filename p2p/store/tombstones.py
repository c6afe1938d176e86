"""Tombstones: users deleted for privacy stay deleted until they are explicitly re-admitted.

Why: the nightly data often still holds a deleted user for a while; without a record of the
deletion, the next refresh silently made their adapter again. A refresh skips tombstoned users
unless given `--readmit`.

A tombstone keeps only sha256(user id) and the time: nothing of the profile, the embedding or
the adapter. (A hash of a guessable id can be matched against a list of ids; it says "this id
was deleted", which the store must know to honour the deletion.) One Parquet file per
deletion, named by time, so a server can ask for the deletions since the last file it read.
"""

from __future__ import annotations

import hashlib
import io
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from p2p.store import layout
from p2p.store.manifest import encode
from p2p.store.objects import ObjectStore
from p2p.store.runs import new_run_id

SCHEMA = pa.schema([pa.field("user_sha256", pa.string(), nullable=False),
                    pa.field("deleted_at", pa.int64(), nullable=False)])


def user_hash(user_id: str) -> str:
    return hashlib.sha256(user_id.encode("utf-8", "surrogatepass")).hexdigest()


class Tombstones:
    def __init__(self, objects: ObjectStore):
        self.objects = objects
        self._files: dict[str, frozenset[str]] = {}  # file -> hashes; files are never rewritten in place

    def add(self, user_ids: list[str]) -> str | None:
        """Record a deletion; returns the new tombstone file (None for no ids)."""
        hashes = sorted({user_hash(u) for u in user_ids})
        if not hashes:
            return None
        rel = f"{layout.TOMBSTONES}/{new_run_id()}.parquet"
        table = pa.table({"user_sha256": hashes, "deleted_at": [int(time.time())] * len(hashes)}, schema=SCHEMA)
        self.objects.write(rel, encode(table))
        self._files[rel] = frozenset(hashes)
        return rel

    def hashes(self) -> set[str]:
        """Every tombstoned user's id hash (new files read once, then cached)."""
        return set().union(*self._load().values())

    def is_deleted(self, user_id: str) -> bool:
        return any(user_hash(user_id) in h for h in self._load().values())

    def since(self, token: str | None) -> tuple[str | None, set[str]]:
        """(new token, id hashes tombstoned after `token`): what a server evicts from its caches."""
        files = self._load()
        newer = sorted(f for f in files if token is None or f > token)
        return (newer[-1] if newer else token), set().union(*(files[f] for f in newer))

    def readmit(self, user_ids: list[str]) -> int:
        """Lift the tombstones of these users (a file left empty goes); returns how many were lifted."""
        wanted = {user_hash(u) for u in user_ids}
        lifted = 0
        for rel, hashes in sorted(self._load().items()):
            hit = hashes & wanted
            if not hit:
                continue
            table = pq.read_table(io.BytesIO(self.objects.read(rel)))
            kept = table.filter(pc.invert(pc.is_in(table.column("user_sha256"), pa.array(sorted(hit), pa.string()))))
            if len(kept):
                new_rel = f"{layout.TOMBSTONES}/{rel.rsplit('/', 1)[-1][:-len('.parquet')]}-r{new_run_id()}.parquet"
                self.objects.write(new_rel, encode(kept))
                self._files[new_rel] = frozenset(kept.column("user_sha256").to_pylist())
            self.objects.delete(rel)
            del self._files[rel]
            lifted += len(hit)
            wanted -= hit
        return lifted

    def _load(self) -> dict[str, frozenset[str]]:
        listed = {rel for rel in self.objects.list(layout.TOMBSTONES) if rel.endswith(".parquet")}
        for rel in set(self._files) - listed:
            del self._files[rel]
        new = sorted(listed - set(self._files))
        for rel, table in self.read_files(new).items():
            self._files[rel] = frozenset(table.column("user_sha256").to_pylist())
        return self._files

    def read_files(self, rels: list[str]) -> dict[str, pa.Table]:
        """The `user_sha256` column of each tombstone file still there (the refresh's plan reads them in tasks)."""
        return {rel: pq.read_table(io.BytesIO(data), columns=["user_sha256"])
                for rel, data in self.objects.read_many(rels).items()}
