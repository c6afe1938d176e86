"""The refresh's plan at 1M, 3M and 10M users on a local Ray cluster: time, every process's peak memory, spill, bytes.

    python -m bench.refresh_scale [--users 1000000 3000000 10000000] [--changed 0.1] [--root DIR]

For each size, a synthetic embeddings-only store (one committed layer, 384-d float32 rows in parts
of `--part-rows`) and a users table of (user_id, profile_hash) where `--changed` of the profiles
changed, `--removed` of the users left and as many new ones came, all written with numpy to local
disk (deleted after). Then one night, end to end on Ray, with the refresh's own pieces:
guards (pipelines.refresh_plan.StorePlan.check) -> plan (StorePlan.plan: the distributed join) ->
an embedding per changed user (random: the encoder is not what is measured) -> the refresh's
writer (pipelines.refresh.GenerateAndWrite, embeddings mode) -> commit. Each size runs in its own
Ray session (a fresh process), and a sampler records every process's peak RSS and USS (driver,
raylet, each worker; shared object-store pages count in the RSS of each process that maps them, not
in its USS). Spill is Ray's own count. The baseline for bytes is the store as built: what a night
that rewrote every row (the refresh before layers, or a compaction) writes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

HYPERNET = "bench000000000000"
DIM = 384
USERS_PER_FILE = 250_000


def _hex(words: np.ndarray) -> list[str]:
    return [f"{a:016x}{b:016x}{c:016x}{d:016x}" for a, b, c, d in words.tolist()]


def _words(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 2**63, size=(n, 4), dtype=np.int64)


def build(root: str, data: str, users: int, part_rows: int, changed: float, removed: float) -> dict:
    """A committed embeddings-only store of `users` rows and tonight's users table; what was built."""
    from p2p.store import AdapterStore, new_run_id
    from p2p.store.manifest import encode, manifest_schema

    store, schema = AdapterStore(root), manifest_schema(DIM)
    rng = np.random.default_rng(0)
    run_id = new_run_id()
    profile = _words(rng, users)  # each user's profile hash, as four words
    parts = []
    for start in range(0, users, part_rows):
        n = min(part_rows, users - start)
        emb = rng.random(n * DIM, dtype=np.float32)
        table = pa.table({"user_id": [f"user{i:09d}" for i in range(start, start + n)],
                          "adapter_uri": pa.nulls(n, pa.string()), "profile_hash": _hex(profile[start:start + n]),
                          "hypernet_id": [HYPERNET] * n, "sha256": _hex(_words(rng, n)), "bytes": np.zeros(n, np.int64),
                          "created_at": np.full(n, int(time.time()), np.int64),
                          "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb), DIM)}, schema=schema)
        rel = f"manifests/{HYPERNET}/{run_id}.parquet/part-{start:010d}.parquet"
        store.objects.write(rel, encode(table), durable=False)
        parts.append(rel)
    with store.leased("bench build") as lease:
        store.runs.commit(HYPERNET, run_id, parts, users, lease, mode="embeddings")
    _write_hypernet_stub(store)

    flags = np.random.default_rng(1).random(users)
    gone = flags < removed
    profile[(flags >= removed) & (flags < removed + changed)] += 1  # a new profile tonight
    os.makedirs(f"{data}/users", exist_ok=True)
    kept = np.flatnonzero(~gone)
    extra = int(gone.sum())  # as many new users as left
    fresh = _words(rng, extra)
    for f, start in enumerate(range(0, len(kept) + extra, USERS_PER_FILE)):
        idx = np.arange(start, min(start + USERS_PER_FILE, len(kept) + extra))
        old, new = kept[idx[idx < len(kept)]], idx[idx >= len(kept)] - len(kept)
        pq.write_table(pa.table({"user_id": [f"user{i:09d}" for i in old] + [f"new{i:09d}" for i in new],
                                 "profile_hash": _hex(profile[old]) + _hex(fresh[new])}),
                       f"{data}/users/part-{f:05d}.parquet")
    return {"changed": int(((flags >= removed) & (flags < removed + changed)).sum()), "removed": int(gone.sum()),
            "new": extra, "store_bytes": _bytes(root, f"manifests/{HYPERNET}")}


def _write_hypernet_stub(store) -> None:
    """An embeddings-only night never loads the hypernet; the store only needs to know its id."""
    store.objects.write(f"hypernets/{HYPERNET}/config.json", b"{}")


def _bytes(root: str, rel: str) -> int:
    total = 0
    for folder, _, files in os.walk(os.path.join(root, rel)):
        total += sum(os.path.getsize(os.path.join(folder, f)) for f in files)
    return total


class PeakRss:
    """Samples every process under this one (Ray's raylet, GCS and workers start as its children)."""

    def __init__(self, every_s: float = 0.5):
        self.every_s, self.peak, self.private, self.names = every_s, {}, {}, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            for p in me.children(recursive=True):
                try:
                    mem = p.memory_full_info()  # uss: pages this process alone holds (not the object store's)
                    name = _name(p)
                    if name != "ray::IDLE" or p.pid not in self.names:
                        self.names[p.pid] = name  # a reused worker: what it last ran
                    self.peak[p.pid] = max(self.peak.get(p.pid, 0), mem.rss)
                    self.private[p.pid] = max(self.private.get(p.pid, 0), mem.uss)
                except psutil.Error:
                    continue
            self._stop.wait(self.every_s)

    def largest(self, private: bool = False) -> tuple[str, int]:
        peaks = self.private if private else self.peak
        if not peaks:
            return "-", 0
        pid = max(peaks, key=peaks.get)
        return self.names.get(pid, "?"), peaks[pid]


def _name(p: psutil.Process) -> str:
    try:
        cmd = p.cmdline()
    except psutil.Error:
        return "?"
    title = " ".join(cmd)
    if title.startswith("ray::"):
        return title.split()[0]
    return os.path.basename(cmd[0]) if cmd else p.name()


def _spilled_mib() -> float:
    from ray._private.internal_api import memory_summary

    found = re.search(r"Spilled ([\d.]+) MiB", memory_summary(stats_only=True))
    return float(found.group(1)) if found else 0.0


def fake_embed(batch: pa.Table) -> pa.Table:
    """An embedding for each user the plan sends to the encoder (status "embed"); null for the rest."""
    want = [s == "embed" for s in batch.column("status").to_pylist()]
    rng = np.random.default_rng(len(batch))
    column = [rng.random(DIM, dtype=np.float32).tolist() if w else None for w in want]
    out = batch.drop_columns([c for c in ("profile_text", "features") if c in batch.column_names])
    out = out.append_column("embedding", pa.array(column, pa.list_(pa.float32())))
    return out.append_column("t_embed", pa.array(np.zeros(len(batch))))


def night(root: str, data: str, partition_users: int, batch_size: int) -> dict:
    """One refresh night of the plan and the writer on a fresh local Ray session; its figures."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    from p2p.store import AdapterStore
    from pipelines.ray_setup import StoreCredentials
    from pipelines.refresh import GenerateAndWrite
    from pipelines.refresh_plan import StorePlan, guard_removals

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    DataContext.get_current().enable_progress_bars = False
    try:
        store = AdapterStore(root)
        committed = store.current(HYPERNET)
        written_before = _bytes(root, "manifests")
        with PeakRss() as rss, store.leased("bench night") as lease:
            t0 = time.perf_counter()
            plan = StorePlan(store, committed.layers(), [], DIM, partition_users, committed.users)
            checked = plan.check(f"{data}/users")
            removed = guard_removals(checked, 0.2, False, "bench")
            t1 = time.perf_counter()
            run = store.runs.begin(HYPERNET, lease)
            ds = plan.plan(ray.data.read_parquet(f"{data}/users"), checked.inputs, "embeddings", False, False)
            ds = ds.map_batches(fake_embed, batch_format="pyarrow", batch_size=batch_size)
            ds = ds.map_batches(GenerateAndWrite, fn_constructor_kwargs={
                "store": root, "credentials": StoreCredentials.of_driver(), "hypernet_id": HYPERNET,
                "run_id": run.run_id, "mode": "embeddings", "dim": DIM, "compact": False}, batch_format="pyarrow", batch_size=batch_size, compute=ActorPoolStrategy(size=1))
            parts, live, counts = [], 0, {"seen": 0, "written": 0, "unchanged": 0}
            for row in ds.iter_rows():
                parts += [row["part"]] if row["part"] else []
                live += row["rows"]
                for k in counts:
                    counts[k] += row[k]
            below = [p for layer in committed.layers() for p in layer]
            store.runs.commit(HYPERNET, run.run_id, below + parts, live, lease, mode="embeddings")
            t2 = time.perf_counter()
        spilled = _spilled_mib()
    finally:
        ray.shutdown()
    after = AdapterStore(root).current(HYPERNET)
    largest, largest_rss = rss.largest()
    private, private_peak = rss.largest(private=True)
    return {"guards_s": t1 - t0, "plan_write_commit_s": t2 - t1, "total_s": t2 - t0, "removed": removed,
            "partitions": checked.partitions, "seen": counts["seen"], "written": counts["written"],
            "unchanged": counts["unchanged"], "committed_users": after.users, "layers": len(after.layers()),
            "bytes_written": _bytes(root, "manifests") - written_before,
            "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "largest_process": largest, "largest_process_peak_rss_mb": largest_rss / 2**20,
            "largest_private": private, "largest_private_peak_mb": private_peak / 2**20,
            "processes": len(rss.peak), "spilled_mib": spilled}


def bytes_per_user_by_mode() -> list[dict]:
    """One user's stored bytes in each mode: PEFT files made by the refresh's own writer function at
    the embedded model's shapes (SmolLM2-135M, top 8 of 30 layers x q,v, r=8), and an embeddings row."""
    import torch

    from p2p.model.hypernet import HypernetConfig
    from p2p.model.peft_format import peft_files
    from p2p.store.manifest import embedding_row, encode, manifest_schema

    shapes = {"q_proj": [576, 576], "v_proj": [576, 192]}
    config = HypernetConfig(base_model="HuggingFaceTB/SmolLM2-135M-Instruct", encoder="all-MiniLM-L6-v2",
                            embed_dim=DIM, num_layers=30, layers=list(range(22, 30)), target_modules=list(shapes),
                            shapes=shapes, module_paths={m: f"model.layers.{{layer}}.self_attn.{m}" for m in shapes})
    gen = torch.Generator().manual_seed(0)
    adapter = {config.module_paths[m].format(layer=layer): (torch.randn(8, i, generator=gen), torch.randn(o, 8, generator=gen))
               for layer in config.layers for m, (i, o) in shapes.items()}
    rows = [embedding_row(f"user{i:09d}", HYPERNET, "0" * 64, np.random.default_rng(i).random(DIM, np.float32), 0)
            for i in range(4096)]
    per_row = len(encode(pa.Table.from_pylist(rows, schema=manifest_schema(DIM)))) / len(rows)
    out = [{"mode": f"adapters, {dtype}", "bytes per user": sum(len(b) for b in peft_files(adapter, config, dtype=dtype).values())}
           for dtype in ("float32", "bfloat16")]
    return out + [{"mode": "embeddings only (a manifest row, 4,096 a part)", "bytes per user": round(per_row)}]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, nargs="+", default=[1_000_000, 3_000_000, 10_000_000])
    parser.add_argument("--changed", type=float, default=0.10)
    parser.add_argument("--removed", type=float, default=0.001, help="share of users gone (as many new ones come)")
    parser.add_argument("--part-rows", type=int, default=4096, help="users per manifest part of the built store")
    parser.add_argument("--batch-size", type=int, default=1024, help="the refresh's --batch-size for the writer")
    parser.add_argument("--partition-users", type=int, default=50_000, help="the refresh's plan_partition_users")
    parser.add_argument("--root", default=None, help="scratch directory (default: a temporary one, removed after)")
    parser.add_argument("--night", nargs=2, default=None, help=argparse.SUPPRESS)  # STORE DATA: one night, JSON out
    args = parser.parse_args()
    if args.night:
        print(json.dumps(night(*args.night, args.partition_users, args.batch_size)))
        return

    rows = []
    for users in args.users:
        scratch = tempfile.mkdtemp(prefix="bench-refresh-scale-", dir=args.root)
        try:
            t = time.perf_counter()
            built = build(f"{scratch}/store", f"{scratch}/data", users, args.part_rows, args.changed, args.removed)
            build_s = time.perf_counter() - t
            print(f"{users:,} users built in {build_s:.0f}s; night...", file=sys.stderr, flush=True)
            out = subprocess.run([sys.executable, "-m", "bench.refresh_scale", "--night", f"{scratch}/store",
                                  f"{scratch}/data", "--partition-users", str(args.partition_users),
                                  "--batch-size", str(args.batch_size)], capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"the night at {users} users failed:\n{out.stderr[-3000:]}")
            got = json.loads(out.stdout.strip().splitlines()[-1])  # a fresh process: its peak RSS is the night's
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        changed = built["changed"] + built["new"]
        rows.append({
            "users": users, "changed (new profile or new user)": changed, "removed": got["removed"],
            "partitions": got["partitions"], "guards (s)": round(got["guards_s"], 1),
            "plan+write+commit (s)": round(got["plan_write_commit_s"], 1), "total (s)": round(got["total_s"], 1),
            "driver peak RSS (MB)": round(got["driver_peak_rss_mb"]),
            "largest process peak RSS (MB)": f"{got['largest_process_peak_rss_mb']:.0f} ({got['largest_process']})",
            "largest process peak USS (MB)": f"{got['largest_private_peak_mb']:.0f} ({got['largest_private']})",
            "spilled (MiB)": round(got["spilled_mib"]), "bytes written": got["bytes_written"],
            "bytes per changed user": round(got["bytes_written"] / max(changed, 1)),
            "rewriting every row instead (bytes per changed user)": round(built["store_bytes"] / max(changed, 1)),
            "checks": f"written {got['written']}, unchanged {got['unchanged']}, committed {got['committed_users']}, "
                      f"layers {got['layers']}",
        })
        print(rows[-1], file=sys.stderr, flush=True)
        if got["written"] != changed or got["committed_users"] != users or got["removed"] != built["removed"]:
            raise SystemExit(f"wrong night at {users} users: {got}")
    modes = bytes_per_user_by_mode()
    print("\n".join(f"{m['mode']}: {m['bytes per user']:,} bytes per user" for m in modes), file=sys.stderr)
    base = rows[0]["total (s)"]
    for r in rows:
        r["time / smallest"] = round(r["total (s)"] / base, 2)
    from bench.report import write

    write("refresh_scale", rows, {
        "what": "one night of the refresh's guards, plan, writer and commit over an embeddings-only store",
        "changed_share": args.changed, "removed_share": args.removed, "embedding_dim": DIM,
        "part_rows": args.part_rows, "batch_size": args.batch_size, "partition_users": args.partition_users,
        "ray": "local, num_cpus=4 on this machine's cores", "store": "local file://",
        "bytes_per_user_by_mode": modes,
    })


if __name__ == "__main__":
    main()
