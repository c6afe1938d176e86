"""LaMP import on small files written in exactly the published shape of each task."""

import json

import pytest

from p2p.data.lamp import import_lamp
from p2p.data.schemas import DataError, read_table
from pipelines.cli import main

# One question per task, fields as in the released LaMP files.
SAMPLES = {
    "LaMP_1": ({"id": "100", "input": 'For an author who has written the paper with the title "Deep nets", '
                "which reference is related? Just answer with [1] or [2] without explanation. "
                '[1]: "Graph kernels" [2]: "Residual learning"',
                "profile": [{"title": "Wide networks", "abstract": "We study width.", "id": "p1"},
                            {"title": "Batch norm", "abstract": "Normalising layers.", "id": "p2"}]}, "[2]"),
    "LaMP_2": ({"id": "200", "input": "Which tag does this movie relate to among the following tags? ... "
                "description: A crew lands on Mars.",
                "profile": [{"tag": "sci-fi", "description": "Astronauts in orbit.", "id": "m1"},
                            {"tag": "comedy", "description": "A clumsy chef.", "id": "m2"}]}, "sci-fi"),
    "LaMP_3": ({"id": "300", "input": "What is the score of the following review on a scale of 1 to 5? ... "
                "review: Great kettle.",
                "profile": [{"text": "Broke fast.", "score": "1", "id": "r1"},
                            {"text": "Nice mug.", "score": "4", "id": "r2"}]}, "5"),
    "LaMP_4": ({"id": "400", "input": "Generate a headline for the following article: Rain floods the city.",
                "profile": [{"text": "The council met today.", "title": "Council Meets", "id": "n1"}]},
               "City Floods"),
    "LaMP_5": ({"id": "500", "input": "Generate a title for the following abstract of a paper: We propose X.",
                "profile": [{"title": "On Y", "abstract": "We study Y.", "id": "a1"}]}, "X: a method"),
    "LaMP_7": ({"id": "700", "input": "Paraphrase the following tweet without any explanation before or after "
                "it: so tired today",
                "profile": [{"text": "coffee first, then the world", "id": "t1"}]}, "exhausted today"),
}


def write_pair(tmp_path, task, question, gold):
    q, o = tmp_path / f"{task}_questions.json", tmp_path / f"{task}_outputs.json"
    q.write_text(json.dumps([question]))
    o.write_text(json.dumps({"task": task, "golds": [{"id": question["id"], "output": gold}]}))
    return str(q), str(o)


@pytest.mark.parametrize("task", sorted(SAMPLES))
def test_lamp_round_trip(tmp_path, task):
    question, gold = SAMPLES[task]
    q, o = write_pair(tmp_path, task, question, gold)
    out = tmp_path / "data"
    stats = import_lamp(q, o, "test_id", str(out))
    assert stats == {"task": task, "users": 1, "examples": 1, "from_history": 0}
    users = read_table(str(out / "users"), "users").to_pylist()
    examples = read_table(str(out / "examples"), "examples").to_pylist()
    assert users[0]["user_id"] == question["id"]
    assert len(users[0]["history"]) == len(question["profile"])
    assert examples[0] == {"example_id": question["id"], "user_id": question["id"], "task": task,
                           "input": question["input"], "target": gold, "split": "test_id"}
    first, item = users[0]["history"][0], question["profile"][0]
    assert first["item_id"] == item["id"]
    expected_label = {"LaMP_1": "Wide networks", "LaMP_2": "sci-fi", "LaMP_3": "1", "LaMP_4": "Council Meets",
                      "LaMP_5": "On Y", "LaMP_7": None}[task]
    assert first["label"] == expected_label
    assert (item.get("abstract") or item.get("description") or item["text"]) in first["text"]


def test_malformed_json_names_file(tmp_path):
    q = tmp_path / "q.json"
    q.write_text("[{not json")
    o = tmp_path / "o.json"
    o.write_text('{"task": "LaMP_2", "golds": []}')
    with pytest.raises(DataError, match=r"q\.json: not valid JSON \(line 1"):
        import_lamp(str(q), str(o), "train", str(tmp_path / "d"))


