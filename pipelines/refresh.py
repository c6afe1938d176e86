"""`p2p refresh`: the nightly job that brings every user's adapter in the store up to date, on Ray Data.

    driver: schemas, the lease, the list of part files; nothing per user
    guards: ids + committed keys + tombstones, partitioned by user (pipelines/refresh_plan.py):
            duplicate ids and the removal guard, before anything is written
    users Parquet -> profile text + hash (tasks)
                  -> plan: joined with every stored layer and the tombstones by user hash,
                     each partition planned alone (p2p.store.plan)
                  -> embed changed users (encoder actor pool)
                  -> generate + write PEFT folders (adapters mode) or embedding rows (embeddings mode)
                     + one manifest part per block (writer actor pool)
                  -> commit: CURRENT names the new run, written last, under the lease

Only users whose profile hash (profile text + encoder) changed, or who have no row from this
hypernet, are embedded. A night writes only what changed: its parts are a new layer over the
committed run's (p2p.store.manifest), holding the new rows and a removal row for each user gone;
every `max_layers` nights, or with `--full` or a change of mode, the night rewrites every row into
one layer instead (compaction). A rerun after a crash starts a new run over the dead run's parts,
reusing the rows it finished. Nothing is committed when nothing changed. Users absent from the data
drop out, but never more than `max_removed_share` of them without `allow_mass_removal`. The driver
holds the store's lease throughout; when it stops on an error or a signal it stops its workers
(see `_stopping_workers`).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Annotated, Literal

import numpy as np
import pyarrow as pa
import ray
from pydantic import Field
from ray.data import ActorPoolStrategy

from p2p.config import Positive, StrictConfig
from p2p.data.schemas import check_schemas, users_uri
from p2p.errors import P2PError
from p2p.personalize import Personalizer, resolve_hypernet
from p2p.store import AdapterStore
from p2p.store import layout as store_layout
from p2p.store.histories import merged
from p2p.store.manifest import as_embedding_row, embedding_row, removal_rows
from p2p.store.plan import CARRIED
from p2p.store.runs import MODES
from p2p.userkey import is_user_id
from pipelines.ingest import EmbedProfiles, profile_texts
from pipelines.ray_setup import StoreCredentials, ensure_ray, store_remote_args, user_errors
from pipelines.refresh_plan import StorePlan, arrow_fs, guard_removals

log = logging.getLogger("p2p.refresh")
TERMINATED = 143  # exit status after SIGTERM (`ray job stop` sends it, then SIGKILL 3 s later)


Given = Annotated[str, Field(min_length=1)]  # a required string: empty is as good as missing


class RefreshConfig(StrictConfig):
    """The nightly refresh (`p2p refresh`, jobs/refresh.py); jobs/README.md explains each guard."""

    hypernet: Given  # a checkpoint folder (published into the store) or a hypernet id already stored
    data: Given  # data directory with users/ (or a users Parquet path), local or s3://
    store: Given  # adapter store root: a path, file://... or s3://bucket/prefix
    full: bool = False  # regenerate every user, not only those whose profile or hypernet changed
    mode: Literal[MODES] = "adapters"  # adapters: a PEFT folder per user; embeddings: embeddings only, adapters made on a miss
    adapter_dtype: Literal["float32", "bfloat16"] = "float32"  # bfloat16: half the bytes per user (with --full to convert)
    batch_size: Positive = 64  # users per block through profile, embed and generate
    embed_actors: Positive = 1  # encoder actors (one model each; one per GPU on a cluster)
    generate_actors: Positive = 1  # hypernet actors, each writing its users' PEFT folders
    create: bool = False  # create the store's S3 bucket if missing (otherwise a missing bucket is an error)
    max_removed_share: Annotated[float, Field(ge=0.0, le=1.0)] = 0.2  # refuse a run that drops more than this share of committed users...
    allow_mass_removal: bool = False  # ...unless this is set (an empty or truncated users file)
    readmit: list[str] = []  # deleted (tombstoned) user ids allowed back in
    lease_wait_s: Annotated[float, Field(ge=0.0)] = 0.0  # wait this long for another run's lease, then exit 3 naming its holder
    lease_ttl_s: Annotated[float, Field(gt=0.0)] = 120.0  # a dead run's lease expires this long after its last heartbeat
    max_layers: Positive = 8  # rewrite every row into one layer (compaction) once the committed run has this many
    plan_partition_users: Positive = 50_000  # users per partition of the plan (its memory per process)


@dataclass
class RefreshSummary:
    store: str
    hypernet_id: str
    mode: Literal[MODES] = "adapters"
    run_id: str | None = None
    committed: bool = False
    users_seen: int = 0
    changed: int = 0
    written: int = 0
    resumed: int = 0
    unchanged: int = 0
    regenerated: int = 0
    removed: int = 0
    deleted: int = 0  # tombstoned users still in the data, left out
    readmitted: int = 0
    failed: int = 0
    compacted: bool = False  # every row rewritten into one layer (otherwise only the changes: a new layer)
    failures: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def line(self) -> str:
        busy = ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items())
        state = f"committed run {self.run_id}" if self.committed else "nothing changed: nothing committed"
        if self.committed:
            state += " (compacted: every row rewritten)" if self.compacted else " (a new layer of the changes)"
        return (f"refresh {self.hypernet_id} ({self.mode}): {self.users_seen} users seen, {self.changed} changed, "
                f"{self.written} written, {self.resumed} resumed, {self.unchanged} unchanged, "
                f"{self.regenerated} regenerated, {self.removed} removed, {self.deleted} deleted (tombstoned), "
                f"{self.readmitted} readmitted, {self.failed} failed; {state}; {busy}")


def _timed(batch: pa.Table, stage: str, seconds: float) -> pa.Table:
    """Spread a stage's busy seconds over the batch's rows: the sum over all rows is the stage total."""
    per_row = seconds / max(len(batch), 1)
    return batch.append_column(f"t_{stage}", pa.array([per_row] * len(batch), pa.float64()))


def profile_stage(batch: pa.Table, profile: dict, encoder: str, store: str | None = None,
                  credentials: StoreCredentials | None = None, with_history: list | None = None) -> pa.Table:
    t = time.perf_counter()
    keys = ray.get(with_history[0]) if with_history else set()  # one small set per block, from the object store
    if keys:
        if credentials is not None:
            credentials.install()
        batch = _with_recorded_events(batch, AdapterStore(store), keys)
    out = profile_texts(batch, profile, encoder)  # text, label features and hash per user
    return _timed(out, "profile", time.perf_counter() - t)


def _with_recorded_events(batch: pa.Table, store: AdapterStore, keys: set[str]) -> pa.Table:
    """Each user's history from the data, plus the items events recorded that it lacks (by item_id), so a
    night whose data predates an event does not undo it (p2p/store/histories.py)."""
    ids, histories = batch.column("user_id").to_pylist(), batch.column("history").to_pylist()
    changed = False
    for i, uid in enumerate(ids):
        if is_user_id(uid) and store.histories.has(keys, uid):
            recorded = store.histories.read(uid)
            if recorded:
                histories[i], added = merged(histories[i] or [], recorded)
                changed |= added > 0
    if not changed:
        return batch
    index = batch.schema.get_field_index("history")
    return batch.set_column(index, batch.schema.field(index), pa.array(histories, batch.schema.field(index).type))


class EmbedChanged(EmbedProfiles):
    """Encoder actor: embeds only the users whose profile is new or changed (status "embed")."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        t = time.perf_counter()
        out = super().__call__(batch).drop_columns(["profile_text"])
        return _timed(out, "embed", time.perf_counter() - t)


