"""Training: the config contract, the local loop, and Ray Train + DeepSpeed on a local cluster."""

import collections
import copy
import itertools
import os

import numpy as np
import pytest
import torch
from numerics import assert_same_losses
from train_support import DIM, TINY, local_rows

from p2p.config import TrainConfig, config_from_dict, load_config
from p2p.errors import P2PError
from p2p.model.hypernet import load_hypernet
from p2p.train.batching import check_task_weights, task_batches
from p2p.train.loop import train_local


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

    from pipelines.cli import main

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
    with pytest.raises(P2PError, match="config field 'task_weights': expected a mapping"):
        config_from_dict({"batch_by_task": True, "task_weights": ["rate"]})


@pytest.mark.numerics
def test_prefix_cache_gives_the_same_run_over_several_epochs_and_mixed_batches(tiny, train_data):
    # 12 examples in batches of 8: from the second epoch on, batches mix cached and new rows.
    train, val = local_rows(train_data)
    runs = []
    for cache in (True, False):
        cfg = TrainConfig(**TINY, max_steps=6, eval_every=3, top_k_layers=2, cache_prefix=cache)
        runs.append(train_local(cfg, copy.deepcopy(tiny[0]), tiny[1], train[:12], val, DIM, log=lambda s: None))
    losses = [[r["loss"] for r in run["history"]] for run in runs]
    assert_same_losses(losses[0], losses[1], what="cached vs uncached prefix")  # the same run, up to rounding
    vals = [[r["val_loss"] for r in run["history"] if "val_loss" in r] for run in runs]
    assert_same_losses(vals[0], vals[1], steps=6, what="val loss")
    cache = runs[0]["adapter_loss"].cache
    assert cache.misses == 12 + 16  # each train example once, each val example once (two evaluations)
    assert cache.hits == 6 * 8 - 12 + 16  # every later use came from the cache
    assert runs[1]["adapter_loss"].cache is None


@pytest.mark.numerics
def test_prefix_cache_respects_its_memory_bound(tiny, train_data):
    train, val = local_rows(train_data)
    results = []
    for max_bytes in (1 << 30, 40_000):  # the second holds a few rows; the rest are recomputed
        cfg = TrainConfig(**TINY, max_steps=4, eval_every=4, top_k_layers=2, cache_max_bytes=max_bytes)
        results.append(train_local(cfg, copy.deepcopy(tiny[0]), tiny[1], train[:12], val, DIM, log=lambda s: None))
    small = results[1]["adapter_loss"].cache
    assert 0 < small.bytes <= 40_000 and len(small.states) < 12
    assert_same_losses([r["loss"] for r in results[0]["history"]], [r["loss"] for r in results[1]["history"]],
                       what="stored vs recomputed prefixes")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_hypernet_trains_on_fp32_inputs(tiny, train_data, dtype):
    """DeepSpeed casts the hypernet to bf16/fp16 and (for bf16) leaves the fp32 embeddings as they are."""
    from p2p.model.adapted import AdaptedModel
    from p2p.task.prompt import PromptFormat
    from p2p.train.batch import collate
    from p2p.train.examples import embedding_stats, user_embeddings
    from p2p.train.loop import new_hypernet
    from p2p.train.step import AdapterLoss

    train, _ = local_rows(train_data)
    cfg = TrainConfig(**TINY)
    model = copy.deepcopy(tiny[0])
    hypernet = new_hypernet(cfg, model, DIM, embedding_stats(user_embeddings(train))).to(dtype)
    lm = AdapterLoss(AdaptedModel(model, tiny[1], hypernet.config))
    batch = collate(train[:4], PromptFormat(tiny[1]), cfg.max_seq_len)
    assert batch.embeddings.dtype == torch.float32
    loss, _ = lm(hypernet, batch)
    loss.backward()
    assert torch.isfinite(loss) and hypernet.user_proj.weight.grad.dtype == dtype
    assert torch.isfinite(hypernet.user_proj.weight.grad.float()).all()


