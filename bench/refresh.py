"""Refresh throughput and store cost in both store modes (adapters, embeddings), same machine, same run.

    python -m bench.refresh [--users 5000] [--sample 1000] [--encoder minilm] [--modes adapters,embeddings]
                            [--cold 200] [--skip-stages]

Each stage alone runs in this process on `--sample` users with one torch thread, as each actor
of the pipeline gets one CPU (Ray sets OMP_NUM_THREADS=1 in workers). Then, per mode, `run_refresh`
into a fresh file store (SmolLM2 shapes, adapters on the top 8 layers, `--encoder`), timed after
the local Ray cluster is up: users/s end to end (goal: >= 80% of the slowest stage alone) and bytes
per user in the store (adapters/ + manifests/).

Cold-user latency is measured at the library level, which is what a serving replica does for a
user missing from its cache (the through-the-server figure is bench/serve.py's): the replica has
CURRENT and its manifest index loaded; for each of `--cold` random users, one thread,
- adapters mode: `read_adapter` (row lookup, on-demand record check, two object reads, sha256
  check) + `adapter_from_files` (safetensors -> tensors);
- embeddings mode: `adapter_row(embedding=True)` (row lookup, on-demand record check, the user's
  manifest part read for the embedding) + `adapters_from_rows` (embedding digest check + one
  hypernet pass at batch 1); "batched" divides one pass over 16 cold users by 16.
The store is local disk with a warm page cache: on S3 add one GET round trip per object read
(two for a folder, one for a part).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from bench.report import write
from p2p.data.schemas import read_table
from p2p.data.synthetic import write_synthetic
from p2p.model.base import load_base_model
from p2p.model.hypernet import Hypernetwork, make_config, save_hypernet
from p2p.model.peft_format import adapter_from_files
from p2p.personalize import Personalizer
from p2p.profile.config import ProfileConfig
from p2p.profile.embedder import profile_hash
from p2p.profile.encoder import ProfileEncoder
from p2p.profile.text import build_profile
from p2p.store import AdapterStore
from pipelines.refresh import RefreshConfig


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def stages_alone(hypernet, hid: str, encoder_name: str, profile: dict, histories: list[dict], bs: int,
                 tmp: str) -> dict[str, float]:
    """Seconds of each stage alone on `histories` (one thread)."""
    n, stages = len(histories), {}
    t = time.perf_counter()
    texts = [build_profile(h["history"], ProfileConfig(**profile)) for h in histories]
    hashes = [profile_hash(x, encoder_name) for x in texts]
    stages["profile"] = time.perf_counter() - t
    encoder = ProfileEncoder(encoder_name)
    encoder.encode(texts[:8])
    t = time.perf_counter()
    emb = np.concatenate([encoder.encode(texts[i : i + bs]) for i in range(0, n, bs)])
    stages["embed"] = time.perf_counter() - t
    t = time.perf_counter()
    files = []
    for i in range(0, n, bs):
        for a in hypernet.user_adapters(emb[i : i + bs]):
            files.append(Personalizer(hypernet, hid).files(a))
    stages["generate"] = time.perf_counter() - t
    store = AdapterStore(os.path.join(tmp, "store-alone"))
    t = time.perf_counter()
    for i in range(0, n, bs):
        store.write_adapters(hid, "alone", [(h["user_id"], f, p, e) for h, f, p, e in
                                            zip(histories[i : i + bs], files[i : i + bs], hashes[i : i + bs],
                                                emb[i : i + bs], strict=True)])
    stages["write"] = time.perf_counter() - t
    return stages


def cold_latencies(uri: str, mode: str, users: list[str], hypernet, hid: str) -> dict[str, float]:
    """p50/p95 ms per cold user (and per user in a batch of 16, embeddings mode)."""
    store = AdapterStore(uri)
    store.adapter_row(users[0])  # the replica's index is loaded once, before any user arrives
    times = []
    for uid in users:
        t = time.perf_counter()
        if mode == "adapters":
            adapter_from_files(store.read_adapter(uid)[0])
        else:
            Personalizer(hypernet, hid).adapters_from_rows([store.adapter_row(uid, embedding=True)])
        times.append(time.perf_counter() - t)
    out = {"cold p50 ms": 1000 * float(np.percentile(times, 50)), "cold p95 ms": 1000 * float(np.percentile(times, 95))}
    if mode == "embeddings":
        batched = []
        for i in range(0, len(users) - 15, 16):
            t = time.perf_counter()
            Personalizer(hypernet, hid).adapters_from_rows([store.adapter_row(u, embedding=True) for u in users[i : i + 16]])
            batched.append((time.perf_counter() - t) / 16)
        out["batched p50 ms/user"] = 1000 * float(np.percentile(batched, 50))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=5000)
    parser.add_argument("--sample", type=int, default=1000, help="users for each stage measured alone")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--encoder", default="minilm", help="minilm (realistic) or hashing (isolates the store)")
    parser.add_argument("--modes", default="adapters,embeddings")
    parser.add_argument("--cold", type=int, default=200, help="users whose cold-read latency is measured")
    parser.add_argument("--skip-stages", action="store_true", help="only the end-to-end runs")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-refresh-")
    data = os.path.join(tmp, "data")
    write_synthetic(data, args.users, seed=0, chunk_size=2500, workers=2)
    model, _ = load_base_model("smollm2-135m")
    dim = ProfileEncoder(args.encoder).dim
    config = make_config(model, "smollm2-135m", args.encoder, dim, top_k_layers=8)
    torch.manual_seed(0)
    hypernet = Hypernetwork(config)
    hn_dir = os.path.join(tmp, "hypernet")
    hid = save_hypernet(hypernet, hn_dir)
    del model
    torch.set_num_threads(1)
    histories = read_table(os.path.join(data, "users"), "users").to_pylist()
    rows = []
    slowest = None
    if not args.skip_stages:
        sample = histories[: args.sample]
        for name, s in stages_alone(hypernet, hid, args.encoder, config.profile, sample, args.batch_size, tmp).items():
            rows.append({"stage": name, "mode": "-", "users": len(sample), "seconds": round(s, 2),
                         "users/s": round(rate(len(sample), s), 1)})
        slowest = min(rows, key=lambda r: r["users/s"])

    from pipelines.ray_setup import ensure_ray
    from pipelines.refresh import run_refresh

    ensure_ray()
    cold_users = [h["user_id"] for h in np.random.default_rng(0).choice(histories, min(args.cold, args.users),
                                                                       replace=False)]
    per_mode = {}
    for mode in args.modes.split(","):
        uri = os.path.join(tmp, f"store-{mode}")
        t = time.perf_counter()
        summary = run_refresh(RefreshConfig(hypernet=hn_dir, data=data, store=uri, batch_size=args.batch_size,
                                            mode=mode))
        e2e = time.perf_counter() - t
        assert summary.written == args.users, summary.line()
        listing = AdapterStore(uri).objects.list("")
        stored = {top: sum(i.size for r, i in listing.items() if r.startswith(top + "/")) for top in ("adapters", "manifests")}
        cold = cold_latencies(uri, mode, cold_users, hypernet, hid)
        per_mode[mode] = {"users_per_s": round(rate(args.users, e2e), 1),
                          "bytes_per_user": round(sum(stored.values()) / args.users),
                          "adapter_bytes_per_user": round(stored["adapters"] / args.users),
                          "manifest_bytes_per_user": round(stored["manifests"] / args.users),
                          **{k.replace(" ", "_").replace("/", "_per_"): round(v, 2) for k, v in cold.items()},
                          "busy_seconds": {k: round(v, 1) for k, v in summary.seconds.items()}}
        rows.append({"stage": "end to end (Ray Data, 1 actor per stage)", "mode": mode, "users": args.users,
                     "seconds": round(e2e, 2), "users/s": round(rate(args.users, e2e), 1),
                     "bytes/user": per_mode[mode]["bytes_per_user"],
                     **{k: round(v, 2) for k, v in cold.items()}})
    columns = ["stage", "mode", "users", "seconds", "users/s", "bytes/user", "cold p50 ms", "cold p95 ms",
               "batched p50 ms/user"]
    rows = [{c: r.get(c, "-") for c in columns} for r in rows]
    out = {"users": args.users, "encoder": args.encoder, "batch_size": args.batch_size, "modes": per_mode,
           "cold_users": len(cold_users), "torch_threads": 1}
    if slowest is not None:
        out.update({"slowest_stage": slowest["stage"], "slowest_stage_users_per_s": slowest["users/s"],
                    "ratio_vs_slowest_stage": {m: round(v["users_per_s"] / slowest["users/s"], 3)
                                               for m, v in per_mode.items()}, "goal": ">= 0.8"})
    if {"adapters", "embeddings"} <= per_mode.keys():
        a, e = per_mode["adapters"], per_mode["embeddings"]
        out["embeddings_vs_adapters"] = {"bytes_per_user": round(e["bytes_per_user"] / a["bytes_per_user"], 4),
                                         "users_per_s": round(e["users_per_s"] / a["users_per_s"], 2),
                                         "cold_p50": round(e["cold_p50_ms"] / a["cold_p50_ms"], 2)}
    write("refresh" if args.encoder == "minilm" else f"refresh_{args.encoder}", rows, out)


if __name__ == "__main__":
    main()
