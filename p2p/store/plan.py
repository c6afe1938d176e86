"""Planning a refresh one partition of users at a time, with no Ray: the guards and each user's decision.

The refresh (pipelines/refresh_plan.py) hash-partitions three kinds of rows by the hash of the
user's id, so that a tombstone, which holds only that hash, lands beside the user it deletes:
- INPUT: one per row of tonight's users data;
- STORED: every row of the hypernet's stored layers: the committed run's layers, oldest first,
  then each dead run's parts (rows a crashed refresh finished, which a rerun reuses);
- TOMBSTONE: one per deleted user.
Each partition is planned alone (`check_partition` for the guards, before anything is written;
`plan_partition` for the decisions), so no process holds more than its partition. The planner
before this held the whole committed manifest in one actor: 5.6 GB at a million users.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from p2p.data.schemas import embedding_type
from p2p.store.manifest import REMOVED
from p2p.store.tombstones import user_hash

INPUT, STORED, TOMBSTONE = 0, 1, 2

# unchanged: the stored row stays.  resumed: a row a dead run of this refresh finished is reused.
# regenerate: same profile, but the row has no folder and this run stores adapters: generate from
# the stored embedding.  embed: new or changed profile.  deleted: tombstoned, left out.
# removed: stored, absent from tonight's data: dropped (a removal row, or left out of a compaction).
STATUSES = ("unchanged", "resumed", "regenerate", "embed", "deleted", "removed")
CARRIED = ["adapter_uri", "profile_hash", "sha256", "bytes", "created_at", "embedding"]
PROFILE_COLUMNS = [("profile_text", pa.string()), ("features", pa.list_(pa.float32())), ("updated_at", pa.int64()),
                   ("t_profile", pa.float64())]


@dataclass(frozen=True)
class PlanShape:
    """Which columns the partitioned rows carry.

    `carry`: the stored rows' embeddings, sizes and times travel with them: a compaction rewrites
    every row, and an adapters run may regenerate folders from stored embeddings. Without it only
    keys move (about 200 bytes a user), and the rows that stay are not touched at all.
    `profiles`: tonight's profile text and features (the plan, not the guards).
    """

    dim: int
    carry: bool
    profiles: bool

    def schema(self) -> pa.Schema:
        fields = [("user_sha256", pa.string()), ("kind", pa.int8()), ("user_id", pa.string()), ("path", pa.string()),
                  ("layer", pa.int32()), ("profile_hash", pa.string()), ("sha256", pa.string()),
                  ("adapter_uri", pa.string())]
        if self.carry:
            fields += [("bytes", pa.int64()), ("created_at", pa.int64()), ("embedding", embedding_type(self.dim))]
        if self.profiles:
            fields += PROFILE_COLUMNS
        return pa.schema(fields)

    def rows(self, kind: int, columns: dict[str, pa.Array | list], n: int) -> pa.Table:
        """A table of this shape: `columns` given, the rest null."""
        schema = self.schema()
        given = {**columns, "kind": np.full(n, kind, np.int8)}

        def column(f: pa.Field):
            value = given.get(f.name)
            if value is None:
                return pa.nulls(n, f.type)
            return value.cast(f.type) if isinstance(value, (pa.Array, pa.ChunkedArray)) else pa.array(value, f.type)

        arrays = [column(f) for f in schema]
        return pa.Table.from_arrays(arrays, schema=schema)

    def input_rows(self, batch: pa.Table) -> pa.Table:
        """Tonight's users: (user_id, path) for the guards, or the profile stage's output for the plan."""
        batch = batch.filter(pc.is_valid(batch.column("user_id")))  # a null id is named by the profile stage
        ids = batch.column("user_id").to_pylist()
        columns = {c: batch.column(c) for c in ("user_id", "path", "profile_hash", *dict(PROFILE_COLUMNS))
                   if c in batch.column_names}
        columns["user_sha256"] = [user_hash(u) for u in ids]
        return self.rows(INPUT, columns, len(batch))

    def stored_rows(self, part: pa.Table, layer: int) -> pa.Table:
        """Rows of one stored layer's parts."""
        columns = {c: part.column(c) for c in ("user_id", "profile_hash", "sha256", "adapter_uri", "bytes", "created_at",
                                               "embedding") if c in part.column_names}
        columns["user_sha256"] = [user_hash(u) for u in part.column("user_id").to_pylist()]
        columns["layer"] = pa.array(np.full(len(part), layer, np.int32))
        return self.rows(STORED, columns, len(part))

    def tombstone_rows(self, hashes: pa.Table) -> pa.Table:
        return self.rows(TOMBSTONE, {"user_sha256": hashes.column("user_sha256")}, len(hashes))


class _Groups:
    """A partition sorted by user hash, walked one user at a time (kinds mixed within a user)."""

    def __init__(self, rows: pa.Table):
        self.rows = rows.sort_by([("user_sha256", "ascending"), ("kind", "ascending"), ("layer", "ascending")])
        self.hash = self.rows.column("user_sha256").to_pylist()
        self.kind = self.rows.column("kind").to_pylist()
        self.layer = self.rows.column("layer").to_pylist()
        self.sha = self.rows.column("sha256").to_pylist()

    def __iter__(self):
        start, n = 0, len(self.hash)
        for i in range(1, n + 1):
            if i == n or self.hash[i] != self.hash[start]:
                yield start, i
                start = i

    def stored(self, start: int, stop: int, below: int | None = None) -> tuple[int | None, bool]:
        """(index of the user's row in the newest stored layer, or None if none or a removal row; conflicted).

        `below`: only layers under it (the committed layers, for the guard). Rows come sorted by layer.
        """
        top = [i for i in range(start, stop) if self.kind[i] == STORED and (below is None or self.layer[i] < below)]
        if not top:
            return None, False
        newest = [i for i in top if self.layer[i] == self.layer[top[-1]]]
        if len({self.sha[i] for i in newest}) > 1:
            return newest[-1], True  # a retried block that decided twice (even: removed and kept): redo the user
        if self.sha[newest[-1]] == REMOVED:
            return None, False
        return newest[-1], False


