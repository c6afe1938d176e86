"""LaMP's metrics on cases computed by hand the way its official eval/evaluation.py computes them."""

import math

import pytest

from p2p.evaluation.metrics import (
    classification_scores,
    headline_style,
    primary_per_example,
    rating_scores,
    rouge_per_example,
    score,
)
from p2p.task.registry import CLASSIFICATION, GENERATION, LAMP_2_TAGS, RATING, task_for


def test_lamp_task_names_in_every_spelling():
    for name in ("LaMP_2", "LaMP-2", "lamp2"):
        task = task_for(name)
        assert task.kind == CLASSIFICATION and task.labels == LAMP_2_TAGS and len(task.labels) == 15
        assert task.name == name
    assert task_for("LaMP_1").labels == ("[1]", "[2]")
    assert task_for("LaMP_3").kind == RATING and task_for("LaMP-3").primary == "mae"
    assert task_for("LaMP_4").kind == GENERATION and task_for("LaMP_7").primary == "rouge1"
    assert task_for("LongLaMP_2").kind == GENERATION and task_for("LongLaMP-abstract").kind == GENERATION


def test_classification_is_exact_after_strip():
    labels = LAMP_2_TAGS
    # " sci-fi " is sci-fi; "based on a true story" is not "based on a book"; case matters.
    got = classification_scores([" sci-fi ", "based on a true story", "Comedy"], ["sci-fi", "based on a book", "comedy"],
                                labels)
    assert got["accuracy"] == pytest.approx(1 / 3)
    assert got["no_label"] == pytest.approx(2 / 3)
    # The lenient variant (first word, lowercased) would wrongly accept both.
    lenient = classification_scores(["based on a true story", "Comedy"], ["based on a book", "comedy"], labels,
                                    scoring="lenient")
    assert lenient["accuracy"] == 1.0


def test_macro_f1_is_over_the_whole_label_list():
    # golds sci-fi, sci-fi; preds sci-fi, comedy. sci-fi: tp1 fp0 fn1 -> 2/3; comedy: tp0 fp1 -> 0;
    # the 13 labels nobody used score 0 too: macro F1 = (2/3) / 15, not (2/3) / 2.
    got = classification_scores(["sci-fi", "comedy"], ["sci-fi", "sci-fi"], LAMP_2_TAGS)
    assert got["macro_f1"] == pytest.approx((2 / 3) / 15)
    assert got["accuracy"] == 0.5


def test_rating_parses_the_whole_answer_and_scores_the_farther_end():
    # gold 4: "3" -> 1; " 5 " -> 1; "4 stars" does not parse: farther end of 1..5 from 4 is 1 -> 3;
    # gold 3: "three" -> tie between the ends: the official script picks 5 -> 2; gold 2: "7" is not
    # clamped -> 5; gold 1: "1e0" is float 1.0 -> 0.
    preds, golds = ["3", " 5 ", "4 stars", "three", "7", "1e0"], ["4", "4", "4", "3", "2", "1"]
    got = rating_scores(preds, golds)
    errors = [1, 1, 3, 2, 5, 0]
    assert got["mae"] == pytest.approx(sum(errors) / 6)
    assert got["rmse"] == pytest.approx(math.sqrt(sum(e * e for e in errors) / 6))
    assert got["unparsed"] == pytest.approx(2 / 6)
    # lenient: the first number, clamped: "4 stars" -> 4 (0), "7" -> 5 (3)
    assert rating_scores(["4 stars", "7"], ["4", "2"], scoring="lenient")["mae"] == pytest.approx(1.5)
    # non-finite answers are unparsable here (the official script would report a NaN MAE)
    assert rating_scores(["nan"], ["2"])["mae"] == 3


def test_rouge_has_no_stemming():
    # "cats running" vs "cat runs": no shared token without stemming; with Porter stemming both match.
    assert rouge_per_example(["cats running"], ["cat runs"])[0] == {"rouge1": 0.0, "rougeL": 0.0}
    assert rouge_per_example(["cats running"], ["cat runs"], scoring="lenient")[0]["rouge1"] == pytest.approx(1.0)
    # pred "the cat sat", gold "the cat": P 2/3, R 1 -> F 0.8 for ROUGE-1 and ROUGE-L.
    assert rouge_per_example(["the cat sat"], ["the cat"])[0] == pytest.approx({"rouge1": 0.8, "rougeL": 0.8})


def test_headline_style_is_case_and_punctuation_sensitive():
    assert headline_style("Breaking: Firefighters Open Center in Riverside!") == ("Breaking:", "title", "!")
    assert headline_style("firefighters open center in riverside") == ("", "lower", "")
    assert headline_style("Update: Firefighters open center in Riverside?") == ("Update:", "sentence", "?")
    headline = task_for("headline")
    got = score(headline, ["Firefighters open center in Riverside"], ["firefighters open center in riverside!"])
    assert got["rougeL"] == 1.0 and got["style_exact"] == 0.0  # ROUGE cannot see the style; the style metric can
    assert got["style_prefix"] == 1.0 and got["style_casing"] == 0.0 and got["style_ending"] == 0.0


def test_primary_per_example_averages_to_the_reported_figure():
    tag = task_for("tag")
    preds, golds = ["noir", "scary ", "witty", "gory"], ["noir", "scary", "silly", "creepy"]
    per = primary_per_example(tag, preds, golds)
    assert per == [1.0, 1.0, 0.0, 0.0] and sum(per) / 4 == score(tag, preds, golds)["accuracy"]
    rate = task_for("rate")
    assert primary_per_example(rate, ["5", "x"], ["4", "2"]) == [1.0, 3.0]


def test_unknown_tasks_are_inferred_from_their_targets():
    assert task_for("my-ratings", ["1", "3", "5"]).kind == RATING
    cls = task_for("mood", ["happy", "sad", "happy"])
    assert cls.kind == CLASSIFICATION and cls.labels == ("happy", "sad")
    assert task_for("essay", ["a long free text answer here"] * 3).kind == GENERATION
    with pytest.raises(ValueError):
        score(cls, [], [])
