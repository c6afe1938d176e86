"""Training: the config contract, the local loop, and Ray Train + DeepSpeed on a local cluster."""

import collections
import copy
import itertools
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

from p2p.config import TrainConfig, config_from_dict, load_config
from p2p.data.schemas import read_table
from p2p.data.synthetic import write_synthetic
from p2p.errors import P2PError
from p2p.generate import generate_user_adapters
from p2p.hypernet import load_hypernet
from p2p.lora import load_peft
from p2p.personalizer import ProfileEmbedder, build_profiles
from p2p.profile import ProfileConfig
from p2p.training import check_task_weights, examples_with_embeddings, task_batches, train_local
from p2p.userkey import user_key

TINY = dict(base="tiny-random", encoder="hashing", batch_size=8, lr=1e-3, warmup_steps=3, log_every=5,
            val_examples=16, max_failures=0, profile_features=16)
DIM = 384 + 16  # hashing encoder + label statistics


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Tag-only synthetic users with their profiles written next to them (DATA/profiles)."""
    out = str(tmp_path_factory.mktemp("train-data"))
    write_synthetic(out, 60, seed=11, tasks=("tag",))
    profiles = build_profiles(out, ProfileEmbedder("hashing", ProfileConfig(**TrainConfig(**TINY).profile_config())))
    os.makedirs(f"{out}/profiles")
    pq.write_table(profiles, f"{out}/profiles/part-0.parquet")
    return out


def test_unknown_field_and_wrong_type_are_named(tmp_path, capsys):
    with pytest.raises(P2PError, match="unknown config field 'learning_rate'"):
        config_from_dict({"learning_rate": 0.1})
    with pytest.raises(P2PError, match="config field 'max_steps': expected an integer"):
        config_from_dict({"max_steps": "many"})
    with pytest.raises(P2PError, match="config field 'zero_stage': must be 0..3"):
        config_from_dict({"zero_stage": 4})
    assert config_from_dict({"lr": 1, "top_k_layers": None}).lr == 1.0
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: tiny-random\nbatchsize: 8\n")
    import ray

    from p2p.cli import main

    assert main(["train", "--config", str(bad), "--data", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "unknown config field 'batchsize'" in capsys.readouterr().err
    assert not ray.is_initialized()  # failed before Ray started


def test_shipped_configs_are_valid():
    for name in os.listdir("jobs/configs"):
        if name.startswith("train"):
            load_config(f"jobs/configs/{name}")


def test_task_batches_hold_one_task_and_follow_the_weights():
    rows = ([{"task": "tag", "i": i} for i in range(300)] + [{"task": "rate", "i": i} for i in range(100)]
            + [{"task": "headline", "i": i} for i in range(3)])
    plain = list(itertools.islice(task_batches(rows, 4, seed=0), 2000))
    assert all(len(b) == 4 and len({r["task"] for r in b}) == 1 for b in plain)
    share = collections.Counter(b[0]["task"] for b in plain)
    assert 0.70 < share["tag"] / 2000 < 0.79 and 0.20 < share["rate"] / 2000 < 0.30  # 300 : 100 : 3
    headline = [r["i"] for b in plain if b[0]["task"] == "headline" for r in b]
    assert headline and all(sorted(headline[k:k + 3]) == [0, 1, 2] for k in range(0, len(headline) - 2, 3))
    weighted = collections.Counter(b[0]["task"] for b in itertools.islice(
        task_batches(rows, 4, seed=0, weights={"rate": 3.0}), 2000))
    assert 0.45 < weighted["rate"] / 2000 < 0.55  # 300 : 300 : 3
    again = list(itertools.islice(task_batches(rows, 4, seed=0), 50))
    assert again == plain[:50]  # reproducible by seed
    # A Ray worker's shard draws by the whole data's counts, not by its own mix.
    by_data = collections.Counter(b[0]["task"] for b in itertools.islice(
        task_batches(rows, 4, seed=0, counts={"tag": 100, "rate": 100, "headline": 100}), 2000))
    assert 0.28 < by_data["rate"] / 2000 < 0.38 and 0.28 < by_data["headline"] / 2000 < 0.38
    with pytest.raises(P2PError, match="'task_weights': no training examples of task 'rating'"):
        check_task_weights(config_from_dict({"batch_by_task": True, "task_weights": {"rating": 2}}),
                           (r["task"] for r in rows))
    with pytest.raises(P2PError, match="task_weights.*needs batch_by_task"):
        config_from_dict({"task_weights": {"rate": 2}})
    with pytest.raises(P2PError, match="weight of 'rate' must be a positive number"):
        config_from_dict({"batch_by_task": True, "task_weights": {"rate": 0}})
    with pytest.raises(P2PError, match="'task_weights'.*is not dict"):
        config_from_dict({"batch_by_task": True, "task_weights": ["rate"]})


def local_rows(data):
    profiles = read_table(f"{data}/profiles", "profiles")
    return (examples_with_embeddings(data, profiles, ("train",)),
            examples_with_embeddings(data, profiles, ("val",)))


@pytest.mark.numerics
def test_prefix_cache_gives_the_same_run_over_several_epochs_and_mixed_batches(tiny, data):
    # 12 examples in batches of 8: from the second epoch on, batches mix cached and new rows.
    train, val = local_rows(data)
    runs = []
    for cache in (True, False):
        cfg = TrainConfig(**TINY, max_steps=6, eval_every=3, top_k_layers=2, cache_prefix=cache)
        runs.append(train_local(cfg, copy.deepcopy(tiny[0]), tiny[1], train[:12], val, DIM, log=lambda s: None))
    losses = [[r["loss"] for r in run["history"]] for run in runs]
    assert_same_losses(losses[0], losses[1], what="cached vs uncached prefix")  # the same run, up to rounding
    vals = [[r["val_loss"] for r in run["history"] if "val_loss" in r] for run in runs]
    assert_same_losses(vals[0], vals[1], steps=6, what="val loss")
    cache = runs[0]["lm"].cache
    assert cache.misses == 12 + 16  # each train example once, each val example once (two evaluations)
    assert cache.hits == 6 * 8 - 12 + 16  # every later use came from the cache
    assert runs[1]["lm"].cache is None


@pytest.mark.numerics
def test_prefix_cache_respects_its_memory_bound(tiny, data):
    train, val = local_rows(data)
    results = []
    for max_bytes in (1 << 30, 40_000):  # the second holds a few rows; the rest are recomputed
        cfg = TrainConfig(**TINY, max_steps=4, eval_every=4, top_k_layers=2, cache_max_bytes=max_bytes)
        results.append(train_local(cfg, copy.deepcopy(tiny[0]), tiny[1], train[:12], val, DIM, log=lambda s: None))
    small = results[1]["lm"].cache
    assert 0 < small.bytes <= 40_000 and len(small.states) < 12
    assert_same_losses([r["loss"] for r in results[0]["history"]], [r["loss"] for r in results[1]["history"]],
                       what="stored vs recomputed prefixes")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_hypernet_trains_on_fp32_inputs(tiny, data, dtype):
    """DeepSpeed casts the hypernet to bf16/fp16 and (for bf16) leaves the fp32 embeddings as they are."""
    from p2p.adapted_model import AdaptedModel
    from p2p.prompting import PromptFormat
    from p2p.training import AdapterLM, collate, prepare_hypernet

    train, _ = local_rows(data)
    cfg = TrainConfig(**TINY)
    model = copy.deepcopy(tiny[0])
    hypernet = prepare_hypernet(cfg, model, DIM, train).to(dtype)
    lm = AdapterLM(AdaptedModel(model, tiny[1], hypernet.config))
    batch = collate(train[:4], PromptFormat(tiny[1]), cfg.max_seq_len)
    assert batch.embeddings.dtype == torch.float32
    loss, _ = lm.loss(hypernet, batch, cfg)
    loss.backward()
    assert torch.isfinite(loss) and hypernet.user_proj.weight.grad.dtype == dtype
    assert torch.isfinite(hypernet.user_proj.weight.grad.float()).all()


def test_local_loop_learns_and_keeps_best(tiny, data, tmp_path):
    # Overfit one fixed batch: a systematic fall the tiny model reaches on any CPU (it settles near
    # 0.65 x the start at learning rates from 1e-3 to 3e-3), not a thin margin on a noisy curve.
    train, val = local_rows(data)
    cfg = TrainConfig(**{**TINY, "lr": 1e-3}, max_steps=60, eval_every=20)
    out = train_local(cfg, copy.deepcopy(tiny[0]), tiny[1], train[:8], val, DIM, run_dir=str(tmp_path),
                      log=lambda s: None)
    losses = [r["loss"] for r in out["history"]]
    assert sum(losses[-10:]) / 10 < 0.75 * losses[0]
    best, _ = load_hypernet(str(tmp_path / "best"))
    vals = [r["val_loss"] for r in out["history"] if "val_loss" in r]
    assert best.config.extra["val_loss"] == min(vals)


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
def test_ray_zero2_two_workers_learns_and_checkpoint_generates(ray_cluster, data, tmp_path):
    # 16 fixed examples, 2 steps an epoch per worker: the loss falls by a wide margin on any CPU.
    small = few_train_users(data, tmp_path / "data", 4)
    summary = train({"workers": 2, "zero_stage": 2, "max_steps": 40, "eval_every": 20, "batch_size": 4,
                     "lr": 1e-3}, small, tmp_path / "run")
    m = metrics(tmp_path / "run")
    assert [r["step"] for r in m] == list(range(5, 41, 5))
    assert m[-1]["loss"] < 0.9 * m[0]["loss"]  # ~0.8 here: a fall of a nat or more, step after step
    assert summary["steps"] == 40 and os.path.exists(tmp_path / "run" / "best" / "model.safetensors")
    hypernet, hid = load_hypernet(str(tmp_path / "run" / "latest"))
    assert hypernet.config.extra["step"] == 40
    from p2p.cli import main

    users = read_table(f"{data}/profiles", "profiles").slice(0, 2)
    assert main(["generate", "--hypernet", str(tmp_path / "run" / "latest"), "--data", data,
                 "--out", str(tmp_path / "ad"), "--users", ",".join(users.column("user_id").to_pylist())]) == 0
    emb = torch.tensor(users.column("embedding").to_pylist())
    for uid, expected in zip(users.column("user_id").to_pylist(), generate_user_adapters(hypernet, emb), strict=True):
        loaded, _ = load_peft(str(tmp_path / "ad" / user_key(uid)))
        assert loaded.keys() == expected.keys()
        for path, (a, b) in expected.items():
            assert_same_function(loaded[path][0], a, HYPERNET_DEPTH, what=path)
            assert_same_function(loaded[path][1], b, HYPERNET_DEPTH, what=path)
        assert any(b.abs().sum() > 0 for _, b in expected.values())  # trained: no longer dW = 0


@pytest.mark.slow
def test_ray_zero3_smoke(ray_cluster, data, tmp_path):
    # One task per batch (batch_by_task) runs through the worker's loop too.
    train({"workers": 2, "zero_stage": 3, "max_steps": 10, "eval_every": 10, "batch_by_task": True}, data,
          tmp_path / "run")
    hypernet, _ = load_hypernet(str(tmp_path / "run" / "latest"))
    assert hypernet.config.extra["step"] == 10
    assert any(h.weight.abs().sum() > 0 for h in hypernet.heads.values())  # gathered, not empty partitions


@pytest.mark.slow
def test_ray_zero0_single_worker_first_loss_equals_local(ray_cluster, tiny, data, tmp_path):
    # Exactly one batch of train examples, so both loops see the same first batch.
    small = few_train_users(data, tmp_path / "data", 2)
    train_rows, val_rows = local_rows(small)
    assert len(train_rows) == 8
    cfg = {"workers": 1, "zero_stage": 0, "max_steps": 1, "eval_every": 1, "log_every": 1}
    local = train_local(config_from_dict({**TINY, **cfg}), copy.deepcopy(tiny[0]), tiny[1], train_rows, val_rows,
                        DIM, log=lambda s: None)
    train(cfg, small, tmp_path / "run")
    ray_loss = metrics(tmp_path / "run")[0]["loss"]
    assert_same_losses([ray_loss], [local["history"][0]["loss"]], what="Ray Train vs the local loop")


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
def test_worker_killed_mid_run_resumes_from_checkpoint(ray_cluster, data, tmp_path):
    run = tmp_path / "run"
    result: dict = {}

    def target():
        try:
            result["summary"] = train({"workers": 2, "zero_stage": 2, "max_steps": 60, "eval_every": 10,
                                       "max_failures": 2}, data, run)
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
