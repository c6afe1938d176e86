"""LaMP's metrics, computed the way its official `eval/evaluation.py` computes them.

Official scoring (the default):
- classification: prediction and gold are stripped, then matched exactly against the task's
  label list (a string outside the list is "no label"); accuracy, and macro F1 over the whole
  list (a label nobody predicted or needed scores 0, as sklearn's `f1_score(..., labels=...)`);
- rating: `float(answer)` of the whole stripped answer, no clamp; an answer that does not parse
  scores the farther end of the scale (1 or 5; 5 on a tie). One deviation, on purpose: a
  non-finite parse ("nan", "inf") counts as unparsable, where the official script would make the
  whole MAE NaN or infinite;
- generation: ROUGE-1 and ROUGE-L F-measure of rouge-score's default tokenizer, no stemming,
  averaged over examples (the official script's bootstrap aggregator reports about this mean).

`lenient` scoring is the earlier, forgiving variant, kept for comparison and labelled as such in
reports: the first word lowercased without punctuation, the first number in the answer clamped to
the scale, and ROUGE with Porter stemming.

`style_*` read a headline's style case-sensitively (a leading `Word:` prefix, the casing of the
words, the closing mark): the personal signal of the synthetic headline task that ROUGE's
lowercasing tokenizer cannot see.
"""

from __future__ import annotations

import math
import re

from rouge_score import rouge_scorer

from p2p.task.registry import CLASSIFICATION, RATING, Task

SCORINGS = ("official", "lenient")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_ROUGE = {
    "official": rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False),
    "lenient": rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True),
}


def _check(preds: list[str], golds: list[str]) -> None:
    if len(preds) != len(golds) or not golds:
        raise ValueError(f"need as many predictions as golds, and at least one ({len(preds)} vs {len(golds)})")


# --- classification ------------------------------------------------------------------------------------


def lenient_label(text: str) -> str:
    text = text.strip().lower()
    return text.split()[0].strip(".,;:!\"'") if text else ""


def label_index(text: str, labels: tuple[str, ...] | list[str], scoring: str = "official") -> int:
    """Position of the answer in the label list, -1 when it names none of them."""
    if scoring == "lenient":
        normalized = [lenient_label(x) for x in labels]
        key = lenient_label(text)
        return normalized.index(key) if key in normalized else -1
    text = str(text).strip()
    return labels.index(text) if text in labels else -1


def classification_scores(preds: list[str], golds: list[str], labels: tuple[str, ...] | list[str],
                          scoring: str = "official") -> dict[str, float]:
    """Accuracy and macro F1 over the whole label list."""
    _check(preds, golds)
    p = [label_index(x, labels, scoring) for x in preds]
    g = [label_index(x, labels, scoring) for x in golds]
    f1s = []
    for k in range(len(labels)):
        tp = sum(1 for a, b in zip(p, g, strict=True) if a == k and b == k)
        fp = sum(1 for a, b in zip(p, g, strict=True) if a == k and b != k)
        fn = sum(1 for a, b in zip(p, g, strict=True) if a != k and b == k)
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {"accuracy": sum(a == b for a, b in zip(p, g, strict=True)) / len(g),
            "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0,
            "no_label": sum(a == -1 for a in p) / len(p)}


# --- rating --------------------------------------------------------------------------------------------


def parse_rating(text: str, low: float = 1.0, high: float = 5.0, scoring: str = "official") -> float | None:
    """The rating an answer gives, or None when it gives none (see the module docstring)."""
    if scoring == "lenient":
        m = _NUMBER.search(text)
        return None if m is None else min(high, max(low, float(m.group())))
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def rating_error(pred: str, gold: str, low: float = 1.0, high: float = 5.0, scoring: str = "official") -> float:
    target = float(gold)
    value = parse_rating(pred, low, high, scoring)
    if value is None:  # the farther end of the scale, as LaMP scores an unparsable answer
        value = low if abs(low - target) > abs(high - target) else high
    return abs(value - target)


def rating_scores(preds: list[str], golds: list[str], low: float = 1.0, high: float = 5.0,
                  scoring: str = "official") -> dict[str, float]:
    _check(preds, golds)
    errors = [rating_error(p, g, low, high, scoring) for p, g in zip(preds, golds, strict=True)]
    n = len(errors)
    unparsed = sum(parse_rating(p, low, high, scoring) is None for p in preds)
    return {"mae": sum(errors) / n, "rmse": math.sqrt(sum(e * e for e in errors) / n), "unparsed": unparsed / n}


