import os
import subprocess
import sys

import pytest

from pipelines.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True, timeout=300)


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


# Runs `p2p` with every socket connection and name lookup refused and recorded: what a model
# name that is not installed would try first. Without HF_HUB_OFFLINE, as a new user's shell is.
NO_NETWORK = """
import socket, sys
calls = []
def refuse(*args, **kwargs):
    calls.append(args[:2])
    raise OSError("network refused by the test")
socket.getaddrinfo = refuse
socket.socket.connect = lambda self, address: refuse(address)
from pipelines.cli import main
rc = main(sys.argv[1:])
print("network calls:", len(calls), calls[:3])
sys.exit(rc)
"""


@pytest.mark.parametrize("command", [["complete", "--prompt", "hi", "--base", "no-such-model"],
                                     ["init-hypernet", "--base", "tiny-random", "--encoder", "no-such-encoder",
                                      "--out", "/tmp/p2p-never-written"]])
def test_an_unknown_model_name_fails_offline_in_one_line(command):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    r = subprocess.run([sys.executable, "-c", NO_NETWORK, *command], capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 2, r.stderr
    assert "network calls: 0 []" in r.stdout  # no lookup, no connection: nothing reached for a hub
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"p2p {command[0]}: error: cannot load"), r.stderr
    assert "--allow-download" in lines[0]


def test_complete_tiny(capsys):
    assert main(["complete", "--prompt", "hello", "--base", "tiny-random", "--max-tokens", "3"]) == 0


@pytest.mark.integration
def test_info_check_loads_models(capsys):
    assert main(["info", "--check"]) == 0
    out = capsys.readouterr().out
    assert "check: smollm2-135m loads" in out and "check: minilm loads (384-d" in out
