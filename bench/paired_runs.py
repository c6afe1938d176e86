"""Two or more `p2p eval` reports on the same users, compared pairwise with paired CIs.

    python -m bench.paired_runs --data DATA --task tag --method p2p REPORT_A REPORT_B [REPORT_C ...]
    python -m bench.paired_runs --data DATA --task tag --split test_id NEW_REPORT OLD_REPORT:retrieval

`p2p eval` compares methods within one run; a recipe question (which encoder, which targets), or a new
run against a control kept from an earlier one, is a comparison across runs. `REPORT:METHOD` names
the method to read from that report (default `--method`). Its answers are its LaMP output file
(`REPORT/lamp/<method>/<task>.json`) or, where only `report.json` was kept, the predictions in it.
They are scored with the task's primary metric against the data's targets, on the examples every
report answered (of `--split`'s users, if given), and each pair's difference (first minus second; for
an error metric, negative is the first better) gets a paired bootstrap interval over users
(p2p.evaluation.stats), as within a report.
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
    """example_id -> answer of `method` on `task` in one report folder."""
    lamp = os.path.join(report, "lamp", method, f"{task}.json")
    if os.path.exists(lamp):
        with open(lamp) as f:
            return {row["id"]: row["output"] for row in json.load(f)["golds"]}
    try:
        with open(os.path.join(report, "report.json")) as f:
            methods = json.load(f)["methods"]
    except FileNotFoundError:
        raise SystemExit(f"{report}: neither lamp/{method}/{task}.json nor report.json") from None
    if task not in methods.get(method, {}).get("predictions", {}):
        raise SystemExit(f"{report}/report.json: no {task!r} predictions of method {method!r}; "
                         f"its methods: {', '.join(methods)}")
    return methods[method]["predictions"][task]


def report_and_method(name: str, default: str) -> tuple[str, str]:
    """`REPORT:METHOD` or `REPORT` (then the default method); a folder whose own name holds a colon is a REPORT."""
    folder, colon, method = name.rpartition(":")
    if os.path.isdir(name) or not colon or not method or "/" in method:
        return name, default
    if not os.path.isdir(folder):
        raise SystemExit(f"{name}: no report folder {folder!r}")
    return folder, method


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+", help="p2p eval report folders, each REPORT or REPORT:METHOD")
    ap.add_argument("--data", required=True, help="the data directory the reports were scored on")
    ap.add_argument("--task", required=True)
    ap.add_argument("--method", default="p2p", help="the method read from a report named without one")
    ap.add_argument("--split", default=None, help="only examples of this split (default: every example all answered)")
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--name", default="paired_runs", help="bench/results/<name>.{md,json}")
    args = ap.parse_args(argv)
    if len(args.reports) < 2:
        ap.error("give two reports or more")
    if len(set(args.reports)) < len(args.reports):
        ap.error("a report is named twice")
    by_report = {r: answers(*report_and_method(r, args.method), args.task) for r in args.reports}
    ids = sorted(set.intersection(*(set(a) for a in by_report.values())))
    table = pads.dataset(examples_uri(args.data)).to_table(columns=["example_id", "user_id", "target", "split"])
    gold = {e: (u, t) for e, u, t, s in zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True)
            if args.split is None or s == args.split}
    ids = [i for i in ids if i in gold]
    if not ids:
        raise SystemExit(f"no example answered in every report{' among ' + args.split + ' users' if args.split else ''}")
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
    write(args.name, rows, {"task": args.task, "method": args.method, "split": args.split or "all",
                            "users": len(set(users)), "examples": len(ids)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
