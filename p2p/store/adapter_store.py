"""`AdapterStore`: the one object the rest of p2p uses to read and write the store.

It composes the protocol's parts and adds what is about adapters:
    objects     ObjectStore   atomic / conditional object I/O, storage failures as StoreUnavailable
    runs        RunLog        begin / commit / abandon / current, the pointer files
    manifests   Manifests     manifest parts; ManifestIndex answers "which row is this user's"
    tombstones  Tombstones    deleted users a refresh must not bring back
    histories   Histories     users' histories as the server knows them (the base of events)
    leased()    Lease         one writer of manifests at a time
Deletion (p2p.store.deletion) and garbage collection (p2p.store.gc) are functions over it.

Why reads are shaped this way:
- Adapter folders are per run: a refresh never overwrites a folder a committed manifest points
  at, so a server reading through an older `CURRENT` sees consistent bytes the whole time.
- `p2p.json` is written after a folder's PEFT files and records their digest, profile hash and
  embedding; each manifest row carries the digest and `read_adapter` checks it on every read, so
  a corrupted object is `AdapterCorrupt`, never a silently wrong adapter. Only JSON, Parquet and
  safetensors are read: no pickle.
- A row without a folder (embeddings-only mode) comes back as its row, embedding included:
  turning it into an adapter is the hypernet's work (`p2p.personalize.StoredAdapters`), and the
  store never loads or runs a model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from p2p.model.files import PEFT_FILES
from p2p.store import layout
from p2p.store.deletion import delete_users
from p2p.store.errors import (
    AdapterCorrupt,
    AdapterNotFound,
    StoreDamaged,
    StoreError,
    StoreUnavailable,
    UserDeleted,
)
from p2p.store.histories import Histories
from p2p.store.lease import Lease, lease_holder
from p2p.store.manifest import ManifestIndex, Manifests, embedding_row, row_mode
from p2p.store.objects import ObjectStore
from p2p.store.runs import Committed, RunLog
from p2p.store.tombstones import Tombstones

logger = logging.getLogger(__name__)

MARKER = layout.MARKER
HYPERNET_FILES = layout.HYPERNET_FILES
DEFAULT_LEASE_TTL_S = 120.0
INDEX_RETRY_S = 30.0  # a failed background build of the manifest index is retried this long after


def digest(files: dict[str, bytes]) -> str:
    """sha256 over the PEFT folder: each file's name and sha256, in name order."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}\0{hashlib.sha256(files[name]).hexdigest()}\n".encode())
    return h.hexdigest()


def _commit_key(committed: Committed) -> tuple:
    return committed.hypernet_id, committed.run_id, committed.created_at


