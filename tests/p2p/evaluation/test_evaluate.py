"""`p2p eval` end to end on tiny-random: every method and control, intervals, the personalization effect."""

import json
import os
import re
import shutil

import pytest
import torch

from p2p.model.hypernet import Hypernetwork, load_hypernet, save_hypernet
from p2p.task.registry import task_for
from pipelines.cli import main


@pytest.fixture(scope="module")
def run_dir(tiny_hypernet, tmp_path_factory):
    """A run directory as `p2p train --with-shared` leaves it: best/ and shared/best/."""
    run = tmp_path_factory.mktemp("run")
    shutil.copytree(tiny_hypernet, run / "best")
    shared, _ = load_hypernet(tiny_hypernet)
    shared = Hypernetwork(shared.config)  # another hypernet, same shapes
    with torch.no_grad():
        for p in shared.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_hypernet(shared, str(run / "shared" / "best"))
    shutil.copytree(run / "shared" / "best", run / "retrieval" / "best")  # a control of the same shapes
    return str(run)


def test_eval_scores_every_method_with_intervals_and_the_effect(run_dir, synth_dir, tmp_path, capsys):
    out = tmp_path / "report"
    rc = main(["eval", "--run", run_dir, "--data", synth_dir, "--out", str(out), "--users-per-split", "3",
               "--oppu-users", "1", "--oppu-epochs", "1", "--oppu-max-items", "4", "--bootstrap", "200"])
    err = capsys.readouterr().err
    assert rc == 0, err
    # each method that runs the model shows its answering in a job's log: one line when it is done
    for name in ("base", "prompt", "shared", "shuffled", "oppu", "p2p"):
        assert re.search(rf"^{name}: answering: (\d+)/\1 answers, .*\(done\)$", err, re.M), (name, err)
    assert sorted(os.listdir(out)) == ["cost.png", "effect.png", "lamp", "quality.png", "report.json", "report.md"]
    report = json.loads((out / "report.json").read_text())
    assert set(report["methods"]) == {"base", "prompt", "rule", "shared", "shuffled", "oppu", "p2p"}
    assert report["users"] == 6 and report["scoring"] == "official"
    cells = {f"{t}/{s}" for t in ("tag", "rate", "headline") for s in ("test_id", "test_ood")}
    for name, method in report["methods"].items():
        assert set(method["scores"]) == cells, name
        for key, cell in method["scores"].items():
            low, high = cell["ci95"]
            assert cell["examples"] > 0, (name, key)
            assert low <= cell["primary"] <= high if cell["users"] > 1 else low != low, (name, key)  # 1 user: no CI
        users = sum(c["users"] for k, c in method["scores"].items() if k.startswith("tag/"))
        assert users == (2 if name == "oppu" else 6)  # OPPU: one user per split
    # the headline task is scored on its style, which ROUGE cannot see, and ROUGE is reported too
    head = report["methods"]["p2p"]["scores"]["headline/test_id"]
    assert report["tasks"]["headline"]["primary"] == "style_exact" and "rougeL" in head
    # the input-only rule's headline is the plain headline: the right words, no style
    assert report["methods"]["rule"]["scores"]["headline/test_id"]["rougeL"] > 0.9
    assert report["ceiling"]["tag/test_id"]["primary"] > 0.9  # the persona-known answers
    assert set(report["effects"]) == cells
    for effect in report["effects"].values():
        assert set(effect["by_control"]) == {"rule", "shared", "shuffled"}
        assert effect["control"] == min(effect["by_control"], key=lambda c: effect["by_control"][c]["effect"])
        low, high = effect["ci95"]
        assert low <= effect["effect"] <= high
        assert effect["verdict"] in ("P2P better", "P2P worse", "no difference shown")
    oppu = report["methods"]["oppu"]["oppu"]
    assert all(n <= 4 * 3 for n in oppu["items"].values()) and all(s > 0 for s in oppu["seconds"].values())
    assert report["p2p_vs_oppu_personalize_speedup"] > 1
    md = (out / "report.md").read_text()
    assert "Personalization effect" in md and "official LaMP scoring" in md and "| tag/test_id | accuracy" in md


def test_lenient_scoring_is_labelled(run_dir, synth_dir, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["eval", "--run", run_dir, "--data", synth_dir, "--out", str(out), "--users-per-split", "2",
                 "--methods", "rule,p2p", "--tasks", "rate", "--scoring", "lenient"]) == 0, capsys.readouterr().err
    assert "LENIENT scoring" in (out / "report.md").read_text()


