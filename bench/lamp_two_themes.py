"""Where a LaMP-2-shaped answer is lost: naming one of the movie's two themes (the task), or picking
the one this user prefers (the user)? Read off an evaluation's saved answers; no model runs.

Every LaMP-2-shaped movie names two themes and the gold tag is the one the user ranks higher, so an
answer's accuracy splits into the share of answers that are one of the two themes and the accuracy
among those. A method that learned the task but not the user sits near 1.0 and 0.5. Each method is
set against the history rule on the same questions (the theme the user tagged more often, read off the
question's own profile: a rule that reads the user, not a control), with a paired interval over users.

    python -m bench.lamp_two_themes --report OUT --questions DIR/val_questions.json --outputs DIR/val_outputs.json

OUT is a `p2p eval` or `bench.val_eval` output folder (OUT/lamp/<method>/LaMP_2.json: each method's
answers in LaMP's format); DIR is what `bench.lamp_shaped` wrote. Writes bench/results/lamp_two_themes.{md,json}.
"""

from __future__ import annotations

from bench.lamp_answers import load_golds, load_questions, method_answers, parser
from bench.lamp_shaped import history_rule, themes_of
from bench.report import write
from p2p.evaluation.stats import mean_ci, paired_diff_ci


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    loaded = load_questions(args.questions)
    questions = {q["id"]: q["input"] for q in loaded}
    rule = {q["id"]: history_rule(q["profile"], tuple(themes_of(q["input"]))) for q in loaded}
    golds = load_golds(args.outputs, set(questions))
    answer_sets = method_answers(args.report, "LaMP_2", set(golds))
    answer_sets["history rule"] = {i: rule[i] for i in set().union(*answer_sets.values())}
    rows = []
    for method, answers in answer_sets.items():
        ids = sorted(answers)  # one question per user in LaMP-2: the question id stands for its user
        right = [float(answers[i] == golds[i]) for i in ids]
        named = [float(answers[i] in themes_of(questions[i])) for i in ids]
        among = [i for i, n in zip(ids, named, strict=True) if n]
        rows.append({"method": method, "users": len(ids), "accuracy": mean_ci(right, ids).text(),
                     "one of the two themes": mean_ci(named, ids).text(),
                     "accuracy among those": mean_ci([float(answers[i] == golds[i]) for i in among], among).text(),
                     "accuracy - history rule": paired_diff_ci(right, [float(rule[i] == golds[i]) for i in ids],
                                                               ids).text()})
    write("lamp_two_themes", rows, {"report": args.report, "questions": args.questions}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