def check_partition(rows: pa.Table, committed_layers: int) -> pa.Table:
    """One row of counts: users in the data, duplicated ids (the first, with its files), committed users
    and the committed users absent from the data (the removal guard)."""
    groups = _Groups(rows)
    ids = groups.rows.column("user_id").to_pylist()
    paths = groups.rows.column("path").to_pylist()
    inputs = duplicated = committed = removed = 0
    example: list[str] = []
    for start, stop in groups:
        given = [i for i in range(start, stop) if groups.kind[i] == INPUT]
        inputs += len(given)
        if len(given) > 1:
            duplicated += 1
            if not example:
                example = [ids[given[0]], paths[given[0]], paths[given[1]]]
        row, _ = groups.stored(start, stop, below=committed_layers)
        if row is not None:
            committed += 1
            removed += not given
    return pa.table({"inputs": [inputs], "duplicated": [duplicated], "example": [example], "committed": [committed],
                     "removed": [removed]}, schema=CHECK_SCHEMA)


CHECK_SCHEMA = pa.schema([("inputs", pa.int64()), ("duplicated", pa.int64()), ("example", pa.list_(pa.string())),
                          ("committed", pa.int64()), ("removed", pa.int64())])


def plan_partition(rows: pa.Table, mode: str, committed_layers: int, full: bool, compact: bool) -> pa.Table:
    """Each user's decision (see STATUSES), with the profile columns and the stored row it rests on (`prev_*`).

    `compact`: every user gets a row (the night rewrites them all). Otherwise users that stay as they
    are become one count row per partition (`user_id` null, `n` users), so only the changes move on.
    """
    groups = _Groups(rows)
    table = groups.rows
    ids = table.column("user_id").to_pylist()
    hashes = table.column("profile_hash").to_pylist()
    folders = table.column("adapter_uri").is_valid().to_pylist()
    user_ids, status, given, stored = [], [], [], []
    unchanged, t_unchanged = 0, 0.0
    t_profile = (pc.fill_null(table.column("t_profile"), 0.0).to_pylist() if "t_profile" in table.column_names
                 else [0.0] * len(table))

    def emit(uid, what, i, s):
        user_ids.append(uid)
        status.append(what)
        given.append(i)
        stored.append(s)

    for start, stop in groups:
        inputs = [i for i in range(start, stop) if groups.kind[i] == INPUT]
        deleted = any(groups.kind[i] == TOMBSTONE for i in range(start, stop))
        row, conflicted = groups.stored(start, stop)
        prev = row if row is not None and not conflicted else None
        if not inputs:
            if row is not None:
                emit(ids[row], "removed", None, row)
            continue
        i = inputs[0]  # the guards refused duplicated ids before this ran
        if deleted:
            emit(ids[i], "deleted", i, row)
        elif prev is None or full or hashes[prev] != hashes[i]:
            emit(ids[i], "embed", i, prev)  # prev: kept if making this user's new row fails: no data lost
        elif mode == "adapters" and not folders[prev]:
            emit(ids[i], "regenerate", i, prev)
        elif groups.layer[prev] >= committed_layers:
            emit(ids[i], "resumed", i, prev)
        elif compact:
            emit(ids[i], "unchanged", i, prev)
        else:
            unchanged += 1
            t_unchanged += t_profile[i]
    if unchanged:
        emit(None, "unchanged", None, None)
    out = _output(table, user_ids, status, given, stored)
    counts = np.ones(len(out), np.int64)
    times = np.asarray([t_profile[i] if i is not None else 0.0 for i in given], np.float64)
    if unchanged:
        counts[-1], times[-1] = unchanged, t_unchanged
    out = out.append_column("n", pa.array(counts))
    return out.append_column("t_profile", pa.array(times))


def _output(table: pa.Table, user_ids: list, status: list, given: list, stored: list) -> pa.Table:
    def take(column: str, index: list) -> pa.Array:
        if column not in table.column_names:
            return pa.nulls(len(index), pa.null())
        return table.column(column).take(pa.array(index, pa.int64()))

    columns = {"user_id": pa.array(user_ids, pa.string()), "status": pa.array(status, pa.string())}
    for c in ("profile_text", "features", "profile_hash", "updated_at"):
        if c in table.column_names:
            columns[c] = take(c, given)
    for c in CARRIED:
        columns[f"prev_{c}"] = take(c, stored)
    return pa.table(columns)


def first_duplicate_rows(fs, files: list[str], user_id: str) -> list[tuple[str, int]]:
    """(file, row) of the first two rows holding `user_id`, one file's id column at a time."""
    hits = []
    for path in files:
        ids = pq.read_table(path, filesystem=fs, columns=["user_id"]).column("user_id")
        rows = np.flatnonzero(pc.fill_null(pc.equal(ids, user_id), False).to_numpy(zero_copy_only=False))
        hits += [(path, int(r)) for r in rows]
        if len(hits) >= 2:
            break
    return hits[:2]
