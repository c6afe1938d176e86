"""The hypernetwork and the batched per-example LoRA, against peft itself.

Covers the reference implementation's known defects (docs/design.md, section 4): each example gets its own user's adapter (batch ==
one at a time), and exported adapters reproduce the training-time scale exactly in PEFT,
including when training used rsLoRA scaling.
"""

import copy
import dataclasses

import pytest
import torch
from numerics import HYPERNET_DEPTH, assert_same_function
from numerics import TINY_DEPTH as DEPTH
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict

from p2p.errors import P2PError
from p2p.model.base import build_tiny_random
from p2p.model.files import ADAPTER_WEIGHTS
from p2p.model.hypernet import Hypernetwork, adapter_paths, load_hypernet, make_config, save_hypernet
from p2p.model.lora import adapters_applied, stack_users, wrap_model
from p2p.model.peft_format import load_peft, peft_scale, write_peft_folder
from p2p.personalize import Personalizer

pytestmark = pytest.mark.numerics  # run again under other kernel configurations (tests/numerics.py)

PROMPTS = ["The cat sat on the mat", "Hello there, how are you", "A short one", "Tags: noir, gritty, epic"]


def perturb(hypernet: Hypernetwork, std: float = 0.05, seed: int = 0) -> Hypernetwork:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hypernet.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return hypernet


def setup(tiny, rank=8, use_rslora=False, top_k=None, base_name="tiny-random", model=None):
    model = copy.deepcopy(model if model is not None else tiny[0])
    config = make_config(model, base_name, "hashing", 384, rank=rank, alpha=16.0, use_rslora=use_rslora,
                         top_k_layers=top_k)
    torch.manual_seed(0)
    hypernet = Hypernetwork(config)
    wrap_model(model, config.target_modules, config.layers)
    return model, hypernet


def batch(tok, prompts=PROMPTS):
    tok.padding_side = "right"
    return tok(prompts, return_tensors="pt", padding=True)


def base_logits(tiny, inputs):
    with torch.no_grad():
        return tiny[0](**inputs).logits


def test_step0_adapters_are_near_zero_and_exactly_zero_with_zero_heads(tiny):
    model, hypernet = setup(tiny)
    inputs = batch(tiny[1])
    emb = torch.nn.functional.normalize(torch.randn(4, 384), dim=-1)
    base = base_logits(tiny, inputs)
    with torch.no_grad(), adapters_applied(model, hypernet(emb), hypernet.config.layers, hypernet.config.scale):
        logits = model(**inputs).logits
    # Small random heads: dW ~ 0, a hundred times smaller than what a trained adapter does to logits.
    assert 0 < (logits - base).abs().max() < 0.05
    for a, b in hypernet(emb).values():
        assert b.abs().max() < 1e-2 and torch.count_nonzero(a) > 0  # PEFT init: B ~ 0, A Kaiming
    # With zero heads (how checkpoints before this init were made) every adapter is exactly dW = 0.
    zero = Hypernetwork(dataclasses.replace(hypernet.config, head_init_std=0.0))
    with torch.no_grad(), adapters_applied(model, zero(emb), hypernet.config.layers, hypernet.config.scale):
        assert torch.equal(model(**inputs).logits, base)  # exact: the same kernels, plus exactly 0.0


def test_user_pathway_gets_gradient_at_step0(tiny):
    model, hypernet = setup(tiny)
    inputs = batch(tiny[1])
    hypernet.set_input_stats(torch.zeros(384), torch.ones(384))
    emb = torch.randn(4, 384)
    generated = hypernet(emb)
    with adapters_applied(model, generated, hypernet.config.layers, hypernet.config.scale):
        logits = model(**inputs).logits
    logits.float().pow(2).mean().backward()
    assert hypernet.user_proj.weight.grad.abs().sum() > 0
    assert all(b.fc1.weight.grad.abs().sum() > 0 for b in hypernet.blocks)


def test_without_adapters_wrapped_model_is_bit_identical(tiny):
    model, _ = setup(tiny)
    inputs = batch(tiny[1])
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, base_logits(tiny, inputs))  # exact: the wrapper adds nothing


def test_batch_generation_equals_one_at_a_time(tiny):
    _, hypernet = setup(tiny)
    perturb(hypernet)
    emb = torch.randn(5, 384)
    together = hypernet(emb)
    # Equal up to float32 rounding (GEMM blocking differs with batch size); the defect this
    # guards against (one user's adapter for the whole batch) differs by orders more.
    for i in range(5):
        alone = hypernet(emb[i : i + 1])
        for name in together:
            for j in (0, 1):
                assert_same_function(together[name][j][i], alone[name][j][0], depth=HYPERNET_DEPTH, what=name)
    assert not torch.allclose(together["q_proj"][1][0], together["q_proj"][1][1])  # users differ


