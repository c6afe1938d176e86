"""Write LaMP-2- or LaMP-3-shaped files (one question per user) whose answer depends on the user's history.

LaMP's own files cannot be fetched here (no network), so this writes files in exactly their
shape: `<split>_questions.json` (a list of {id, input, profile: [...]}) and `<split>_outputs.json`
({task, golds: [{id, output}]}), with LaMP's prompts.

- `--task LaMP_2` (movie tagging, LaMP-2's 15 tags): every movie description mentions two themes;
  which of the two tags a user gives it depends on the user (a private ranking of the 15 tags,
  revealed by their history): an interaction of the question and the user. Picking one of the two
  themes at random scores 0.5; answering the theme the user tagged more often in their history
  scores about 0.76; the input alone cannot do better than 0.5.
- `--task LaMP_3` (product rating, 1-5): every review's text carries a sentiment 1-5, and each
  user shifts every rating by a personal offset (-2..+2, clipped to 1..5), revealed by their
  history: a shift that applies to every question. The input alone scores MAE ~0.9; reading the
  user's mean shift off the history (a hand rule) about 0.2 (0.182 over 1,200 users at the defaults).

    python -m bench.lamp_shaped --out DIR [--task LaMP_2] [--users 1200] [--seed 0]
    for s in train val test_id; do p2p import-lamp --questions DIR/${s}_questions.json \
        --outputs DIR/${s}_outputs.json --split $s --out DATA; done
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections import Counter

from p2p.data.synthetic import SENTIMENT_PHRASES
from p2p.task.registry import LAMP_2_PROMPT, LAMP_2_TAGS, LAMP_3_PROMPT

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
PRODUCTS = ["blender", "pair of headphones", "backpack", "coffee grinder", "desk lamp", "running shoe", "kettle",
            "phone case", "office chair", "water bottle"]


def themes_of(prompt: str) -> list[str]:
    """The two themes a LaMP-2-shaped question's movie names (from its phrases), in LaMP_2_TAGS order."""
    return [t for t in LAMP_2_TAGS if any(phrase in prompt for phrase in THEMES[t])]


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


def review(rng: random.Random, sentiment: int) -> str:
    return f"I bought this {rng.choice(PRODUCTS)}. {rng.choice(SENTIMENT_PHRASES[sentiment])}"


def on_scale(score: float) -> int:
    """A rating clipped to LaMP-3's 1-5 scale."""
    return min(5, max(1, round(score)))


def rating(rng: random.Random, sentiment: int, offset: int, noise: float) -> int:
    return on_scale(sentiment + offset + (rng.choice((-1, 1)) if rng.random() < noise else 0))


def make_rating_user(rng: random.Random, uid: str, items: int, noise: float) -> tuple[dict, str, int]:
    offset = rng.choice((-2, -1, 0, 1, 2))
    profile = []
    for j in range(items):
        s = rng.randint(1, 5)
        profile.append({"id": f"{uid}-{j}", "text": review(rng, s), "score": str(rating(rng, s, offset, noise))})
    s = rng.randint(1, 5)
    question = {"id": uid, "input": LAMP_3_PROMPT.format(text=review(rng, s)), "profile": profile}
    return question, str(rating(rng, s, offset, 0.0)), s


def sentiment_of(text: str) -> int:
    """The sentiment 1-5 a LaMP-3-shaped review carries (read off the phrase it was written with)."""
    for sentiment, phrases in SENTIMENT_PHRASES.items():
        if any(phrase in text for phrase in phrases):
            return sentiment
    raise ValueError(f"not a bench.lamp_shaped review (no sentiment phrase): {text[:80]!r}")


def offset_rule(profile: list[dict], sentiment: int) -> str:
    """The hand rule: the user's mean shift over their history, added to the review's own sentiment."""
    shifts = [int(p["score"]) - sentiment_of(p["text"]) for p in profile]
    return str(on_scale(sentiment + sum(shifts) / len(shifts)))


def clipped_offset_rule(profile: list[dict], sentiment: int) -> str:
    """The offset that best explains the history once ratings are clipped to 1-5 (the one nearest 0 on a tie).

    The mean shift underestimates a large offset: a +2 user's 4- and 5-sentiment reviews are rated 5, a
    shift of 1 and 0. This rule knows how the data was made, so it is the ceiling of reading the user.
    """
    history = [(sentiment_of(p["text"]), int(p["score"])) for p in profile]
    offset = min(range(-2, 3), key=lambda o: (sum(abs(on_scale(s + o) - r) for s, r in history), abs(o)))
    return str(on_scale(sentiment + offset))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--task", default="LaMP_2", choices=["LaMP_2", "LaMP_3"])
    ap.add_argument("--users", type=int, default=1200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noise", type=float, default=0.05)
    ap.add_argument("--min-items", type=int, default=20)
    ap.add_argument("--max-items", type=int, default=60)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    by_split: dict[str, tuple[list, list]] = {s: ([], []) for s, _ in SPLITS}
    rule_score = 0.0
    for i in range(args.users):
        r = rng.random()
        split = next(s for (s, _), acc in zip(SPLITS, (0.7, 0.8, 1.01), strict=True) if r < acc)
        items = rng.randint(args.min_items, args.max_items)
        if args.task == "LaMP_2":
            question, gold, themes = make_user(rng, f"lamp2-{i:05d}", items, args.noise)
            rule_score += history_rule(question["profile"], themes) == gold
        else:
            question, gold, sentiment = make_rating_user(rng, f"lamp3-{i:05d}", items, args.noise)
            rule_score += abs(int(offset_rule(question["profile"], sentiment)) - int(gold))
        by_split[split][0].append(question)
        by_split[split][1].append({"id": question["id"], "output": gold})
    os.makedirs(args.out, exist_ok=True)
    for split, (questions, golds) in by_split.items():
        with open(os.path.join(args.out, f"{split}_questions.json"), "w") as f:
            json.dump(questions, f)
        with open(os.path.join(args.out, f"{split}_outputs.json"), "w") as f:
            json.dump({"task": args.task, "golds": golds}, f)
    counts = {s: len(q) for s, (q, _) in by_split.items()}
    rule = ("history rule (the theme tagged more often): accuracy" if args.task == "LaMP_2"
            else "history rule (the user's mean shift): MAE")
    print(f"wrote {args.task}-shaped files for {args.users} users to {args.out}: {counts}; "
          f"{rule} {rule_score / args.users:.3f}")


if __name__ == "__main__":
    main()
