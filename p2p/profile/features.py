"""History -> profile text: a summary section, then the top-k history items.

The profile is what the encoder embeds, what the prompt baseline puts in the prompt and what
a person can read to check. The summary comes first because MiniLM reads only 256 tokens:
what must survive truncation (which labels this user uses, their score level, their style)
goes at the top. Deterministic: the same history always gives the same text.
"""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np

from p2p.profile.config import ProfileConfig
from p2p.task.registry import is_number

# A category is at most this many words: LaMP-2's longest tag is "based on a book"; a written
# answer (headline, title) is longer; a headline of four words or fewer still reads as a category.
CATEGORY_MAX_WORDS = 4


def label_kind(labels: list[str]) -> str:
    if all(is_number(x) for x in labels):
        return "score"
    if all(len(x.split()) <= CATEGORY_MAX_WORDS for x in labels):
        return "category"
    return "text"


_SMALL_WORDS = frozenset({"a", "an", "and", "at", "for", "in", "near", "of", "on", "or", "the", "to"})


def answer_casing(text: str) -> str:
    """lowercase, title case or sentence case of a written answer (a leading `Word:` prefix aside)."""
    words = text.split()
    if words and words[0].endswith(":"):
        words = words[1:]
    letters = [w for w in words if w[:1].isalpha()]
    if letters and all(w == w.lower() for w in letters):
        return "lowercase"
    if letters and all(w[:1].isupper() for w in letters if w.lower() not in _SMALL_WORDS):
        return "title case"
    return "sentence case"


def label_tokens(label: str) -> list[str]:
    """What one answer says about its author, as tokens: the label itself for categories and
    scores; the prefix word, casing and closing mark for written answers."""
    kind = label_kind([label])
    if kind == "category":
        return ["label:" + label.strip().lower()]
    if kind == "score":
        return [f"score:{round(float(label))}"]
    words = label.split()
    prefix = words[0] if words and words[0].endswith(":") else "-"
    ending = label.rstrip()[-1] if label.rstrip()[-1:] in ("!", "?", ".") else "-"
    return [f"prefix:{prefix}", f"case:{answer_casing(label)}", f"end:{ending}"]


def profile_features(history: list[dict], config: ProfileConfig) -> np.ndarray:
    """The user's label statistics as a fixed-size vector: how often each label-token is used,
    as a share of the user's answers of that kind, hashed into `config.features` bins.

    The text embedding reads the summary only as far as the encoder's window goes and blurs
    counts; these shares are exact for any encoder, and they are what decides a user's answer
    when the input alone does not (which tag, which score level, which style).
    """
    out = np.zeros(config.features, np.float32)
    if not config.features:
        return out
    by_kind: dict[str, Counter] = {}
    for h in history:
        if h.get("label") not in (None, ""):
            kind = label_kind([h["label"]])
            by_kind.setdefault(kind, Counter()).update(label_tokens(h["label"]))
    for kind, counts in by_kind.items():
        total = sum(counts.values()) / (3 if kind == "text" else 1)  # 3 tokens per written answer
        for token, c in counts.items():
            out[statistic_bin(kind, token, config.features)] += c / total
    return out


def statistic_bin(kind: str, token: str, features: int) -> int:
    """The bin a label-token of this kind is counted in (a stable hash)."""
    h = int.from_bytes(hashlib.blake2b(f"{kind}|{token}".encode(), digest_size=8).digest(), "little")
    return h % features


def label_bin(label: str, features: int) -> int | None:
    """The bin whose value is this label's share of a user's answers (a category or a score; a written
    answer's statistics are about its form, not the label, so it has none)."""
    kind = label_kind([label])
    if kind == "text" or not features:
        return None
    return statistic_bin(kind, label_tokens(label)[0], features)
