"""The paired cluster bootstrap: intervals over users, pairing cancels what users share."""

import numpy as np
import pytest

from p2p.evaluation.stats import mean_ci, paired_diff_ci


def test_mean_interval_contains_the_mean_and_narrows_with_users():
    rng = np.random.default_rng(0)
    few = [f"u{i % 10}" for i in range(40)]
    many = [f"u{i % 200}" for i in range(800)]
    a = mean_ci(list(rng.random(40)), few)
    b = mean_ci(list(rng.random(800)), many)
    assert a.low <= a.value <= a.high and b.low <= b.value <= b.high
    assert (b.high - b.low) < (a.high - a.low) / 2


def test_paired_difference_cancels_per_user_offsets():
    # Each user has their own level; method b is always exactly 0.1 below a: the paired interval is [0.1, 0.1].
    users = [f"u{i // 4}" for i in range(80)]
    level = {u: i * 0.05 for i, u in enumerate(sorted(set(users)))}
    a = [level[u] for u in users]
    b = [level[u] - 0.1 for u in users]
    d = paired_diff_ci(a, b, users)
    assert d.value == pytest.approx(0.1) and d.low == pytest.approx(0.1) and d.high == pytest.approx(0.1)
    # unpaired, the per-user levels would make the interval wide
    assert mean_ci(a, users).high - mean_ci(a, users).low > 0.2


def test_one_user_has_no_interval():
    ci = mean_ci([1.0, 0.0], ["u", "u"])
    assert ci.value == 0.5 and ci.low != ci.low  # NaN
