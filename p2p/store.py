"""The adapter store: hypernets, one PEFT folder per user, and manifests committed by `CURRENT`.

Layout under a root URI (a path, `file://...` or `s3://bucket/prefix`), DESIGN section 5:

    hypernets/<hid>/{config.json, model.safetensors}
    adapters/<hid>/<shard>/<user key>/<run_id>/{adapter_config.json, adapter_model.safetensors, p2p.json}
    manifests/<hid>/<run_id>.parquet/part-*.parquet     one row per user (manifest schema)
    manifests/<hid>/PENDING    the run being written: a rerun after a crash resumes it
    manifests/<hid>/CURRENT    the committed run and its exact part files; written last
    manifests/CURRENT          the hypernet committed most recently (what a server uses by default)

Why these choices:
- Adapter folders are per run: a refresh never overwrites a folder that the committed manifest
  points at, so servers reading through the old `CURRENT` see consistent bytes the whole time.
- `p2p.json` is written after the PEFT files and records their digest, the profile hash and the
  embedding. A rerun after a crash reuses a folder only when its files hash to that digest.
- Each manifest row carries the adapter's digest; `read_adapter` checks it on every read, so a
  corrupted object is an error, never a silently wrong adapter. Only JSON and safetensors are read.
- `CURRENT` lists its part files explicitly: stray parts of a dead run are never read.
- User ids become keys through `p2p.userkey` (no `/`, `..` or control characters reach a path);
  the two-hex-digit shard prefix spreads keys, since S3 limits request rates per prefix.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
import time
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from p2p.data.schemas import manifest_schema, validate
from p2p.errors import P2PError
from p2p.fs import display, filesystem
from p2p.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from p2p.userkey import shard_of, user_key

MARKER = "p2p.json"
HYPERNET_FILES = ("config.json", "model.safetensors")


class StoreError(P2PError):
    """The store is unreachable, incomplete or holds bytes that fail their digest."""


class AdapterNotFound(StoreError):
    """The committed manifest has no adapter for this user."""


def digest(files: dict[str, bytes]) -> str:
    """sha256 over the PEFT folder: each file's name and sha256, in name order."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}\0{hashlib.sha256(files[name]).hexdigest()}\n".encode())
    return h.hexdigest()


