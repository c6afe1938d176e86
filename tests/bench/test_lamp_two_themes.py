"""bench/lamp_two_themes.py: an answer's accuracy split into naming one of the two themes and choosing."""

import json

from bench import lamp_two_themes
from bench.lamp_shaped import THEMES


def test_answers_split_into_the_two_themes_and_the_choice_among_them(tmp_path):
    pairs = [("comedy", "romance"), ("action", "fantasy"), ("sci-fi", "violence"), ("classic", "dystopia")]
    # Each profile tags the movie's second theme more often: the history rule answers it, wrong on every gold.
    questions = [{"id": f"q{k}", "input": f"tags: [...] description: A man {THEMES[a][0]}, {THEMES[b][1]}.",
                  "profile": [{"id": "h", "description": "", "tag": b}]} for k, (a, b) in enumerate(pairs)]
    golds = [{"id": f"q{k}", "output": a} for k, (a, _) in enumerate(pairs)]
    # right, the other theme, a tag the movie does not name, right
    answers = ["comedy", "fantasy", "true story", "classic"]
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "o.json").write_text(json.dumps({"task": "LaMP_2", "golds": golds}))
    method = tmp_path / "report" / "lamp" / "p2p"
    method.mkdir(parents=True)
    (method / "LaMP_2.json").write_text(json.dumps({"task": "LaMP_2", "golds": [
        {"id": f"q{k}", "output": a} for k, a in enumerate(answers)]}))
    assert lamp_two_themes.main(["--report", str(tmp_path / "report"), "--questions", str(tmp_path / "q.json"),
                                 "--outputs", str(tmp_path / "o.json"), "--out", str(tmp_path / "out")]) == 0
    row, rule = json.loads((tmp_path / "out" / "lamp_two_themes.json").read_text())["rows"]
    assert row["method"] == "p2p" and row["users"] == 4
    assert row["accuracy"].startswith("0.500 ")
    assert row["one of the two themes"].startswith("0.750 ")
    assert row["accuracy among those"].startswith("0.667 ")
    assert row["accuracy - history rule"].startswith("0.500 ")
    assert rule["method"] == "history rule" and rule["accuracy"].startswith("0.000 ")
    assert rule["one of the two themes"].startswith("1.000 ")
