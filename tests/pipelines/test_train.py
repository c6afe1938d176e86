"""`p2p train` on Ray Train + DeepSpeed: learning, checkpoints, resume after a killed worker, parity with the local loop."""

import copy
import json
import os
import signal
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from numerics import HYPERNET_DEPTH, assert_same_function, assert_same_losses
from train_support import DIM, GATE, TINY, local_rows

from p2p.config import config_from_dict
from p2p.data.schemas import read_table
from p2p.model.hypernet import load_hypernet
from p2p.model.peft_format import load_peft
from p2p.train.loop import train_local
from p2p.userkey import user_key


def metrics(run):
    with open(f"{run}/metrics.jsonl") as f:
        return [json.loads(line) for line in f]

def train(config: dict, data, out):
    from pipelines.train import run_training

    return run_training(config_from_dict({**TINY, **config}), data, str(out), log=lambda s: None)

def few_train_users(data: str, out, n_users: int) -> str:
    """DATA with only the first `n_users` train users' examples (val kept): a set small enough to overfit."""
    ex = read_table(f"{data}/examples", "examples")
    train_users = sorted(set(ex.filter(pa.compute.equal(ex["split"], "train"))["user_id"].to_pylist()))[:n_users]
    keep = pa.compute.or_(pa.compute.is_in(ex["user_id"], value_set=pa.array(train_users)),
                          pa.compute.equal(ex["split"], "val"))
    (out / "examples").mkdir(parents=True)
    for sub in ("users", "profiles"):
        os.symlink(f"{data}/{sub}", out / sub)
    pq.write_table(ex.filter(keep), out / "examples" / "part-0.parquet")
    return str(out)

@pytest.mark.slow
def test_ray_zero2_two_workers_learns_and_checkpoint_generates(ray_cluster, train_data, tmp_path):
    # 16 fixed examples, 2 steps an epoch per worker: the loss falls by a wide margin on any CPU.
    small = few_train_users(train_data, tmp_path / "data", 4)
    summary = train({"workers": 2, "zero_stage": 2, "max_steps": 40, "eval_every": 20, "batch_size": 4,
                     "lr": 1e-3}, small, tmp_path / "run")
    m = metrics(tmp_path / "run")
    assert [r["step"] for r in m] == list(range(5, 41, 5))
    assert m[-1]["loss"] < 0.9 * m[0]["loss"]  # ~0.8 here: a fall of a nat or more, step after step
    assert summary["steps"] == 40 and os.path.exists(tmp_path / "run" / "best" / "model.safetensors")
    hypernet, hid = load_hypernet(str(tmp_path / "run" / "latest"))
    assert hypernet.config.extra["step"] == 40
    from pipelines.cli import main

    users = read_table(f"{train_data}/profiles", "profiles").slice(0, 2)
    assert main(["generate", "--hypernet", str(tmp_path / "run" / "latest"), "--data", train_data,
                 "--out", str(tmp_path / "ad"), "--users", ",".join(users.column("user_id").to_pylist())]) == 0
    emb = torch.tensor(users.column("embedding").to_pylist())
    for uid, expected in zip(users.column("user_id").to_pylist(), hypernet.user_adapters(emb), strict=True):
        loaded, _ = load_peft(str(tmp_path / "ad" / user_key(uid)))
        assert loaded.keys() == expected.keys()
        for path, (a, b) in expected.items():
            assert_same_function(loaded[path][0], a, HYPERNET_DEPTH, what=path)
            assert_same_function(loaded[path][1], b, HYPERNET_DEPTH, what=path)
        assert any(b.abs().sum() > 0 for _, b in expected.values())  # trained: no longer dW = 0

@pytest.mark.slow
def test_ray_zero3_smoke(ray_cluster, train_data, tmp_path):
    # One task per batch (batch_by_task) runs through the worker's loop too.
    train({"workers": 2, "zero_stage": 3, "max_steps": 10, "eval_every": 10, "batch_by_task": True}, train_data,
          tmp_path / "run")
    hypernet, _ = load_hypernet(str(tmp_path / "run" / "latest"))
    assert hypernet.config.extra["step"] == 10
    assert any(h.weight.abs().sum() > 0 for h in hypernet.heads.values())  # gathered, not empty partitions