def test_missing_key_names_id(tmp_path):
    question, gold = SAMPLES["LaMP_2"]
    q, o = write_pair(tmp_path, "LaMP_2", {k: v for k, v in question.items() if k != "profile"}, gold)
    with pytest.raises(DataError, match=r"id '200' \(question 0\) is missing key 'profile'"):
        import_lamp(q, o, "train", str(tmp_path / "d"))


def test_id_without_gold(tmp_path, capsys):
    question, gold = SAMPLES["LaMP_3"]
    q, o = write_pair(tmp_path, "LaMP_3", question, gold)
    with open(o, "w") as f:
        json.dump({"task": "LaMP_3", "golds": [{"id": "999", "output": "1"}]}, f)
    rc = main(["import-lamp", "--questions", q, "--outputs", o, "--split", "train", "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert rc == 2 and "no gold output for id '300'" in err and o in err


def test_bad_split(tmp_path):
    question, gold = SAMPLES["LaMP_2"]
    q, o = write_pair(tmp_path, "LaMP_2", question, gold)
    with pytest.raises(DataError, match="--split 'dev'"):
        import_lamp(q, o, "dev", str(tmp_path / "d"))


def test_history_examples_become_questions_and_leave_the_profile(tmp_path):
    profile = [{"id": f"m{i}", "description": f"Movie {i}.", "tag": tag, "date": f"2020-01-{i + 1:02d}"}
               for i, tag in enumerate(["sci-fi", "comedy", "not a LaMP tag", "romance", "action"])]
    question = {"id": "200", "input": "Which tag ... description: A crew lands on Mars.", "profile": profile}
    q, o = write_pair(tmp_path, "LaMP_2", question, "sci-fi")
    stats = import_lamp(q, o, "train", str(tmp_path / "d"), history_examples=3)
    assert stats == {"task": "LaMP_2", "users": 1, "examples": 4, "from_history": 3}
    examples = read_table(str(tmp_path / "d" / "examples"), "examples").to_pylist()
    asked = {e["example_id"]: e for e in examples if e["example_id"] != "200"}
    # The three most recent items whose tag is one of LaMP-2's, oldest first, in LaMP-2's prompt.
    assert [e["target"] for e in asked.values()] == ["comedy", "romance", "action"]
    assert all(e["input"].startswith("Which tag does this movie relate to") and e["split"] == "train"
               for e in asked.values())
    assert "description: Movie 4." in asked["200-h2"]["input"]
    history = read_table(str(tmp_path / "d" / "users"), "users").to_pylist()[0]["history"]
    assert [h["item_id"] for h in history] == ["m0", "m2"]  # what was asked is not in the profile


def test_history_examples_refused_for_held_out_splits(tmp_path, capsys):
    question, gold = SAMPLES["LaMP_2"]
    q, o = write_pair(tmp_path, "LaMP_2", question, gold)
    rc = main(["import-lamp", "--questions", q, "--outputs", o, "--split", "test_id", "--out", str(tmp_path / "d"),
               "--history-examples", "2"])
    assert rc == 2 and "--history-examples is for --split train only" in capsys.readouterr().err


def test_history_examples_keep_one_item_and_refuse_other_tasks(tmp_path):
    question, gold = SAMPLES["LaMP_2"]  # two usable items: one is asked, one stays in the profile
    q, o = write_pair(tmp_path, "LaMP_2", question, gold)
    assert import_lamp(q, o, "train", str(tmp_path / "d"), history_examples=5)["from_history"] == 1
    history = read_table(str(tmp_path / "d" / "users"), "users").to_pylist()[0]["history"]
    assert [h["item_id"] for h in history] == ["m1"]
    question, gold = SAMPLES["LaMP_7"]  # a tweet item is not a paraphrasing question
    q, o = write_pair(tmp_path, "LaMP_7", question, gold)
    with pytest.raises(DataError, match=r"--history-examples: task 'LaMP_7' .* is not one whose history items"):
        import_lamp(q, o, "train", str(tmp_path / "e"), history_examples=1)
