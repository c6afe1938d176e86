"""The LaMP metrics on cases computed by hand."""

import math

import pytest

from p2p.metrics import accuracy, f1_scores, parse_rating, rating_errors, rouge, score


def test_accuracy_normalizes_case_space_and_trailing_punctuation():
    assert accuracy(["Scary.", " noir", "witty", "sweet"], ["scary", "noir", "silly", "sweet"]) == 0.75


def test_f1_macro_and_weighted():
    # golds a,a,b,c; preds a,b,b,a. a: tp1 fp1 fn1 -> 0.5; b: tp1 fp1 fn0 -> 2/3; c: tp0 -> 0.
    got = f1_scores(["a", "b", "b", "a"], ["a", "a", "b", "c"])
    assert got["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 0) / 3)
    assert got["weighted_f1"] == pytest.approx((0.5 * 2 + 2 / 3 * 1 + 0 * 1) / 4)


def test_rating_unparsable_counts_as_worst():
    # gold 4, "5" -> 1; gold 2, "two" -> unparsable: worst is max(2-1, 5-2) = 3; gold 1, "9" out of range -> 4.
    got = rating_errors(["5", "two", "9"], ["4", "2", "1"])
    assert got["mae"] == pytest.approx((1 + 3 + 4) / 3)
    assert got["rmse"] == pytest.approx(math.sqrt((1 + 9 + 16) / 3))
    assert got["unparsed"] == pytest.approx(2 / 3)
    assert parse_rating("I'd say 3.") == 3.0 and parse_rating("none") is None


def test_rouge_by_hand():
    # pred "the cat sat", gold "the cat": ROUGE-1 P=2/3 R=1 F=0.8; LCS 2 -> ROUGE-L 0.8 too.
    got = rouge(["the cat sat"], ["the cat"])
    assert got["rouge1"] == pytest.approx(0.8) and got["rougeL"] == pytest.approx(0.8)
    # Order matters for ROUGE-L only: "cat the" vs "the cat": R1 = 1, LCS = 1 -> 0.5.
    got = rouge(["cat the"], ["the cat"])
    assert got["rouge1"] == pytest.approx(1.0) and got["rougeL"] == pytest.approx(0.5)


def test_score_dispatches_by_task_and_rejects_empty():
    assert set(score("tag", ["a"], ["a"])) == {"accuracy", "macro_f1", "weighted_f1"}
    assert set(score("LaMP-3", ["3"], ["3"])) == {"mae", "rmse", "unparsed"}
    assert set(score("headline", ["x"], ["x"])) == {"rouge1", "rougeL"}
    with pytest.raises(ValueError):
        accuracy([], [])
