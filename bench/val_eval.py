"""`p2p eval`'s report, on *val* users: for choosing a recipe or an ablation without touching held-out users.

`p2p eval` scores held-out splits only (test_id, test_ood), so a figure reported there never stood
on a choice. This runs the same Evaluation on the val split instead, with the same methods,
decodings and paired intervals, and writes its report to OUT (report.md, report.json):

    python -m bench.val_eval --run RUN --data DATA --out OUT --methods shuffled,p2p --decoding free,labels
"""

from __future__ import annotations

import argparse

from p2p.evaluation.evaluate import EvalConfig, Evaluation
from p2p.evaluation.report import report_markdown, write_report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--methods", default="shuffled,p2p")
    ap.add_argument("--decoding", default="free")
    ap.add_argument("--tasks", default=None)
    ap.add_argument("--users", type=int, default=None, help="val users sampled (seed 0; default all)")
    ap.add_argument("--shared", default=None)
    ap.add_argument("--retrieval", default=None)
    args = ap.parse_args(argv)
    config = EvalConfig(run=args.run, data=args.data, out=args.out, splits=("val",),
                        methods=tuple(args.methods.split(",")), decodings=tuple(args.decoding.split(",")),
                        tasks=tuple(args.tasks.split(",")) if args.tasks else None, users_per_split=args.users,
                        shared=args.shared, retrieval=args.retrieval, oppu_users=1)
    results = Evaluation(config, progress=print, allowed_splits=("val",)).run()
    write_report(results, args.out)
    report = report_markdown(results)
    print(report[: report.find("\n## By history") if "\n## By history" in report else len(report)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
