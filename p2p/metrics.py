"""The LaMP metrics: accuracy and F1 for classification, MAE and RMSE for rating, ROUGE for generation.

As in LaMP, a rating answer that does not parse as a number in range scores the worst possible
error (the distance to the farther end of the scale), and classification predictions are
compared after stripping whitespace and case.
"""

from __future__ import annotations

import math
import re

from rouge_score import rouge_scorer

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def normalize_label(text: str) -> str:
    text = text.strip().lower()
    return text.split()[0].strip(".,;:!\"'") if text else ""


def accuracy(preds: list[str], golds: list[str]) -> float:
    _check(preds, golds)
    return sum(normalize_label(p) == normalize_label(g) for p, g in zip(preds, golds, strict=True)) / len(golds)


def f1_scores(preds: list[str], golds: list[str], labels: list[str] | None = None) -> dict[str, float]:
    """Macro and support-weighted F1 over the gold labels (and any extra `labels`)."""
    _check(preds, golds)
    p = [normalize_label(x) for x in preds]
    g = [normalize_label(x) for x in golds]
    classes = sorted(set(g) | {normalize_label(x) for x in labels or []})
    f1s, weights = [], []
    for c in classes:
        tp = sum(1 for a, b in zip(p, g, strict=True) if a == c and b == c)
        fp = sum(1 for a, b in zip(p, g, strict=True) if a == c and b != c)
        fn = sum(1 for a, b in zip(p, g, strict=True) if a != c and b == c)
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
        weights.append(sum(1 for b in g if b == c))
    macro = sum(f1s) / len(f1s)
    weighted = sum(f * w for f, w in zip(f1s, weights, strict=True)) / sum(weights)
    return {"macro_f1": macro, "weighted_f1": weighted}


def parse_rating(text: str, low: int = 1, high: int = 5) -> float | None:
    m = _NUMBER.search(text)
    if m is None:
        return None
    value = float(m.group())
    return value if low <= value <= high else None


def rating_errors(preds: list[str], golds: list[str], low: int = 1, high: int = 5) -> dict[str, float]:
    """MAE and RMSE; an unparsable or out-of-range answer counts as the worst error for that gold."""
    _check(preds, golds)
    errors, unparsed = [], 0
    for p, g in zip(preds, golds, strict=True):
        gold = float(g)
        value = parse_rating(p, low, high)
        if value is None:
            unparsed += 1
            errors.append(max(gold - low, high - gold))
        else:
            errors.append(abs(value - gold))
    n = len(errors)
    return {"mae": sum(errors) / n, "rmse": math.sqrt(sum(e * e for e in errors) / n), "unparsed": unparsed / n}


_SCORER = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)


def rouge(preds: list[str], golds: list[str]) -> dict[str, float]:
    """Mean ROUGE-1 and ROUGE-L F-measure (rouge-score, Porter stemming)."""
    _check(preds, golds)
    scores = [_SCORER.score(g, p) for p, g in zip(preds, golds, strict=True)]
    return {"rouge1": sum(s["rouge1"].fmeasure for s in scores) / len(scores),
            "rougeL": sum(s["rougeL"].fmeasure for s in scores) / len(scores)}


TASK_KIND = {"tag": "classification", "rate": "rating", "headline": "generation"}
PRIMARY = {"classification": ("accuracy", "higher"), "rating": ("mae", "lower"), "generation": ("rougeL", "higher")}


def task_kind(task: str) -> str:
    """LaMP task names map too: LaMP-1/2 classification, LaMP-3 rating, the rest generation."""
    if task in TASK_KIND:
        return TASK_KIND[task]
    if task.startswith(("LaMP-1", "LaMP-2")):
        return "classification"
    if task.startswith("LaMP-3"):
        return "rating"
    return "generation"


def score(task: str, preds: list[str], golds: list[str]) -> dict[str, float]:
    kind = task_kind(task)
    if kind == "classification":
        return {"accuracy": accuracy(preds, golds), **f1_scores(preds, golds)}
    if kind == "rating":
        return rating_errors(preds, golds)
    return rouge(preds, golds)


def _check(preds: list[str], golds: list[str]) -> None:
    if len(preds) != len(golds) or not golds:
        raise ValueError(f"need as many predictions as golds, and at least one ({len(preds)} vs {len(golds)})")
