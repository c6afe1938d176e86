"""Planning a refresh against the store, with no Ray: input ids, the guards, and each user's decision.

Why here and columnar: at a million users, planning must be one read of the committed manifest
and of the pending run's own parts, then a dict lookup per user, not one store request per user
(the old resume checked each folder: ~95 ms a user on S3, ~26 hours per million).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from p2p.data.schemas import DataError, parquet_files
from p2p.errors import P2PError
from p2p.fs import display
from p2p.store.manifest import manifest_schema
from p2p.store.tombstones import user_hash

# unchanged: the committed row stays.  resumed: a row a dead run of this refresh finished is reused.
# regenerate: same profile, but the row has no folder and this run stores adapters: generate from
# the stored embedding.  embed: new or changed profile.  deleted: tombstoned, left out.
STATUSES = ("unchanged", "resumed", "regenerate", "embed", "deleted")


def read_input_ids(uri: str) -> pa.Table:
    """(user_id, file, row) for every users file, reading only that column; duplicates are an error.

    Ray Data checks each block alone, so an id in two files used to reach two writers and commit a
    row whose digest matched neither folder. The message names both places.
    """
    fs, files = parquet_files(uri)
    tables = []
    for i, path in enumerate(files):
        ids = pq.read_table(path, filesystem=fs, columns=["user_id"]).column("user_id")
        tables.append(pa.table({"user_id": ids.cast(pa.string()), "file": pa.array(np.full(len(ids), i, np.int32)),
                                "row": pa.array(np.arange(len(ids), dtype=np.int64))}))
    table = pa.concat_tables(tables) if tables else pa.table({"user_id": pa.array([], pa.string())})
    counts = pc.value_counts(table.column("user_id").drop_null())
    dup = pc.filter(counts, pc.greater(counts.field("counts"), 1))
    if len(dup):
        value = dup[0]["values"].as_py()
        hits = table.filter(pc.equal(table.column("user_id"), value)).slice(0, 2).to_pylist()
        where = [f"{display(fs, files[h['file']])} row {h['row']}" for h in hits]
        raise DataError(f"user id {value!r} appears twice in the users data: {where[0]} and {where[1]} "
                        f"({len(dup)} duplicated id(s) in all); each user must appear once")
    return table


def check_removals(committed_ids: pa.ChunkedArray | None, input_ids: pa.ChunkedArray, max_share: float,
                   allowed: bool, source: str) -> int:
    """How many committed users the refresh would drop; refuses more than `max_share` unless `allowed`."""
    if committed_ids is None or len(committed_ids) == 0:
        if len(input_ids) == 0:
            raise DataError(f"{source}: the users data has no rows; nothing to refresh")
        return 0
    removed = len(committed_ids) - pc.sum(pc.is_in(committed_ids, value_set=input_ids.combine_chunks()
                                                   if isinstance(input_ids, pa.ChunkedArray) else input_ids)
                                          ).as_py()
    share = removed / len(committed_ids)
    if share > max_share and not allowed:
        raise P2PError(f"refresh would remove {removed} of {len(committed_ids)} committed users ({share:.0%}, more "
                       f"than max_removed_share {max_share:.0%}): {source} has {len(input_ids)} users. If that is "
                       f"intended, rerun with --allow-mass-removal")
    return removed


class Planner:
    """Decides per user (see STATUSES) and carries the row the decision rests on."""

    def __init__(self, previous: pa.Table | None, resumable: pa.Table | None, deleted: set[str], mode: str):
        sources = [t for t in (previous, resumable) if t is not None and len(t)]
        dim = _dim(sources)
        self.schema = manifest_schema(dim)
        # One contiguous copy: `take` on a list column of thousands of chunks concatenates them on
        # every call (0.1 s a block at 200k users), on one chunk it is microseconds.
        self.sources = (pa.concat_tables([t.select(self.schema.names).cast(self.schema) for t in sources])
                        .combine_chunks() if sources else self.schema.empty_table())
        n_prev = 0 if previous is None else len(previous)
        ids = self.sources.column("user_id").to_pylist()
        self._previous = {uid: i for i, uid in enumerate(ids[:n_prev])}
        self._resumable = _agreeing(self.sources, ids, n_prev)
        self._hashes = self.sources.column("profile_hash").to_pylist()
        self._folders = self.sources.column("adapter_uri").is_valid().to_pylist()
        self.deleted, self.mode = deleted, mode

    def plan(self, user_ids: list[str], profile_hashes: list[str]) -> tuple[list[str], pa.Table]:
        """(status per user, the carried row per user: manifest schema, null where none)."""
        status, take = [], []
        for uid, phash in zip(user_ids, profile_hashes, strict=True):
            if self.deleted and uid is not None and user_hash(uid) in self.deleted:
                status.append("deleted")
                take.append(None)
                continue
            prev = self._previous.get(uid)
            source = prev if prev is not None and self._hashes[prev] == phash else None
            resumed = False
            if source is None and (r := self._resumable.get(uid)) is not None and self._hashes[r] == phash:
                source, resumed = r, True
            if source is None:
                status.append("embed")
                take.append(prev)  # kept if making this user's new adapter fails: no data lost
            elif self.mode == "adapters" and not self._folders[source]:
                status.append("regenerate")
                take.append(source)
            else:
                status.append("resumed" if resumed else "unchanged")
                take.append(source)
        return status, self.sources.take(pa.array(take, pa.int64()))


def _dim(tables: list[pa.Table]) -> int:
    for t in tables:
        typ = t.schema.field("embedding").type
        if pa.types.is_fixed_size_list(typ):
            return typ.list_size
    return 1


def _agreeing(sources: pa.Table, ids: list[str], start: int) -> dict[str, int]:
    """user -> row among the resumable rows (from `start`), for users whose rows all agree.

    A block retried after its part was written can leave two parts for one user; if their
    digests differ, no one can tell which folder bytes are on disk, so that user is redone.
    """
    digests = sources.column("sha256").to_pylist()
    out: dict[str, int] = {}
    conflicted = set()
    for i in range(start, len(ids)):
        uid = ids[i]
        if uid in out and digests[out[uid]] != digests[i]:
            conflicted.add(uid)
        out.setdefault(uid, i)
    for uid in conflicted:
        del out[uid]
    return out
