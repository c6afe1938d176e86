"""`p2p refresh`: the nightly job that brings every user's adapter in the store up to date, on Ray Data.

    users Parquet -> profile text + hash (tasks)
                  -> plan against the committed manifest (actor: holds the manifest index)
                  -> embed changed users (encoder actor pool)
                  -> generate + write PEFT folders + write a manifest part (hypernet actor pool)
                  -> commit: CURRENT names the new run, written last

Only users whose profile hash (profile text + encoder) changed, or who have no adapter from this
hypernet, are embedded and generated; the rest carry their manifest row over. A rerun after a
crash resumes the pending run: folders the dead run completed (digest checked) are reused. Nothing
is committed when nothing changed. Users absent from the data drop out of the new manifest.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data import ActorPoolStrategy

from p2p.config import RefreshConfig
from p2p.data.schemas import check_schemas, parquet_files
from p2p.errors import P2PError
from p2p.fs import filesystem
from p2p.generate import adapter_files, generate_user_adapters
from p2p.personalizer import Profile, ProfileEmbedder
from p2p.pipeline_local import users_uri
from p2p.store import AdapterStore
from pipelines.ingest import profile_texts
from pipelines.ray_setup import ensure_ray, store_remote_args, user_errors

log = logging.getLogger("p2p.refresh")
CARRIED = ["profile_hash", "adapter_uri", "sha256", "bytes", "created_at", "embedding"]


@dataclass
class RefreshSummary:
    store: str
    hypernet_id: str
    run_id: str | None = None
    committed: bool = False
    users_seen: int = 0
    changed: int = 0
    written: int = 0
    resumed: int = 0
    unchanged: int = 0
    removed: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def line(self) -> str:
        busy = ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items())
        state = f"committed run {self.run_id}" if self.committed else "nothing changed: nothing committed"
        return (f"refresh {self.hypernet_id}: {self.users_seen} users seen, {self.changed} changed, "
                f"{self.written} written, {self.resumed} resumed, {self.unchanged} unchanged, "
                f"{self.removed} removed, {self.failed} failed; {state}; {busy}")


def _timed(batch: pa.Table, stage: str, seconds: float) -> pa.Table:
    """Spread a stage's busy seconds over the batch's rows: the sum over all rows is the stage total."""
    per_row = seconds / max(len(batch), 1)
    return batch.append_column(f"t_{stage}", pa.array([per_row] * len(batch), pa.float64()))


def profile_stage(batch: pa.Table, profile: dict, encoder: str) -> pa.Table:
    t = time.perf_counter()
    out = profile_texts(batch, profile, encoder)  # text, label features and hash per user
    return _timed(out, "profile", time.perf_counter() - t)


class Plan:
    """Decides per user: keep the committed adapter, reuse a folder this run already wrote, or make one."""

    def __init__(self, store: str, hypernet_id: str, run_id: str, previous: list, resuming: bool):
        self.store = AdapterStore(store)
        self.hypernet_id, self.run_id, self.resuming = hypernet_id, run_id, resuming
        table = ray.get(previous[0]) if previous else None
        self.previous = {} if table is None else {r["user_id"]: r for r in table.to_pylist()}

    def __call__(self, batch: pa.Table) -> pa.Table:
        t = time.perf_counter()
        status, carried = [], {c: [] for c in CARRIED}
        in_previous = []
        for uid, phash in zip(batch.column("user_id").to_pylist(), batch.column("profile_hash").to_pylist(), strict=True):
            prev = self.previous.get(uid)
            in_previous.append(prev is not None)
            row = None
            if prev is not None and prev["profile_hash"] == phash:
                status.append("unchanged")
                row = prev
            elif self.resuming and (row := self._completed(uid, phash)) is not None:
                status.append("resumed")
            else:
                status.append("todo")
                row = prev  # kept if generating this user fails: no data lost
            for c in CARRIED:
                carried[c].append(None if row is None else row[c])
        out = batch.append_column("status", pa.array(status, pa.string()))
        out = out.append_column("in_previous", pa.array(in_previous, pa.bool_()))
        for c in CARRIED:
            typ = pa.list_(pa.float32()) if c == "embedding" else (pa.int64() if c in ("bytes", "created_at") else pa.string())
            out = out.append_column(f"prev_{c}", pa.array(carried[c], typ))
        return _timed(out, "plan", time.perf_counter() - t)

    def _completed(self, uid: str, phash: str) -> dict | None:
        try:
            return self.store.completed_adapter(self.hypernet_id, self.run_id, uid, phash)
        except P2PError:  # a hostile or empty id has no folder; the generate stage reports it
            return None


class EmbedChanged:
    """Encoder actor: embeds only the users that need a new adapter."""

    def __init__(self, encoder: str, profile: dict):
        self.embedder = ProfileEmbedder(encoder, profile)

    def __call__(self, batch: pa.Table) -> pa.Table:
        t = time.perf_counter()
        todo = [i for i, s in enumerate(batch.column("status").to_pylist()) if s == "todo"]
        texts = batch.column("profile_text").to_pylist()
        features = batch.column("features").to_pylist()
        hashes = batch.column("profile_hash").to_pylist()
        emb = self.embedder.embed([Profile(texts[i], np.asarray(features[i], np.float32), hashes[i]) for i in todo])
        column: list = [None] * len(batch)
        for j, i in enumerate(todo):
            column[i] = emb[j].tolist()
        out = batch.drop_columns(["profile_text", "features"]).append_column("embedding",
                                                                             pa.array(column, pa.list_(pa.float32())))
        return _timed(out, "embed", time.perf_counter() - t)


class GenerateAndWrite:
    """Hypernet actor: generates the batch's new adapters in one pass, writes their folders and a manifest part."""

    def __init__(self, store: str, hypernet_id: str, run_id: str):
        self.store = AdapterStore(store)
        self.hypernet, self.hypernet_id = self.store.load_hypernet(hypernet_id)
        self.run_id = run_id
        self.dim = self.hypernet.config.embed_dim

    def __call__(self, batch: pa.Table) -> pa.Table:
        t0 = time.perf_counter()
        rows = batch.to_pylist()
        todo = [r for r in rows if r["status"] == "todo"]
        adapters = generate_user_adapters(self.hypernet, np.asarray([r["embedding"] for r in todo], np.float32)
                                          .reshape(len(todo), self.dim)) if todo else []
        t1 = time.perf_counter()
        manifest, failures, written = [], [], {}
        batch_out = []
        for r, adapter in zip(todo, adapters, strict=True):
            try:
                self.store.adapter_dir(self.hypernet_id, r["user_id"], self.run_id)  # rejects ids with no key
                batch_out.append((r["user_id"], adapter_files(self.hypernet, self.hypernet_id, adapter),
                                  r["profile_hash"], r["embedding"]))
            except P2PError as exc:
                failures.append(f"{r['user_id']!r}: {exc}")
        for row in self.store.write_adapters(self.hypernet_id, self.run_id, batch_out):
            written[row["user_id"]] = row
        for r in rows:
            if r["user_id"] in written:
                manifest.append(written[r["user_id"]])
            elif r["prev_adapter_uri"] is not None:  # unchanged, resumed, or failed with an older adapter
                manifest.append(self._carried(r))
        part = self.store.write_manifest_part(self.hypernet_id, self.run_id, manifest, self.dim)
        t2 = time.perf_counter()
        status = [r["status"] for r in rows]
        seconds = {f"t_{s}": sum(r[f"t_{s}"] for r in rows) for s in ("profile", "plan", "embed")}
        return pa.table({
            "part": [part], "seen": [len(rows)], "in_previous": [sum(r["in_previous"] for r in rows)],
            "changed": [status.count("todo") + status.count("resumed")], "written": [len(written)],
            "resumed": [status.count("resumed")], "unchanged": [status.count("unchanged")],
            "failed": [len(failures)], "failures": [failures[:5]], "rows": [len(manifest)],
            **{k: [v] for k, v in seconds.items()}, "t_generate": [t1 - t0], "t_write": [t2 - t1],
        })

    def _carried(self, r: dict) -> dict:
        return {"user_id": r["user_id"], "hypernet_id": self.hypernet_id, **{c: r[f"prev_{c}"] for c in CARRIED}}