def test_the_personalization_margin_is_a_hinge_on_another_users_adapter(tiny, train_data):
    """loss = CE + w * mean(max(0, m - (CE under the next user's adapter - CE under the own one)))."""
    import dataclasses

    import torch.nn.functional as F

    from p2p.model.adapted import AdaptedModel
    from p2p.task.prompt import PromptFormat
    from p2p.train.batch import collate
    from p2p.train.examples import embedding_stats, user_embeddings
    from p2p.train.loop import new_hypernet
    from p2p.train.step import AdapterLoss

    train, _ = local_rows(train_data)
    rows = [next(r for r in train if r["user_id"] == u) for u in dict.fromkeys(r["user_id"] for r in train)][:4]
    cfg = TrainConfig(**TINY)
    model = copy.deepcopy(tiny[0])
    hypernet = new_hypernet(cfg, model, DIM, embedding_stats(user_embeddings(train)))
    with torch.no_grad():
        for p in hypernet.heads.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # adapters that differ by user, so the two runs differ
    batch = collate(rows, PromptFormat(tiny[1]), cfg.max_seq_len)
    assert batch.embeddings.shape[0] == 4
    plain = AdapterLoss(AdaptedModel(model, tiny[1], hypernet.config))
    with_margin = AdapterLoss(AdaptedModel(model, tiny[1], hypernet.config), contrast_weight=2.0, contrast_margin=3.0)
    _, own = plain.per_example(hypernet, batch)
    _, other = plain.per_example(hypernet, dataclasses.replace(batch, embeddings=batch.embeddings.roll(1, 0)))
    assert not torch.allclose(own, other)
    loss, ce = with_margin(hypernet, batch)
    expected = own.mean() + 2.0 * F.relu(3.0 - (other - own)).mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(ce, own.mean())
    loss.backward()
    assert hypernet.user_proj.weight.grad.abs().sum() > 0
    # One user in the batch: there is no other adapter to beat, and the term is off.
    single = collate(rows[:1], PromptFormat(tiny[1]), cfg.max_seq_len)
    loss, ce = with_margin(hypernet, single)
    torch.testing.assert_close(loss, ce)


def test_local_loop_learns_and_keeps_best(tiny, train_data, tmp_path):
    # Overfit one fixed batch: a systematic fall the tiny model reaches on any CPU (it settles near
    # 0.65 x the start at learning rates from 1e-3 to 3e-3), not a thin margin on a noisy curve.
    train, val = local_rows(train_data)
    cfg = TrainConfig(**{**TINY, "lr": 1e-3}, max_steps=60, eval_every=20)
    out = train_local(cfg, copy.deepcopy(tiny[0]), tiny[1], train[:8], val, DIM, run_dir=str(tmp_path),
                      log=lambda s: None)
    losses = [r["loss"] for r in out["history"]]
    assert sum(losses[-10:]) / 10 < 0.75 * losses[0]
    best, _ = load_hypernet(str(tmp_path / "best"))
    vals = [r["val_loss"] for r in out["history"] if "val_loss" in r]
    assert best.config.extra["val_loss"] == min(vals)



def test_the_local_loop_trains_a_label_binding_from_its_training_prompts(tiny, train_data, tmp_path):
    """`label_binding` through the loop: the binding starts from the training prompts and the tag task's
    labels, its parameters train, and the checkpoint serves the same adapters."""
    train, val = local_rows(train_data)
    cfg = TrainConfig(**{**TINY, "targets": ["q_proj", "o_proj"]}, label_binding=True, max_steps=6, eval_every=6)
    out = train_local(cfg, copy.deepcopy(tiny[0]), tiny[1], train[:16], val, DIM, run_dir=str(tmp_path),
                      log=lambda s: None)
    assert out["history"][-1]["step"] == 6
    hypernet, _ = load_hypernet(str(tmp_path / "latest"))
    assert hypernet.bound == ["o_proj"] and hypernet.binding.abs().sum(1).nonzero().numel() > 0
    fresh = TrainConfig(**{**TINY, "targets": ["q_proj", "o_proj"]}, label_binding=True)
    from p2p.train.examples import embedding_stats, user_embeddings
    from p2p.train.loop import binding_prompts, new_hypernet

    start = new_hypernet(fresh, tiny[0], DIM, embedding_stats(user_embeddings(train[:16])), tiny[1], ["tag"],
                         binding_prompts(train[:16]))
    assert not torch.equal(start.binding_gain["o_proj"], hypernet.binding_gain["o_proj"])  # it trained
    torch.testing.assert_close(start.binding, hypernet.binding)  # the buffer is the model's, not learned


def test_a_fixed_label_binding_stays_at_its_start_while_the_rest_trains(tiny, train_data, tmp_path):
    from p2p.train.examples import embedding_stats, user_embeddings
    from p2p.train.loop import binding_prompts, new_hypernet

    train, val = local_rows(train_data)
    cfg = TrainConfig(**{**TINY, "targets": ["q_proj", "o_proj"]}, label_binding=True, label_binding_trained=False,
                      max_steps=4, eval_every=4)
    train_local(cfg, copy.deepcopy(tiny[0]), tiny[1], train[:16], val, DIM, run_dir=str(tmp_path), log=lambda s: None)
    hypernet, _ = load_hypernet(str(tmp_path / "latest"))
    start = new_hypernet(cfg, tiny[0], DIM, embedding_stats(user_embeddings(train[:16])), tiny[1], ["tag"],
                         binding_prompts(train[:16]))
    assert start.binding_gain["o_proj"].abs().sum() > 0
    for name in ("binding_gain", "binding_read"):
        torch.testing.assert_close(getattr(start, name)["o_proj"], getattr(hypernet, name)["o_proj"], rtol=0, atol=0)
    assert not torch.equal(start.heads["o_proj"].weight, hypernet.heads["o_proj"].weight)  # the rest trained