def peft_reference(tiny, adapter, rank, alpha, use_rslora, layers=None):
    """The same weights through peft's own LoRA implementation."""
    base = copy.deepcopy(tiny[0])
    cfg = LoraConfig(r=rank, lora_alpha=alpha, use_rslora=use_rslora, target_modules=["q_proj", "v_proj"],
                     layers_to_transform=layers, lora_dropout=0.0)
    pm = get_peft_model(base, cfg)
    state = {}
    for path, (a, b) in adapter.items():
        state[f"base_model.model.{path}.lora_A.weight"] = a
        state[f"base_model.model.{path}.lora_B.weight"] = b
    result = set_peft_model_state_dict(pm, state)
    assert not [k for k in result.unexpected_keys if "lora" in k]
    return pm.eval()


@pytest.mark.parametrize("use_rslora", [False, True])
def test_mixed_batch_equals_peft_per_user(tiny, use_rslora):
    model, hypernet = setup(tiny, rank=8, use_rslora=use_rslora)
    perturb(hypernet, std=0.2)
    emb = torch.randn(4, 384)
    inputs = batch(tiny[1])
    c = hypernet.config
    with torch.no_grad(), adapters_applied(model, hypernet(emb), c.layers, c.scale):
        ours = model(**inputs).logits
    adapters = hypernet.user_adapters(emb)
    for i, adapter in enumerate(adapters):
        pm = peft_reference(tiny, adapter, c.rank, c.alpha, use_rslora)
        with torch.no_grad():
            ref = pm(input_ids=inputs["input_ids"][i : i + 1], attention_mask=inputs["attention_mask"][i : i + 1]).logits
        assert_same_function(ours[i], ref[0], DEPTH, mask=inputs["attention_mask"][i], what=f"row {i} vs peft")
    assert (ours - base_logits(tiny, inputs)).abs().max() > 1e-2  # the adapters do something


def test_rows_share_an_adapter_by_index(tiny):
    model, hypernet = setup(tiny)
    perturb(hypernet, std=0.2)
    emb = torch.randn(2, 384)
    inputs = batch(tiny[1])
    c = hypernet.config
    gen = hypernet(emb)
    index = torch.tensor([1, 0, 1, 1])
    with torch.no_grad(), adapters_applied(model, gen, c.layers, c.scale, row_index=index):
        by_index = model(**inputs).logits
    copied = {k: (a[index], b[index]) for k, (a, b) in gen.items()}
    with torch.no_grad(), adapters_applied(model, copied, c.layers, c.scale):
        by_copy = model(**inputs).logits
    assert_same_function(by_index, by_copy, DEPTH, mask=inputs["attention_mask"], what="by index vs by copy")


@pytest.mark.parametrize("use_rslora,top_k", [(False, None), (True, None), (True, 2)])
def test_save_peft_then_peft_from_pretrained_gives_same_logits(tiny, tmp_path, use_rslora, top_k):
    model, hypernet = setup(tiny, use_rslora=use_rslora, top_k=top_k)
    perturb(hypernet, std=0.2)
    emb = torch.randn(3, 384)
    c = hypernet.config
    inputs = batch(tiny[1], PROMPTS[:3])
    with torch.no_grad(), adapters_applied(model, hypernet(emb), c.layers, c.scale):
        ours = model(**inputs).logits
    for i, adapter in enumerate(hypernet.user_adapters(emb)):
        folder = tmp_path / f"user{i}"
        write_peft_folder(Personalizer(hypernet, "test").files(adapter), str(folder))
        loaded, config = load_peft(str(folder))
        assert config["use_rslora"] is False and peft_scale(config) == pytest.approx(c.scale, rel=1e-12)
        pm = PeftModel.from_pretrained(build_tiny_random(0), str(folder)).eval()
        mask = inputs["attention_mask"][i]
        with torch.no_grad():
            ref = pm(input_ids=inputs["input_ids"][i : i + 1], attention_mask=inputs["attention_mask"][i : i + 1]).logits
        assert_same_function(ours[i], ref[0], DEPTH, mask=mask, what=f"user {i}: ours vs peft from_pretrained")
        # and our loader round-trips it into the batched path
        restored = stack_users([loaded], c.layers, adapter_paths(c))
        with torch.no_grad(), adapters_applied(model, restored, c.layers, peft_scale(config)):
            again = model(input_ids=inputs["input_ids"][i : i + 1], attention_mask=inputs["attention_mask"][i : i + 1]).logits
        assert_same_function(again[0], ours[i], DEPTH, mask=mask, what=f"user {i}: reloaded vs generated")


