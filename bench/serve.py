"""Serving throughput and latency over real HTTP: base model vs personalized, warm vs cold adapters.

    python -m bench.serve [--clients 8] [--requests 32] [--max-tokens 16]

SmolLM2-135M behind `p2p serve` (one replica with 2 CPUs) and a `file://` store of adapters
(top 8 layers x q,v, r=8) made by a hypernetwork with random weights: the cost of serving an
adapter does not depend on what it learned. N closed-loop clients send the same prompt:
(a) no user: base model; (b) every request the same user; (c) every request a different user,
adapters already cached; (d) every request a user not yet cached (loaded from the store).
Also: p50 of one cold adapter load (store read + digest + tensors) and of an on-demand adapter
(POST /v1/users/{id}/adapter: profile, MiniLM, hypernet, store write). Goal: (c) >= 0.8 x (a).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import requests
import torch

from bench.report import write
from p2p.generate import adapter_files, generate_user_adapters
from p2p.hypernet import Hypernetwork, make_config, save_hypernet
from p2p.lora import adapter_from_files
from p2p.models import load_base_model
from p2p.store import AdapterStore

PROMPT = "Write a one-line review of a quiet cafe."


def build_store(root: str, users: int) -> AdapterStore:
    model, _ = load_base_model("smollm2-135m")
    config = make_config(model, "smollm2-135m", "minilm", 384, top_k_layers=8)
    torch.manual_seed(0)
    hypernet = Hypernetwork(config)
    with torch.no_grad():
        for p in hypernet.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    save_hypernet(hypernet, f"{root}/hn")
    store = AdapterStore(f"file://{root}/store")
    hid = store.publish_hypernet(f"{root}/hn")
    run_id = store.begin(hid)
    emb = np.random.default_rng(0).standard_normal((users, 384)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    items = [(f"user{i:05d}", adapter_files(hypernet, hid, a), f"h{i}", e)
             for i, (a, e) in enumerate(zip(generate_user_adapters(hypernet, emb), emb, strict=True))]
    part = store.write_manifest_part(hid, run_id, store.write_adapters(hid, run_id, items), 384)
    store.commit(hid, run_id, [part], users)
    return store


def load(url: str, users: list[str | None], clients: int, max_tokens: int) -> dict:
    """Closed loop: `clients` threads, each sends its next request when the last one returns."""
    latencies, tokens = [], 0

    def one(user):
        body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens, "temperature": 0}
        if user is not None:
            body["user"] = user
        t = time.perf_counter()
        r = requests.post(f"{url}/v1/chat/completions", json=body, timeout=600)
        r.raise_for_status()
        return time.perf_counter() - t, r.json()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for seconds, body in pool.map(one, users):
            latencies.append(seconds)
            tokens += body["usage"]["completion_tokens"]
            assert body["personalized"] == (users[0] is not None), body
    wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=20)
    return {"requests": len(users), "tokens": tokens, "seconds": round(wall, 2), "tokens/s": round(tokens / wall, 1),
            "p50 ms": round(statistics.median(latencies) * 1000), "p95 ms": round(q[18] * 1000)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    n = args.requests
    root = tempfile.mkdtemp(prefix="bench-serve-")
    store = build_store(root, users=3 * n + 8)
    users = [f"user{i:05d}" for i in range(3 * n + 8)]

    timings = []
    for uid in users[-8:]:
        t = time.perf_counter()
        adapter_from_files(store.read_adapter(uid)[0])
        timings.append(time.perf_counter() - t)
    cold_load_ms = statistics.median(timings) * 1000

    from ray import serve

    from pipelines.serve import start

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = start(store.uri, port=port, recheck_s=60.0, max_batch_size=args.clients, batch_wait_s=0.01,
                cpus_per_replica=2)
    try:
        requests.get(f"{url}/healthz", timeout=300).raise_for_status()
        load(url, [None] * args.clients, args.clients, 2)  # warm up the replica
        warm = users[:n]
        load(url, warm, args.clients, 1)  # (c) needs these cached
        rows = []
        scenarios = [("(a) base model, no user", [None] * n), ("(b) one user, every request", [users[0]] * n),
                     ("(c) a different user per request, cached", warm),
                     ("(d) a different user per request, cold (file:// store)", users[n : 2 * n])]
        for name, batch in scenarios:
            rows.append({"scenario": name, **load(url, batch, args.clients, args.max_tokens)})
        history = [{"item_id": f"i{i}", "text": f"A calm cafe with good tea, visit {i}.", "label": "4", "ts": i}
                   for i in range(20)]
        on_demand = []
        for i in range(5):
            t = time.perf_counter()
            requests.post(f"{url}/v1/users/new{i}/adapter", json={"history": history}, timeout=300).raise_for_status()
            on_demand.append(time.perf_counter() - t)
        stats = requests.get(f"{url}/healthz", timeout=30).json()["stats"]
    finally:
        serve.shutdown()
    base, mixed = rows[0]["tokens/s"], rows[2]["tokens/s"]
    summary = {
        "clients": args.clients, "max_tokens": args.max_tokens, "replica_cpus": 2,
        "mixed_users_vs_base_throughput": round(mixed / base, 3), "goal": ">= 0.8",
        "cold_adapter_load_p50_ms": round(cold_load_ms, 1),
        "on_demand_adapter_p50_ms (first includes loading MiniLM)": round(statistics.median(on_demand) * 1000),
        "mean_rows_per_batch": round(stats["rows"] / max(stats["batches"], 1), 2),
    }
    write("serve", rows, summary)


if __name__ == "__main__":
    main()
