"""Continuous vs static batching over real HTTP, in one run: staggered arrivals from many users.

    python -m bench.serve [--requests 32] [--mean-gap-ms 600] [--short 8] [--long 48] [--replica-cpus 1]

SmolLM2-135M behind `p2p serve`, one replica per loop, deployed side by side on one Serve
instance and measured one after the other with the same arrival schedule: requests from
different (cached) users arrive at Poisson times (mean gap `--mean-gap-ms`), alternating short
and long answers (`--short` / `--long` max_tokens), each streamed so time to first token is seen.

- static: the old policy, a batch gathered for 50 ms runs until its longest row finishes;
  requests that arrive meanwhile wait for the whole batch.
- continuous: a request joins the running decode loop at the next step; finished rows leave.

Reports tokens/s, p50/p95 latency and time to first token, and the engine's mean rows per step,
as ratios continuous / static. The adapters come from a hypernetwork with random weights: the
cost of serving an adapter does not depend on what it learned. One torch thread per replica by
default: on a machine shared with other work, more threads than free cores makes every step
wait for the slowest thread.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import statistics
import tempfile
import threading
import time

import numpy as np
import requests
import torch

from bench.report import write
from p2p.model.base import load_base_model
from p2p.model.hypernet import Hypernetwork, make_config, save_hypernet
from p2p.personalize import Personalizer, publish_hypernet
from p2p.store import AdapterStore

PROMPT = "Write a one-line review of a quiet cafe."
MODES = ("static", "continuous")


def build_store(root: str, users: int, base: str = "smollm2-135m", noise: float = 1e-3,
                top_k_layers: int | None = 8) -> tuple[AdapterStore, Hypernetwork]:
    """A committed file:// store of `users` adapters from a hypernet with random weights (`noise` sizes them)."""
    model, _ = load_base_model(base)
    config = make_config(model, base, "minilm", 384, top_k_layers=top_k_layers)
    torch.manual_seed(0)
    hypernet = Hypernetwork(config)
    with torch.no_grad():
        for p in hypernet.parameters():
            p.add_(torch.randn_like(p) * noise)
    save_hypernet(hypernet, f"{root}/hn")
    store = AdapterStore(f"file://{root}/store")
    hid = publish_hypernet(store, f"{root}/hn")
    run_id = store.begin(hid)
    emb = np.random.default_rng(0).standard_normal((users, 384)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    items = [(f"user{i:05d}", Personalizer(hypernet, hid).files(a), f"h{i}", e)
             for i, (a, e) in enumerate(zip(hypernet.user_adapters(emb), emb, strict=True))]
    part = store.write_manifest_part(hid, run_id, store.write_adapters(hid, run_id, items), 384)
    store.commit(hid, run_id, [part], users)
    return store, hypernet


def schedule(n: int, mean_gap_s: float, short: int, long: int, seed: int) -> list[tuple[float, str, int]]:
    """(send time, user, max_tokens) for each request: Poisson arrivals, alternating short and long."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        out.append((t, f"user{i:05d}", short if i % 2 == 0 else long))
        t += rng.expovariate(1.0 / mean_gap_s)
    return out


def one(url: str, user: str, max_tokens: int) -> dict:
    """One streamed chat completion: time to first token, latency, tokens."""
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens, "temperature": 0,
            "user": user, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, tokens = None, 0
    with requests.post(f"{url}/v1/chat/completions", json=body, stream=True, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if first is None and any(c["delta"].get("content") for c in event["choices"]):
                first = time.perf_counter() - t0
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return {"latency": time.perf_counter() - t0, "ttft": first if first is not None else float("nan"),
            "tokens": tokens}


def run(url: str, plan: list[tuple[float, str, int]]) -> dict:
    """Send `plan` to a server open-loop, each request streamed; gather the figures."""
    return open_loop(lambda user, max_tokens: one(url, user, max_tokens), plan)


def open_loop(ask, plan: list[tuple[float, str, int]]) -> dict:
    """Each request of `plan` at its time, whatever the others do: `ask(user, max_tokens)` returns its
    latency, time to first token (NaN when not streamed) and tokens. Tokens/s and latency percentiles."""
    results: list[dict] = [{}] * len(plan)
    start = time.perf_counter() + 0.2

    def send(i: int, at: float, user: str, max_tokens: int) -> None:
        time.sleep(max(0.0, start + at - time.perf_counter()))
        results[i] = ask(user, max_tokens)

    threads = [threading.Thread(target=send, args=(i, *p)) for i, p in enumerate(plan)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = [r["latency"] for r in results]
    ttft = [r["ttft"] for r in results if r["ttft"] == r["ttft"]]
    tokens = sum(r["tokens"] for r in results)
    out = {"requests": len(plan), "tokens": tokens, "seconds": round(wall, 2), "tokens/s": round(tokens / wall, 2),
           "p50 latency ms": round(statistics.median(lat) * 1000), "p95 latency ms": round(_p95(lat) * 1000)}
    if ttft:
        out |= {"p50 TTFT ms": round(statistics.median(ttft) * 1000), "p95 TTFT ms": round(_p95(ttft) * 1000)}
    return out


def schedule_args(parser: argparse.ArgumentParser) -> None:
    """The request-mix options every serving bench shares (see `schedule`)."""
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--mean-gap-ms", type=float, default=600)
    parser.add_argument("--short", type=int, default=8)
    parser.add_argument("--long", type=int, default=48)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)


def start_serve() -> int:
    """A local Ray cluster and Serve's HTTP proxy on a free loopback port; returns the port."""
    from ray import serve

    from pipelines.ray_setup import ensure_ray

    ensure_ray()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


def deploy(port: int, store_uri: str, name: str = "p2p", route_prefix: str = "/", **build_kwargs) -> str:
    """`p2p serve`'s app over `store_uri` under `route_prefix`; returns its URL once /healthz answers."""
    from ray import serve

    from pipelines.serve import build_app

    serve.run(build_app(store_uri, **build_kwargs), name=name, route_prefix=route_prefix, blocking=False)
    url = f"http://127.0.0.1:{port}{route_prefix.rstrip('/')}"
    requests.get(f"{url}/healthz", timeout=600).raise_for_status()
    return url


def _p95(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=20)[18] if len(xs) > 1 else xs[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    schedule_args(parser)
    parser.add_argument("--replica-cpus", type=float, default=1)
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="bench-serve-")
    store, _ = build_store(root, users=args.requests)
    plan = schedule(args.requests, args.mean_gap_ms / 1000, args.short, args.long, args.seed)

    from ray import serve

    port = start_serve()
    rows = []
    try:
        for mode in MODES:
            url = deploy(port, store.uri, name=mode, route_prefix=f"/{mode}", recheck_s=3600, batching=mode,
                         max_batch_size=args.max_batch_size, batch_wait_s=0.05, cpus_per_replica=args.replica_cpus)
            for _, user, _ in plan:  # every user's adapter cached, the model warm
                one(url, user, 1)
            before = requests.get(f"{url}/healthz", timeout=30).json()["engine"]
            row = {"loop": mode, **run(url, plan)}
            after = requests.get(f"{url}/healthz", timeout=30).json()["engine"]
            steps = after["steps"] - before["steps"]
            row["mean rows/step"] = round((after["tokens"] - before["tokens"]) / max(steps, 1), 2)
            rows.append(row)
            serve.delete(mode)
    finally:
        serve.shutdown()
    static, continuous = rows
    summary = {
        "model": "smollm2-135m (top 8 layers x q,v adapters, r=8)", "replica_cpus": args.replica_cpus,
        "requests": args.requests, "mean_gap_ms": args.mean_gap_ms, "max_tokens": f"{args.short}/{args.long} alternating",
        "continuous_vs_static_tokens_per_s": round(continuous["tokens/s"] / static["tokens/s"], 3),
        "continuous_vs_static_p50_latency": round(continuous["p50 latency ms"] / static["p50 latency ms"], 3),
        "continuous_vs_static_p95_latency": round(continuous["p95 latency ms"] / static["p95 latency ms"], 3),
        "continuous_vs_static_p95_ttft": round(continuous["p95 TTFT ms"] / static["p95 TTFT ms"], 3),
    }
    write("serve", rows, summary)


if __name__ == "__main__":
    main()
