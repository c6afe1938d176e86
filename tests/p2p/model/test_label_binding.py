"""Label binding: a user's label shares reach the bound module's B along each label's output embedding."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from p2p.config import TrainConfig
from p2p.errors import P2PError
from p2p.model.hypernet import load_hypernet, save_hypernet
from p2p.model.label_binding import binding_matrix, labels_of_tasks
from p2p.profile.config import ProfileConfig
from p2p.profile.features import label_bin, profile_features
from p2p.task.registry import LAMP_2_TAGS
from p2p.train.loop import new_hypernet

FEATURES = 512  # LaMP-2's 15 tags in 15 bins


def _config(**overrides) -> TrainConfig:
    fields = dict(base="tiny-random", encoder="none", targets=["q_proj", "o_proj"], top_k_layers=2,
                  profile_features=FEATURES, label_binding=True, head_init_std=0.0)
    return TrainConfig(**{**fields, **overrides})


def _shares(history_tags: list[str]) -> np.ndarray:
    return profile_features([{"label": t} for t in history_tags], ProfileConfig(features=FEATURES))


def _users() -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.stack([_shares(list(rng.choice(LAMP_2_TAGS, 20))) for _ in range(16)])


def test_the_matrix_holds_each_labels_first_answer_token_at_its_statistics_bin(tiny):
    model, tok = tiny
    out = model.get_output_embeddings().weight
    matrix = binding_matrix(out, tok, list(LAMP_2_TAGS), FEATURES)
    bins = {label_bin(t, FEATURES) for t in LAMP_2_TAGS}
    assert len(bins) == len(LAMP_2_TAGS)
    for tag in LAMP_2_TAGS:
        first = tok(tag, add_special_tokens=False)["input_ids"][0]
        torch.testing.assert_close(matrix[label_bin(tag, FEATURES)], out[first].float())
    others = [b for b in range(FEATURES) if b not in bins]
    assert matrix[others].abs().sum() == 0
    # A user's share of a tag lands in that tag's bin (what the hypernet reads is what the matrix binds).
    assert _shares(["comedy", "comedy", "action"])[label_bin("comedy", FEATURES)] == pytest.approx(2 / 3)


def test_a_task_without_a_label_list_has_nothing_to_bind(tiny):
    model, tok = tiny
    assert labels_of_tasks(["LaMP_2", "LaMP_3"])[-5:] == ["1", "2", "3", "4", "5"]
    with pytest.raises(P2PError, match="label_binding"):
        binding_matrix(model.get_output_embeddings().weight, tok, labels_of_tasks(["headline"]), FEATURES)


PROMPTS = ["Which tag fits a film about a detective on a space colony?", "Tag this: a tender love story."]


def _hypernet(tiny, **overrides):
    model, tok = tiny
    users = _users()
    return new_hypernet(_config(**overrides), model, FEATURES, (users.mean(0), users.std(0)), tok, ["LaMP_2"],
                        PROMPTS)


def test_the_binding_uses_rank_column_zero_only(tiny):
    bound = _hypernet(tiny, head_init_std=1e-2)
    plain = _hypernet(tiny, head_init_std=1e-2, label_binding=False)
    users = torch.tensor(_users())
    for name, (a, b) in bound(users).items():
        a0, b0 = plain(users)[name]
        torch.testing.assert_close(a[:, :, 1:], a0[:, :, 1:])
        torch.testing.assert_close(b[..., 1:], b0[..., 1:])
        if name == "q_proj":  # not bound: the same adapter
            torch.testing.assert_close(a, a0)
            torch.testing.assert_close(b, b0)


def test_the_read_direction_fires_at_the_answer_position(tiny):
    """read . x = 1 for the mean input at the position that predicts the first answer token."""
    from p2p.model.hypernet import adapter_paths
    from p2p.model.label_binding import answer_position
    from p2p.task.prompt import PromptFormat

    model, tok = tiny
    hypernet = _hypernet(tiny)
    paths = {k: v for k, v in adapter_paths(hypernet.config).items() if k[1] == "o_proj"}
    answer = answer_position(model, [PromptFormat(tok).ids(p) for p in PROMPTS], paths)
    for j, layer in enumerate(hypernet.config.layers):
        read = hypernet.binding_read["o_proj"][j]
        assert float(read.detach() @ answer.inputs[(layer, "o_proj")]) == pytest.approx(1.0, rel=1e-4)


def test_two_users_differ_by_the_gain_times_their_label_directions(tiny):
    """With user-blind heads (zero head weights), all that differs between two users' B is the binding:
    gain[l] times their share difference along the labels' output embeddings, in column 0."""
    model, tok = tiny
    hypernet = _hypernet(tiny)
    assert hypernet.bound == ["o_proj"]
    assert (hypernet.binding_gain["o_proj"] > 0).all()
    fan = _shares(["comedy"] * 10 + ["action"] * 10)
    other = _shares(["romance"] * 10 + ["action"] * 10)
    out = hypernet(torch.tensor(np.stack([fan, other])))
    diff = out["o_proj"][1][0] - out["o_proj"][1][1]  # [L, out, r]
    out_emb = model.get_output_embeddings().weight
    comedy, romance = (out_emb[tok(t, add_special_tokens=False)["input_ids"][0]] for t in ("comedy", "romance"))
    direction = 0.5 * (comedy - romance) * hypernet.binding_norm
    expected = hypernet.binding_gain["o_proj"][:, None] * direction[None, :]
    torch.testing.assert_close(diff[..., 0], expected, rtol=1e-3, atol=1e-4)
    assert diff[..., 1:].abs().max() == 0


