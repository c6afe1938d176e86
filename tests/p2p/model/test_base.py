import pytest
import torch

from p2p.errors import P2PError
from p2p.model.base import build_tiny_random, complete, load_base_model
from p2p.task.prompt import chat_prompt


def test_tiny_random_is_deterministic_frozen_and_gqa(tiny):
    model, tok = tiny
    a, b, c = build_tiny_random(0), build_tiny_random(0), build_tiny_random(1)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters(), strict=True))
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.out_features != attn.v_proj.out_features  # grouped-query attention
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert len(tok) == model.config.vocab_size


def test_load_is_cached_per_process(tiny):
    assert load_base_model("tiny-random")[0] is tiny[0]


def test_unknown_model_is_one_clear_error():
    with pytest.raises(P2PError) as err:
        load_base_model("no-such-model-xyz")
    msg = str(err.value)
    assert "smollm2-135m" in msg and "tiny-random" in msg and "\n" not in msg


def test_missing_directory_is_clear():
    with pytest.raises(P2PError, match="does not exist"):
        load_base_model("/nonexistent/model/dir")


def test_chat_prompt_uses_template(tiny):
    _, tok = tiny
    text = chat_prompt(tok, "hi there")
    assert "hi there" in text and text.rstrip().endswith("assistant")


@pytest.mark.integration
def test_smollm2_knows_paris():
    model, tok = load_base_model("smollm2-135m")
    assert model.config.num_hidden_layers == 30
    assert "Paris" in complete(model, tok, "What is the capital of France?", max_new_tokens=16)
