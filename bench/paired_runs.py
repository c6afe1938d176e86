"""Two or more `p2p eval` reports of one method on the same users, compared pairwise with paired CIs.

    python -m bench.paired_runs --data DATA --task tag --method p2p REPORT_A REPORT_B [REPORT_C ...]

`p2p eval` compares methods within one run; a recipe question (which encoder, which targets) is a
comparison across runs. Each report's LaMP output file (`REPORT/lamp/<method>/<task>.json`) holds
its answers; they are scored with the task's primary metric against the data's targets, on the
examples every report answered, and each pair's difference gets a paired bootstrap interval over
users (p2p.evaluation.stats), as within a report.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

import pyarrow.dataset as pads

from bench.report import write
from p2p.data.schemas import examples_uri
from p2p.evaluation.metrics import primary_per_example
from p2p.evaluation.stats import mean_ci, paired_diff_ci
from p2p.task.registry import task_for


def answers(report: str, method: str, task: str) -> dict[str, str]:
    with open(os.path.join(report, "lamp", method, f"{task}.json")) as f:
        return {row["id"]: row["output"] for row in json.load(f)["golds"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+", help="p2p eval report folders (REPORT/lamp/... inside)")
    ap.add_argument("--data", required=True, help="the data directory the reports were scored on")
    ap.add_argument("--task", required=True)
    ap.add_argument("--method", default="p2p")
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--name", default="paired_runs", help="bench/results/<name>.{md,json}")
    args = ap.parse_args(argv)
    if len(args.reports) < 2:
        ap.error("give two reports or more")
    by_report = {r: answers(r, args.method, args.task) for r in args.reports}
    ids = sorted(set.intersection(*(set(a) for a in by_report.values())))
    table = pads.dataset(examples_uri(args.data)).to_table(columns=["example_id", "user_id", "target"])
    gold = {e: (u, t) for e, u, t in zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True)}
    ids = [i for i in ids if i in gold]
    golds, users = [gold[i][1] for i in ids], [gold[i][0] for i in ids]
    task = task_for(args.task, golds)
    scores = {r: primary_per_example(task, [a[i] for i in ids], golds) for r, a in by_report.items()}
    rows = []
    for r in args.reports:
        ci = mean_ci(scores[r], users, samples=args.bootstrap)
        rows.append({"report": r, "versus": "", f"{task.primary} [95% CI]": ci.text()})
    for a, b in itertools.combinations(args.reports, 2):
        ci = paired_diff_ci(scores[a], scores[b], users, samples=args.bootstrap)
        rows.append({"report": a, "versus": b,
                     f"{task.primary} [95% CI]": f"{ci.value:+.3f} [{ci.low:+.3f}, {ci.high:+.3f}] (difference)"})
    write(args.name, rows, {"task": args.task, "method": args.method, "users": len(set(users)), "examples": len(ids)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
