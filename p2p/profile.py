"""History -> profile text: a summary section, then the top-k history items.

The profile is what the encoder embeds, what the prompt baseline puts in the prompt and what
a person can read to check. The summary comes first because MiniLM reads only 256 tokens:
what must survive truncation (which labels this user uses, their score level, their style)
goes at the top. Deterministic: the same history always gives the same text.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
from rank_bm25 import BM25Okapi


@dataclass
class ProfileConfig:
    top_k: int = 8  # history items quoted after the summary
    max_chars: int = 2000  # hard bound on the profile text
    item_chars: int = 160  # each quoted item is cut to this
    summary_labels: int = 12  # most frequent labels listed
    query_terms: int = 10  # the user-level BM25 query: this many most frequent content words
    features: int = 0  # dimensions of the label-statistics vector appended to the text embedding (0: none)


_WORD = re.compile(r"[a-z0-9']+")
STOPWORDS = frozenset(
    ["a", "an", "the", "and", "or", "but", "of", "to", "in", "on", "at", "for", "with", "by", "from", "as", "is", "are", "was", "were", "be", "been", "it", "its", "this", "that", "these", "those", "they", "them", "their", "he", "she", "his", "her", "i", "my", "me", "we", "our", "you", "your", "not", "no", "so", "than", "then", "there", "who", "what", "when", "where", "which", "while", "after", "before", "over", "under", "into", "out", "up", "down", "one", "all", "any", "some", "very", "just", "about", "more", "most", "can", "will", "would", "could", "should", "has", "have", "had", "do", "does", "did", "also", "only"]
)


def tokenize(text: str) -> list[str]:
    return _WORD.findall(text.lower())


# A category is at most this many words: LaMP-2's longest tag is "based on a book"; a written
# answer (headline, title) is longer; a headline of four words or fewer still reads as a category.
CATEGORY_MAX_WORDS = 4


def _label_kind(labels: list[str]) -> str:
    if all(_is_number(x) for x in labels):
        return "score"
    if all(len(x.split()) <= CATEGORY_MAX_WORDS for x in labels):
        return "category"
    return "text"


def _is_number(x: str) -> bool:
    try:
        float(x)
        return True
    except ValueError:
        return False


_SMALL_WORDS = frozenset({"a", "an", "and", "at", "for", "in", "near", "of", "on", "or", "the", "to"})


def _casing(text: str) -> str:
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


def _label_summary(labels: list[str], config: ProfileConfig) -> list[str]:
    kind = _label_kind(labels)
    if kind == "score":
        values = [float(x) for x in labels]
        hist = Counter(round(v) for v in values)
        dist = ", ".join(f"{k}: {hist[k]}" for k in sorted(hist))
        return [f"Scores given: mean {sum(values) / len(values):.2f} over {len(values)} ({dist})."]
    if kind == "category":
        counts = sorted(Counter(labels).items(), key=lambda kv: (-kv[1], kv[0]))[: config.summary_labels]
        return ["Labels used: " + ", ".join(f"{k} {v}" for k, v in counts) + "."]
    first = Counter(x.split()[0] for x in labels)
    openings = [w for w, c in sorted(first.items(), key=lambda kv: (-kv[1], kv[0])) if c >= 2][:3]
    casing = Counter(_casing(x) for x in labels).most_common(1)[0][0]
    endings = Counter(x.rstrip()[-1] if x.rstrip()[-1] in "!?." else "none" for x in labels)
    ending = endings.most_common(1)[0][0]
    words = Counter(w for x in labels for w in tokenize(x) if w not in STOPWORDS)
    frequent = [w for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))[:6]]
    parts = [f"Written answers: {len(labels)}, mostly {casing}, ending with {ending}"]
    if openings:
        parts.append("often starting with " + ", ".join(repr(w) for w in openings))
    parts.append("frequent words: " + ", ".join(frequent))
    return ["; ".join(parts) + "."]


def _frequent_phrases(texts: list[str], n: int = 5) -> list[str]:
    grams: Counter = Counter()
    for t in texts:
        words = tokenize(t)
        for a, b in zip(words, words[1:], strict=False):
            if a not in STOPWORDS and b not in STOPWORDS:
                grams[f"{a} {b}"] += 1
    return [g for g, c in sorted(grams.items(), key=lambda kv: (-kv[1], kv[0])) if c >= 2][:n]


def _date(ts: int) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d") if ts > 10_000_000 else str(ts)


def summary_lines(history: list[dict], config: ProfileConfig) -> list[str]:
    if not history:
        return ["No history yet."]
    ts = [h["ts"] for h in history]
    lines = [f"History: {len(history)} items from {_date(min(ts))} to {_date(max(ts))}."]
    # Group labels by kind so a mixed history (tags, scores and headlines) summarises each.
    groups: dict[str, list[str]] = {}
    for h in history:
        if h.get("label") not in (None, ""):
            groups.setdefault(_label_kind([h["label"]]), []).append(h["label"])
    for kind in ("category", "score", "text"):
        if kind in groups:
            lines += _label_summary(groups[kind], config)
    phrases = _frequent_phrases([h["text"] for h in history])
    if phrases:
        lines.append("Frequent phrases: " + ", ".join(phrases) + ".")
    return lines


def top_items(history: list[dict], config: ProfileConfig) -> list[dict]:
    """The k items most representative of the user: BM25 against their most frequent words."""
    if len(history) <= config.top_k:
        return sorted(history, key=lambda h: (h["ts"], h["item_id"]))
    docs = [tokenize(h["text"]) for h in history]
    counts = Counter(w for d in docs for w in d if w not in STOPWORDS)
    query = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: config.query_terms]]
    scores = BM25Okapi([d or ["_"] for d in docs]).get_scores(query)
    order = sorted(range(len(history)), key=lambda i: (-round(float(scores[i]), 9), -history[i]["ts"],
                                                        history[i]["item_id"]))
    chosen = sorted(order[: config.top_k], key=lambda i: (history[i]["ts"], history[i]["item_id"]))
    return [history[i] for i in chosen]


def build_profile(history: list[dict], config: ProfileConfig | None = None) -> str:
    config = config or ProfileConfig()
    lines = summary_lines(history, config)
    items = top_items(history, config)
    if items:
        lines.append("Examples:")
        for h in items:
            text = h["text"] if len(h["text"]) <= config.item_chars else h["text"][: config.item_chars - 3] + "..."
            lines.append(f"- {text}" + (f" => {h['label']}" if h.get("label") not in (None, "") else ""))
    out = "\n".join(lines)
    return out if len(out) <= config.max_chars else out[: config.max_chars]


def label_tokens(label: str) -> list[str]:
    """What one answer says about its author, as tokens: the label itself for categories and
    scores; the prefix word, casing and closing mark for written answers."""
    kind = _label_kind([label])
    if kind == "category":
        return ["label:" + label.strip().lower()]
    if kind == "score":
        return [f"score:{round(float(label))}"]
    words = label.split()
    prefix = words[0] if words and words[0].endswith(":") else "-"
    ending = label.rstrip()[-1] if label.rstrip()[-1:] in ("!", "?", ".") else "-"
    return [f"prefix:{prefix}", f"case:{_casing(label)}", f"end:{ending}"]


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
            kind = _label_kind([h["label"]])
            by_kind.setdefault(kind, Counter()).update(label_tokens(h["label"]))
    for kind, counts in by_kind.items():
        total = sum(counts.values()) / (3 if kind == "text" else 1)  # 3 tokens per written answer
        for token, c in counts.items():
            h = int.from_bytes(hashlib.blake2b(f"{kind}|{token}".encode(), digest_size=8).digest(), "little")
            out[h % config.features] += c / total
    return out


def profile_hash(profile_text: str, encoder_id: str, features: np.ndarray | None = None) -> str:
    """Changes when the profile text, its features or the encoder changes: each means a new embedding."""
    h = hashlib.sha256(f"{encoder_id}\n{profile_text}".encode())
    if features is not None and len(features):
        h.update(np.ascontiguousarray(features, np.float32).tobytes())
    return h.hexdigest()
