"""History -> profile text: a summary section, then the top-k history items.

The profile is what the encoder embeds, what the prompt baseline puts in the prompt and what
a person can read to check. The summary comes first because MiniLM reads only 256 tokens:
what must survive truncation (which labels this user uses, their score level, their style)
goes at the top. Deterministic: the same history always gives the same text.
"""

from __future__ import annotations

import datetime as dt
import re
from collections import Counter

from rank_bm25 import BM25Okapi

from p2p.profile.config import ProfileConfig
from p2p.profile.features import answer_casing, label_kind

_WORD = re.compile(r"[a-z0-9']+")


STOPWORDS = frozenset(
    ["a", "an", "the", "and", "or", "but", "of", "to", "in", "on", "at", "for", "with", "by", "from", "as", "is", "are", "was", "were", "be", "been", "it", "its", "this", "that", "these", "those", "they", "them", "their", "he", "she", "his", "her", "i", "my", "me", "we", "our", "you", "your", "not", "no", "so", "than", "then", "there", "who", "what", "when", "where", "which", "while", "after", "before", "over", "under", "into", "out", "up", "down", "one", "all", "any", "some", "very", "just", "about", "more", "most", "can", "will", "would", "could", "should", "has", "have", "had", "do", "does", "did", "also", "only"]
)


def tokenize(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _label_summary(labels: list[str], config: ProfileConfig) -> list[str]:
    kind = label_kind(labels)
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
    casing = Counter(answer_casing(x) for x in labels).most_common(1)[0][0]
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


MAX_DATE_TS = 253_402_300_799  # 9999-12-31T23:59:59Z: past it a timestamp has no calendar date


def _date(ts: int) -> str:
    """A date for a unix timestamp; small values (ordinals) and ones past year 9999 stay numbers."""
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d") if 10_000_000 < ts <= MAX_DATE_TS else str(ts)


def summary_lines(history: list[dict], config: ProfileConfig) -> list[str]:
    if not history:
        return ["No history yet."]
    ts = [h["ts"] for h in history]
    lines = [f"History: {len(history)} items from {_date(min(ts))} to {_date(max(ts))}."]
    # Group labels by kind so a mixed history (tags, scores and headlines) summarises each.
    groups: dict[str, list[str]] = {}
    for h in history:
        if h.get("label") not in (None, ""):
            groups.setdefault(label_kind([h["label"]]), []).append(h["label"])
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
