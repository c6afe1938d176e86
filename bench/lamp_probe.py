"""Is the answer in the hypernet's input? Probes of the LaMP-2-shaped task's profile features.

On LaMP-2-shaped data (`bench/lamp_shaped.py`) the answer is one of the two themes the movie
names, and which one depends on the user. A hypernet can only personalize what its input
carries, so this fits small classifiers on the profile features (`p2p.profile.features`, the
label statistics the recipe reads) plus the two candidate tags the input names (found with the
generator's theme phrases: the probe is told the candidates, the hypernet must learn them), on
training users, and scores them on held-out (`test_id`) users:

- `shares`: answer the candidate whose share of the user's answers is larger (the hand rule, read
  off the hashed feature vector instead of the raw history);
- `logistic, shares of the two`: a logistic regression on (share[a] - share[b], per-tag biases);
- `logistic, whole vector`: per-tag linear scores over all feature bins (what a linear read-out of
  the hypernet's input could reach).

    python -m bench.lamp_probe --json DIR   # the folder bench.lamp_shaped wrote

Prints a Markdown table and writes bench/results/lamp_probe.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os

import numpy as np
from sklearn.linear_model import LogisticRegression

from bench.lamp_shaped import THEMES
from bench.report import write
from p2p.data.lamp import profile_item_to_history
from p2p.evaluation.stats import mean_ci
from p2p.profile.config import ProfileConfig
from p2p.profile.features import profile_features
from p2p.task.registry import LAMP_2_TAGS

PHRASE = {phrase: tag for tag, phrases in THEMES.items() for phrase in phrases}


def candidates(text: str) -> tuple[str, str]:
    found = [tag for phrase, tag in PHRASE.items() if phrase in text]
    return found[0], found[1]


def tag_bin(tag: str, bins: int) -> int:
    """The feature bin of a category label (the hash profile_features uses)."""
    h = int.from_bytes(hashlib.blake2b(f"category|label:{tag}".encode(), digest_size=8).digest(), "little")
    return h % bins


def load(folder: str, split: str, bins: int, history_examples: int = 0
         ) -> tuple[np.ndarray, list[tuple[str, str]], list[str]]:
    with open(os.path.join(folder, f"{split}_questions.json")) as f:
        questions = json.load(f)
    with open(os.path.join(folder, f"{split}_outputs.json")) as f:
        gold = {g["id"]: g["output"] for g in json.load(f)["golds"]}
    config = ProfileConfig(features=bins)
    feats, cands, answers = [], [], []
    for q in questions:
        history = [profile_item_to_history(p, j, q["id"], folder) for j, p in enumerate(q["profile"])]
        feats.append(profile_features(history, config))
        cands.append(candidates(q["input"]))
        answers.append(gold[q["id"]])
        # As `p2p import-lamp --history-examples K`: the K most recent items asked too, each out of its profile.
        ordered = sorted(history, key=lambda h: (h["ts"], h["item_id"]))
        asked = ordered[-history_examples:] if history_examples else []
        kept = ordered[: len(ordered) - len(asked)]
        for item in asked:
            feats.append(profile_features(kept, config))
            cands.append(candidates(item["text"]))
            answers.append(item["label"])
    return np.stack(feats), cands, answers


def pair_design(x: np.ndarray, cands, bins: int, whole: bool) -> np.ndarray:
    """One row per question: features of "first candidate minus second", for P(answer = first)."""
    tags = list(LAMP_2_TAGS)
    rows = []
    for f, (a, b) in zip(x, cands, strict=True):
        onehot = np.zeros(len(tags))
        onehot[tags.index(a)], onehot[tags.index(b)] = 1, -1  # per-tag popularity
        if whole:  # per-tag weights over every bin: score(t) = w_t . f, so the row is w_a.f - w_b.f
            row = np.zeros(len(tags) * len(f))
            row[tags.index(a) * len(f):(tags.index(a) + 1) * len(f)] += f
            row[tags.index(b) * len(f):(tags.index(b) + 1) * len(f)] -= f
        else:
            row = np.array([f[tag_bin(a, bins)] - f[tag_bin(b, bins)]])
        rows.append(np.concatenate([row, onehot]))
    return np.stack(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True, help="folder of bench.lamp_shaped's LaMP_2 files")
    ap.add_argument("--bins", type=int, default=512)
    ap.add_argument("--history-examples", type=int, default=0, help="also train on each training user's K latest items")
    args = ap.parse_args()
    xtr, ctr, ytr = load(args.json, "train", args.bins, args.history_examples)
    xte, cte, yte = load(args.json, "test_id", args.bins)
    users = [str(i) for i in range(len(yte))]
    rows = []

    def row(name: str, hits: list[float]) -> None:
        ci = mean_ci(hits, users, 2000, 0)
        rows.append({"probe (held-out test_id users)": name, "accuracy": ci.value, "ci95": f"[{ci.low:.3f}, {ci.high:.3f}]",
                     "n": len(hits)})

    row("one of the two candidates at random", [0.5] * len(yte))
    share = [max((a, b), key=lambda t: (f[tag_bin(t, args.bins)], t)) == y for f, (a, b), y in zip(xte, cte, yte, strict=True)]
    row("shares: the candidate with the larger share", [float(h) for h in share])
    for name, whole in (("logistic, shares of the two + tag biases", False), ("logistic, whole vector per tag", True)):
        clf = LogisticRegression(max_iter=5000, C=1.0).fit(pair_design(xtr, ctr, args.bins, whole),
                                                            [int(y == a) for y, (a, _) in zip(ytr, ctr, strict=True)])
        pred = clf.predict(pair_design(xte, cte, args.bins, whole))
        row(name, [float((a if p else b) == y) for p, (a, b), y in zip(pred, cte, yte, strict=True)])
    write("lamp_probe", rows, {"training questions": len(ytr), "history examples per user": args.history_examples, "test_id users": len(yte), "feature bins": args.bins,
                               "candidates": "the two tags the input names (told to the probe)"})


if __name__ == "__main__":
    main()
