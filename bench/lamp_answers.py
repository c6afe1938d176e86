"""What the LaMP answer benches read: an evaluation's saved answers per method, and the split they answer.

`p2p eval` and `bench.val_eval` write each method's answers in LaMP's output format under
OUT/lamp/<method>/<task>.json, so a bench that splits or compares answers runs on a finished report with no
model. `bench.lamp_shaped` wrote the questions (with each user's profile) and the golds.
"""

from __future__ import annotations

import argparse
import json
import os


def parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--report", required=True, help="an evaluation's output folder")
    ap.add_argument("--questions", required=True, help="LaMP questions JSON of the scored split")
    ap.add_argument("--outputs", required=True, help="its LaMP outputs JSON (the golds)")
    ap.add_argument("--out", default="bench/results")
    return ap


def load_questions(path: str) -> list[dict]:
    with open(path) as f:
        return json.load(f)


def load_golds(path: str, ids: set[str]) -> dict[str, str]:
    """The outputs of a LaMP outputs file ({task, golds: [{id, output}]}) whose id is in `ids`, stripped."""
    with open(path) as f:
        return {g["id"]: g["output"].strip() for g in json.load(f)["golds"] if g["id"] in ids}


def method_answers(report: str, task: str, ids: set[str]) -> dict[str, dict[str, str]]:
    """Every method's answers to `task` in the report, by method name; one line naming the folder when none."""
    lamp = os.path.join(report, "lamp")
    methods = sorted(d for d in os.listdir(lamp) if os.path.isfile(os.path.join(lamp, d, f"{task}.json"))) \
        if os.path.isdir(lamp) else []
    if not methods:
        raise SystemExit(f"{lamp}: no method's {task}.json answers")
    return {m: load_golds(os.path.join(lamp, m, f"{task}.json"), ids) for m in methods}
