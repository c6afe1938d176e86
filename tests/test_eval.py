"""`p2p eval` end to end on tiny-random: every method, every file, figures that add up."""

import json
import os

from p2p.cli import main


def test_eval_writes_every_file_for_every_method(tiny_hypernet, synth_dir, tmp_path, capsys):
    out = tmp_path / "report"
    rc = main(["eval", "--run", tiny_hypernet, "--data", synth_dir, "--out", str(out), "--users-per-split", "3",
               "--oppu-users", "1", "--oppu-epochs", "1", "--oppu-max-items", "8"])
    assert rc == 0, capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["by_history.png", "cost.png", "quality.png", "report.json", "report.md"]
    for png in ("by_history.png", "cost.png", "quality.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "report.json").read_text())
    assert set(report["methods"]) == {"base", "prompt", "oppu", "p2p"}
    assert report["users"] == 6  # 3 per held-out split
    for name, method in report["methods"].items():
        scores = method["scores"]
        assert {k.split("/")[1] for k in scores} <= {"test_id", "test_ood"}
        assert {k.split("/")[0] for k in scores} == {"tag", "rate", "headline"}
        for cell in scores.values():
            assert cell["examples"] > 0 and cell["users"] > 0
        assert 0 <= scores[next(k for k in scores if k.startswith("tag/"))]["accuracy"] <= 1
        users = sum(c["users"] for k, c in scores.items() if k.startswith("tag/"))
        assert users == (2 if name == "oppu" else 6)  # OPPU: one user per split
    assert report["methods"]["oppu"]["cost"]["personalize_seconds_per_user"] > 0
    assert report["methods"]["p2p"]["cost"]["bytes_per_user"] > 0
    assert report["p2p_vs_oppu_personalize_speedup"] > 1
    md = (out / "report.md").read_text()
    assert "| tag/test_id | accuracy" in md and "OPPU" in md


def test_eval_refuses_training_users(tiny_hypernet, synth_dir, tmp_path, capsys):
    rc = main(["eval", "--run", tiny_hypernet, "--data", synth_dir, "--out", str(tmp_path / "r"), "--split", "train"])
    assert rc == 2 and "held-out users only" in capsys.readouterr().err
