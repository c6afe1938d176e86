"""What a trained run answers for one task on *val* users: its error next to the input-only rule's,
and how its answers sit against the rule's answer and the persona's (the data's reference table).

For choosing a recipe without looking at held-out users (`p2p eval` scores those only): the three-task
recipe (`jobs/configs/train-quality-mix.yaml`) was chosen with this bench.

    python -m bench.val_answers --run RUN --data DATA --task rate [--users 50]

Prints a Markdown table (and, for a rating task, which answer each input-only answer got) and writes
bench/results/val_answers.json.
"""

from __future__ import annotations

import argparse
import collections

from bench.report import write
from p2p.evaluation.evaluate import EvalConfig, Evaluation
from p2p.evaluation.metrics import score


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--task", required=True)
    ap.add_argument("--users", type=int, default=50, help="val users sampled (seed 0)")
    args = ap.parse_args()
    config = EvalConfig(run=args.run, data=args.data, out="", splits=("val",), methods=("p2p", "shuffled"),
                        tasks=(args.task,), users_per_split=args.users)
    ev = Evaluation(config, progress=lambda s: None, allowed_splits=("val",))
    task, golds = ev.tasks[args.task], [e["target"] for e in ev.examples]
    reference = [ev.reference.get(e["example_id"]) for e in ev.examples]
    answers = {"rule": [r[1] if r else "" for r in reference]}
    answers |= {name: [(p or "").strip() for p in m.predict(ev.users, ev.examples)] for name, m in ev.methods().items()}
    rows, confusion = [], {}
    for name, preds in answers.items():
        row = {"method": name, task.primary: score(task, preds, golds, labels=ev.labels[args.task])[task.primary]}
        if all(reference):
            row["answers the persona's"] = sum(p == r[2] for p, r in zip(preds, reference, strict=True)) / len(preds)
            row["answers the rule's"] = sum(p == r[1] for p, r in zip(preds, reference, strict=True)) / len(preds)
            confusion[name] = sorted(collections.Counter(
                f"{r[1]}->{p}" for p, r in zip(preds, reference, strict=True)).items())
        rows.append(row)
    write("val_answers", rows, {"run": args.run, "task": args.task, "val_users": len(ev.users),
                                "questions": len(ev.examples), "rule_answer_to_answer": confusion})
    for name, pairs in confusion.items():
        print(f"{name}: rule's answer -> this answer: {', '.join(f'{k} x{v}' for k, v in pairs)}")


if __name__ == "__main__":
    main()
