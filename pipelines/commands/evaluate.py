"""`p2p eval`: every method on held-out users, the report."""

from __future__ import annotations

import argparse
import os
import sys

from p2p.evaluation.baselines import OPPUConfig
from p2p.evaluation.evaluate import EvalConfig, run_eval
from p2p.evaluation.report import report_markdown


def cmd_eval(args: argparse.Namespace) -> int:
    config = EvalConfig(
        run=args.run, data=args.data, out=args.out, splits=tuple(args.split.split(",")),
        methods=tuple(args.methods.split(",")), decodings=tuple(d for d in args.decoding.split(",") if d), tasks=tuple(args.tasks.split(",")) if args.tasks else None,
        users_per_split=args.users_per_split, oppu_users=args.oppu_users,
        oppu=OPPUConfig(max_epochs=args.oppu_epochs, max_items=args.oppu_max_items), seed=args.seed,
        scoring=args.scoring, bootstrap=args.bootstrap, shared=args.shared, retrieval=args.retrieval, exclude_users=args.exclude_users,
    )
    results = run_eval(config, progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(report_markdown(results))
    print(f"report: {os.path.join(args.out, 'report.md')} (+ report.json, quality.png, effect.png, cost.png)")
    return 0