def test_a_users_binding_raises_the_labels_they_give_more_often_from_the_start(tiny):
    """The whole path, before any training: the comedy fan's adapter moves the next-token logits
    towards "comedy" and away from "romance" relative to the romance fan's."""
    from p2p.model.adapted import AdaptedModel
    from p2p.task.prompt import PromptFormat

    model, tok = tiny
    hypernet = _hypernet(tiny, targets=["o_proj"])
    adapted = AdaptedModel(copy.deepcopy(model), tok, hypernet.config)
    fan = _shares(["comedy"] * 10 + ["action"] * 10)
    other = _shares(["romance"] * 10 + ["action"] * 10)
    ids = torch.tensor([PromptFormat(tok).ids(PROMPTS[0])] * 2)
    with torch.no_grad(), adapted.applied(hypernet(torch.tensor(np.stack([fan, other])))):
        logits = adapted.model(input_ids=ids).logits[:, -1]
    comedy, romance = (tok(t, add_special_tokens=False)["input_ids"][0] for t in ("comedy", "romance"))
    gap = logits[:, comedy] - logits[:, romance]
    assert float(gap[0] - gap[1]) > 0.5


def test_the_gain_learns_and_the_checkpoint_keeps_the_binding(tiny, tmp_path):
    users = _users()
    hypernet = _hypernet(tiny)
    a, b = hypernet(torch.tensor(users))["o_proj"]
    (b * torch.randn_like(b)).sum().backward()
    assert hypernet.binding_gain["o_proj"].grad.abs().sum() > 0
    save_hypernet(hypernet, str(tmp_path))
    loaded, _ = load_hypernet(str(tmp_path))
    for (a1, b1), (a2, b2) in zip(hypernet.user_adapters(users[:3])[0].values(),
                                  loaded.user_adapters(users[:3])[0].values(), strict=True):
        torch.testing.assert_close(a1, a2)
        torch.testing.assert_close(b1, b2)


def test_binding_needs_a_residual_output_target_and_label_statistics(tiny):
    model, tok = tiny
    users = _users()
    with pytest.raises(P2PError, match="o_proj or down_proj"):
        new_hypernet(_config(targets=["q_proj", "v_proj"]), model, FEATURES, (users.mean(0), users.std(0)), tok,
                     ["LaMP_2"], PROMPTS)
    with pytest.raises(ValueError, match="profile_features"):
        _config(profile_features=0)


def test_the_bound_hypernet_runs_cast_to_bf16(tiny):
    """DeepSpeed's bf16 casts the module, buffers included; the binding follows the weights' dtype."""
    users = torch.tensor(_users())
    hypernet = _hypernet(tiny).to(torch.bfloat16)
    a, b = hypernet(users)["o_proj"]
    assert b.dtype == torch.bfloat16 and torch.isfinite(b.float()).all()
