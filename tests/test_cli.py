import subprocess
import sys

import pytest

from p2p.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "p2p.cli", *args], capture_output=True, text=True, timeout=300)


def test_help():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("info", "complete", "synth", "import-lamp", "init-hypernet", "generate"):
        assert cmd in r.stdout


def test_info_lists_versions_and_models(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for pkg in ("torch", "ray", "deepspeed", "peft", "transformers"):
        assert pkg in out
    assert "smollm2-135m" in out and ".gguf" in out and "minilm" in out


def test_unknown_model_exits_nonzero_with_one_line():
    r = run("complete", "--prompt", "hi", "--base", "no-such-model-xyz")
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("p2p")]
    assert len(lines) == 1 and "tiny-random" in lines[0]
    assert "Traceback" not in r.stderr


def test_complete_tiny(capsys):
    assert main(["complete", "--prompt", "hello", "--base", "tiny-random", "--max-tokens", "3"]) == 0


@pytest.mark.integration
def test_info_check_loads_models(capsys):
    assert main(["info", "--check"]) == 0
    out = capsys.readouterr().out
    assert "check: smollm2-135m loads" in out and "check: minilm loads (384-d" in out