# --- generation ----------------------------------------------------------------------------------------


def rouge_per_example(preds: list[str], golds: list[str], scoring: str = "official") -> list[dict[str, float]]:
    _check(preds, golds)
    scorer = _ROUGE[scoring]
    out = []
    for p, g in zip(preds, golds, strict=True):
        s = scorer.score(g.strip(), p.strip())
        out.append({"rouge1": s["rouge1"].fmeasure, "rougeL": s["rougeL"].fmeasure})
    return out


_SMALL_WORDS = frozenset({"a", "an", "and", "at", "for", "in", "near", "of", "on", "or", "the", "to"})


def headline_style(text: str) -> tuple[str, str, str]:
    """(prefix, casing, closing mark) of a headline, read case-sensitively."""
    words = text.strip().split()
    prefix = words[0] if words and len(words[0]) > 1 and words[0].endswith(":") else ""
    body = [w for w in (words[1:] if prefix else words) if w[:1].isalpha()]
    if body and all(w == w.lower() for w in body):
        casing = "lower"
    elif body and all(w[:1].isupper() for w in body if w.lower() not in _SMALL_WORDS):
        casing = "title"
    elif body and body[0][:1].isupper():
        casing = "sentence"
    else:
        casing = "other"
    stripped = text.rstrip()
    ending = stripped[-1] if stripped and stripped[-1] in "!?." else ""
    return prefix, casing, ending


def style_per_example(preds: list[str], golds: list[str]) -> list[dict[str, float]]:
    _check(preds, golds)
    out = []
    for p, g in zip(preds, golds, strict=True):
        ps, gs = headline_style(p), headline_style(g)
        parts = {"style_prefix": float(ps[0] == gs[0]), "style_casing": float(ps[1] == gs[1]),
                 "style_ending": float(ps[2] == gs[2])}
        out.append({"style_exact": float(ps == gs), **parts})
    return out


def generation_scores(preds: list[str], golds: list[str], scoring: str = "official",
                      style: bool = False) -> dict[str, float]:
    rows = rouge_per_example(preds, golds, scoring)
    if style:
        rows = [{**r, **s} for r, s in zip(rows, style_per_example(preds, golds), strict=True)]
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


# --- per task --------------------------------------------------------------------------------------------


def _labels(task: Task, golds: list[str], labels: list[str] | None) -> tuple[str, ...]:
    return task.labels or tuple(labels or sorted({g.strip() for g in golds}))


def score(task: Task, preds: list[str], golds: list[str], scoring: str = "official",
          labels: list[str] | None = None) -> dict[str, float]:
    """Every metric of the task's kind; `labels`: the classification label list when the task has none."""
    if scoring not in SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r}; valid: {', '.join(SCORINGS)}")
    if task.kind == CLASSIFICATION:
        return classification_scores(preds, golds, _labels(task, golds, labels), scoring)
    if task.kind == RATING:
        return rating_scores(preds, golds, *task.rating_range, scoring=scoring)
    return generation_scores(preds, golds, scoring, style=task.primary.startswith("style"))


def primary_per_example(task: Task, preds: list[str], golds: list[str], scoring: str = "official",
                        labels: list[str] | None = None) -> list[float]:
    """The task's primary metric for each example: its mean over examples is the reported figure.

    Macro F1 is not a mean over examples, so it is never a primary metric; the paired bootstrap
    resamples users over these per-example values.
    """
    _check(preds, golds)
    if task.primary == "accuracy":
        lab = _labels(task, golds, labels)
        return [float(label_index(p, lab, scoring) == label_index(g, lab, scoring))
                for p, g in zip(preds, golds, strict=True)]
    if task.primary == "mae":
        return [rating_error(p, g, *task.rating_range, scoring=scoring) for p, g in zip(preds, golds, strict=True)]
    if task.primary.startswith("style"):
        return [r[task.primary] for r in style_per_example(preds, golds)]
    return [r[task.primary] for r in rouge_per_example(preds, golds, scoring)]