def new_run_id() -> str:
    """Sortable by time, unique across concurrent writers."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


@dataclass
class Committed:
    """What `CURRENT` says: the run whose manifest servers read."""

    hypernet_id: str
    run_id: str
    parts: list[str]
    users: int
    created_at: int


class AdapterStore:
    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.root = filesystem(uri)
        self.root = self.root.rstrip("/")
        self._manifests: dict[tuple[str, str], dict[str, dict]] = {}

    # --- paths ---------------------------------------------------------------------------------

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def url(self, *parts: str) -> str:
        return display(self.fs, self.path(*parts))

    def adapter_prefix(self, hypernet_id: str, user_id: str) -> str:
        """Every version of one user's adapter under one hypernet, relative to the root."""
        return f"adapters/{hypernet_id}/{shard_of(user_id)}/{user_key(user_id)}"

    def adapter_dir(self, hypernet_id: str, user_id: str, run_id: str) -> str:
        return f"{self.adapter_prefix(hypernet_id, user_id)}/{run_id}"

    def _cat(self, rel: str) -> bytes:
        try:
            return self.fs.cat_file(self.path(rel))
        except FileNotFoundError:
            raise
        except Exception as exc:  # network, credentials, endpoint: name the store, keep one line
            raise StoreError(f"store {self.uri} unreachable reading {rel}: {type(exc).__name__}: {exc}") from None

    def _put(self, rel: str, data: bytes) -> None:
        path = self.path(rel)
        parent = path.rsplit("/", 1)[0]
        try:
            self.fs.makedirs(parent, exist_ok=True)
            self.fs.pipe_file(path, data)
        except Exception as exc:
            raise StoreError(f"store {self.uri} unreachable writing {rel}: {type(exc).__name__}: {exc}") from None

    def _json(self, rel: str) -> dict | None:
        self.fs.invalidate_cache()
        try:
            return json.loads(self._cat(rel))
        except FileNotFoundError:
            return None

    # --- hypernets -----------------------------------------------------------------------------

    def publish_hypernet(self, folder: str) -> str:
        """Copy a checkpoint folder into the store (verified first); return its hypernet_id."""
        from p2p.hypernet import load_hypernet

        _, hid = load_hypernet(folder)
        for name in HYPERNET_FILES:
            rel = f"hypernets/{hid}/{name}"
            if not self.fs.exists(self.path(rel)):
                with open(os.path.join(folder, name), "rb") as f:
                    self._put(rel, f.read())
        return hid

    def resolve_hypernet(self, hypernet: str) -> str:
        """A checkpoint folder (published on the way) or the id of a hypernet already stored."""
        if os.path.isdir(hypernet):
            return self.publish_hypernet(hypernet)
        if self.fs.exists(self.path(f"hypernets/{hypernet}/config.json")):
            return hypernet
        raise StoreError(f"{hypernet!r} is neither a checkpoint folder nor a hypernet in {self.uri} "
                         f"(stored: {', '.join(self.hypernet_ids()) or 'none'})")

    def hypernet_ids(self) -> list[str]:
        try:
            return sorted(p.rsplit("/", 1)[-1] for p in self.fs.ls(self.path("hypernets"), detail=False))
        except FileNotFoundError:
            return []

    def load_hypernet(self, hypernet_id: str, device: str = "cpu"):
        """(Hypernetwork, hypernet_id), its content hash checked against the id it is stored under."""
        from p2p.hypernet import load_hypernet

        with tempfile.TemporaryDirectory() as tmp:
            for name in HYPERNET_FILES:
                try:
                    data = self._cat(f"hypernets/{hypernet_id}/{name}")
                except FileNotFoundError:
                    raise StoreError(f"hypernet {hypernet_id} not in {self.uri}") from None
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(data)
            model, hid = load_hypernet(tmp, device=device)
        if hid != hypernet_id:
            raise StoreError(f"hypernet {hypernet_id} in {self.uri} hashes to {hid}: corrupted")
        return model, hid

    # --- adapters ------------------------------------------------------------------------------

    def write_adapters(self, hypernet_id: str, run_id: str, adapters: list[tuple[str, dict[str, bytes], str, np.ndarray]]
                       ) -> list[dict]:
        """Write users' PEFT folders, then their completion records; return their manifest rows.

        `adapters` holds (user_id, files, profile_hash, embedding). Each phase is one concurrent
        `pipe` (s3fs uploads the objects in parallel), and records follow the files they describe.
        """
        rows, payload, markers = [], {}, {}
        now = int(time.time())
        for user_id, files, phash, embedding in adapters:
            rel = self.adapter_dir(hypernet_id, user_id, run_id)
            payload.update({self.path(f"{rel}/{name}"): data for name, data in files.items()})
            row = {
                "user_id": user_id, "adapter_uri": rel, "profile_hash": phash, "hypernet_id": hypernet_id,
                "sha256": digest(files), "bytes": sum(len(d) for d in files.values()), "created_at": now,
                "embedding": np.asarray(embedding, np.float32).tolist(),
            }
            markers[self.path(f"{rel}/{MARKER}")] = json.dumps(row).encode()
            rows.append(row)
        self._pipe(payload)
        self._pipe(markers)
        return rows

    def _pipe(self, objects: dict[str, bytes]) -> None:
        if not objects:
            return
        try:
            if "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)):
                for parent in {p.rsplit("/", 1)[0] for p in objects}:
                    self.fs.makedirs(parent, exist_ok=True)
            self.fs.pipe(objects)
        except Exception as exc:
            raise StoreError(f"store {self.uri} unreachable writing {len(objects)} objects: "
                             f"{type(exc).__name__}: {exc}") from None

    def completed_adapter(self, hypernet_id: str, run_id: str, user_id: str, profile_hash: str) -> dict | None:
        """The manifest row of a folder this run already wrote for this profile, if its bytes check out."""
        rel = self.adapter_dir(hypernet_id, user_id, run_id)
        try:
            row = json.loads(self._cat(f"{rel}/{MARKER}"))
            if row.get("profile_hash") != profile_hash or row.get("user_id") != user_id:
                return None
            files = {name: self._cat(f"{rel}/{name}") for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)}
        except (FileNotFoundError, ValueError):
            return None
        return row if digest(files) == row.get("sha256") else None

    def write_on_demand(self, hypernet_id: str, user_id: str, files: dict[str, bytes], profile_hash: str,
                        embedding: np.ndarray) -> dict:
        """Store an adapter made now (a new user at serving time) beside the committed manifest.

        It is found by `read_adapter` until a newer one is committed by a refresh; other replicas
        and restarts see it too. Returns its row.
        """
        [row] = self.write_adapters(hypernet_id, "ondemand-" + new_run_id(), [(user_id, files, profile_hash, embedding)])
        record = {k: v for k, v in row.items() if k != "embedding"}
        self._put(self._on_demand_rel(hypernet_id, user_id), json.dumps(record).encode())
        return record

    def _on_demand_rel(self, hypernet_id: str, user_id: str) -> str:
        return f"ondemand/{hypernet_id}/{shard_of(user_id)}/{user_key(user_id)}.json"

    def adapter_row(self, user_id: str, hypernet_id: str | None = None) -> dict | None:
        """The row `read_adapter` would use: the newer of the committed manifest's and an on-demand one."""
        committed = self.current(hypernet_id)
        hid = hypernet_id or (committed.hypernet_id if committed else None)
        row = None
        if committed is not None:
            row = self.manifest_rows(committed).get(user_id)
            if row is not None:
                row = {**row, "source": "manifest", "run_id": committed.run_id}
        if hid is not None:
            try:
                record = json.loads(self._cat(self._on_demand_rel(hid, user_id)))
            except FileNotFoundError:
                record = None
            if record is not None and (row is None or record["created_at"] > row["created_at"]):
                row = {**record, "source": "on-demand", "run_id": record["adapter_uri"].rsplit("/", 1)[-1]}
        return row

    def read_adapter(self, user_id: str, hypernet_id: str | None = None) -> tuple[dict[str, bytes], dict]:
        """One user's PEFT files through the committed manifest (or on-demand record), digest checked."""
        row = self.adapter_row(user_id, hypernet_id)
        if row is None:
            raise AdapterNotFound(f"user {user_id!r} has no adapter in {self.uri}"
                                  + (f" for hypernet {hypernet_id}" if hypernet_id else ""))
        try:
            files = {name: self._cat(f"{row['adapter_uri']}/{name}") for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)}
        except FileNotFoundError as exc:
            raise StoreError(f"adapter of user {user_id!r} is missing from {self.uri}: {exc}") from None
        if digest(files) != row["sha256"]:
            raise StoreError(f"adapter of user {user_id!r} at {self.url(row['adapter_uri'])} fails its sha256 "
                             f"check (manifest {row['sha256'][:12]}..., files {digest(files)[:12]}...): corrupted")
        return files, row

    def fetch_adapter(self, user_id: str, local_dir: str, hypernet_id: str | None = None) -> dict:
        """Copy one user's checked PEFT folder to `local_dir` (for `PeftModel.from_pretrained`)."""
        files, row = self.read_adapter(user_id, hypernet_id)
        os.makedirs(local_dir, exist_ok=True)
        for name, data in files.items():
            with open(os.path.join(local_dir, name), "wb") as f:
                f.write(data)
        return row

    # --- manifests and commits -----------------------------------------------------------------

    def write_manifest_part(self, hypernet_id: str, run_id: str, rows: list[dict], dim: int) -> str | None:
        """One Parquet part of a run's manifest; returns its path relative to the root."""
        if not rows:
            return None
        table = validate(pa.Table.from_pylist(rows, schema=manifest_schema(dim)), "manifest", "manifest part")
        return self._put_part(hypernet_id, run_id, table)

    def _put_part(self, hypernet_id: str, run_id: str, table: pa.Table) -> str:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        rel = f"manifests/{hypernet_id}/{run_id}.parquet/part-{uuid.uuid4().hex}.parquet"
        self._put(rel, buf.getvalue())
        return rel

    def begin(self, hypernet_id: str) -> str:
        """The run id to write: the pending run of a job that died, or a new one."""
        pending = self._json(f"manifests/{hypernet_id}/PENDING")
        if pending is not None:
            return pending["run_id"]
        run_id = new_run_id()
        self._put(f"manifests/{hypernet_id}/PENDING", json.dumps({"run_id": run_id}).encode())
        return run_id

    def abandon(self, hypernet_id: str, run_id: str) -> None:
        """Forget a run that had nothing to commit: its staged parts and the PENDING record."""
        staged = self.path(f"manifests/{hypernet_id}/{run_id}.parquet")
        if self.fs.exists(staged):
            self.fs.rm(staged, recursive=True)
        self._rm(f"manifests/{hypernet_id}/PENDING")

    def commit(self, hypernet_id: str, run_id: str, parts: list[str], users: int) -> Committed:
        """Make a run the one servers read: every part exists, then `CURRENT` (last), then PENDING goes."""
        for rel in parts:
            if not self.fs.exists(self.path(rel)):
                raise StoreError(f"cannot commit run {run_id}: part {rel} is missing")
        committed = Committed(hypernet_id, run_id, sorted(parts), users, int(time.time()))
        record = json.dumps(committed.__dict__, indent=1).encode()
        self._put(f"manifests/{hypernet_id}/CURRENT", record)
        self._put("manifests/CURRENT", json.dumps({"hypernet_id": hypernet_id, "run_id": run_id}).encode())
        self._rm(f"manifests/{hypernet_id}/PENDING")
        return committed

    def current(self, hypernet_id: str | None = None) -> Committed | None:
        """The committed run of `hypernet_id` (default: the hypernet committed last), or None."""
        if hypernet_id is None:
            latest = self._json("manifests/CURRENT")
            if latest is None:
                return None
            hypernet_id = latest["hypernet_id"]
        data = self._json(f"manifests/{hypernet_id}/CURRENT")
        return Committed(**data) if data else None

    def manifest(self, committed: Committed | None, columns: list[str] | None = None) -> pa.Table | None:
        if committed is None:
            return None
        tables = []
        for rel in committed.parts:
            try:
                tables.append(pq.read_table(io.BytesIO(self._cat(rel)), columns=columns))
            except FileNotFoundError:
                raise StoreError(f"manifest part {rel} of run {committed.run_id} is missing from {self.uri}") from None
        if not tables:
            return pa.Table.from_pylist([], schema=manifest_schema(1)).select(columns or manifest_schema(1).names)
        return pa.concat_tables(tables)

    def manifest_rows(self, committed: Committed) -> dict[str, dict]:
        """user_id -> manifest row (without the embedding), cached per committed run."""
        key = (committed.hypernet_id, committed.run_id)
        if key not in self._manifests:
            cols = ["user_id", "adapter_uri", "profile_hash", "hypernet_id", "sha256", "bytes", "created_at"]
            table = self.manifest(committed, cols)
            self._manifests = {key: {r["user_id"]: r for r in table.to_pylist()}}
        return self._manifests[key]

    def embedding(self, user_id: str, hypernet_id: str | None = None) -> np.ndarray | None:
        """A user's stored embedding: enough to regenerate the adapter without the history."""
        committed = self.current(hypernet_id)
        table = self.manifest(committed, ["user_id", "embedding"])
        if table is None:
            return None
        hit = table.filter(pc.equal(table.column("user_id"), user_id))
        return np.asarray(hit.column("embedding")[0].as_py(), np.float32) if len(hit) else None

    def stat(self, hypernet_id: str | None = None) -> dict:
        committed = self.current(hypernet_id)
        out = {"store": self.uri, "hypernets": self.hypernet_ids(), "committed": None}
        if committed is not None:
            table = self.manifest(committed, ["bytes"])
            out["committed"] = {**committed.__dict__, "adapter_bytes": int(pc.sum(table.column("bytes")).as_py() or 0)}
            del out["committed"]["parts"]
        return out

    # --- privacy -------------------------------------------------------------------------------

    def delete_users(self, user_ids: list[str]) -> int:
        """Remove users' adapters (every version, every hypernet) and commit manifests without them."""
        gone = set(user_ids)
        for uid in gone:
            for hid in self.hypernet_ids():
                prefix = self.path(self.adapter_prefix(hid, uid))
                if self.fs.exists(prefix):
                    self.fs.rm(prefix, recursive=True)
                self._rm(self._on_demand_rel(hid, uid))
        removed = 0
        for hid in self.hypernet_ids():
            committed = self.current(hid)
            if committed is None:
                continue
            table = self.manifest(committed)
            keep = pc.invert(pc.is_in(table.column("user_id"), pa.array(sorted(gone), pa.string())))
            kept = table.filter(keep)
            removed += len(table) - len(kept)
            if len(kept) == len(table):
                continue
            run_id = new_run_id()
            rel = self._put_part(hid, run_id, kept)
            latest = self._json("manifests/CURRENT")
            self.commit(hid, run_id, [rel], len(kept))
            if latest and latest["hypernet_id"] != hid:  # keep the default hypernet as it was
                self._put("manifests/CURRENT", json.dumps(latest).encode())
        self._manifests.clear()
        return removed

    def _rm(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path(rel))
