"""`p2p synth` and `p2p import-lamp`: the data sets, written as Parquet."""

from __future__ import annotations

import argparse
import time

from p2p.data.lamp import import_lamp
from p2p.data.synthetic import write_synthetic
from p2p.errors import P2PError
from p2p.progress import ProgressBar


def cmd_synth(args: argparse.Namespace) -> int:
    tasks = tuple(t for t in args.tasks.split(",") if t)
    t0 = time.perf_counter()
    try:
        with ProgressBar(args.users, "synth", "user") as bar:
            stats = write_synthetic(
                args.out, args.users, args.seed, tasks, args.chunk_size, args.workers, progress=bar.update
            )
    except ValueError as exc:
        raise P2PError(str(exc)) from None
    secs = time.perf_counter() - t0
    print(f"wrote {stats['users']} users, {stats['examples']} examples to {args.out} "
          f"({stats['users'] / max(secs, 1e-9):.0f} users/s); splits: {stats['splits']}")
    return 0


def cmd_import_lamp(args: argparse.Namespace) -> int:
    stats = import_lamp(args.questions, args.outputs, args.split, args.out, args.history_examples)
    extra = f" ({stats['from_history']} from the users' histories)" if stats["from_history"] else ""
    print(f"imported {stats['task']}: {stats['users']} users, {stats['examples']} examples{extra} -> {args.out}")
    return 0
