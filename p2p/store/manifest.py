"""Manifest rows and parts: what a run commits for each user, and how readers look a user up.

A row is one user under one hypernet: profile hash, embedding, and either an adapter folder
(`adapter_uri`, `sha256` of its files, `bytes`) or, in embeddings-only mode, no folder at all
(`adapter_uri` null, `sha256` of the embedding, `bytes` 0): the adapter is a pure function of the
embedding, made by the hypernet when a server first needs it.

Layers. A committed run lists its parts oldest layer first (`Committed.layers`): the parts an
earlier night wrote, then each later night's parts. A night writes only the users that changed,
and a removal row (`sha256` REMOVED) for each user it drops, so its bytes grow with the changes,
not with the users; the newest layer holding a user decides (`resolve`). A refresh rewrites
everything into one layer every `max_layers` nights (compaction), or when the mode changes.
"""

from __future__ import annotations

import hashlib
import io
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from p2p.data.schemas import Contract, embedding_type, required, validate
from p2p.store import layout
from p2p.store.errors import AdapterCorrupt, StoreDamaged, StoreError
from p2p.store.objects import ObjectStore
from p2p.store.runs import Committed

ROW_COLUMNS = ["user_id", "adapter_uri", "profile_hash", "hypernet_id", "sha256", "bytes", "created_at"]
REMOVED = ""  # the sha256 of a removal row: the user is gone from this layer on (a real digest is 64 hex digits)


def manifest_schema(dim: int) -> pa.Schema:
    """One row per user of a committed run.

    `adapter_uri` is null for a user stored as an embedding only (embeddings-only mode); `sha256`
    is then the digest of the embedding and `bytes` is 0.
    """
    return pa.schema([required("user_id"), pa.field("adapter_uri", pa.string()),
                      *(required(name) for name in ("profile_hash", "hypernet_id", "sha256")),
                      required("bytes", pa.int64()), required("created_at", pa.int64()),
                      required("embedding", embedding_type(dim))])


MANIFEST = Contract("manifest", manifest_schema, ("user_id",))


def embedding_digest(embedding) -> str:
    """sha256 of the embedding as little-endian float32: an embeddings-only row's checksum."""
    return hashlib.sha256(np.ascontiguousarray(embedding, dtype="<f4").tobytes()).hexdigest()


def embedding_row(user_id: str, hypernet_id: str, profile_hash: str, embedding, created_at: int) -> dict:
    return {"user_id": user_id, "adapter_uri": None, "profile_hash": profile_hash, "hypernet_id": hypernet_id,
            "sha256": embedding_digest(embedding), "bytes": 0, "created_at": int(created_at),
            "embedding": np.asarray(embedding, np.float32).tolist()}


def as_embedding_row(row: dict) -> dict:
    """An adapter row carried into an embeddings-only run: same user, embedding and profile, no folder."""
    if row["adapter_uri"] is None:
        return row
    return embedding_row(row["user_id"], row["hypernet_id"], row["profile_hash"], row["embedding"], row["created_at"])


def removal_rows(user_ids: list[str], hypernet_id: str, dim: int, created_at: int) -> list[dict]:
    """Rows saying "gone from this layer on" (an all-zero embedding: a few bytes in Parquet)."""
    zeros = [0.0] * dim
    return [{"user_id": uid, "adapter_uri": None, "profile_hash": REMOVED, "hypernet_id": hypernet_id,
             "sha256": REMOVED, "bytes": 0, "created_at": int(created_at), "embedding": zeros} for uid in user_ids]


def resolve(table: pa.Table) -> pa.Table:
    """Each user's row from the newest layer holding one, removal rows dropped; `table` is in layer order.

    Within a layer a user has one row, or (a dead run's block retried) two rows with the same digest;
    the refresh redoes a user whose retried rows disagree, in a newer layer.
    """
    if len(table) == 0:
        return table
    order = pa.table({"user_id": table.column("user_id"), "i": pa.array(np.arange(len(table), dtype=np.int64))})
    last = order.group_by("user_id", use_threads=False).aggregate([("i", "max")]).column("i_max").to_numpy()
    latest = table.take(pa.array(np.sort(last)))
    return latest.filter(pc.not_equal(latest.column("sha256"), REMOVED))


def row_mode(row: dict) -> str:
    """What a row stores: "adapters" (a PEFT folder) or "embeddings" (only the embedding)."""
    return "adapters" if row.get("adapter_uri") else "embeddings"


def check_embedding_rows(rows: list[dict], hypernet_id: str, dim: int) -> np.ndarray:
    """The rows' embeddings as one (n, dim) float32 matrix, each checked against its row."""
    matrix = np.zeros((len(rows), dim), np.float32)
    for i, row in enumerate(rows):
        uid = row.get("user_id")
        if row.get("hypernet_id") != hypernet_id:
            raise StoreError(f"user {uid!r}: row made for hypernet {row.get('hypernet_id')}, not {hypernet_id}; "
                             f"load that hypernet, or refresh the store for this one")
        emb = row.get("embedding")
        if emb is None:
            raise StoreError(f"user {uid!r}: row has no embedding (read it with adapter_row(..., embedding=True))")
        emb = np.asarray(emb, np.float32).reshape(-1)
        if emb.shape[0] != dim:
            raise AdapterCorrupt(f"user {uid!r}: embedding has {emb.shape[0]} values, hypernet expects {dim}")
        if row.get("adapter_uri") is None and embedding_digest(emb) != row.get("sha256"):
            raise AdapterCorrupt(f"user {uid!r}: embedding fails its sha256 check (manifest "
                                 f"{str(row.get('sha256'))[:12]}..., stored {embedding_digest(emb)[:12]}...): corrupted")
        matrix[i] = emb
    return matrix


