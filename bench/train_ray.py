"""The distributed training path against the single-process loop it wraps: examples/s, same cores, one run.

Both train the same hypernet on the same data for the same number of steps of the same total
batch: `p2p.train.loop.train_local` in this process (torch's threads over every core), and
`p2p train` on a local Ray cluster (Ray Train workers, DeepSpeed ZeRO, gloo, one CPU each), once per
ZeRO stage asked for. Each reports examples/s of its training loop (setup and validation excluded),
over the whole loop and over its second half (after the first epoch's cache fill and warm-up). The
local loop runs first and again last, and the ratios are against the mean of the two, so a slower
or faster spell of a shared machine does not land on one side only. Goal: Ray at >= 0.8x the local loop.

    python -m bench.train_ray [--base smollm2-135m] [--users 40] [--steps 60] [--workers 2] [--zero-stages 0,2]

Several epochs over a small set, so the frozen-prefix cache is exercised as in real runs.
Prints a Markdown table and writes bench/results/train_ray.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from typing import NamedTuple

import pyarrow.parquet as pq

from bench.report import write
from p2p.config import TrainConfig
from p2p.data.schemas import read_table
from p2p.data.synthetic import write_synthetic
from p2p.model.base import load_base_model
from p2p.profile.config import ProfileConfig
from p2p.profile.embedder import ProfileEmbedder, build_profiles
from p2p.train.examples import example_rows
from p2p.train.loop import train_local


def rates(records: list[dict], batch: int) -> tuple[float, float]:
    """Examples/s over the whole loop and over its second half (steps N/2..N).

    Both loops report a cumulative rate (training time only) at logged steps; the second half
    leaves out the first epoch's frozen-prefix cache fill and the first steps' warm-up (gloo,
    DeepSpeed's buckets), which a 60-step run weighs far more than a real one does.
    """
    records = [r for r in records if "examples_per_s" in r and r["step"] > 0]
    last = records[-1]
    mid = min(records, key=lambda r: abs(r["step"] - last["step"] / 2))

    def seconds(r: dict) -> float:
        return r["step"] * batch / r["examples_per_s"]

    return last["examples_per_s"], (last["step"] - mid["step"]) * batch / (seconds(last) - seconds(mid))


class LoopRate(NamedTuple):
    examples_per_s: float  # whole loop
    second_half: float  # steps N/2..N
    wall_s: float


def zero_stages(text: str) -> list[int]:
    """`--zero-stages 0,2` -> [0, 2]; anything else is refused before a minute of training is spent."""
    try:
        stages = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected stages like 0,2, got {text!r}") from None
    if any(not 0 <= s <= 3 for s in stages) or len(set(stages)) != len(stages):
        raise argparse.ArgumentTypeError(f"stages are distinct numbers 0-3, got {text!r}")
    return stages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--encoder", default="hashing", help="the encoder does not enter the training step")
    ap.add_argument("--users", type=int, default=40)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=8, help="examples per step in total")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--zero-stages", default="0,2", type=zero_stages,
                    help="comma-separated DeepSpeed ZeRO stages (0-3), one Ray run each")
    ap.add_argument("--top-k-layers", type=int, default=8)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    tmp = tempfile.mkdtemp(prefix="p2p-bench-train-")
    data = os.path.join(tmp, "data")
    write_synthetic(data, args.users, seed=0, tasks=("tag",))
    common = dict(base=args.base, encoder=args.encoder, top_k_layers=args.top_k_layers, max_steps=args.steps,
                  eval_every=args.steps, log_every=10, val_examples=16, max_seq_len=192, warmup_steps=5)
    local_cfg = TrainConfig(**common, batch_size=args.batch)
    profiles = build_profiles(data, ProfileEmbedder(args.encoder, ProfileConfig(**local_cfg.profile_config())))
    os.makedirs(os.path.join(data, "profiles"))
    pq.write_table(profiles, os.path.join(data, "profiles", "part-0.parquet"))
    table = read_table(os.path.join(data, "profiles"), "profiles")
    train = example_rows(data, table, ("train",))
    val = example_rows(data, table, ("val",))

    model, tokenizer = load_base_model(args.base)

    def run_local() -> LoopRate:
        t = time.perf_counter()
        result = train_local(local_cfg, copy.deepcopy(model), tokenizer, train, val, len(train[0]["embedding"]),
                             log=lambda s: None)
        return LoopRate(*rates(result["history"], args.batch), time.perf_counter() - t)

    from pipelines.ray_setup import ensure_ray
    from pipelines.train import run_training

    def run_ray(stage: int) -> LoopRate:
        cfg = TrainConfig(**common, batch_size=args.batch // args.workers, workers=args.workers, zero_stage=stage)
        out = os.path.join(tmp, f"run-zero{stage}")
        t = time.perf_counter()
        run_training(cfg, data, out, log=lambda s: None)
        wall = time.perf_counter() - t
        with open(os.path.join(out, "metrics.jsonl")) as f:
            return LoopRate(*rates([json.loads(line) for line in f], args.batch), wall)

    local_runs = [run_local()]
    ensure_ray()
    ray_runs = {stage: run_ray(stage) for stage in args.zero_stages}
    local_runs.append(run_local())
    base_rate = sum(r.examples_per_s for r in local_runs) / len(local_runs)
    base_late = sum(r.second_half for r in local_runs) / len(local_runs)

    def row(path: str, run: LoopRate) -> dict:
        return {"path": path, "examples_per_s": run.examples_per_s, "ratio": run.examples_per_s / base_rate,
                "second_half_examples_per_s": run.second_half, "second_half_ratio": run.second_half / base_late,
                "wall_s": run.wall_s}

    rows = [row(f"single process (train_local), {when}", run)
            for when, run in zip(("first", "last"), local_runs, strict=True)]
    rows += [row(f"Ray Train, {args.workers} workers, DeepSpeed ZeRO-{stage}", run) for stage, run in ray_runs.items()]
    write("train_ray", rows, {"base": args.base, "steps": args.steps, "batch_per_step": args.batch,
                              "train_examples": len(train), "epochs": args.steps * args.batch / len(train),
                              "top_k_layers": args.top_k_layers,
                              "goal": "ratio >= 0.8 (against the mean of the two local runs)"})


if __name__ == "__main__":
    main()
