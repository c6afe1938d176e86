"""Which change to the training recipe buys what: ablations on held-out users, against the controls.

Each variant trains the hypernetwork with the single-process loop (`p2p.train.loop.train_local`, the
same step `p2p train` runs on Ray) for the same number of steps on the same data, then `p2p eval`
scores P2P and the `shuffled` control (P2P's own hypernet, other users' profiles) on the same
held-out users: the gap between them is what the hypernet learned about users. Embedding
variants slice the profiles table (its vectors are [text embedding | label statistics]).

    python -m bench.recipe --data DATA [--variants before,standardize,init,features,features_only]
                           [--steps 250] [--tasks tag] [--users-per-split 30]

DATA needs profiles built with label features (`p2p profiles --data DATA --out DATA/profiles`).
Prints a Markdown table and writes bench/results/recipe.json, and the held-out users it scored to
bench/results/recipe-users.txt: choosing a recipe here is tuning on them, so a figure reported for
the chosen recipe excludes them (`p2p eval --exclude-users bench/results/recipe-users.txt`).
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time

import numpy as np
import pyarrow as pa

from bench.report import write
from p2p.config import TrainConfig
from p2p.data.schemas import read_table
from p2p.evaluation.evaluate import EvalConfig, Evaluation
from p2p.model.base import load_base_model
from p2p.model.hypernet import save_hypernet
from p2p.train.examples import example_rows

ZERO_HEADS = {"head_init_std": 0.0, "head_output_scale": 1.0}
# name -> (what changes, TrainConfig overrides, embedding part)
VARIANTS = {
    "before": ("zero-init heads, raw embeddings, text only, lr 1e-4",
               {"lr": 1e-4, "profile_features": 0, "standardize_inputs": False, **ZERO_HEADS}, "text"),
    "standardize": ("+ standardized embeddings", {"lr": 1e-4, "profile_features": 0, **ZERO_HEADS}, "text"),
    "init": ("+ small random heads, output scale, lr 1e-3", {"lr": 1e-3, "profile_features": 0}, "text"),
    "features": ("+ label statistics next to the text embedding", {"lr": 1e-3}, "all"),
    "features_only": ("label statistics alone (encoder 'none')", {"lr": 1e-3, "encoder": "none"}, "features"),
}


def sliced_profiles(profiles: pa.Table, part: str, features: int) -> pa.Table:
    """The profiles table with only the text part, only the features part, or all of the vector."""
    if part == "all":
        return profiles
    emb = np.asarray(profiles.column("embedding").combine_chunks().flatten(), np.float32).reshape(len(profiles), -1)
    emb = emb[:, : emb.shape[1] - features] if part == "text" else emb[:, emb.shape[1] - features :]
    column = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])
    return profiles.set_column(profiles.column_names.index("embedding"), "embedding", column)


def run_variant(name: str, base: TrainConfig, data: str, profiles: pa.Table, model, tokenizer, args
                ) -> tuple[dict, list[str]]:
    """The variant's row, and the held-out users it was scored on."""
    from p2p.train.loop import train_local

    what, overrides, part = VARIANTS[name]
    config = TrainConfig.model_validate({**base.model_dump(), **overrides})
    table = sliced_profiles(profiles, part, base.profile_features)
    train = example_rows(data, table, ("train",), config.tasks)
    val = example_rows(data, table, ("val",), config.tasks)
    dim = len(train[0]["embedding"])
    t0 = time.perf_counter()
    result = train_local(config, copy.deepcopy(model), tokenizer, train, val, dim, log=lambda s: None)
    seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        save_hypernet(result["hypernet"], tmp)
        evaluation = Evaluation(EvalConfig(run=tmp, data=data, out="", tasks=tuple(config.tasks or ()) or None,
                                           users_per_split=args.users_per_split, methods=("shuffled", "p2p"),
                                           bootstrap=1000), progress=lambda s: None)
        report = evaluation.run()
    row = {"variant": name, "change": what}
    for key, cell in sorted(report["methods"]["p2p"]["scores"].items()):
        effect = report["effects"].get(key, {})
        row[f"{key} p2p"] = cell["primary"]
        row[f"{key} shuffled"] = report["methods"]["shuffled"]["scores"][key]["primary"]
        if effect:
            row[f"{key} effect [95% CI]"] = f"{effect['effect']:+.3f} [{effect['ci95'][0]:+.3f}, {effect['ci95'][1]:+.3f}]"
    row["train s"] = seconds
    row["final loss"] = float(np.mean([h["loss"] for h in result["history"][-20:]]))
    return row, sorted(evaluation.users)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--tasks", default="tag")
    parser.add_argument("--users-per-split", type=int, default=30)
    parser.add_argument("--config", default=None, help="the recipe the variants change (default: TrainConfig)")
    args = parser.parse_args()
    from p2p.config import load_config

    base = load_config(args.config, max_steps=args.steps, tasks=[t for t in args.tasks.split(",") if t] or None,
                       eval_every=args.steps, log_every=args.steps)
    profiles = read_table(os.path.join(args.data, "profiles"), "profiles").select(["user_id", "embedding"])
    model, tokenizer = load_base_model(base.base)
    os.makedirs("bench/results", exist_ok=True)
    rows, scored = [], set()
    for name in args.variants.split(","):
        row, users = run_variant(name, base, args.data, profiles, model, tokenizer, args)
        rows.append(row)
        scored.update(users)
        print(row, flush=True)
        with open("bench/results/recipe-users.txt", "w") as f:  # after each variant: a killed run keeps it
            f.write("".join(f"{u}\n" for u in sorted(scored)))
    write("recipe", rows, {"data": args.data, "steps": args.steps, "batch_size": base.batch_size,
                           "tasks": args.tasks, "users_per_split": args.users_per_split,
                           "top_k_layers": base.top_k_layers})


if __name__ == "__main__":
    main()