class GenerateAndWrite:
    """Writer actor: the block's new rows (adapters: one hypernet pass + PEFT folders), then one manifest part.

    A compaction writes every user's row; any other night writes the new rows and a removal row per
    user gone, and the rows that stay are where they were (the committed layers below).
    """

    def __init__(self, store: str, credentials: StoreCredentials, hypernet_id: str, run_id: str, mode: str, dim: int,
                 dtype: str = "float32", compact: bool = True):
        credentials.install()
        self.store, self.dtype, self.compact = AdapterStore(store), dtype, compact
        self.personalizer = Personalizer.from_store(self.store, hypernet_id) if mode == "adapters" else None
        self.hypernet_id, self.run_id, self.mode, self.dim = hypernet_id, run_id, mode, dim

    def __call__(self, batch: pa.Table) -> pa.Table:
        t0 = time.perf_counter()
        rows = batch.to_pylist()
        new, failures = self._new_rows([r for r in rows if r["status"] in ("embed", "regenerate")])
        t1 = time.perf_counter()
        manifest, gone, live = [], [], 0
        for r in rows:
            uid, status, kept = r["user_id"], r["status"], r["prev_sha256"] is not None
            if uid is None:  # a partition's count of users that stay as they are
                live += r["n"]
            elif uid in new:
                manifest.append(new[uid])
                live += 1
            elif status in ("deleted", "removed"):
                if kept and not self.compact:
                    gone.append(uid)
            elif kept:  # carried, or kept after a failure
                live += 1
                if self.compact:
                    row = {"user_id": uid, "hypernet_id": self.hypernet_id, **{c: r[f"prev_{c}"] for c in CARRIED}}
                    manifest.append(as_embedding_row(row) if self.mode == "embeddings" else row)
        manifest += removal_rows(gone, self.hypernet_id, self.dim, int(time.time()))
        part = self.store.write_manifest_part(self.hypernet_id, self.run_id, manifest, self.dim)
        t2 = time.perf_counter()
        count = {s: sum(r["n"] for r in rows if r["status"] == s) for s in ("embed", "resumed", "unchanged", "deleted")}
        return pa.table({
            "part": [part], "seen": [sum(r["n"] for r in rows if r["status"] != "removed")],
            "changed": [count["embed"] + count["resumed"]], "written": [len(new)], "resumed": [count["resumed"]],
            "unchanged": [count["unchanged"]],
            "regenerated": [sum(1 for r in rows if r["status"] == "regenerate" and r["user_id"] in new)],
            "deleted": [count["deleted"]], "failed": [len(failures)], "failures": [failures[:5]], "rows": [live],
            "t_profile": [sum(r["t_profile"] for r in rows)], "t_embed": [sum(r["t_embed"] for r in rows)],
            "t_generate": [t1 - t0], "t_write": [t2 - t1],
        })

    def _new_rows(self, todo: list[dict]) -> tuple[dict[str, dict], list[str]]:
        """user -> new manifest row for users needing one; failures name the user (their old row stays)."""
        ok, failures = [], []
        for r in todo:
            try:
                store_layout.adapter_dir(self.hypernet_id, r["user_id"], self.run_id)  # rejects ids with no key
                ok.append(r)
            except P2PError as exc:
                failures.append(f"{r['user_id']!r}: {exc}")
        embeddings = np.asarray([r["embedding"] if r["status"] == "embed" else r["prev_embedding"] for r in ok],
                                np.float32).reshape(len(ok), self.dim)
        now = int(time.time())
        if self.mode == "embeddings":
            return {r["user_id"]: embedding_row(r["user_id"], self.hypernet_id, r["profile_hash"], e, now)
                    for r, e in zip(ok, embeddings, strict=True)}, failures
        adapters = self.personalizer.from_embeddings(embeddings) if ok else []
        items = [(r["user_id"], self.personalizer.files(a, self.dtype), r["profile_hash"], e)
                 for r, a, e in zip(ok, adapters, embeddings, strict=True)]
        return {row["user_id"]: row for row in self.store.write_adapters(self.hypernet_id, self.run_id, items)}, failures


