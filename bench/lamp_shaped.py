"""Write LaMP-2-shaped files (one question per user) whose answer depends on the user's history.

LaMP's own files cannot be fetched here (no network), so this writes files in exactly their
shape: `<split>_questions.json` (a list of {id, input, profile: [{id, description, tag}]}) and
`<split>_outputs.json` ({task: "LaMP_2", golds: [{id, output}]}), with LaMP-2's prompt and its 15
tags. Every movie description mentions two themes; which of the two tags a user gives it
depends on the user (a private ranking of the 15 tags, revealed by their history). Picking one
of the two themes at random scores 0.5; answering the theme the user tagged more often in their
history scores about 0.8; the input alone cannot do better than 0.5.

    python -m bench.lamp_shaped --out DIR [--users 1200] [--seed 0]
    for s in train val test_id; do p2p import-lamp --questions DIR/${s}_questions.json \
        --outputs DIR/${s}_outputs.json --split $s --out DATA; done
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections import Counter

from p2p.tasks import LAMP_2_PROMPT, LAMP_2_TAGS

THEMES = {
    "sci-fi": ["on a distant space colony", "with time-travelling scientists", "as robots become self-aware"],
    "based on a book": ["adapted from a best-selling novel", "based on a classic book", "from the pages of a famous memoir"],
    "comedy": ["full of slapstick humour", "with hilarious mishaps", "played entirely for laughs"],
    "action": ["packed with car chases and explosions", "with relentless fight scenes", "in a high-speed pursuit"],
    "twist ending": ["with a shocking final twist", "where nothing is what it seems until the last scene",
                     "with an ending nobody sees coming"],
    "dystopia": ["in a bleak authoritarian future", "under a totalitarian regime", "after society has collapsed"],
    "dark comedy": ["with pitch-black humour", "laughing at death and misfortune", "with a morbidly funny streak"],
    "classic": ["in a timeless black-and-white masterpiece", "in a celebrated golden-age film",
                "in a beloved classic from decades ago"],
    "psychology": ["exploring a troubled mind", "in a study of obsession and memory",
                   "inside the head of a disturbed patient"],
    "fantasy": ["in a world of dragons and wizards", "among magic and enchanted forests",
                "on a quest through a mythical kingdom"],
    "romance": ["while falling in love", "in a tender love story", "during a passionate affair"],
    "thought-provoking": ["raising hard questions about life", "in a meditative film that lingers",
                          "challenging what we believe"],
    "social commentary": ["criticising inequality and class", "in a sharp look at modern society",
                          "exposing injustice in a small town"],
    "violence": ["with brutal, bloody violence", "through graphic shootouts", "drenched in gore and cruelty"],
    "true story": ["based on true events", "in the real story of a famous trial", "recounting a true wartime rescue"],
}
SUBJECTS = ["A young teacher", "Two brothers", "A retired detective", "A struggling musician", "A single mother",
            "A small-town sheriff", "An ambitious lawyer", "A group of friends", "A lonely scientist",
            "A former soldier", "A teenage runaway", "An aging actress"]
ACTIONS = ["fights to survive", "searches for the truth", "tries to start over", "uncovers a secret",
           "risks everything", "must make an impossible choice", "returns home", "chases a dream"]
SPLITS = (("train", 0.7), ("val", 0.1), ("test_id", 0.2))


def movie(rng: random.Random, themes: tuple[str, str]) -> str:
    a, b = (rng.choice(THEMES[t]) for t in themes)
    return f"{rng.choice(SUBJECTS)} {rng.choice(ACTIONS)} {a}, {b}."


def user_answer(rng: random.Random, ranking: dict[str, int], themes: tuple[str, str], noise: float) -> str:
    first, second = sorted(themes, key=ranking.__getitem__)
    return second if rng.random() < noise else first


def make_user(rng: random.Random, uid: str, items: int, noise: float) -> tuple[dict, str, tuple[str, str]]:
    # A user's taste: a few favourite tags matter, the rest are in a random order below them.
    order = rng.sample(LAMP_2_TAGS, len(LAMP_2_TAGS))
    ranking = {t: i for i, t in enumerate(order)}
    profile = []
    for j in range(items):
        themes = tuple(rng.sample(LAMP_2_TAGS, 2))
        profile.append({"id": f"{uid}-{j}", "description": movie(rng, themes),
                        "tag": user_answer(rng, ranking, themes, noise)})
    themes = tuple(rng.sample(LAMP_2_TAGS, 2))
    question = {"id": uid, "input": LAMP_2_PROMPT.format(text=movie(rng, themes)), "profile": profile}
    return question, user_answer(rng, ranking, themes, 0.0), themes


def history_rule(profile: list[dict], themes: tuple[str, str]) -> str:
    counts = Counter(p["tag"] for p in profile)
    return max(themes, key=lambda t: (counts[t], t))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--users", type=int, default=1200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noise", type=float, default=0.05)
    ap.add_argument("--min-items", type=int, default=20)
    ap.add_argument("--max-items", type=int, default=60)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    by_split: dict[str, tuple[list, list]] = {s: ([], []) for s, _ in SPLITS}
    rule_hits = 0
    for i in range(args.users):
        r = rng.random()
        split = next(s for (s, _), acc in zip(SPLITS, (0.7, 0.8, 1.01), strict=True) if r < acc)
        question, gold, themes = make_user(rng, f"lamp2-{i:05d}", rng.randint(args.min_items, args.max_items),
                                           args.noise)
        by_split[split][0].append(question)
        by_split[split][1].append({"id": question["id"], "output": gold})
        rule_hits += history_rule(question["profile"], themes) == gold
    os.makedirs(args.out, exist_ok=True)
    for split, (questions, golds) in by_split.items():
        with open(os.path.join(args.out, f"{split}_questions.json"), "w") as f:
            json.dump(questions, f)
        with open(os.path.join(args.out, f"{split}_outputs.json"), "w") as f:
            json.dump({"task": "LaMP_2", "golds": golds}, f)
    counts = {s: len(q) for s, (q, _) in by_split.items()}
    print(f"wrote LaMP_2-shaped files for {args.users} users to {args.out}: {counts}; "
          f"history rule (the theme tagged more often) scores {rule_hits / args.users:.3f}, a coin 0.5")


if __name__ == "__main__":
    main()