def _count_rows(uri: str) -> int:
    fs, files = parquet_files(uri)
    return sum(pq.read_metadata(f, filesystem=fs).num_rows for f in files)


def run_refresh(config: RefreshConfig) -> RefreshSummary:
    start = time.perf_counter()
    users = users_uri(config.data)
    check_schemas(users, "users")  # a bad file is named now, before anything is written
    total = _count_rows(users)
    store = AdapterStore(config.store)
    hypernet_id = store.resolve_hypernet(config.hypernet)
    hypernet, _ = store.load_hypernet(hypernet_id)
    hconf = hypernet.config
    summary = RefreshSummary(store=config.store, hypernet_id=hypernet_id)

    committed = None if config.full else store.current(hypernet_id)
    previous = store.manifest(committed)
    resuming = store.fs.exists(store.path(f"manifests/{hypernet_id}/PENDING"))
    run_id = store.begin(hypernet_id)
    summary.run_id = run_id
    log.info("refresh %s -> %s run %s (%s; %d users in data, %d in the committed manifest)", hypernet_id,
             config.store, run_id, "resuming" if resuming else "new", total, 0 if previous is None else len(previous))

    ensure_ray()
    previous_ref = [ray.put(previous)] if previous is not None and len(previous) else []
    ds = ray.data.read_parquet(users, include_paths=True, filesystem=_arrow_fs(users))
    ds = ds.map_batches(profile_stage, fn_kwargs={"profile": hconf.profile, "encoder": hconf.encoder},
                        batch_format="pyarrow", batch_size=config.batch_size)
    ds = ds.map_batches(Plan, fn_constructor_kwargs={"store": config.store, "hypernet_id": hypernet_id,
                                                     "run_id": run_id, "previous": previous_ref, "resuming": resuming},
                        batch_format="pyarrow", batch_size=config.batch_size, compute=ActorPoolStrategy(size=1),
                        **store_remote_args())
    ds = ds.map_batches(EmbedChanged, fn_constructor_kwargs={"encoder": hconf.encoder, "profile": hconf.profile},
                        batch_format="pyarrow",
                        batch_size=config.batch_size, compute=ActorPoolStrategy(min_size=1, max_size=config.embed_actors))
    ds = ds.map_batches(GenerateAndWrite, fn_constructor_kwargs={"store": config.store, "hypernet_id": hypernet_id,
                                                                 "run_id": run_id},
                        batch_format="pyarrow", batch_size=config.batch_size,
                        compute=ActorPoolStrategy(min_size=1, max_size=config.generate_actors), **store_remote_args())

    parts, seconds = [], {s: 0.0 for s in ("profile", "plan", "embed", "generate", "write")}
    in_previous, manifest_rows, last_print = 0, 0, time.perf_counter()
    with user_errors():
        for row in ds.iter_rows():
            if row["part"]:
                parts.append(row["part"])
            summary.users_seen += row["seen"]
            for k in ("changed", "written", "resumed", "unchanged", "failed"):
                setattr(summary, k, getattr(summary, k) + row[k])
            in_previous += row["in_previous"]
            manifest_rows += row["rows"]
            summary.failures.extend(row["failures"][: max(0, 5 - len(summary.failures))])
            for s in seconds:
                seconds[s] += row[f"t_{s}"]
            if time.perf_counter() - last_print > 10:
                last_print = time.perf_counter()
                rate = summary.users_seen / (last_print - start)
                print(f"refresh: {summary.users_seen}/{total} users ({rate:.0f} users/s), "
                      f"{summary.written} written", file=sys.stderr, flush=True)
    summary.removed = (0 if previous is None else len(previous)) - in_previous
    summary.seconds = {**{f"{k} (busy)": v for k, v in seconds.items()}, "total": time.perf_counter() - start}

    nothing_new = committed is not None and summary.changed == 0 and summary.removed == 0 and summary.failed == 0
    if nothing_new:
        store.abandon(hypernet_id, run_id)
    else:
        store.commit(hypernet_id, run_id, parts, manifest_rows)
        summary.committed = True
    summary.seconds["total"] = time.perf_counter() - start
    return summary


def _arrow_fs(uri: str):
    """A pyarrow filesystem over fsspec, so Ray Data reads s3:// with the same endpoint as the store."""
    if not uri.startswith(("s3://", "s3a://")):
        return None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(filesystem(uri)[0]))


def summary_dict(summary: RefreshSummary) -> dict:
    return asdict(summary)