class Manifests:
    """Reads and writes manifest parts (Parquet) through the object layer."""

    def __init__(self, objects: ObjectStore):
        self.objects = objects

    def write_part(self, hypernet_id: str, run_id: str, rows: list[dict] | pa.Table, dim: int) -> str | None:
        """One Parquet part of a run's manifest; its path relative to the root (None for no rows)."""
        table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=manifest_schema(dim))
        if len(table) == 0:
            return None
        table = validate(table, MANIFEST, "manifest part")
        rel = f"{layout.run_dir(hypernet_id, run_id)}/part-{uuid.uuid4().hex}.parquet"
        self.objects.write(rel, encode(table))
        return rel

    def read(self, committed: Committed, columns: list[str] | None = None, with_part: bool = False) -> pa.Table:
        """The committed manifest, one row per user (optionally only `columns`; `with_part`: each row's part index)."""
        # one layer of the run's own parts has one row per user; anything else (layers, or a dead run's
        # parts reused, where a retried block may have left a user twice) is resolved
        layered = any(layout.run_of_part(p) != committed.run_id for p in committed.parts)
        wanted = columns if columns is None or not layered else [*dict.fromkeys([*columns, "user_id", "sha256"])]
        tables = self.read_parts(committed.parts, wanted, what=f"run {committed.run_id}")
        if with_part:
            tables = [t.append_column("part", pa.array(np.full(len(t), i, np.int32))) for i, t in enumerate(tables)]
        if not tables:
            empty = manifest_schema(1).empty_table()
            empty = empty.select(columns) if columns else empty
            return empty.append_column("part", pa.array([], pa.int32())) if with_part else empty
        table = pa.concat_tables(tables)
        if layered:
            table = resolve(table)
            if columns is not None:
                table = table.select([*columns, "part"] if with_part else columns)
        return table

    def read_parts(self, rels: list[str], columns: list[str] | None = None, what: str = "manifest") -> list[pa.Table]:
        """Parts in order, read concurrently; a missing or unreadable one is StoreDamaged."""
        def load(rel: str) -> pa.Table:
            table = self.read_part(rel, columns, what)
            if table is None:
                raise StoreDamaged(f"manifest part {rel} of {what} is missing from {self.objects.uri}; "
                                   f"`p2p store recover` serves the newest complete commit, "
                                   f"`p2p refresh --full` rebuilds the manifest")
            return table

        with ThreadPoolExecutor(max_workers=4 if self.objects.local else 16) as pool:
            return list(pool.map(load, rels))

    def read_part(self, rel: str, columns: list[str] | None = None, what: str = "manifest") -> pa.Table | None:
        """One part (None when missing), cast to the manifest schema."""
        try:
            if self.objects.local:
                table = pq.read_table(self.objects.path(rel), columns=columns)
            else:
                table = pq.read_table(io.BytesIO(self.objects.read(rel)), columns=columns)
        except FileNotFoundError:
            return None
        except (pa.ArrowInvalid, OSError) as exc:
            raise StoreDamaged(f"manifest part {rel} of {what} in {self.objects.uri} is unreadable ({exc}); "
                               f"`p2p refresh --full` rebuilds the manifest") from None
        return conform(table)


def encode(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def conform(table: pa.Table) -> pa.Table:
    """Cast a part to the manifest schema (older parts declared adapter_uri non-null)."""
    embedding = table.schema.field("embedding").type if "embedding" in table.column_names else None
    dim = embedding.list_size if embedding is not None and pa.types.is_fixed_size_list(embedding) else 1
    target = pa.schema([manifest_schema(dim).field(name) for name in table.column_names])
    return table if table.schema.equals(target) else table.cast(target)


class ManifestIndex:
    """One committed manifest held for lookups, without its embeddings.

    At 1M users the columns and the user -> position dict take a few hundred MB; the embeddings
    (1.5 GB at 384-d float32) stay in their parts and are read a part at a time when asked for.
    """

    def __init__(self, manifests: Manifests, committed: Committed, cached_parts: int = 8):
        self.manifests, self.committed = manifests, committed
        self.table = manifests.read(committed, ROW_COLUMNS, with_part=True)
        self._position = {uid: i for i, uid in enumerate(self.table.column("user_id").to_pylist())}
        self._parts: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._cached_parts = cached_parts

    def __len__(self) -> int:
        return len(self._position)

    def __contains__(self, user_id: str) -> bool:
        return user_id in self._position

    def row(self, user_id: str) -> dict | None:
        i = self._position.get(user_id)
        if i is None:
            return None
        row = self.table.slice(i, 1).to_pylist()[0]
        row.pop("part")
        return row

    def embeddings(self, user_ids: list[str]) -> dict[str, np.ndarray]:
        """Each user's stored embedding, one part read per part needed (recent parts cached)."""
        parts = self.table.column("part")
        out = {}
        for uid in user_ids:
            i = self._position.get(uid)
            if i is None:
                continue
            part = self._part(parts[i].as_py())
            if uid in part:  # else its part was rewritten without it since this index was read (a deletion)
                out[uid] = part[uid]
        return out

    def _part(self, index: int) -> dict[str, np.ndarray]:
        if index not in self._parts:
            rel = self.committed.parts[index]
            [table] = self.manifests.read_parts([rel], ["user_id", "embedding"], what=f"run {self.committed.run_id}")
            emb = table.column("embedding").combine_chunks()
            matrix = emb.values.to_numpy(zero_copy_only=False).reshape(len(table), -1)
            self._parts[index] = dict(zip(table.column("user_id").to_pylist(), matrix, strict=True))
            while len(self._parts) > self._cached_parts:
                self._parts.popitem(last=False)
        self._parts.move_to_end(index)
        return self._parts[index]
