"""bench/lamp_rating_rule.py: each method's rating error against the history's offset rule, split by shift."""

import json

import pytest

from bench import lamp_rating_rule
from bench.lamp_shaped import clipped_offset_rule, offset_rule, sentiment_of
from p2p.data.synthetic import SENTIMENT_PHRASES
from p2p.task.registry import LAMP_3_PROMPT


def test_sentiment_is_read_off_the_review_phrase():
    for sentiment, phrases in SENTIMENT_PHRASES.items():
        assert sentiment_of(LAMP_3_PROMPT.format(text=f"I bought this lamp. {phrases[-1]}")) == sentiment
    with pytest.raises(ValueError, match="no sentiment phrase"):
        sentiment_of("I bought this lamp. It is a lamp.")


def _write(tmp_path, answers: dict[str, list[str]]) -> dict:
    # Four users, each with two history reviews (sentiments 3 and 4, rated on the 1-5 scale): offsets +1, +1, 0, -2,
    # none clipped away. The question's review has sentiment 3.
    offsets = [1, 1, 0, -2]
    review = LAMP_3_PROMPT.format(text=f"I bought this lamp. {SENTIMENT_PHRASES[3][0]}")
    questions = [{"id": f"q{k}", "input": review, "profile": [
        {"id": f"q{k}-{j}", "text": f"A kettle. {SENTIMENT_PHRASES[s][0]}", "score": str(min(5, max(1, s + off)))}
        for j, s in enumerate((3, 4))]} for k, off in enumerate(offsets)]
    golds = [{"id": f"q{k}", "output": str(3 + off)} for k, off in enumerate(offsets)]
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "o.json").write_text(json.dumps({"task": "LaMP_3", "golds": golds}))
    for method, outputs in answers.items():
        folder = tmp_path / "report" / "lamp" / method
        folder.mkdir(parents=True)
        (folder / "LaMP_3.json").write_text(json.dumps({"task": "LaMP_3", "golds": [
            {"id": f"q{k}", "output": a} for k, a in enumerate(outputs)]}))
    assert lamp_rating_rule.main(["--report", str(tmp_path / "report"), "--questions", str(tmp_path / "q.json"),
                                  "--outputs", str(tmp_path / "o.json"), "--out", str(tmp_path / "out")]) == 0
    return {r["method"]: r for r in json.loads((tmp_path / "out" / "lamp_rating_rule.json").read_text())["rows"]}


def test_each_method_is_set_against_the_offset_rule_on_the_same_users(tmp_path):
    # golds 4, 4, 3, 1. "shared" answers the review's sentiment (3) to everyone; "p2p" is right but for the last
    # user, where it answers "five stars" (unparsable: the far end of the scale, as LaMP scores it).
    rows = _write(tmp_path, {"shared": ["3", "3", "3", "3"], "p2p": ["4", "4", "3", "five stars"]})
    rule = rows["history rule"]
    assert rule["users"] == 4 and rule["MAE"].startswith("0.000 ")  # the offsets are exact in these histories
    shared, p2p = rows["shared"], rows["p2p"]
    assert shared["MAE"].startswith("1.000 ")  # errors 1, 1, 0, 2
    assert shared["MAE - history rule"].startswith("1.000 ")
    assert shared["users shifted"] == 3
    assert shared["MAE where the user shifts the rating"].startswith("1.333 ")
    assert shared["MAE where they do not"].startswith("0.000 ")
    assert p2p["MAE"].startswith("1.000 ")  # errors 0, 0, 0, 4
    assert p2p["MAE where the user shifts the rating"].startswith("1.333 ")
    assert rows["history rule, clip-aware"]["MAE"].startswith("0.000 ")


def test_a_report_without_rating_answers_is_one_line(tmp_path):
    (tmp_path / "report" / "lamp").mkdir(parents=True)
    (tmp_path / "q.json").write_text("[]")
    (tmp_path / "o.json").write_text(json.dumps({"task": "LaMP_3", "golds": []}))
    with pytest.raises(SystemExit, match="no method's LaMP_3.json answers"):
        lamp_rating_rule.main(["--report", str(tmp_path / "report"), "--questions", str(tmp_path / "q.json"),
                               "--outputs", str(tmp_path / "o.json"), "--out", str(tmp_path / "out")])


def test_the_clip_aware_rule_reads_an_offset_the_scale_clips():
    # A +2 user: sentiments 3 and 5 are both rated 5 (shifts 2 and 0). The mean shift, 1, answers 4 to a
    # sentiment-3 review; the offset that explains the clipped history, 2, answers 5.
    profile = [{"id": "h0", "text": SENTIMENT_PHRASES[3][0], "score": "5"},
               {"id": "h1", "text": SENTIMENT_PHRASES[5][0], "score": "5"}]
    assert offset_rule(profile, 3) == "4"
    assert clipped_offset_rule(profile, 3) == "5"
    assert clipped_offset_rule(profile, 1) == "3"