def test_shuffled_gives_every_user_another_users_profile(run_dir, synth_dir):
    from p2p.evaluation.evaluate import EvalConfig, Evaluation

    evaluation = Evaluation(EvalConfig(run=run_dir, data=synth_dir, out="", tasks=("tag",), users_per_split=4,
                                       methods=("shuffled",)), progress=lambda s: None)
    shuffled = evaluation.methods()["shuffled"]
    shuffled.predict(evaluation.users, evaluation.examples)
    split_of = {e["user_id"]: e["split"] for e in evaluation.examples}
    assert len(shuffled.profile_of) == 8
    for user, donor in shuffled.profile_of.items():
        assert donor != user and split_of[donor] == split_of[user]  # another held-out user of the same split
    assert sorted(shuffled.profile_of.values()) == sorted(shuffled.profile_of)  # each profile lent once


def test_oppu_trains_on_the_users_items_of_the_evaluated_task_in_its_format(run_dir, synth_dir):
    from p2p.evaluation.evaluate import EvalConfig, Evaluation

    evaluation = Evaluation(EvalConfig(run=run_dir, data=synth_dir, out="", tasks=("tag", "rate"), users_per_split=1,
                                       methods=("oppu",)), progress=lambda s: None)
    oppu = evaluation.methods()["oppu"]
    user = next(iter(evaluation.users.values()))
    history = user["history"]
    tag = task_for("tag")
    pairs = oppu.training_pairs(history, ["tag"])
    tag_items = [h for h in history if h["label"] in tag.labels]
    assert len(pairs) == len(tag_items) > 0  # every tag item, however old, and no headline or score item
    assert all(x.startswith("Which tag fits this movie?") and y in tag.labels for x, y in pairs)
    both = oppu.training_pairs(history, ["tag", "rate"])
    assert len(both) == len(pairs) + sum(1 for h in history if h["label"].isdigit())


def test_rule_answers_the_majority_of_its_key_fitted_on_training_examples():
    from p2p.evaluation.baselines import Rule

    tasks = {"t": task_for("t", ["a", "b"])}
    train = [{"example_id": f"e{i}", "task": "t", "target": tgt} for i, tgt in enumerate(["a", "a", "b", "b", "b"])]
    reference = {"e0": ("k1", None), "e1": ("k1", None), "e2": ("k2", None), "e3": ("k2", None), "e4": ("k1", None),
                 "q1": ("k1", None), "q2": ("k2", None), "q3": ("k9", None)}
    rule = Rule("rule", tasks, train, reference)
    queries = [{"example_id": q, "task": "t"} for q in ("q1", "q2", "q3")]
    # k1: a, a, b -> a; k2: b, b -> b; an unseen key -> the task's overall majority (b)
    assert rule.predict({}, queries) == ["a", "b", "b"]


def test_eval_refuses_training_users(run_dir, synth_dir, tmp_path, capsys):
    rc = main(["eval", "--run", run_dir, "--data", synth_dir, "--out", str(tmp_path / "r"), "--split", "train"])
    assert rc == 2 and "held-out users only" in capsys.readouterr().err


def test_val_users_only_where_a_bench_asks_for_them(synth_dir):
    from p2p.errors import P2PError
    from p2p.evaluation.evaluate import EvalConfig, select

    config = EvalConfig(run="", data=synth_dir, out="", splits=("val",), tasks=("tag",))
    with pytest.raises(P2PError, match="held-out users only"):
        select(config)
    users, examples, _ = select(config, allowed=("val",))  # bench.val_answers: choosing a recipe
    assert users and {e["split"] for e in examples} == {"val"}