class AdapterStore:
    def __init__(self, uri: str, create: bool = False, index_in_background: bool = False):
        """`index_in_background`: when a new commit appears, keep answering from the manifest index
        already held while the new one is built on a thread of its own, and swap it in when ready.
        A server wants this: reading a million-user manifest takes seconds, which every request
        would otherwise wait for after each refresh and each API delete (a delete commits again).
        Its rows are then at most one build behind the store, which is safe for deletes only
        because a server also checks the tombstones on every read (pipelines/serve/store_access.py);
        a command that must see its own commit at once leaves it off."""
        self.uri = uri
        self.objects = ObjectStore(uri, create=create)
        self.fs, self.root = self.objects.fs, self.objects.root
        self.runs = RunLog(self.objects)
        self.manifests = Manifests(self.objects)
        self.tombstones = Tombstones(self.objects)
        self.histories = Histories(self.objects)
        self._index: ManifestIndex | None = None
        self._index_guard = threading.Lock()
        self._index_in_background = index_in_background
        self._index_wanted: tuple | None = None  # the commit readers asked for last (background mode)
        self._index_building: tuple | None = None  # the commit a background build is reading
        self._index_failed: tuple[tuple, float] | None = None  # (commit, when) of the last failed build
        self._held = threading.local()  # each thread its own lease: replicas delete users from many threads

    # --- paths ---------------------------------------------------------------------------------------

    def path(self, *parts: str) -> str:
        return self.objects.path("/".join(parts))

    def url(self, *parts: str) -> str:
        return self.objects.url("/".join(parts))

    def adapter_prefix(self, hypernet_id: str, user_id: str) -> str:
        return layout.adapter_prefix(hypernet_id, user_id)

    def adapter_dir(self, hypernet_id: str, user_id: str, run_id: str) -> str:
        return layout.adapter_dir(hypernet_id, user_id, run_id)

    # --- the lease -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def leased(self, purpose: str, ttl_s: float = DEFAULT_LEASE_TTL_S, wait_s: float = 0.0) -> Iterator[Lease]:
        """Hold the store's lease for a block: commits, deletions and gc inside it use it."""
        lease = Lease(self.objects, purpose, ttl_s=ttl_s, wait_s=wait_s).acquire()
        self._held.lease, self._held.implicit = lease, False
        try:
            yield lease
        finally:
            self._held.lease = None
            lease.release()

    def _held_lease(self, purpose: str, wait_s: float = 60.0) -> Lease:
        """This thread's lease of the enclosing `leased` block, or one taken for this call alone (released after).

        Per thread: a lease shared by the threads of one store object let two concurrent deletes
        reuse one lease, the first release it, and the second rewrite manifests holding none.
        """
        if getattr(self._held, "lease", None) is None:
            self._held.lease = Lease(self.objects, purpose, ttl_s=DEFAULT_LEASE_TTL_S, wait_s=wait_s).acquire()
            self._held.implicit = True
        return self._held.lease

    def _release_implicit(self) -> None:
        if getattr(self._held, "implicit", False) and self._held.lease is not None:
            self._held.lease.release()
            self._held.lease, self._held.implicit = None, False

    # --- hypernets -----------------------------------------------------------------------------------

    def publish_hypernet(self, hypernet_id: str, files: dict[str, bytes]) -> None:
        """Store a checkpoint's files under its id (the caller verified them: p2p.personalize)."""
        for name in HYPERNET_FILES:
            rel = layout.hypernet_file(hypernet_id, name)
            if not self.objects.exists(rel):
                self.objects.write(rel, files[name])

    def has_hypernet(self, hypernet_id: str) -> bool:
        return self.objects.exists(layout.hypernet_file(hypernet_id, HYPERNET_FILES[0]))

    def hypernet_ids(self) -> list[str]:
        return sorted({rel.split("/")[1] for rel in self.objects.list("hypernets") if rel.count("/") >= 2})

    def hypernet_files(self, hypernet_id: str) -> dict[str, bytes]:
        """A stored checkpoint's files ({name: bytes}), for `p2p.personalize.Personalizer.from_store`."""
        try:
            return {name: self.objects.read(layout.hypernet_file(hypernet_id, name)) for name in HYPERNET_FILES}
        except FileNotFoundError:
            raise StoreError(f"hypernet {hypernet_id} not in {self.uri} "
                             f"(stored: {', '.join(self.hypernet_ids()) or 'none'})") from None

    # --- writing adapters ----------------------------------------------------------------------------

    def write_adapters(self, hypernet_id: str, run_id: str, adapters: list[tuple[str, dict[str, bytes], str, np.ndarray]]
                       ) -> list[dict]:
        """Write users' PEFT folders, then their completion records; return their manifest rows.

        `adapters` holds (user_id, files, profile_hash, embedding). Each phase is one batch of
        concurrent atomic writes, and records follow the files they describe.
        """
        rows, payload, markers = [], {}, {}
        now = int(time.time())
        for user_id, files, phash, embedding in adapters:
            rel = layout.adapter_dir(hypernet_id, user_id, run_id)
            payload.update({f"{rel}/{name}": data for name, data in files.items()})
            row = {
                "user_id": user_id, "adapter_uri": rel, "profile_hash": phash, "hypernet_id": hypernet_id,
                "sha256": digest(files), "bytes": sum(len(d) for d in files.values()), "created_at": now,
                "embedding": np.asarray(embedding, np.float32).tolist(),
            }
            markers[f"{rel}/{MARKER}"] = json.dumps(row).encode()
            rows.append(row)
        self.objects.write_many(payload)
        self.objects.write_many(markers)
        return rows

    def write_on_demand(self, hypernet_id: str, user_id: str, files: dict[str, bytes] | None, profile_hash: str,
                        embedding: np.ndarray, readmit: bool = False) -> dict:
        """Store an adapter made now (a user a server met first) beside the committed manifest.

        Idempotent and atomic: the folder is named by its content's digest, so N concurrent builds
        of one profile write one folder, and the record is replaced in one atomic write, so readers
        see the old record or the new one. `files=None` stores the embedding only. A deleted user
        is refused (`UserDeleted`) unless `readmit`. Found by `adapter_row` / `read_adapter` until a
        refresh commits a newer row; superseded folders are removed by `gc`.
        """
        if not readmit and self.tombstones.is_deleted(user_id):
            raise UserDeleted(f"user {user_id!r} was deleted from {self.uri}; re-admit them explicitly")
        if files is None:
            record = embedding_row(user_id, hypernet_id, profile_hash, embedding, int(time.time()))
        else:
            [row] = self.write_adapters(hypernet_id, "ondemand-" + digest(files)[:16],
                                        [(user_id, files, profile_hash, embedding)])
            record = {k: v for k, v in row.items() if k != "embedding"}
        self.objects.write(layout.on_demand_record(hypernet_id, user_id), json.dumps(record).encode())
        if not readmit and self.tombstones.is_deleted(user_id):
            # A delete ran meanwhile. It writes its tombstone before removing anything, so either it
            # removed what was written here, or its tombstone is visible now: undo the write ourselves.
            self.objects.delete(layout.on_demand_record(hypernet_id, user_id))
            self.objects.delete_prefixes([layout.adapter_prefix(hypernet_id, user_id)])
            raise UserDeleted(f"user {user_id!r} was deleted from {self.uri} while their adapter was built")
        return record

    # --- reading adapters ----------------------------------------------------------------------------

    def adapter_row(self, user_id: str, hypernet_id: str | None = None, embedding: bool = False) -> dict | None:
        """The row `read_adapter` would use: the newer of the committed manifest's and an on-demand one.

        `mode` says what it stores ("adapters": a folder; "embeddings": only the embedding, which
        `p2p.store.adapters_from_rows` turns into an adapter); `embedding=True` adds the embedding.
        """
        return self._adapter_row(user_id, hypernet_id, embedding)[0]

    def _adapter_row(self, user_id: str, hypernet_id: str | None, embedding: bool
                     ) -> tuple[dict | None, ManifestIndex | None]:
        """The row, and the manifest index it came from (the one to read its embedding from)."""
        committed = self.current(hypernet_id)
        hid = hypernet_id or (committed.hypernet_id if committed else None)
        row, index = None, None
        if committed is not None:
            index = self._index_of(committed)  # in the background mode, possibly the previous commit's
            row = index.row(user_id)
            if row is not None:
                row = {**row, "source": "manifest", "run_id": index.committed.run_id, "mode": row_mode(row)}
        if hid is not None:
            record = self._on_demand(hid, user_id)
            if record is not None and (row is None or record["created_at"] > row["created_at"]):
                run_id = record["adapter_uri"].rsplit("/", 1)[-1] if record.get("adapter_uri") else "ondemand"
                row = {**record, "source": "on-demand", "run_id": run_id, "mode": row_mode(record)}
        if row is not None and embedding and "embedding" not in row:
            row["embedding"] = self._embedding_of(row, index)
        if row is not None and "embedding" in row:
            row["embedding"] = np.asarray(row["embedding"], np.float32)
        return row, index

    def read_adapter(self, user_id: str, hypernet_id: str | None = None) -> tuple[dict[str, bytes] | None, dict]:
        """One user's PEFT files through the committed manifest (or on-demand record), checked.

        A folder is checked against the row's sha256. An embeddings-only row has no files: it
        comes back as (None, row with its embedding), for the hypernet to turn into an adapter.
        """
        row, index = self._adapter_row(user_id, hypernet_id, embedding=False)
        if row is None:
            raise self._not_found(user_id, hypernet_id)
        if row["mode"] == "embeddings":
            row["embedding"] = self._embedding_of(row, index)
            return None, row
        try:
            files = {name: self.objects.read(f"{row['adapter_uri']}/{name}") for name in PEFT_FILES}
        except FileNotFoundError as exc:
            if self.tombstones.is_deleted(user_id):
                raise UserDeleted(f"user {user_id!r} was deleted from {self.uri}") from None
            raise AdapterCorrupt(f"adapter of user {user_id!r} is missing from {self.uri}: {exc}; "
                                 f"`p2p refresh --full` rewrites it") from None
        if digest(files) != row["sha256"]:
            raise AdapterCorrupt(f"adapter of user {user_id!r} at {self.url(row['adapter_uri'])} fails its sha256 "
                                 f"check (manifest {row['sha256'][:12]}..., files {digest(files)[:12]}...): corrupted; "
                                 f"`p2p refresh --full` rewrites it")
        return files, row

    def embedding(self, user_id: str, hypernet_id: str | None = None) -> np.ndarray | None:
        """A user's stored embedding: enough to regenerate the adapter without the history."""
        row = self.adapter_row(user_id, hypernet_id, embedding=True)
        return None if row is None else row["embedding"]

    # --- manifests and commits -----------------------------------------------------------------------

    def write_manifest_part(self, hypernet_id: str, run_id: str, rows: list[dict], dim: int) -> str | None:
        return self.manifests.write_part(hypernet_id, run_id, rows, dim)

    def begin(self, hypernet_id: str) -> str:
        """A new run id (taking the lease for this run unless inside `leased`)."""
        return self.runs.begin(hypernet_id, self._held_lease(f"run of {hypernet_id}")).run_id

    def commit(self, hypernet_id: str, run_id: str, parts: list[str], users: int, mode: str = "adapters") -> Committed:
        """Make a run the one servers read (see p2p.store.runs)."""
        try:
            committed = self.runs.commit(hypernet_id, run_id, [p for p in parts if p], users,
                                         self._held_lease(f"commit of {hypernet_id}"), mode=mode)
        finally:
            self._release_implicit()
        return committed

    def abandon(self, hypernet_id: str, run_id: str) -> None:
        try:
            self.runs.abandon(hypernet_id, run_id, self._held_lease(f"run of {hypernet_id}"))
        finally:
            self._release_implicit()

    def current(self, hypernet_id: str | None = None) -> Committed | None:
        """The committed run of `hypernet_id` (default: the hypernet committed last), or None."""
        return self.runs.current(hypernet_id)

    def recover(self, hypernet_id: str | None = None) -> list[Committed]:
        """Rewrite unreadable `CURRENT` pointers from the newest complete commit records."""
        hids = [hypernet_id] if hypernet_id else self._manifest_hypernets()
        out = []
        try:
            lease = self._held_lease("recover")
            for hid in hids:
                try:
                    if self.runs.current(hid) is not None:
                        continue
                except (StoreDamaged, StoreUnavailable):  # unreadable, or gone since this object read it
                    pass
                if self.runs.history(hid):
                    out.append(self.runs.recover(hid, lease))
        finally:
            self._release_implicit()
        return out

    def manifest(self, committed: Committed | None, columns: list[str] | None = None) -> pa.Table | None:
        return None if committed is None else self.manifests.read(committed, columns)

    def manifest_rows(self, committed: Committed) -> dict[str, dict]:
        """user_id -> manifest row (without the embedding). Small stores only: `adapter_row` scales."""
        index = self._index_of(committed)
        return {r["user_id"]: r for r in index.table.drop_columns(["part"]).to_pylist()}

    def stat(self, hypernet_id: str | None = None) -> dict:
        if not self.objects.root_exists():
            raise StoreUnavailable(f"no store at {self.uri} (nothing has been written there; mistyped?)")
        committed = self.current(hypernet_id)
        holder = lease_holder(self.objects)
        out = {"store": self.uri, "hypernets": self.hypernet_ids(), "committed": None,
               "lease": holder.describe() if holder else None, "deleted_users": len(self.tombstones.hashes())}
        if committed is not None:
            table = self.manifest(committed, ["bytes", "adapter_uri"])
            out["committed"] = {
                **{k: v for k, v in committed.__dict__.items() if k != "parts"},
                "adapter_bytes": int(pc.sum(table.column("bytes")).as_py() or 0),
                "embeddings_only_users": table.column("adapter_uri").null_count,
                "pending_run": (p.run_id if (p := self.runs.pending(committed.hypernet_id)) else None),
                "commits_kept": len(self.runs.history(committed.hypernet_id)),
            }
        return out

    # --- privacy ---------------------------------------------------------------------------------------

    def delete_users(self, user_ids: list[str], wait_s: float = 60.0) -> int:
        """Delete users completely (see p2p.store.deletion); returns the committed rows removed."""
        try:
            report = delete_users(self, user_ids, self._held_lease("delete-users", wait_s))
        finally:
            self._release_implicit()
        return report.committed_rows_removed

    def is_deleted(self, user_id: str) -> bool:
        return self.tombstones.is_deleted(user_id)

    def deleted_since(self, token: str | None) -> tuple[str | None, set[str]]:
        """(token, sha256 of ids deleted since `token`): a server drops these users from its caches."""
        return self.tombstones.since(token)

    # --- internals -------------------------------------------------------------------------------------

    def forget_index(self) -> None:
        """After rewriting manifest parts in place (a deletion): the next read must not use the held index.

        In the background mode the deletion's new commit already moves readers on (a new key), and
        a server must not wait for the rebuild; elsewhere the index is dropped.
        """
        if not self._index_in_background:
            with self._index_guard:
                self._index = None

    def _index_of(self, committed: Committed) -> ManifestIndex:
        """The index of `committed`; in the background mode, the one held until that one is built."""
        key = _commit_key(committed)
        with self._index_guard:
            index = self._index
            if index is not None and _commit_key(index.committed) == key:
                return index
            if index is None or index.committed.hypernet_id != committed.hypernet_id \
                    or not self._index_in_background:
                index = self._index = ManifestIndex(self.manifests, committed)
                return index
            self._index_wanted = key
            failed = self._index_failed
            retry = failed is None or failed[0] != key or time.monotonic() - failed[1] >= INDEX_RETRY_S
            if self._index_building is None and retry:
                self._index_building = key
                threading.Thread(target=self._build_index, args=(committed,), name="p2p-manifest-index",
                                 daemon=True).start()
            return index

    def _build_index(self, committed: Committed) -> None:
        key = _commit_key(committed)
        try:
            index = ManifestIndex(self.manifests, committed)
        except Exception as exc:  # noqa: BLE001 - the held index keeps serving; a read retries in INDEX_RETRY_S
            logger.warning("building the manifest index of run %s failed (%s); the previous run's index "
                           "answers, and the build is retried in %.0f s", committed.run_id, exc, INDEX_RETRY_S)
            index = None
        with self._index_guard:
            self._index_building = None
            if index is None:
                self._index_failed = (key, time.monotonic())
            elif key == self._index_wanted:  # what readers ask for now (a rollback by `recover` included)
                self._index = index

    def _on_demand(self, hypernet_id: str, user_id: str) -> dict | None:
        try:
            data = self.objects.read(layout.on_demand_record(hypernet_id, user_id))
        except FileNotFoundError:
            return None
        except StoreError as exc:
            if isinstance(exc, StoreUnavailable):
                raise
            return None  # an id with no key (empty) has no record
        try:
            record = json.loads(data)
        except ValueError:
            raise AdapterCorrupt(f"on-demand record of user {user_id!r} in {self.uri} is unreadable; "
                                 f"make the adapter again") from None
        if not isinstance(record, dict) or record.get("user_id") != user_id:
            # Another id's record under this key (`Alice` and `alice` on a case-insensitive disk, a copied
            # object): never serve one user another's adapter.
            raise AdapterCorrupt(f"on-demand record under user {user_id!r} in {self.uri} belongs to another user; "
                                 f"make the adapter again")
        return record

    def _embedding_of(self, row: dict, index: ManifestIndex | None) -> np.ndarray:
        if "embedding" in row:
            return np.asarray(row["embedding"], np.float32)
        if row["source"] == "manifest" and index is not None:
            found = index.embeddings([row["user_id"]])
            if row["user_id"] not in found:  # deleted since the held index was read
                raise self._not_found(row["user_id"], row.get("hypernet_id"))
            return found[row["user_id"]]
        try:
            return np.asarray(json.loads(self.objects.read(f"{row['adapter_uri']}/{MARKER}"))["embedding"], np.float32)
        except (FileNotFoundError, ValueError, KeyError):
            raise AdapterCorrupt(f"the embedding of user {row['user_id']!r} is missing from {self.uri}") from None

    def _not_found(self, user_id: str, hypernet_id: str | None) -> AdapterNotFound:
        if user_id and self.tombstones.is_deleted(user_id):
            return UserDeleted(f"user {user_id!r} was deleted from {self.uri}")
        return AdapterNotFound(f"user {user_id!r} has no adapter in {self.uri}"
                               + (f" for hypernet {hypernet_id}" if hypernet_id else ""))

    def _manifest_hypernets(self) -> list[str]:
        """Hypernets with anything under manifests/ (a commit may outlive its published hypernet)."""
        found = {rel.split("/")[1] for rel in self.objects.list("manifests") if rel.count("/") >= 2}
        return sorted(found | set(self.hypernet_ids()))
