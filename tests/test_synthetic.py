import pytest

from p2p.cli import main
from p2p.data.rules import history_accuracy, input_only_accuracy, persona_accuracy
from p2p.data.schemas import read_table
from p2p.data.synthetic import generate_chunk, is_ood_combination


@pytest.fixture(scope="module")
def users_2000():
    return generate_chunk(0, 2000, 2000, seed=0)


def test_tag_rules_on_2000_users(users_2000):
    """Personalization is necessary (input-only is low) and learnable (history ~ persona)."""
    assert input_only_accuracy(users_2000) <= 0.5
    assert persona_accuracy(users_2000) >= 0.95
    assert history_accuracy(users_2000) >= 0.85


def test_history_lengths_vary(users_2000):
    per_task = [len(u.history) // 3 for u in users_2000]
    assert min(per_task) == 8 and max(per_task) == 64


def test_text_is_varied(users_2000):
    inputs = [e["input"] for u in users_2000[:200] for e in u.examples if e["task"] == "tag"]
    openings = {" ".join(t.split("Movie: ")[1].split()[:2]) for t in inputs}
    assert len(set(inputs)) > 0.85 * len(inputs) and len(openings) > 20


def test_ood_users_have_unseen_persona_combinations(users_2000):
    seen = {u.persona.combination() for u in users_2000 if u.split in ("train", "val")}
    ood = [u for u in users_2000 if u.split == "test_ood"]
    assert ood and all(u.persona.combination() not in seen for u in ood)
    assert all(is_ood_combination(u.persona, 0) == (u.split == "test_ood") for u in users_2000)



def test_synth_is_deterministic_and_user_disjoint(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "a"), "--users", "300", "--seed", "1"]) == 0
    assert main(["synth", "--out", str(tmp_path / "b"), "--users", "300", "--seed", "1"]) == 0
    assert main(["synth", "--out", str(tmp_path / "c"), "--users", "300", "--seed", "1",
                 "--chunk-size", "70", "--workers", "2"]) == 0
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.parquet"))
    assert len(files) == 2
    for f in files:  # identical files, byte for byte
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    # same users and examples whatever the chunking
    ua = read_table(str(tmp_path / "a" / "users"), "users").sort_by("user_id")
    uc = read_table(str(tmp_path / "c" / "users"), "users").sort_by("user_id")
    assert ua.equals(uc)
    ex = read_table(str(tmp_path / "a" / "examples"), "examples")  # validates: no user in two splits
    assert set(ex.column("split").to_pylist()) == {"train", "val", "test_id", "test_ood"}
    assert set(ex.column("task").to_pylist()) == {"tag", "rate", "headline"}


def test_synth_bad_task_is_one_line(capsys):
    assert main(["synth", "--out", "/tmp/never", "--users", "3", "--tasks", "tag,dance"]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'dance'" in err and err.count("\n") == 1