def test_excluded_users_are_never_scored(synth_dir, tmp_path):
    from p2p.evaluation.evaluate import EvalConfig, select

    users, _, _ = select(EvalConfig(run="", data=synth_dir, out="", tasks=("tag",)))
    chosen = sorted(users)[: len(users) // 2]
    listed = tmp_path / "chosen-on.txt"
    listed.write_text("\n".join(chosen) + "\n\n")
    kept, examples, _ = select(EvalConfig(run="", data=synth_dir, out="", tasks=("tag",), exclude_users=str(listed)))
    assert set(kept) == set(users) - set(chosen) and kept
    assert {e["user_id"] for e in examples} == set(kept)
    sampled, _, _ = select(EvalConfig(run="", data=synth_dir, out="", tasks=("tag",), users_per_split=2,
                                      exclude_users=str(listed)))
    assert sampled and not set(sampled) & set(chosen)


def test_exclude_users_file_errors_are_one_line(run_dir, synth_dir, tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    rc = main(["eval", "--run", run_dir, "--data", synth_dir, "--out", str(tmp_path / "r"),
               "--exclude-users", str(missing)])
    assert rc == 2 and f"{missing}: cannot read the user ids to exclude" in capsys.readouterr().err
    everyone = tmp_path / "all.txt"
    from p2p.evaluation.evaluate import EvalConfig, select

    users, _, _ = select(EvalConfig(run="", data=synth_dir, out=""))
    everyone.write_text("\n".join(users))
    rc = main(["eval", "--run", run_dir, "--data", synth_dir, "--out", str(tmp_path / "r"),
               "--exclude-users", str(everyone)])
    assert rc == 2 and "every user of splits test_id, test_ood is excluded" in capsys.readouterr().err


def test_label_decoding_next_to_free_and_lamp_output_files(run_dir, synth_dir, tmp_path, capsys):
    out = tmp_path / "report"
    rc = main(["eval", "--run", run_dir, "--data", synth_dir, "--out", str(out), "--users-per-split", "2",
               "--methods", "rule,retrieval,shuffled,p2p", "--tasks", "tag,rate", "--decoding", "free,labels",
               "--bootstrap", "100"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert set(report["methods"]) == {"rule", "retrieval", "shuffled", "p2p", "retrieval+labels", "shuffled+labels",
                                      "p2p+labels"}
    # the retrieval control answers with its one adapter and the user's profile in the prompt
    assert report["methods"]["retrieval"]["cost"]["prompt_tokens_per_answer"] > \
        report["methods"]["p2p"]["cost"]["prompt_tokens_per_answer"] + 50
    # Within the label set every answer is a label; the effect is reported per decoding, against its own controls.
    for task, labels in (("tag", set(task_for("tag").labels)), ("rate", {"1", "2", "3", "4", "5"})):
        answers = set(report["methods"]["p2p+labels"]["predictions"][task].values())
        assert answers and answers <= labels
    assert "tag/test_id" in report["effects"] and "tag/test_id (labels)" in report["effects"]
    assert set(report["effects"]["tag/test_id (labels)"]["by_control"]) == {"rule", "retrieval+labels",
                                                                              "shuffled+labels"}
    # LaMP's own output format, one file per method and task, ids = the examples' (LaMP's question ids)
    golds = json.loads((out / "lamp" / "p2p+labels" / "tag.json").read_text())
    assert golds["task"] == "tag"
    assert {g["id"] for g in golds["golds"]} == set(report["methods"]["p2p+labels"]["predictions"]["tag"])
    assert all(set(g) == {"id", "output"} for g in golds["golds"])
    assert main(["eval", "--run", run_dir, "--data", synth_dir, "--out", str(tmp_path / "x"), "--decoding", "beam"]) == 2
    assert "unknown decoding 'beam'" in capsys.readouterr().err


def test_the_oppu_table_reads_an_error_metric_the_way_round_a_reader_expects():
    """P2P's MAE 0.240 against OPPU's 0.135 is stored as -0.105 (positive = P2P better): the report says P2P worse."""
    from p2p.evaluation.report import report_markdown

    def paired(effect, ci95):
        return {"metric": "mae", "effect": effect, "ci95": ci95, "users": 50, "examples": 200}

    results = {"hypernet_id": "h", "run": "r", "data": "d", "splits": ["test_id", "test_ood"], "scoring": "official",
               "users": 100, "examples": 400, "methods": {},
               "tasks": {"rate": {"kind": "rating", "primary": "mae", "higher_is_better": False}},
               "p2p_vs_oppu": {"rate/test_id": paired(-0.105, [-0.2, -0.015]),
                               "rate/test_ood": paired(0.08, [0.0, 0.17])}}
    md = report_markdown(results)
    assert "Positive = P2P better, for an error metric too" in md
    assert "| rate/test_id | mae | -0.105 [-0.200, -0.015] | 50/200 | **P2P worse** |" in md
    assert "| rate/test_ood | mae | +0.080 [+0.000, +0.170] | 50/200 | **no difference shown** |" in md
