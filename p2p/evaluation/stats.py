"""Confidence intervals for figures that stand on users: the paired cluster bootstrap.

A user's examples are not independent (the same adapter answers all of them), so intervals
resample users, not examples: each bootstrap sample draws users with replacement and takes the
mean over all their examples. Paired: a difference between two methods is computed on the same
resampled users, so what the users share cancels out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Interval:
    value: float
    low: float
    high: float

    def as_list(self) -> list[float]:
        return [self.value, self.low, self.high]

    def text(self) -> str:
        """`0.553 [0.465, 0.640]`: how the benches' tables print a figure with its interval."""
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


def _user_sums(values: list[float], users: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    order = sorted(set(users))
    index = {u: i for i, u in enumerate(order)}
    sums, counts = np.zeros(len(order)), np.zeros(len(order))
    for v, u in zip(values, users, strict=True):
        sums[index[u]] += v
        counts[index[u]] += 1
    return sums, counts, order


def _draws(n_users: int, samples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n_users, size=(samples, n_users))


def mean_ci(values: list[float], users: list[str], samples: int = 2000, seed: int = 0, level: float = 0.95
            ) -> Interval:
    """The mean over examples and its bootstrap interval over users."""
    sums, counts, _ = _user_sums(values, users)
    value = float(sums.sum() / counts.sum())
    if len(sums) < 2:
        return Interval(value, float("nan"), float("nan"))
    idx = _draws(len(sums), samples, seed)
    means = sums[idx].sum(1) / counts[idx].sum(1)
    tail = (1 - level) / 2 * 100
    return Interval(value, float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail)))


def paired_diff_ci(a: list[float], b: list[float], users: list[str], samples: int = 2000, seed: int = 0,
                   level: float = 0.95) -> Interval:
    """mean(a) - mean(b) over the same examples, with a paired bootstrap interval over users."""
    sums_a, counts, _ = _user_sums(a, users)
    sums_b, _, _ = _user_sums(b, users)
    value = float((sums_a.sum() - sums_b.sum()) / counts.sum())
    if len(counts) < 2:
        return Interval(value, float("nan"), float("nan"))
    idx = _draws(len(counts), samples, seed)
    diffs = (sums_a[idx].sum(1) - sums_b[idx].sum(1)) / counts[idx].sum(1)
    tail = (1 - level) / 2 * 100
    return Interval(value, float(np.percentile(diffs, tail)), float(np.percentile(diffs, 100 - tail)))


def verdict(ci95: list[float] | tuple[float, float]) -> str:
    """What a paired interval of P2P minus another method says, signed so that positive is P2P better."""
    low, high = ci95
    return "P2P better" if low > 0 else "P2P worse" if high < 0 else "no difference shown"
