"""`make demo`'s script end to end with tiny settings (tiny-random base, hashing encoder, 4 steps)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_demo_runs_every_step_and_writes_the_report(tmp_path):
    env = dict(os.environ, P2P_DEMO_TINY="1", P2P_DEMO_USERS="60", P2P_DEMO_STEPS="4", P2P_DEMO_EVAL_USERS="2",
               P2P_DEMO_DIR=str(tmp_path / "demo"), RAY_ADDRESS="")
    env.pop("RAY_ADDRESS")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "demo.py")], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    for marker in ("synthetic users", "profiles:", "train the hypernetwork", "refresh:", "serve:",
                   "whose histories tag this genre differently", "eval on held-out users", "| tag/test_id | accuracy", "report: "):
        assert marker in out, marker
    assert out.count("personalized (p2p), run") >= 2  # held-out users with different own tags for one question
    assert "Started Serve" not in out + done.stderr  # framework lines go to the log file
    report = tmp_path / "demo" / "report"
    assert {"report.md", "report.json", "quality.png", "effect.png", "cost.png"} <= set(os.listdir(report))
    assert (tmp_path / "demo" / "store" / "manifests" / "CURRENT").exists()