def test_an_exclusive_label_binding_owns_rank_column_0_and_only_its_gain_trains(tiny, train_data, tmp_path):
    from p2p.train.examples import embedding_stats, user_embeddings
    from p2p.train.loop import binding_prompts, new_hypernet

    train, val = local_rows(train_data)
    cfg = TrainConfig(**{**TINY, "targets": ["q_proj", "o_proj"]}, label_binding=True,
                      label_binding_exclusive=True, max_steps=4, eval_every=4)
    train_local(cfg, copy.deepcopy(tiny[0]), tiny[1], train[:16], val, DIM, run_dir=str(tmp_path), log=lambda s: None)
    hypernet, _ = load_hypernet(str(tmp_path / "latest"))
    start = new_hypernet(cfg, tiny[0], DIM, embedding_stats(user_embeddings(train[:16])), tiny[1], ["tag"],
                         binding_prompts(train[:16]))
    torch.testing.assert_close(start.binding_read["o_proj"], hypernet.binding_read["o_proj"], rtol=0, atol=0)
    assert not torch.equal(start.binding_gain["o_proj"], hypernet.binding_gain["o_proj"])  # the gain trained
    users = torch.tensor(user_embeddings(train[:16])[:3], dtype=torch.float32)  # three different users
    with torch.no_grad():
        a, b = hypernet(users)["o_proj"]
        write = hypernet.binding_gain["o_proj"][None, :, None] * hypernet.bound_vector(users)[:, None, :]
    # Column 0 is exactly read (every user alike) and gain * u: nothing the heads emit is added to it ...
    torch.testing.assert_close(a[:, :, 0], hypernet.binding_read["o_proj"][None].expand(3, -1, -1))
    torch.testing.assert_close(b[..., 0], write)
    # ... while the other columns still come from the heads, per user.
    assert not torch.equal(a[0, :, 1:], a[1, :, 1:])
    # An exclusive hypernet is a different model from a shared-column one: its content hash says so.
    shared_column = copy.deepcopy(hypernet.config)
    shared_column.label_binding_exclusive = False
    assert '"label_binding_exclusive": true' in hypernet.config.to_json()
    assert "label_binding_exclusive" not in shared_column.to_json()  # older checkpoints keep their hashes


def test_the_binding_gain_learns_at_its_own_rate_and_the_rest_at_lr(tiny, train_data):
    from p2p.train.examples import embedding_stats, user_embeddings
    from p2p.train.loop import binding_prompts, new_hypernet, optimizer_for

    train, _ = local_rows(train_data)
    cfg = TrainConfig(**{**TINY, "targets": ["q_proj", "o_proj"]}, label_binding=True, label_binding_exclusive=True,
                      label_binding_lr_scale=10.0)
    hypernet = new_hypernet(cfg, tiny[0], DIM, embedding_stats(user_embeddings(train[:16])), tiny[1], ["tag"],
                            binding_prompts(train[:16]))
    optimizer, _ = optimizer_for(cfg, hypernet)
    rest, gains = optimizer.param_groups
    assert [p.data_ptr() for p in gains["params"]] == [hypernet.binding_gain["o_proj"].data_ptr()]
    assert gains["lr"] == pytest.approx(10 * rest["lr"])  # under the same warmup and schedule
    assert (rest["initial_lr"], gains["initial_lr"]) == pytest.approx((cfg.lr, 10 * cfg.lr))
    trained = {p.data_ptr() for g in optimizer.param_groups for p in g["params"]}
    assert hypernet.binding_read["o_proj"].data_ptr() not in trained  # an exclusive binding's read stays put
    assert len(trained) == sum(1 for p in hypernet.parameters() if p.requires_grad)


def test_retrieval_control_trains_on_prompts_that_hold_the_users_profile(tiny, train_data):
    from p2p.task.prompt import PromptFormat
    from p2p.train.batch import collate
    from p2p.train.examples import as_control

    train, val = local_rows(train_data)
    assert "profile_text" in train[0]  # the join carries it along with the embedding
    rows = as_control(train[:4], "retrieval", np.zeros(DIM, np.float32))
    batch = collate(rows, PromptFormat(tiny[1]), 512)
    text = tiny[1].decode(batch.input_ids[0][batch.attention_mask[0].bool()])
    assert "What you know about this user:" in text and train[0]["profile_text"][:40] in text
    assert train[0]["input"][:40] in text
    assert (batch.embeddings == 0).all()  # one embedding for everyone: the profile reaches the model as text only
    losses = {}
    for control in ("shared", "retrieval"):
        cfg = TrainConfig(**TINY, max_steps=4, eval_every=4, control=control, max_seq_len=512)
        run = train_local(cfg, copy.deepcopy(tiny[0]), tiny[1], train[:16], val, DIM, log=lambda s: None)
        losses[control] = [r["loss"] for r in run["history"]]
    assert losses["shared"] != losses["retrieval"]  # other prompts, other losses