def test_bfloat16_adapters_are_half_the_bytes_and_the_same_adapter_within_bf16_rounding(tiny, tmp_path):
    model, hypernet = setup(tiny)
    perturb(hypernet, std=0.2)
    [adapter] = hypernet.user_adapters(torch.randn(1, 384))
    personalizer = Personalizer(hypernet, "test")
    full, half = personalizer.files(adapter), personalizer.files(adapter, "bfloat16")
    assert len(half[ADAPTER_WEIGHTS]) < 0.55 * len(full[ADAPTER_WEIGHTS])
    folder = tmp_path / "bf16"
    write_peft_folder(half, str(folder))
    loaded, config = load_peft(str(folder))
    for path, (a, b) in adapter.items():  # exactly the fp32 weights rounded to bf16, widened back
        assert loaded[path][0].dtype == torch.float32
        assert torch.equal(loaded[path][0], a.detach().to(torch.bfloat16).float())
        assert torch.equal(loaded[path][1], b.detach().to(torch.bfloat16).float())
    # PEFT loads the bf16 folder as it is, and computes what our path computes with the rounded weights.
    c = hypernet.config
    inputs = batch(tiny[1], PROMPTS[:1])
    pm = PeftModel.from_pretrained(build_tiny_random(0), str(folder)).eval()
    restored = stack_users([loaded], c.layers, adapter_paths(c))
    with torch.no_grad(), adapters_applied(model, restored, c.layers, peft_scale(config)):
        ours = model(**inputs).logits
    with torch.no_grad():
        ref = pm(**inputs).logits.float()
    assert_same_function(ours[0], ref[0], DEPTH, mask=inputs["attention_mask"][0], what="bf16 folder: ours vs peft")
    with pytest.raises(P2PError, match="dtype"):
        personalizer.files(adapter, "float16")


def test_gradients_reach_hypernet_not_base(tiny):
    model, hypernet = setup(tiny)
    perturb(hypernet)  # non-zero head weights so gradients flow into the trunk too
    before = {n: p.clone() for n, p in model.named_parameters()}
    inputs = batch(tiny[1])
    c = hypernet.config
    opt = torch.optim.SGD(hypernet.parameters(), lr=0.1)
    with adapters_applied(model, hypernet(torch.randn(4, 384)), c.layers, c.scale):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    opt.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in hypernet.parameters())
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_hypernet_checkpoint_round_trip(tiny, tmp_path):
    _, hypernet = setup(tiny)
    perturb(hypernet)
    hid = save_hypernet(hypernet, str(tmp_path / "hn"))
    loaded, hid2 = load_hypernet(str(tmp_path / "hn"))
    assert hid == hid2 and len(hid) == 16
    emb = torch.randn(2, 384)
    for name, (a, b) in hypernet.eval()(emb).items():
        assert_same_function(loaded(emb)[name][0], a, HYPERNET_DEPTH, what=name)
        assert_same_function(loaded(emb)[name][1], b, HYPERNET_DEPTH, what=name)
    # a flipped byte in the weights is caught by the content hash
    path = tmp_path / "hn" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(Exception, match="content hash"):
        load_hypernet(str(tmp_path / "hn"))


def test_the_tolerance_rejects_the_bugs_it_guards_against(tiny):
    """Each property above, broken on purpose: the float32 rule of tests/numerics.py must fail it."""
    model, hypernet = setup(tiny, rank=8)
    perturb(hypernet, std=0.2)
    emb = torch.randn(4, 384)
    inputs = batch(tiny[1])
    mask = inputs["attention_mask"]
    c = hypernet.config
    generated = hypernet(emb)

    def logits(gen, layers=c.layers, scale=c.scale):
        with torch.no_grad(), adapters_applied(model, gen, layers, scale):
            return model(**inputs).logits

    right = logits(generated)
    assert_same_function(logits(generated), right, DEPTH, mask=mask)  # the rule accepts a rerun
    swapped = {m: (a[[1, 0, 2, 3]], b[[1, 0, 2, 3]]) for m, (a, b) in generated.items()}
    broken = {
        "rsLoRA scale where alpha/r was trained": logits(generated, scale=c.alpha / c.rank**0.5),
        "the top layer's adapter dropped": logits(generated, layers=c.layers[:-1]),
        "rows 0 and 1 given each other's adapter": logits(swapped),
        "no adapter at all": base_logits(tiny, inputs),
    }
    for what, wrong in broken.items():
        with pytest.raises(AssertionError, match="float32 rounding"):
            assert_same_function(wrong, right, DEPTH, mask=mask, what=what)
