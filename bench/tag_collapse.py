"""Does P2P read the user's tag choice, or only the genre? (the diagnosis in docs/quality.md)

    python -m bench.tag_collapse --run /tmp/q/run --data /tmp/q/data [--users-per-split 15]

On held-out tag questions: the share of answers that are exactly the user's tag, the share that
name a tag of the right genre (the input alone gives that), and the most frequent answers. A
model that ignores the user scores ~100% right genre and collapses to one tag per genre.
"""

from __future__ import annotations

import argparse
import collections
import copy

from p2p.evaluation.baselines import P2P, Answerer
from p2p.evaluation.evaluate import EvalConfig, checkpoint_dir, select
from p2p.model.adapted import AdaptedModel
from p2p.model.base import load_base_model
from p2p.model.hypernet import load_hypernet
from p2p.personalize import Personalizer
from p2p.task.registry import GENRE_TAGS, tasks_of


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--users-per-split", type=int, default=15)
    args = parser.parse_args()
    genre_of = {t: g for g, tags in GENRE_TAGS.items() for t in tags}
    users, examples, _ = select(EvalConfig(run=args.run, data=args.data, out="", tasks=("tag",),
                                           users_per_split=args.users_per_split))
    hypernet, hid = load_hypernet(checkpoint_dir(args.run))
    model, tok = load_base_model(hypernet.config.base_model)
    answerer = Answerer(AdaptedModel(copy.deepcopy(model), tok, hypernet.config), tasks_of(examples))
    method = P2P("p2p", answerer, Personalizer(hypernet, hid))
    preds = [p.strip() for p in method.predict(users, examples)]
    n = len(examples)
    exact = sum(p == e["target"] for p, e in zip(preds, examples, strict=True)) / n
    genre = sum(genre_of.get(p) == genre_of[e["target"]] for p, e in zip(preds, examples, strict=True)) / n
    print(f"{n} questions from {len(users)} held-out users: exact {exact:.3f}, right genre {genre:.3f}")
    print("most frequent answers:", collections.Counter(preds).most_common(8))


if __name__ == "__main__":
    main()
