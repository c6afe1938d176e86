"""bench/paired_runs.py: runs scored on the same examples, a paired difference by user."""

import json
import os

import pyarrow as pa
import pytest

from bench import paired_runs
from p2p.data.schemas import EXAMPLES, write_table


def _report(root, name, outputs):
    folder = root / name / "lamp" / "p2p"
    folder.mkdir(parents=True)
    (folder / "tag.json").write_text(json.dumps({"task": "tag", "golds": [
        {"id": i, "output": o} for i, o in outputs.items()]}))
    return str(root / name)


def test_two_runs_are_compared_on_the_examples_both_answered(tmp_path, monkeypatch):
    rows = [{"example_id": f"u{u}-e{k}", "user_id": f"u{u}", "task": "tag", "input": "x", "target": "noir",
             "split": "test_id"} for u in range(4) for k in range(2)]
    write_table(pa.Table.from_pylist(rows, schema=EXAMPLES), str(tmp_path / "data" / "examples" / "e.parquet"),
                "examples")
    right = {r["example_id"]: "noir" for r in rows}
    half = {r["example_id"]: ("noir" if r["user_id"] in ("u0", "u1") else "comedy") for r in rows}
    half.pop("u3-e1")  # answered by one report only: left out of both
    a, b = _report(tmp_path, "a", right), _report(tmp_path, "b", half)
    monkeypatch.chdir(tmp_path)
    assert paired_runs.main([a, b, "--data", str(tmp_path / "data"), "--task", "tag", "--bootstrap", "200"]) == 0
    with open(os.path.join("bench", "results", "paired_runs.json")) as f:
        out = json.load(f)
    assert out["summary"]["examples"] == 7 and out["summary"]["users"] == 4
    first, second, diff = (r["accuracy [95% CI]"] for r in out["rows"])
    assert first.startswith("1.000") and second.startswith(f"{4 / 7:.3f}")
    assert diff.startswith(f"+{3 / 7:.3f}")
    with pytest.raises(SystemExit):
        paired_runs.main([a, "--data", str(tmp_path / "data"), "--task", "tag"])


def test_a_control_kept_only_in_report_json_is_read_by_method_and_split(tmp_path, monkeypatch):
    rows = [{"example_id": f"u{u}-e{k}", "user_id": f"u{u}", "task": "tag", "input": "x", "target": "noir",
             "split": "test_id" if u < 3 else "test_ood"} for u in range(5) for k in range(2)]
    write_table(pa.Table.from_pylist(rows, schema=EXAMPLES), str(tmp_path / "data" / "examples" / "e.parquet"),
                "examples")
    new = _report(tmp_path, "new", {r["example_id"]: "noir" for r in rows})
    kept = tmp_path / "kept"
    kept.mkdir()
    wrong_for_u0 = {r["example_id"]: ("comedy" if r["user_id"] == "u0" else "noir") for r in rows}
    (kept / "report.json").write_text(json.dumps({"methods": {
        "retrieval": {"predictions": {"tag": wrong_for_u0}}, "p2p": {"predictions": {"tag": {}}}}}))
    monkeypatch.chdir(tmp_path)
    argv = [new, f"{kept}:retrieval", "--data", str(tmp_path / "data"), "--task", "tag", "--bootstrap", "200"]
    assert paired_runs.main([*argv, "--split", "test_id"]) == 0
    with open(os.path.join("bench", "results", "paired_runs.json")) as f:
        out = json.load(f)
    assert out["summary"]["users"] == 3 and out["summary"]["split"] == "test_id"
    assert out["rows"][1]["accuracy [95% CI]"].startswith(f"{2 / 3:.3f}")
    assert out["rows"][2]["accuracy [95% CI]"].startswith(f"+{1 / 3:.3f}")
    with pytest.raises(SystemExit, match="no 'tag' predictions of method 'oppu'"):
        paired_runs.main([new, f"{kept}:oppu", "--data", str(tmp_path / "data"), "--task", "tag"])
    with pytest.raises(SystemExit, match="no example answered"):
        paired_runs.main([new, f"{kept}:p2p", "--data", str(tmp_path / "data"), "--task", "tag"])
