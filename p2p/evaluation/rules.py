"""Reference rules on the synthetic `tag` task: they bound what any method can reach.

- input only: the best rule that sees only the item (its genre) -> that genre's majority tag;
- persona: knows the user's hidden convention (the ceiling, up to label noise);
- history: reads only the user's history items: BM25-weighted vote of the most similar tagged items.

The benchmark is sound when input-only is low, persona is high and history is close to persona:
personalization is necessary, and the history (hence the profile) carries what it needs.
"""

from __future__ import annotations

from collections import Counter, defaultdict

from rank_bm25 import BM25Okapi

from p2p.data.synthetic import SyntheticUser, user_tag
from p2p.profile.text import STOPWORDS, tokenize
from p2p.task.registry import TAGS


def _tag_examples(users: list[SyntheticUser]):
    for u in users:
        for e in u.examples:
            if e["task"] == "tag":
                yield u, e


def input_only_accuracy(users: list[SyntheticUser]) -> float:
    """Per-genre majority tag, fitted on the same users it is scored on (optimistic on purpose)."""
    by_genre: dict[str, Counter] = {}
    for _, e in _tag_examples(users):
        by_genre.setdefault(e["genre"], Counter())[e["target"]] += 1
    best = {g: c.most_common(1)[0][0] for g, c in by_genre.items()}
    pairs = [(best[e["genre"]], e["target"]) for _, e in _tag_examples(users)]
    return sum(p == t for p, t in pairs) / len(pairs)


def persona_accuracy(users: list[SyntheticUser]) -> float:
    pairs = [(user_tag(u.persona, e["genre"]), e["target"]) for u, e in _tag_examples(users)]
    return sum(p == t for p, t in pairs) / len(pairs)


def history_rule(history: list[dict], text: str, k: int = 5) -> str:
    """BM25 over the user's tagged items; the k best vote, weighted by score."""
    tagged = [h for h in history if h.get("label") in TAGS]
    if not tagged:
        return TAGS[0]
    bm25 = BM25Okapi([[w for w in tokenize(h["text"]) if w not in STOPWORDS] or ["_"] for h in tagged])
    scores = bm25.get_scores([w for w in tokenize(text) if w not in STOPWORDS])
    votes: dict[str, float] = defaultdict(float)
    for i in sorted(range(len(tagged)), key=lambda i: (-scores[i], i))[:k]:
        votes[tagged[i]["label"]] += max(float(scores[i]), 0.0)
    return max(sorted(votes), key=votes.__getitem__)


def history_accuracy(users: list[SyntheticUser]) -> float:
    pairs = [(history_rule(u.history, e["input"]), e["target"]) for u, e in _tag_examples(users)]
    return sum(p == t for p, t in pairs) / len(pairs)
