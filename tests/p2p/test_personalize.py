import copy

import pytest
import torch
from numerics import assert_same_function
from peft import PeftModel

from p2p.data.schemas import read_table
from p2p.model.base import build_tiny_random, load_base_model
from p2p.model.hypernet import Hypernetwork, load_hypernet, make_config, save_hypernet
from p2p.model.lora import adapters_applied, wrap_model
from p2p.model.peft_format import write_peft_folder
from p2p.personalize import Personalizer
from p2p.userkey import user_key
from pipelines.cli import main


def test_user_keys_cannot_escape():
    keys = {uid: user_key(uid) for uid in ["../x", "a/b", "..", ".", "a\x00b", "tab\there", "Zoë", "ok_id-1"]}
    assert len(set(keys.values())) == len(keys)
    for key in keys.values():
        assert "/" not in key and ".." not in key and key not in (".", "") and key.isprintable()
    assert keys["ok_id-1"] == "ok_id-1"
    with pytest.raises(Exception, match="non-empty"):
        user_key("")
    assert len(user_key("x" * 1000)) <= 200 and user_key("x" * 1000) != user_key("x" * 999)


def test_init_and_generate_cli_folders_load_in_peft(tmp_path, synth_dir, capsys):
    hn = tmp_path / "hn"
    assert main(["init-hypernet", "--base", "tiny-random", "--encoder", "hashing", "--out", str(hn)]) == 0
    hypernet, hid = load_hypernet(str(hn))
    with torch.no_grad():  # make the adapters non-trivial, as after training
        for p in hypernet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_hypernet(hypernet, str(hn))
    users = read_table(f"{synth_dir}/users", "users").column("user_id").to_pylist()[:3]
    out = tmp_path / "adapters"
    assert main(["generate", "--hypernet", str(hn), "--data", synth_dir, "--out", str(out),
                 "--users", ",".join(users), "--batch-size", "2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(user_key(u) for u in users)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    logits = []
    for u in users:
        pm = PeftModel.from_pretrained(build_tiny_random(0), str(out / user_key(u))).eval()
        with torch.no_grad():
            logits.append(pm(input_ids=ids).logits)
    assert (logits[0] - logits[1]).abs().max() > 1e-3  # different users, different adapters


def test_generate_unknown_user_is_clear(tmp_path, synth_dir, capsys):
    hn = tmp_path / "hn"
    assert main(["init-hypernet", "--base", "tiny-random", "--encoder", "hashing", "--out", str(hn)]) == 0
    rc = main(["generate", "--hypernet", str(hn), "--data", synth_dir, "--out", str(tmp_path / "o"),
               "--users", "nobody,u0000000"])
    assert rc == 2 and "user(s) not in" in capsys.readouterr().err


def test_init_hypernet_bad_target_is_clear(tmp_path, capsys):
    rc = main(["init-hypernet", "--base", "tiny-random", "--encoder", "hashing", "--out", str(tmp_path / "h"),
               "--targets", "q_proj,nope"])
    assert rc == 2 and "nope" in capsys.readouterr().err


@pytest.mark.integration
@pytest.mark.numerics
def test_smollm2_step0_peft_equality_and_paper_preset(tmp_path):
    base, tok = load_base_model("smollm2-135m")
    model = copy.deepcopy(base)
    config = make_config(model, "smollm2-135m", "minilm", 384, rank=8, use_rslora=True)
    assert config.num_layers == 30 and config.shapes == {"q_proj": [576, 576], "v_proj": [576, 192]}
    torch.manual_seed(0)
    hypernet = Hypernetwork(config)
    wrap_model(model, config.target_modules, config.layers)
    inputs = tok(["Tag this movie: a heist in Paris.", "Rate: great kettle!"], return_tensors="pt", padding=True)
    emb = torch.nn.functional.normalize(torch.randn(2, 384), dim=-1)
    with torch.no_grad():
        reference = base(**inputs).logits
        with adapters_applied(model, hypernet(emb), config.layers, config.scale):
            # step 0: dW ~ 0 (small random heads), even on all 30 layers with rsLoRA's larger scale
            assert (model(**inputs).logits - reference).abs().max() < 0.05
        for p in hypernet.parameters():  # adapters that move logits by a few units, as trained ones do
            p.add_(torch.randn_like(p) * 0.001)
        with adapters_applied(model, hypernet(emb), config.layers, config.scale):
            ours = model(**inputs).logits
    assert (ours - reference).abs().max() > 0.5

    adapter = hypernet.user_adapters(emb)[1]
    write_peft_folder(Personalizer(hypernet, "it").files(adapter), str(tmp_path / "u1"))
    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "u1")).eval()
    with torch.no_grad():  # the same batch shape on both sides, so float rounding matches too
        ref = pm(**inputs).logits
    real = inputs["attention_mask"][1].bool()
    assert_same_function(ours[1], ref[1], depth=30, mask=real, what="SmolLM2 ours vs peft")
    paper = Hypernetwork(make_config(base, "smollm2-135m", "minilm", 384, preset="paper"))
    out = paper(emb)
    assert out["q_proj"][0].shape == (2, 30, 8, 576) and out["v_proj"][1].shape == (2, 30, 192, 8)
