"""The store at a million users: a commit, gc and deleting 1,000 users, with seconds and peak memory.

    python -m bench.store_scale [--users 1000000] [--part-rows 256] [--delete 1000] [--root DIR]

Builds an embeddings-only store with numpy (no Ray, no model): run A with `--users` rows (384-d
float32 embeddings, one Parquet part per `--part-rows` users, as a refresh with that batch size
writes), then run B with 10% of the profiles changed, as two nightly refreshes leave it. Each
operation then runs in a fresh process, so its peak RSS (getrusage) is its own; Arrow's pool peak
is reported beside it:
- commit: commit run B (part check by listing, stray cleanup, commit record, CURRENT);
- (the refresh's plan at scale, on Ray: bench/refresh_scale.py);
- gc: `collect_garbage(keep_runs=1, grace_s=0)` (run A's parts and record go);
- delete: `delete_users` of `--delete` random users (tombstones, every part searched, recommit).
The store is local (file://): S3 adds request latency per part, listed in the JSON as counts.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa

HYPERNET = "bench000000000000"
DIM = 384


def _ids(n: int) -> list[str]:
    return [f"user{i:08d}" for i in range(n)]


def _hash_strings(words: np.ndarray) -> list[str]:
    return [f"{a:016x}{b:016x}{c:016x}{d:016x}" for a, b, c, d in words.tolist()]


def build(root: str, users: int, part_rows: int) -> dict:
    """Two committed runs (A, then B with 10% changed); returns what was built."""
    from p2p.store import AdapterStore, new_run_id
    from p2p.store.manifest import embedding_digest, encode, manifest_schema

    store = AdapterStore(root)
    schema = manifest_schema(DIM)
    ids = _ids(users)
    rng = np.random.default_rng(0)
    words = rng.integers(0, 2**63, size=(users, 4), dtype=np.int64)
    changed = rng.random(users) < 0.10
    out = {}
    with store.leased("bench build") as lease:
        for name, salt in (("A", None), ("B", 1)):
            run_id = new_run_id()
            if salt is not None:
                words[changed] = np.random.default_rng(salt).integers(0, 2**63, size=(changed.sum(), 4), dtype=np.int64)
            parts, t = [], time.perf_counter()
            for start in range(0, users, part_rows):
                stop = min(users, start + part_rows)
                emb = np.random.default_rng([start, 0 if salt is None else salt]).standard_normal(
                    (stop - start, DIM)).astype(np.float32)
                table = pa.table({
                    "user_id": ids[start:stop], "adapter_uri": pa.nulls(stop - start, pa.string()),
                    "profile_hash": _hash_strings(words[start:stop]), "hypernet_id": [HYPERNET] * (stop - start),
                    "sha256": [embedding_digest(e) for e in emb], "bytes": np.zeros(stop - start, np.int64),
                    "created_at": np.full(stop - start, int(time.time()), np.int64),
                    "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), DIM),
                }, schema=schema)
                rel = f"manifests/{HYPERNET}/{run_id}.parquet/part-{start:09d}.parquet"
                store.objects.write(rel, encode(table), durable=False)
                parts.append(rel)
            out[f"write run {name} (s)"] = round(time.perf_counter() - t, 1)
            if name == "A":
                store.runs.commit(HYPERNET, run_id, parts, users, lease, mode="embeddings")
            else:
                out["pending"] = {"run_id": run_id, "parts": parts}
                store.runs.objects.write(f"manifests/{HYPERNET}/PENDING", json.dumps(
                    {"run_id": run_id, "owner": "bench", "started_at": time.time(), "resume_from": []}).encode())
    out["manifest bytes per run"] = sum(i.size for r, i in store.objects.list(f"manifests/{HYPERNET}").items()
                                        if r.endswith(".parquet")) // 2
    return out


def step(which: str, root: str, users: int, part_rows: int, delete: int, pending: dict | None) -> dict:
    """One timed operation in this (fresh) process."""
    from p2p.store import AdapterStore

    store = AdapterStore(root)
    detail: dict = {}
    t = time.perf_counter()
    if which == "commit":
        with store.leased("bench commit") as lease:
            store.runs.commit(HYPERNET, pending["run_id"], pending["parts"], users, lease, mode="embeddings")
    elif which == "gc":
        from p2p.store.gc import collect_garbage

        with store.leased("bench gc") as lease:
            report = collect_garbage(store, lease, keep_runs=1, grace_s=0)
        detail["freed"] = {"objects": report.objects, "bytes": report.bytes}
    elif which == "delete":
        from p2p.store.deletion import delete_users

        gone = [f"user{i:08d}" for i in np.random.default_rng(3).choice(users, delete, replace=False)]
        with store.leased("bench delete") as lease:
            report = delete_users(store, gone, lease)
        detail["deleted"] = {"rows": report.committed_rows_removed, "parts rewritten": report.parts_rewritten}
    seconds = time.perf_counter() - t
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "arrow_peak_mb": round(pa.default_memory_pool().max_memory() / 2**20), **detail}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--part-rows", type=int, default=256, help="users per manifest part (a refresh's batch size)")
    parser.add_argument("--delete", type=int, default=1000)
    parser.add_argument("--root", default=None, help="scratch directory (default: a temporary one, removed after)")
    parser.add_argument("--step", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--pending", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        pending = None
        if args.pending:
            with open(args.pending) as f:
                pending = json.load(f)
        print(json.dumps(step(args.step, args.root, args.users, args.part_rows, args.delete, pending)))
        return

    scratch = args.root or tempfile.mkdtemp(prefix="bench-store-scale-")
    root = os.path.join(scratch, "store")
    try:
        t = time.perf_counter()
        built = build(root, args.users, args.part_rows)
        build_s = time.perf_counter() - t
        pending_file = os.path.join(scratch, "pending.json")  # thousands of part names: too long for argv
        with open(pending_file, "w") as f:
            json.dump(built.pop("pending"), f)
        rows = []
        for which in ("commit", "gc", "delete"):
            out = subprocess.run([sys.executable, "-m", "bench.store_scale", "--step", which, "--root", root,
                                  "--users", str(args.users), "--part-rows", str(args.part_rows),
                                  "--delete", str(args.delete), "--pending", pending_file],
                                 capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append({"operation": which, "users": args.users, **{k: result.pop(k) for k in
                         ("seconds", "peak_rss_mb", "arrow_peak_mb")}, "detail": json.dumps(result)})
            print(f"{which}: {rows[-1]}", file=sys.stderr, flush=True)
    finally:
        if args.root is None:
            shutil.rmtree(scratch, ignore_errors=True)
    from bench.report import write

    parts = -(-args.users // args.part_rows)
    write("store_scale", rows, {
        "users": args.users, "manifest_parts_per_run": parts, "embedding_dim": DIM,
        "manifest_bytes_per_user": round(built["manifest bytes per run"] / args.users, 1),
        "build_seconds": round(build_s, 1), **{k: v for k, v in built.items() if k.startswith("write")},
        "store": "local file:// (on S3 each part is one GET or PUT: gc and delete read every part once)",
        "per_million_users": {r["operation"]: round(r["seconds"] * 1_000_000 / args.users, 1) for r in rows},
    })


if __name__ == "__main__":
    main()
