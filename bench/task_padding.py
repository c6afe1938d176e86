"""Tokens a training pass computes with mixed batches against one task per batch (`batch_by_task`).

A batch is padded to its longest example, so mixing a short task with a long one pays for the long
one's length on every row. Counts prompt + target tokens with the base model's tokenizer over a
sample of training examples, batched in their shuffled order (mixed) or per task.

    python -m bench.task_padding --data DATA [--base smollm2-135m] [--examples 2000] [--batch 4]

Prints a Markdown table and writes bench/results/task_padding.json.
"""

from __future__ import annotations

import argparse
import random

from bench.report import write
from p2p.data.schemas import examples_uri, read_table
from p2p.model.base import load_tokenizer


def padded(lengths: list[int], batch: int) -> int:
    return sum(max(lengths[i : i + batch]) * len(lengths[i : i + batch]) for i in range(0, len(lengths), batch))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--examples", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    tok = load_tokenizer(args.base)
    train = [e for e in read_table(examples_uri(args.data), "examples").to_pylist() if e["split"] == "train"]
    sample = random.Random(0).sample(train, min(args.examples, len(train)))
    lengths = [(e["task"], len(tok(e["input"])["input_ids"]) + len(tok(e["target"])["input_ids"])) for e in sample]
    by_task: dict[str, list[int]] = {}
    for task, n in lengths:
        by_task.setdefault(task, []).append(n)
    unpadded = sum(n for _, n in lengths)
    mixed = padded([n for _, n in lengths], args.batch)
    one_task = sum(padded(ns, args.batch) for ns in by_task.values())
    rows = [{"batches": name, "tokens": tokens, "ratio to unpadded": tokens / unpadded}
            for name, tokens in (("unpadded", unpadded), ("mixed", mixed), ("one task per batch", one_task))]
    write("task_padding", rows, {"data": args.data, "base": args.base, "examples": len(sample), "batch": args.batch,
                                 "mixed / one task per batch": mixed / one_task,
                                 "mean tokens per task": {t: sum(v) / len(v) for t, v in sorted(by_task.items())}})


if __name__ == "__main__":
    main()
