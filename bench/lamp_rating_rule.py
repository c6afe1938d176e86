"""Each method's LaMP-3-shaped ratings against the hand rule that reads the user's offset off their history.

Every LaMP-3-shaped review carries a sentiment 1-5 and each user shifts every rating by a personal
offset, so the rule "the review's sentiment plus the user's mean shift over their history" is the
bracket a personalized method should reach (it reads the user: a reference, not a control). The mean
shift underestimates offsets the 1-5 scale clips, so a second rule, the offset that best explains the
clipped history, shows the ceiling. `p2p eval` scores the methods; this sets each one against the mean
shift rule on the same questions, with a paired interval over users, and splits the error by whether
the user shifts this answer (where only reading the user helps) or not. No model runs.

    python -m bench.lamp_rating_rule --report OUT --questions DIR/test_id_questions.json \
        --outputs DIR/test_id_outputs.json

OUT is a `p2p eval` or `bench.val_eval` output folder (OUT/lamp/<method>/LaMP_3.json: each method's
answers in LaMP's format); DIR is what `bench.lamp_shaped --task LaMP_3` wrote. Writes
bench/results/lamp_rating_rule.{md,json}.
"""

from __future__ import annotations

from bench.lamp_answers import load_golds, load_questions, method_answers, parser
from bench.lamp_shaped import clipped_offset_rule, offset_rule, sentiment_of
from bench.report import write
from p2p.evaluation.metrics import rating_error
from p2p.evaluation.stats import mean_ci, paired_diff_ci


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    loaded = load_questions(args.questions)
    sentiment = {q["id"]: sentiment_of(q["input"]) for q in loaded}
    rule = {q["id"]: offset_rule(q["profile"], sentiment[q["id"]]) for q in loaded}
    clip_rule = {q["id"]: clipped_offset_rule(q["profile"], sentiment[q["id"]]) for q in loaded}
    golds = load_golds(args.outputs, set(rule))
    answer_sets = method_answers(args.report, "LaMP_3", set(golds))
    scored = set().union(*answer_sets.values())
    answer_sets["history rule"] = {i: rule[i] for i in scored}
    answer_sets["history rule, clip-aware"] = {i: clip_rule[i] for i in scored}
    rule_error = {i: rating_error(rule[i], golds[i]) for i in scored}
    rows = []
    for method, answers in answer_sets.items():
        ids = sorted(answers)  # one question per user in LaMP-3: the question id stands for its user
        error = [rating_error(answers[i], golds[i]) for i in ids]
        # the user's offset shows where the gold differs from the review's own sentiment
        shifted = [i for i in ids if int(golds[i]) != sentiment[i]]
        unshifted = [i for i in ids if int(golds[i]) == sentiment[i]]
        by_id = dict(zip(ids, error, strict=True))
        rows.append({"method": method, "users": len(ids), "MAE": mean_ci(error, ids).text(),
                     "MAE - history rule": paired_diff_ci(error, [rule_error[i] for i in ids], ids).text(),
                     "MAE where the user shifts the rating": mean_ci([by_id[i] for i in shifted], shifted).text(),
                     "MAE where they do not": mean_ci([by_id[i] for i in unshifted], unshifted).text(),
                     "users shifted": len(shifted)})
    write("lamp_rating_rule", rows, {"report": args.report, "questions": args.questions}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