def run_refresh(config: RefreshConfig) -> RefreshSummary:
    """One night, in the module docstring's order.

    Long because every step runs under the one lease and uses the step before it (the committed
    layers, the guards' counts, the run id); read top to bottom it is the night's protocol.
    """
    start = time.perf_counter()
    users = users_uri(config.data)
    check_schemas(users, "users")  # a bad file is named now, before anything is written
    store = AdapterStore(config.store, create=config.create)
    with _exit_on_sigterm(), store.leased(f"refresh {config.hypernet}", ttl_s=config.lease_ttl_s,
                                          wait_s=config.lease_wait_s) as lease, _stopping_workers():
        hypernet_id = resolve_hypernet(store, config.hypernet)
        hconf = Personalizer.from_store(store, hypernet_id).hypernet.config
        summary = RefreshSummary(store=config.store, hypernet_id=hypernet_id, mode=config.mode)
        committed = store.current(hypernet_id)
        layers = committed.layers() if committed is not None else []
        summary.compacted = compact = (config.full or committed is None or committed.mode != config.mode
                                       or len(layers) >= config.max_layers)
        dead = store.runs.pending(hypernet_id)
        below = {store_layout.run_of_part(p) for p in committed.parts} if committed is not None else set()
        dead_runs = [r for r in ([*dead.resume_from, dead.run_id] if dead is not None else [])
                     if r not in below and store.runs.commit_record(hypernet_id, r) is None]  # a commit whose PENDING outlived it
        dead_layers = [p for p in (store.runs.run_parts(hypernet_id, [r]) for r in dead_runs) if p]
        plan = StorePlan(store, layers, dead_layers, hconf.embed_dim, config.plan_partition_users,
                         committed.users if committed is not None else 0)
        t = time.perf_counter()
        with user_errors():
            checked = plan.check(users)  # duplicate ids, named now, before anything is written
        summary.removed = guard_removals(checked, config.max_removed_share, config.allow_mass_removal, users)
        summary.seconds["guards"] = time.perf_counter() - t
        if config.readmit:
            summary.readmitted = store.tombstones.readmit(config.readmit)
        run = store.runs.begin(hypernet_id, lease)
        summary.run_id = run.run_id
        log.info("refresh %s -> %s run %s (resuming %s; %d users in data, %d committed, %d layers, %d partitions%s)",
                 hypernet_id, config.store, run.run_id, run.resume_from or "nothing", checked.inputs, checked.committed,
                 len(layers), checked.partitions, ", compacting" if compact else "")

        ds = ray.data.read_parquet(users, include_paths=True, filesystem=arrow_fs(users), ray_remote_args=store_remote_args())
        keys = store.histories.keys()  # users whose events the server recorded: merged into their history
        ds = ds.map_batches(profile_stage, fn_kwargs={"profile": hconf.profile, "encoder": hconf.encoder,
                                                      "store": config.store, "credentials": StoreCredentials.of_driver(),
                                                      "with_history": [ray.put(keys)] if keys else []},
                            batch_format="pyarrow", batch_size=config.batch_size, **store_remote_args())
        ds = plan.plan(ds, checked.inputs, config.mode, config.full, compact)
        ds = ds.map_batches(EmbedChanged, fn_constructor_kwargs={"encoder": hconf.encoder, "profile": hconf.profile},
                            batch_format="pyarrow", batch_size=config.batch_size,
                            compute=ActorPoolStrategy(min_size=1, max_size=config.embed_actors))
        ds = ds.map_batches(GenerateAndWrite, fn_constructor_kwargs={
            "store": config.store, "credentials": StoreCredentials.of_driver(), "hypernet_id": hypernet_id,
            "run_id": run.run_id, "mode": config.mode,
            "dim": hconf.embed_dim, "dtype": config.adapter_dtype, "compact": compact}, batch_format="pyarrow",
            batch_size=config.batch_size, compute=ActorPoolStrategy(min_size=1, max_size=config.generate_actors),
            **store_remote_args())
        parts, rows = _drain(ds, summary, checked.inputs, start)

        nothing_new = (committed is not None and committed.mode == config.mode and summary.removed == 0
                       and summary.changed == summary.written == summary.failed == 0)
        if nothing_new:
            store.runs.abandon(hypernet_id, run.run_id, lease)
        else:
            below = [] if compact else [p for layer in layers + dead_layers for p in layer]
            store.runs.commit(hypernet_id, run.run_id, below + parts, rows, lease, mode=config.mode)
            summary.committed = True
    summary.seconds["total"] = time.perf_counter() - start
    return summary


