"""`ray start --head --block` on 127.0.0.1, then `ray job submit -- python jobs/train.py ...`.

The cluster is this test's own: its own ports and temp dir, and it is stopped by terminating the
blocking `ray start` (which takes its processes down with it). `ray stop` is not used: it stops
every Ray cluster on the machine, a developer's own included.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from p2p.data.synthetic import write_synthetic

GCS_PORT, DASHBOARD_PORT = 6390, 8290


def _gcs_processes() -> list[int]:
    """Pids of processes serving this test cluster's GCS port (empty once it is down)."""
    out = subprocess.run(["pgrep", "-f", f"gcs_server_port={GCS_PORT}"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.mark.slow
@pytest.mark.integration
def test_ray_job_submit(tmp_path):
    data = str(tmp_path / "data")
    write_synthetic(data, 40, seed=5, tasks=("tag",))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    # A short temp dir of its own (Ray's socket paths must fit in 107 bytes), so this cluster
    # neither reads nor overwrites /tmp/ray's record of a cluster that is already running.
    temp_dir = tempfile.mkdtemp(prefix="p2p-ray-", dir="/tmp")
    head = subprocess.Popen(
        [ray, "start", "--head", "--block", "--temp-dir", temp_dir, "--port", str(GCS_PORT),
         "--dashboard-port", str(DASHBOARD_PORT), "--num-cpus", "8", "--dashboard-host", "127.0.0.1",
         "--node-ip-address", "127.0.0.1", "--dashboard-agent-listen-port", "52390",
         "--metrics-export-port", "52391"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    passed = False
    try:
        for _ in range(60):  # the head, then its job agent, come up some seconds after `ray start`
            if head.poll() is not None:
                pytest.fail(f"`ray start --head --block` exited with {head.returncode}; logs in {temp_dir}")
            r = subprocess.run(
                [ray, "job", "submit", "--address", f"http://127.0.0.1:{DASHBOARD_PORT}", "--working-dir", ".",
                 "--", sys.executable, "jobs/train.py", "--config", "jobs/configs/train-tiny.yaml", "--data", data,
                 "--out", str(tmp_path / "run"), "--max-steps", "10"],
                env=env, capture_output=True, text=True, timeout=900,
            )
            if r.returncode == 0 or not any(s in r.stdout + r.stderr for s in (
                    "No available agent", "Failed to connect", "Connection refused")):
                break
            time.sleep(2)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "succeeded" in r.stdout
        assert os.path.exists(tmp_path / "run" / "latest" / "model.safetensors")
        passed = True
    finally:
        # SIGTERM makes the blocking `ray start` drain and stop the processes it started.
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        for _ in range(60):
            if not _gcs_processes():
                break
            time.sleep(1)
        leftover = _gcs_processes()
        for pid in leftover:
            os.kill(pid, signal.SIGKILL)
        if passed:  # on a failure the cluster's logs stay in temp_dir
            shutil.rmtree(temp_dir, ignore_errors=True)
    assert not leftover, f"the test cluster's GCS (pids {leftover}) outlived its `ray start --block`"