@pytest.mark.slow
def test_ray_run_fits_the_label_gate_into_best_only(ray_cluster, gate_data, tmp_path):
    """The driver fits the gate of the handed-on checkpoint; `latest` keeps the columns as training left them."""
    from pipelines.train import run_training

    summary = run_training(config_from_dict({**GATE, "workers": 1, "zero_stage": 0, "max_steps": 4, "eval_every": 4}),
                           gate_data, str(tmp_path / "run"), log=lambda s: None)
    best, _ = load_hypernet(str(tmp_path / "run" / "best"))
    latest, _ = load_hypernet(str(tmp_path / "run" / "latest"))
    assert best.config.extra["label_gate"] == summary["label_gate"] and summary["label_gate"]["examples"] == 48
    assert best.gate_read.abs().sum() > 0 and latest.gate_read.abs().sum() == 0
    assert (best.gate_write.abs().sum() > 0) == any(g > 0 for g in summary["label_gate"]["gains"].values())
    # Refitting the gated checkpoint (bench/refit_gate.py) reads it with the gate shut: the same fit again.
    from bench.refit_gate import refit

    again = refit(str(tmp_path / "run"), gate_data)
    refitted, _ = load_hypernet(str(tmp_path / "run" / "best"))
    torch.testing.assert_close(refitted.gate_read, best.gate_read)  # the read is fitted even where the gain is 0
    first = summary["label_gate"]
    assert (again["gains"], again["offered"], again["ridge"]) == (first["gains"], first["offered"], first["ridge"])
    assert again["holdout_first_token_accuracy"] == pytest.approx(first["holdout_first_token_accuracy"])
    with open(tmp_path / "run" / "summary.json") as f:
        assert json.load(f)["label_gate"] == again


@pytest.mark.slow
def test_ray_zero0_single_worker_first_loss_equals_local(ray_cluster, tiny, train_data, tmp_path):
    # Exactly one batch of train examples, so both loops see the same first batch.
    small = few_train_users(train_data, tmp_path / "data", 2)
    train_rows, val_rows = local_rows(small)
    assert len(train_rows) == 8
    cfg = {"workers": 1, "zero_stage": 0, "max_steps": 1, "eval_every": 1, "log_every": 1}
    local = train_local(config_from_dict({**TINY, **cfg}), copy.deepcopy(tiny[0]), tiny[1], train_rows, val_rows,
                        DIM, log=lambda s: None)
    train(cfg, small, tmp_path / "run")
    ray_loss = metrics(tmp_path / "run")[0]["loss"]
    assert_same_losses([ray_loss], [local["history"][0]["loss"]], what="Ray Train vs the local loop")

@pytest.mark.slow
def test_ray_retrieval_control_reads_the_profile_text_like_the_local_loop(ray_cluster, tiny, train_data, tmp_path):
    # `p2p train --with-retrieval` once failed in the driver and then in the workers: the profile text
    # was dropped on its way to the prompt. Its first loss through Ray is the local loop's.
    small = few_train_users(train_data, tmp_path / "data", 2)
    train_rows, val_rows = local_rows(small)
    cfg = {"workers": 1, "zero_stage": 0, "max_steps": 1, "eval_every": 1, "log_every": 1, "control": "retrieval",
           "max_seq_len": 512}
    local = train_local(config_from_dict({**TINY, **cfg}), copy.deepcopy(tiny[0]), tiny[1], train_rows, val_rows,
                        DIM, log=lambda s: None)
    shared = train_local(config_from_dict({**TINY, **cfg, "control": "shared"}), copy.deepcopy(tiny[0]), tiny[1],
                         train_rows, val_rows, DIM, log=lambda s: None)
    assert local["history"][0]["loss"] != shared["history"][0]["loss"]  # the profile text changes the loss
    train(cfg, small, tmp_path / "run")
    ray_loss = metrics(tmp_path / "run")[0]["loss"]
    assert_same_losses([ray_loss], [local["history"][0]["loss"]], what="the retrieval control, Ray Train vs local")

def train_worker_pids() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if f.read().startswith(b"ray::RayTrainWorker"):
                        pids.append(int(entry))
            except OSError:
                continue
    return pids

@pytest.mark.slow
def test_worker_killed_mid_run_resumes_from_checkpoint(ray_cluster, train_data, tmp_path):
    run = tmp_path / "run"
    result: dict = {}

    def target():
        try:
            result["summary"] = train({"workers": 2, "zero_stage": 2, "max_steps": 60, "eval_every": 10,
                                       "max_failures": 2}, train_data, run)
        except Exception as exc:  # surfaced by the assertion below
            result["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    killed_after = None
    deadline = time.time() + 600
    while thread.is_alive() and time.time() < deadline and killed_after is None:
        time.sleep(0.2)
        if os.path.exists(run / "metrics.jsonl"):
            steps = [m["step"] for m in metrics(run)]
            if steps and steps[-1] >= 10 and steps[-1] < 40:
                os.kill(max(train_worker_pids()), signal.SIGKILL)  # a real kill -9 of one worker
                killed_after = steps[-1]
    thread.join(timeout=600)
    assert "error" not in result, result.get("error")
    assert killed_after is not None
    m = metrics(run)
    resumed = [r for r in m if r["resumed_from"] > 0]
    assert resumed, "training did not resume from a checkpoint"
    start = resumed[0]["resumed_from"]
    assert 10 <= start <= killed_after + 10 and start % 10 == 0
    assert resumed[0]["step"] > start  # the counter continues from the checkpoint, not from 0
    assert m[-1]["step"] == 60
