"""Refresh throughput: end to end on Ray Data against each stage measured alone, same machine, same run.

    python -m bench.refresh [--users 5000] [--sample 1000]

Each stage alone runs in this process on `--sample` users with one torch thread, as each actor
of the pipeline gets one CPU (Ray sets OMP_NUM_THREADS=1 in workers). The end-to-end run is
`run_refresh` into a fresh file store (SmolLM2 shapes, adapters on the top 8 layers, MiniLM),
timed after the local Ray cluster is up. Goal: end to end >= 80% of the slowest stage alone.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from bench.report import write
from p2p.config import RefreshConfig
from p2p.data.schemas import read_table
from p2p.data.synthetic import write_synthetic
from p2p.encoder import ProfileEncoder
from p2p.generate import adapter_files, generate_user_adapters
from p2p.hypernet import Hypernetwork, make_config, save_hypernet
from p2p.models import load_base_model
from p2p.profile import ProfileConfig, build_profile, profile_hash
from p2p.store import AdapterStore


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=5000)
    parser.add_argument("--sample", type=int, default=1000, help="users for each stage measured alone")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-refresh-")
    data = os.path.join(tmp, "data")
    write_synthetic(data, args.users, seed=0, chunk_size=2500, workers=2)
    model, _ = load_base_model("smollm2-135m")
    config = make_config(model, "smollm2-135m", "minilm", 384, top_k_layers=8)
    torch.manual_seed(0)
    hypernet = Hypernetwork(config)
    hn_dir = os.path.join(tmp, "hypernet")
    hid = save_hypernet(hypernet, hn_dir)
    del model

    torch.set_num_threads(1)
    histories = read_table(os.path.join(data, "users"), "users").slice(0, args.sample).to_pylist()
    n, bs = len(histories), args.batch_size
    stages = {}
    t = time.perf_counter()
    texts = [build_profile(h["history"], ProfileConfig(**config.profile)) for h in histories]
    hashes = [profile_hash(x, "minilm") for x in texts]
    stages["profile"] = time.perf_counter() - t
    encoder = ProfileEncoder("minilm")
    encoder.encode(texts[:8])
    t = time.perf_counter()
    emb = np.concatenate([encoder.encode(texts[i : i + bs]) for i in range(0, n, bs)])
    stages["embed"] = time.perf_counter() - t
    t = time.perf_counter()
    files = []
    for i in range(0, n, bs):
        for a in generate_user_adapters(hypernet, emb[i : i + bs]):
            files.append(adapter_files(hypernet, hid, a))
    stages["generate"] = time.perf_counter() - t
    store = AdapterStore(os.path.join(tmp, "store-alone"))
    t = time.perf_counter()
    for i in range(0, n, bs):
        store.write_adapters(hid, "alone", [(h["user_id"], f, p, e) for h, f, p, e in
                                            zip(histories[i : i + bs], files[i : i + bs], hashes[i : i + bs],
                                                emb[i : i + bs], strict=True)])
    stages["write"] = time.perf_counter() - t
    adapter_bytes = sum(len(b) for b in files[0].values())

    from pipelines.ray_setup import ensure_ray
    from pipelines.refresh import run_refresh

    ensure_ray()
    t = time.perf_counter()
    summary = run_refresh(RefreshConfig(hypernet=hn_dir, data=data, store=os.path.join(tmp, "store"), batch_size=bs))
    e2e = time.perf_counter() - t
    assert summary.written == args.users, summary.line()

    rows = [{"stage": name, "users": n, "seconds": round(s, 2), "users/s": round(rate(n, s), 1)}
            for name, s in stages.items()]
    slowest = min(rows, key=lambda r: r["users/s"])
    rows.append({"stage": "end to end (Ray Data, 1 actor per stage)", "users": args.users, "seconds": round(e2e, 2),
                 "users/s": round(rate(args.users, e2e), 1)})
    summary_out = {
        "users": args.users, "end_to_end_users_per_s": round(rate(args.users, e2e), 1),
        "slowest_stage": slowest["stage"], "slowest_stage_users_per_s": slowest["users/s"],
        "ratio_vs_slowest_stage": round(rate(args.users, e2e) / slowest["users/s"], 3), "goal": ">= 0.8",
        "adapter_bytes_per_user": adapter_bytes, "embedding_bytes_per_user": 384 * 4,
        "stage_busy_seconds_in_pipeline": {k: round(v, 1) for k, v in summary.seconds.items()},
    }
    write("refresh", rows, summary_out)


if __name__ == "__main__":
    main()
