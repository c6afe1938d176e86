"""Label gate: per-label rank columns in the top layer's MLP output projection, fitted after training."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from train_support import GATE, local_rows
from train_support import GATE_DIM as DIM

from p2p.config import TrainConfig, config_from_dict
from p2p.errors import P2PError
from p2p.model.adapted import AdaptedModel
from p2p.model.hypernet import Hypernetwork, load_hypernet, save_hypernet
from p2p.model.label_gate import gate_labels, label_first_tokens, same_first_token
from p2p.task.prompt import PromptFormat
from p2p.task.registry import TAGS
from p2p.train.batch import batches_of
from p2p.train.gate_fit import held_out_users, label_gains, label_groups
from p2p.train.loop import hypernet_config_for, train_local
from p2p.train.step import AdapterLoss, mean_over_examples, val_rows_sample

FEATURES = GATE["profile_features"]


def _hypernet(tiny, **overrides) -> Hypernetwork:
    torch.manual_seed(0)
    return Hypernetwork(hypernet_config_for(TrainConfig(**{**GATE, **overrides}), tiny[0], DIM, ["tag"]))


def test_the_gate_owns_one_column_per_label_in_the_top_layer_only(tiny):
    hypernet = _hypernet(tiny)
    c = hypernet.config
    n = len(c.gate_labels)
    assert c.gate_labels == list(TAGS) and len(set(c.gate_dims)) == n and all(DIM - FEATURES <= d < DIM for d in c.gate_dims)
    users = torch.randn(3, DIM)
    before = hypernet(users)
    read, write = torch.randn(n, c.shapes["down_proj"][0]), torch.randn(n, c.shapes["down_proj"][1])
    hypernet.set_gate(read, write)
    after = hypernet(users)
    a, b = after["down_proj"]
    shares = users[:, c.gate_dims]  # the profile's shares as they are: an offered label is only ever raised
    torch.testing.assert_close(a[:, -1, :n], read.expand(3, -1, -1))
    torch.testing.assert_close(b[:, -1, :, :n], shares[:, None, :] * write.T[None])
    # Everything else is what the heads emit: the other columns, the lower layer, the other module.
    torch.testing.assert_close(a[:, -1, n:], before["down_proj"][0][:, -1, n:])
    torch.testing.assert_close(b[:, :-1], before["down_proj"][1][:, :-1])
    torch.testing.assert_close(after["q_proj"][1], before["q_proj"][1])
    # A user who never gave a label gets no write for it.
    none = users[:1].clone()
    none[0, c.gate_dims[0]] = 0
    assert hypernet(none)["down_proj"][1][0, -1, :, 0].abs().max() == 0


def test_a_gated_checkpoint_round_trips_and_an_ungated_one_keeps_its_hash(tiny, tmp_path):
    hypernet = _hypernet(tiny)
    n, (fan_in, fan_out) = len(hypernet.config.gate_labels), hypernet.config.shapes["down_proj"]
    hypernet.set_gate(torch.randn(n, fan_in), torch.randn(n, fan_out))
    hid = save_hypernet(hypernet, str(tmp_path / "g"))
    loaded, loaded_id = load_hypernet(str(tmp_path / "g"))
    assert loaded_id == hid and loaded.config.gate_labels == hypernet.config.gate_labels
    torch.testing.assert_close(loaded.gate_write, hypernet.gate_write)
    plain = _hypernet(tiny, label_gate=False)
    assert "gate_labels" not in plain.config.to_json()  # a hypernet without the gate hashes as it did before


def test_config_errors_name_the_field(tiny):
    with pytest.raises(P2PError, match="'label_gate': label_binding and label_gate"):
        config_from_dict({**GATE, "label_binding": True})
    with pytest.raises(P2PError, match="'label_gate_module'.*must be one of the targets"):
        config_from_dict({**GATE, "label_gate_module": "o_proj"})
    with pytest.raises(P2PError, match=f"label_gate needs a rank column per label: {len(TAGS)} labels, rank 8"):
        _hypernet(tiny, rank=8)
    with pytest.raises(P2PError, match="not the MLP's output projection"):
        _hypernet(tiny, targets=["q_proj", "o_proj"], label_gate_module="o_proj")
    with pytest.raises(P2PError, match="no fixed label list|none of the training tasks"):
        gate_labels(["headline"], FEATURES, DIM)
    with pytest.raises(P2PError, match="label 'heist' shares a label-statistics bin with 'cosmic'"):
        gate_labels(["tag"], 256, DIM)
    with pytest.raises(P2PError, match="label 'creepy' shares a label-statistics bin with 'end:-'"):
        gate_labels(["tag"], 144, DIM)  # a written answer's form would land in the label's share
    labels = ["comedy", "comic", "drama"]
    assert same_first_token(labels, label_first_tokens(tiny[1], labels)) == [["comedy", "comic"]]
    with pytest.raises(P2PError, match="from 1 user"):
        held_out_users(["u1", "u1"])


def test_each_task_gets_a_gain_for_its_own_labels():
    labels = [*TAGS, "1", "2", "3", "4", "5"]
    groups = label_groups(labels, ["rate", "tag", "headline", "tag"])  # headline has no labels: no group
    assert groups == {"rate": list(range(len(TAGS), len(labels))), "tag": list(range(len(TAGS)))}
    gain = label_gains({"rate": 0.0, "tag": 64.0}, groups, len(labels) + 1)
    assert gain[: len(TAGS)].eq(64).all() and gain[len(TAGS):].eq(0).all()  # the last label has no task: shut
    assert label_groups(labels, ["headline"]) == {}


def test_the_fit_answers_its_holdout_no_worse_and_the_real_forward_agrees_with_its_report(tiny, gate_data):
    train, val = local_rows(gate_data)
    cfg = TrainConfig(**GATE, max_steps=6, eval_every=6)
    run = train_local(cfg, copy.deepcopy(tiny[0]), tiny[1], train, val, DIM, log=lambda s: None)
    hypernet, report = run["hypernet"], run["hypernet"].config.extra["label_gate"]
    accuracy = report["holdout_first_token_accuracy"]
    assert accuracy["with"] >= accuracy["without"]  # gain 0 is a candidate
    assert report["examples"] == 48 and 0 < report["holdout_examples"] < 48
    assert ["scifi", "scary"] in report["same_first_token"]  # raised together, and said so
    # The fit computed the gate's effect in closed form at the final norm; the real LoRA path must agree.
    sample = val_rows_sample(train, cfg.label_gate_examples)
    held = held_out_users([r["user_id"] for r in sample])
    rows = [r for r in sample if r["user_id"] in held]
    loss = AdapterLoss(AdaptedModel(run["adapter_loss"].model, tiny[1], hypernet.config), cache_prefix=False)
    batches = batches_of(rows, 8, PromptFormat(tiny[1]), cfg.max_seq_len)
    with torch.no_grad():
        per_example = torch.cat([loss.per_example(hypernet, b)[1] for b in batches])
    assert float(mean_over_examples(per_example)) == pytest.approx(report["holdout_loss"]["with"], rel=1e-4)
    assert list(report["gains"]) == ["tag"]  # the only task the examples ask
    assert (report["gains"]["tag"] > 0) == (hypernet.gate_write.abs().sum() > 0)


def test_a_gated_hypernet_exported_for_a_device_carries_its_gate(tiny, tmp_path):
    from p2p.model.device_export import PROGRAM, export_for_device

    hypernet = _hypernet(tiny)
    n, (fan_in, fan_out) = len(hypernet.config.gate_labels), hypernet.config.shapes["down_proj"]
    hypernet.set_gate(torch.randn(n, fan_in), torch.randn(n, fan_out))
    folder = export_for_device(hypernet, str(tmp_path / "device"))
    program = torch.export.load(os.path.join(folder, PROGRAM)).module()
    users = torch.rand(3, DIM)
    with torch.no_grad():
        out = hypernet(users)
        want = [t for name in hypernet.config.target_modules for t in out[name]]
        for got, expected in zip(program(users), want, strict=True):
            torch.testing.assert_close(got, expected)
