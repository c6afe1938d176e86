"""`ray start --head` on 127.0.0.1, then `ray job submit -- python jobs/train.py ...`, then `ray stop`."""

import os
import subprocess
import sys
import time

import pytest

from p2p.data.synthetic import write_synthetic


@pytest.mark.slow
@pytest.mark.integration
def test_ray_job_submit(tmp_path):
    data = str(tmp_path / "data")
    write_synthetic(data, 40, seed=5, tasks=("tag",))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    # Ports of its own, so an in-process test cluster elsewhere in the session can't collide.
    subprocess.run([ray, "start", "--head", "--port", "6390", "--dashboard-port", "8290", "--num-cpus", "8",
                    "--dashboard-host", "127.0.0.1", "--node-ip-address", "127.0.0.1",
                    "--dashboard-agent-listen-port", "52390", "--metrics-export-port", "52391"],
                   env=env, check=True, capture_output=True, timeout=180)
    try:
        for _ in range(30):  # the head's job agent comes up a few seconds after `ray start`
            r = subprocess.run(
                [ray, "job", "submit", "--address", "http://127.0.0.1:8290", "--working-dir", ".", "--",
                 sys.executable, "jobs/train.py", "--config", "jobs/configs/train-tiny.yaml", "--data", data,
                 "--out", str(tmp_path / "run"), "--max-steps", "10"],
                env=env, capture_output=True, text=True, timeout=900,
            )
            if "No available agent" not in r.stdout + r.stderr:
                break
            time.sleep(2)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "succeeded" in r.stdout
        assert os.path.exists(tmp_path / "run" / "latest" / "model.safetensors")
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)
