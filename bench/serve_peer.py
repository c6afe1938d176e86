"""`p2p serve` against what a team builds without it, on the same work, in one run.

    python -m bench.serve_peer [--requests 32] [--mean-gap-ms 600] [--short 8] [--long 48] [--threads 1]

The same SmolLM2-135M, the same users' adapters (from one store), the same open-loop schedule of
chat requests from different users (Poisson arrivals, alternating short and long answers; see
bench/serve.py), three ways:

- `p2p serve`: one replica over HTTP, continuous batching (each request streamed);
- the peer: Hugging Face `generate` on a PEFT model holding every user's adapter, batches of the
  requests waiting (gathered for 50 ms, up to `--max-batch-size`), each row with its own adapter
  through PEFT's mixed-adapter batches (`adapter_names=`). It runs in this process, with no HTTP, so
  the comparison leans its way;
- the base model alone with the same batching loop: the cost of no personalization.

Reports tokens/s, p50/p95 latency (arrival to last token), as ratios against `p2p serve`. Torch
threads: `--threads` for every contender (the replica's `num_cpus`).
"""

from __future__ import annotations

import argparse
import queue
import tempfile
import threading
import time

import torch

from bench.report import write
from bench.serve import PROMPT, build_store, deploy, one, open_loop, run, schedule, schedule_args, start_serve
from p2p.model.base import load_base_model
from p2p.personalize import StoredAdapters


class BatchingPeer:
    """A request queue and one thread running `generate` over what waits: the loop a team writes first."""

    def __init__(self, model, tokenizer, adapters: bool, max_batch_size: int, wait_s: float = 0.05):
        self.model, self.tok, self.adapters = model, tokenizer, adapters
        self.max_batch_size, self.wait_s = max_batch_size, wait_s
        self.prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                                    add_generation_prompt=True)
        self.queue: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def ask(self, user: str, max_tokens: int) -> dict:
        done, box = threading.Event(), {}
        t0 = time.perf_counter()
        self.queue.put((user, max_tokens, done, box))
        done.wait()
        return {"latency": time.perf_counter() - t0, "ttft": float("nan"), "tokens": box["tokens"]}

    def _loop(self) -> None:
        while True:
            batch = [self.queue.get()]
            deadline = time.perf_counter() + self.wait_s
            while len(batch) < self.max_batch_size and (left := deadline - time.perf_counter()) > 0:
                try:
                    batch.append(self.queue.get(timeout=left))
                except queue.Empty:
                    break
            self.tok.padding_side = "left"
            inputs = self.tok([self.prompt] * len(batch), return_tensors="pt", padding=True)
            extra = {"adapter_names": [user for user, *_ in batch]} if self.adapters else {}
            with torch.no_grad():
                out = self.model.generate(**inputs, max_new_tokens=max(m for _, m, *_ in batch), do_sample=False,
                                          pad_token_id=self.tok.pad_token_id, **extra)
            for row, (_, max_tokens, done, box) in zip(out[:, inputs["input_ids"].shape[1]:], batch, strict=True):
                tokens = row[:max_tokens].tolist()
                if self.tok.eos_token_id in tokens:
                    tokens = tokens[: tokens.index(self.tok.eos_token_id)]
                box["tokens"] = len(tokens)
                done.set()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    schedule_args(ap)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    root = tempfile.mkdtemp(prefix="bench-peer-")
    store, _ = build_store(root, users=args.requests)
    plan = schedule(args.requests, args.mean_gap_ms / 1000, args.short, args.long, args.seed)
    rows = [{"server": "p2p serve (continuous batching, HTTP)", **serve_p2p(store, plan, args)}]

    from peft import PeftModel  # lazy: the p2p row above does not need it

    torch.set_num_threads(args.threads)
    users = [user for _, user, _ in plan]
    for user in users:
        StoredAdapters(store).fetch(user, f"{root}/peft/{user}")
    base, tok = load_base_model("smollm2-135m")
    peft_model = PeftModel.from_pretrained(base, f"{root}/peft/{users[0]}", adapter_name=users[0])
    for user in users[1:]:
        peft_model.load_adapter(f"{root}/peft/{user}", adapter_name=user)
    peer = BatchingPeer(peft_model.eval(), tok, adapters=True, max_batch_size=args.max_batch_size)
    peer.ask(users[0], 1)  # warm
    rows.append({"server": "HF generate + PEFT adapter_names (in-process)", **open_loop(peer.ask, plan)})
    plain, _ = load_base_model("smollm2-135m")
    base_peer = BatchingPeer(plain.eval(), tok, adapters=False, max_batch_size=args.max_batch_size)
    base_peer.ask(users[0], 1)
    rows.append({"server": "HF generate, base model only (in-process)", **open_loop(base_peer.ask, plan)})
    p2p = rows[0]
    for row in rows:
        row["tokens/s vs p2p"] = round(row["tokens/s"] / p2p["tokens/s"], 3)
        row["p95 latency vs p2p"] = round(row["p95 latency ms"] / p2p["p95 latency ms"], 3)
    write("serve_peer", rows, {"model": "smollm2-135m (top 8 layers x q,v adapters, r=8)", "requests": args.requests,
                               "mean_gap_ms": args.mean_gap_ms, "max_tokens": f"{args.short}/{args.long} alternating",
                               "torch threads": args.threads, "users": len(set(users))})
    return 0


def serve_p2p(store, plan, args) -> dict:
    from ray import serve

    port = start_serve()
    try:
        url = deploy(port, store.uri, recheck_s=3600, max_batch_size=args.max_batch_size,
                     cpus_per_replica=args.threads)
        for _, user, _ in plan:  # every adapter cached, the model warm: as the peer, which holds them all
            one(url, user, 1)
        out = run(url, plan)
    finally:
        serve.shutdown()
    return {k: v for k, v in out.items() if "TTFT" not in k}  # the peer does not stream: latency only


if __name__ == "__main__":
    raise SystemExit(main())
