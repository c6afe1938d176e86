"""The refresh's plan as a distributed join on Ray Data: no process holds more than one partition of users.

    guards: users' ids + the committed layers' keys + tombstones
            -> repartition by user hash -> p2p.store.plan.check_partition -> a row of counts each
            (duplicate ids and the removal guard, before anything is written)
    plan:   profiles (user_id, hash, text) + every stored layer's rows + tombstones
            -> repartition by user hash -> p2p.store.plan.plan_partition -> one row per user to work on

Ray Data's keyed `repartition` hash-shuffles the rows (the shuffle `Dataset.join` runs), so a
user's rows meet in one partition and each partition is planned alone. The driver holds the list
of part files and one row of counts per partition, nothing per user. Only keys travel (about 200
bytes a user) unless the night rewrites every row (compaction) or regenerates adapters from stored
embeddings, when the stored rows travel whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from pyarrow.fs import FSSpecHandler, PyFileSystem

from p2p.data.schemas import DataError, parquet_files
from p2p.errors import P2PError
from p2p.fs import display, storage_options
from p2p.store import AdapterStore
from p2p.store import layout as store_layout
from p2p.store.plan import PlanShape, check_partition, first_duplicate_rows, plan_partition
from pipelines.ray_setup import StoreCredentials, store_remote_args


def arrow_fs(uri: str):
    """A pyarrow filesystem over fsspec, so Ray Data reads s3:// with the same endpoint as the store.

    Its own instance without a listings cache: Ray reuses worker processes, and a listing cached
    by an earlier task would hide the parts written since (FileNotFoundError).
    """
    if not uri.startswith(("s3://", "s3a://")):
        return None
    # The driver's credentials go inside the filesystem object, which Ray Data sends to its read tasks
    # as an argument: a read task gets no runtime env, and a runtime env would show them.
    fs, _ = fsspec.core.url_to_fs(uri, **storage_options(uri), **StoreCredentials.of_driver().options(),
                                  use_listings_cache=False, skip_instance_cache=True)
    return PyFileSystem(FSSpecHandler(fs))


@dataclass
class Checked:
    """What the guards counted: users in the data, committed users, and committed users the data lacks."""

    inputs: int
    committed: int
    removed: int
    partitions: int


class StorePlan:
    """The stored side of a night: the committed run's layers, the dead runs' parts, the tombstones."""

    def __init__(self, store: AdapterStore, committed_layers: list[list[str]],
                 dead_layers: list[list[str]], dim: int, partition_users: int, committed_users: int):
        self.store, self.dim = store, dim
        self.committed_layers, self.dead_layers = committed_layers, dead_layers
        self.partition_users, self.committed_users = partition_users, committed_users

    def partitions(self, users: int) -> int:
        """Enough partitions that each holds about `partition_users` users (two at least, so the join is real)."""
        return max(2, math.ceil(max(users, self.committed_users, 1) / self.partition_users))

    def check(self, users_uri: str) -> Checked:
        """The guards over the data's ids and the committed layers: duplicate ids are an error naming both rows."""
        shape = PlanShape(self.dim, carry=False, profiles=False)
        ids = ray.data.read_parquet(users_uri, columns=["user_id"], include_paths=True, filesystem=arrow_fs(users_uri),
                                    ray_remote_args=store_remote_args())
        ids = ids.map_batches(shape.input_rows, batch_format="pyarrow")
        n = self.partitions(_rows(users_uri))
        rows = self._joined(ids, shape, self.committed_layers, n).map_batches(
            check_partition, fn_kwargs={"committed_layers": len(self.committed_layers)}, batch_size=None,
            batch_format="pyarrow")
        total = {"inputs": 0, "committed": 0, "removed": 0, "duplicated": 0}
        example = None
        for row in rows.iter_rows():
            for k in total:
                total[k] += row[k]
            if not example and row["example"] is not None and len(row["example"]):
                example = list(row["example"])
        if example:
            _raise_duplicate(users_uri, example[0], total["duplicated"])
        return Checked(total["inputs"], total["committed"], total["removed"], n)

    def plan(self, profiles: ray.data.Dataset, users: int, mode: str, full: bool, compact: bool) -> ray.data.Dataset:
        """Each user's decision, partition by partition (p2p.store.plan.plan_partition)."""
        shape = PlanShape(self.dim, carry=compact or mode == "adapters", profiles=True)
        rows = profiles.map_batches(shape.input_rows, batch_format="pyarrow")
        # The memory each planning task reserves: also keeps Ray from fusing the planner into the encoder's
        # actor pool, where partitions would be planned one actor at a time instead of on every CPU.
        memory = self.partition_users * PLAN_BYTES_PER_USER
        return self._joined(rows, shape, self.committed_layers + self.dead_layers, self.partitions(users)).map_batches(
            plan_partition, fn_kwargs={"mode": mode, "committed_layers": len(self.committed_layers), "full": full,
                                       "compact": compact}, batch_size=None, batch_format="pyarrow", memory=memory)

    def _joined(self, users: ray.data.Dataset, shape: PlanShape, layers: list[list[str]], n: int) -> ray.data.Dataset:
        """Tonight's rows with the stored layers' rows and the tombstones, hash-partitioned by user."""
        sides = [users]
        columns = [f.name for f in shape.schema() if f.name in ("user_id", "profile_hash", "sha256", "adapter_uri",
                                                                 "bytes", "created_at", "embedding")]
        for index, parts in enumerate(layers):
            sides.append(self._read(parts, _stored_rows, {"shape": shape, "layer": index, "columns": columns}))
        tombstones = sorted(rel for rel in self.store.objects.list(store_layout.TOMBSTONES) if rel.endswith(".parquet"))
        if tombstones:
            sides.append(self._read(tombstones, _tombstone_rows, {"shape": shape}))
        joined = sides[0].union(*sides[1:]) if len(sides) > 1 else sides[0]
        # Ray coalesces a shuffle's input up to 1 GiB per map task by default: one process would then
        # hold a GiB and more however small the partitions; this bounds it.
        joined.context.shuffle_input_batch_bytes = SHUFFLE_INPUT_BYTES
        return joined.repartition(n, keys=["user_sha256"])

    def _read(self, rels: list[str], fn, kwargs: dict) -> ray.data.Dataset:
        """Store objects read by Ray tasks through the store's own object layer (its endpoint and credentials)."""
        names = ray.data.from_items([{"rel": rel} for rel in rels], override_num_blocks=max(1, len(rels) // PARTS_PER_TASK))
        return names.map_batches(fn, fn_kwargs={"store": self.store.uri, "credentials": StoreCredentials.of_driver(),
                                                **kwargs}, batch_size=PARTS_PER_TASK,
                                 batch_format="pyarrow", **store_remote_args())


PARTS_PER_TASK = 16
SHUFFLE_INPUT_BYTES = 128 * 2**20
PLAN_BYTES_PER_USER = 8_000  # a partition's rows as Arrow and Python values while it is planned, with room to spare


def _stored_rows(batch: pa.Table, store: str, credentials: StoreCredentials, shape: PlanShape, layer: int,
                 columns: list[str]) -> pa.Table:
    credentials.install()
    tables = AdapterStore(store).manifests.read_parts(batch.column("rel").to_pylist(), columns)
    return pa.concat_tables([shape.stored_rows(t, layer) for t in tables])


def _tombstone_rows(batch: pa.Table, store: str, credentials: StoreCredentials, shape: PlanShape) -> pa.Table:
    credentials.install()
    tables = AdapterStore(store).tombstones.read_files(batch.column("rel").to_pylist()).values()
    return pa.concat_tables([shape.tombstone_rows(t) for t in tables])


def _rows(users_uri: str) -> int:
    """Rows in the users data, from the files' footers (no data read)."""
    fs, files = parquet_files(users_uri)
    return sum(pq.read_metadata(path, filesystem=fs).num_rows for path in files)


def _raise_duplicate(users_uri: str, user_id: str, count: int) -> None:
    fs, files = parquet_files(users_uri)
    hits = first_duplicate_rows(fs, files, user_id)
    where = [f"{display(fs, path)} row {row}" for path, row in hits] or ["two files"]
    raise DataError(f"user id {user_id!r} appears twice in the users data: {' and '.join(where)} "
                    f"({count} duplicated id(s) in all); each user must appear once")


def guard_removals(checked: Checked, max_share: float, allowed: bool, source: str) -> int:
    """How many committed users the night drops; more than `max_share` of them is refused unless `allowed`."""
    if checked.committed == 0:
        if checked.inputs == 0:
            raise DataError(f"{source}: the users data has no rows; nothing to refresh")
        return 0
    share = checked.removed / checked.committed
    if share > max_share and not allowed:
        raise P2PError(f"refresh would remove {checked.removed} of {checked.committed} committed users ({share:.0%}, "
                       f"more than max_removed_share {max_share:.0%}): {source} has {checked.inputs} users. If that "
                       f"is intended, rerun with --allow-mass-removal")
    return checked.removed