def _drain(ds, summary: RefreshSummary, total: int, start: float) -> tuple[list[str], int]:
    """Run the pipeline, adding each block's counts to `summary`; (manifest parts, manifest rows)."""
    parts, rows, last_print = [], 0, time.perf_counter()
    seconds = {s: 0.0 for s in ("profile", "embed", "generate", "write")}
    with user_errors(), contextlib.closing(iter(ds.iter_rows())) as blocks:
        for row in blocks:
            if row["part"]:
                parts.append(row["part"])
            summary.users_seen += row["seen"]
            for k in ("changed", "written", "resumed", "unchanged", "regenerated", "deleted", "failed"):
                setattr(summary, k, getattr(summary, k) + row[k])
            rows += row["rows"]
            summary.failures.extend(row["failures"][: max(0, 5 - len(summary.failures))])
            for s in seconds:
                seconds[s] += row[f"t_{s}"]
            if time.perf_counter() - last_print > 10:
                last_print = time.perf_counter()
                rate = summary.users_seen / (last_print - start)
                print(f"refresh: {summary.users_seen}/{total} users ({rate:.0f} users/s), "
                      f"{summary.written} written", file=sys.stderr, flush=True)
    summary.seconds.update({f"{k} (busy)": v for k, v in seconds.items()})
    return parts, rows


def _terminate(signum, frame) -> None:
    raise SystemExit(TERMINATED)


@contextlib.contextmanager
def _exit_on_sigterm() -> Iterator[None]:
    """SIGTERM unwinds like an exception, so the lease is released and workers are stopped."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


@contextlib.contextmanager
def _stopping_workers() -> Iterator[None]:
    """Ray for this run; if the run stops early (error, Ctrl-C, SIGTERM), its workers stop with it.

    A cluster this call started or joined is shut down / left, and Ray then kills the job's actors
    and tasks at once. A Ray session the caller already had (a notebook, tests) is kept; closing the
    pipeline's iterator (in `_drain`) makes Ray Data shut its actor pools down.
    """
    ours = not ray.is_initialized()
    ensure_ray()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)  # ray.init installed its own handler
    try:
        yield
    except BaseException:
        if ours:
            ray.shutdown()
        raise


def summary_dict(summary: RefreshSummary) -> dict:
    return asdict(summary)
