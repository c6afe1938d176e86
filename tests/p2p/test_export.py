"""`p2p store export --layout vllm`: folders named for vLLM, configs vLLM accepts, peft loads them exactly.

No GPU and no vLLM here: the configs are held to the rules of vLLM's loader (vllm/lora/peft_helper.py,
lora_model.py, the filesystem resolver), and real peft loads each folder and must give the same
logits as p2p's own adapter.
"""

import copy
import json
import os
import re

import numpy as np
import pytest
import torch
from numerics import TINY_DEPTH as DEPTH
from numerics import assert_same_function

from p2p.errors import P2PError
from p2p.export import INDEX, vllm_config, vllm_problems
from p2p.fs import filesystem
from p2p.model.adapted import AdaptedModel
from p2p.model.base import build_tiny_random
from p2p.model.hypernet import Hypernetwork, make_config, save_hypernet
from p2p.model.peft_format import adapter_from_files, peft_scale
from p2p.personalize import Personalizer, publish_hypernet
from p2p.store import AdapterStore
from pipelines.cli import main

USERS = ["alice", "bob-2", "a/b c"]  # the last needs escaping into one flat folder
VLLM_TENSOR = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")  # what vLLM's name parser takes


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A committed store whose hypernet adapts the top 2 of 4 layers (so layers_to_transform is set)."""
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    hypernet = Hypernetwork(make_config(build_tiny_random(0), "tiny-random", "hashing", 384, top_k_layers=2))
    with torch.no_grad():
        for p in hypernet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_hypernet(hypernet, str(root / "hn"))
    store = AdapterStore(str(root / "store"))
    hid = publish_hypernet(store, str(root / "hn"))
    run_id = store.begin(hid)
    emb = np.random.default_rng(0).standard_normal((len(USERS), 384)).astype(np.float32)
    items = [(u, Personalizer(hypernet, hid).files(a), f"h-{u}", e)
             for u, a, e in zip(USERS, hypernet.user_adapters(emb), emb, strict=True)]
    store.commit(hid, run_id, [store.write_manifest_part(hid, run_id, store.write_adapters(hid, run_id, items), 384)],
                 len(USERS))
    return store, hypernet


@pytest.mark.numerics
def test_export_writes_one_vllm_folder_per_user_that_peft_loads_exactly(store, tmp_path, tiny, capsys):
    from peft import PeftModel

    store, hypernet = store
    out = tmp_path / "loras"
    assert main(["store", "export", "--store", store.uri, "--out", str(out), "--base-model", "/models/tiny"]) == 0
    printed = capsys.readouterr().out
    assert "exported 3 adapter(s)" in printed and "vllm serve /models/tiny --enable-lora --lora-modules" in printed
    index = json.loads((out / INDEX).read_text())
    assert index["users"] == {"alice": "alice", "bob-2": "bob-2", "a/b c": "a%2Fb%20c"}
    assert sorted(os.listdir(out)) == sorted([INDEX, "alice", "bob-2", "a%2Fb%20c"])

    model, tok = tiny
    adapted = AdaptedModel(copy.deepcopy(model), tok, hypernet.config)
    ids = torch.tensor([tok("A haunted house at night", add_special_tokens=False)["input_ids"]])
    for uid, name in index["users"].items():
        folder = out / name
        assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors"]
        config = json.loads((folder / "adapter_config.json").read_text())
        # vLLM's rules: the filesystem resolver's match, PEFTHelper's required fields and refusals
        assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == "/models/tiny"
        assert vllm_problems(config) == []
        assert config["use_rslora"] is False and config["lora_alpha"] / config["r"] == pytest.approx(hypernet.config.scale)
        files = {n: (folder / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}
        adapter, _ = adapter_from_files(files)
        layers = {int(re.search(r"\.(\d+)\.", p).group(1)) for p in adapter}
        assert layers == set(hypernet.config.layers) == {2, 3}  # only the adapted layers carry tensors
        from safetensors import safe_open

        with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                m = VLLM_TENSOR.fullmatch(key)
                assert m and m.group(1).rsplit(".", 1)[-1] in config["target_modules"], key
        # the stored adapter's bytes, byte for byte
        stored, _ = store.read_adapter(uid)
        assert files["adapter_model.safetensors"] == stored["adapter_model.safetensors"]

        peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(folder)).eval()
        with torch.no_grad():
            theirs = peft_model(input_ids=ids).logits
            with adapted.applied(adapted.stack([adapter])):
                ours = adapted.model(input_ids=ids).logits
            base = model(input_ids=ids).logits
        assert_same_function(ours, theirs, DEPTH, what=f"{uid}: ours vs peft")
        assert (ours - base).abs().max() > 1e-3  # the adapter does something


def test_export_to_s3_for_ray_serve_llm_and_a_subset_of_users(store, moto_s3):
    store, _ = store
    bucket = moto_s3().rsplit("/", 1)[0]
    assert main(["store", "export", "--store", store.uri, "--out", f"{bucket}/loras", "--users", "bob-2"]) == 0
    fs, root = filesystem(f"{bucket}/loras")
    fs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root)) == sorted([INDEX, "bob-2"])
    config = json.loads(fs.cat_file(f"{root}/bob-2/adapter_config.json"))
    assert config["base_model_name_or_path"] == "tiny-random"  # default: the name the hypernet was made for


def test_export_errors_are_one_line(store, tmp_path, capsys):
    store, _ = store
    assert main(["store", "export", "--store", store.uri]) == 2
    assert "needs --out" in capsys.readouterr().err
    assert main(["store", "export", "--store", store.uri, "--out", str(tmp_path), "--users", "nobody"]) == 2
    assert "nobody" in capsys.readouterr().err
    # `Alice` and `alice` would be one folder on a case-insensitive disk: refused before anything is written.
    for action in ("export", "fetch"):
        out = tmp_path / f"case-{action}"
        assert main(["store", action, "--store", store.uri, "--out", str(out), "--users", "alice,Alice"]) == 2
        err = capsys.readouterr().err
        assert "differ only in case" in err and "'Alice'" in err and err.count("\n") == 1
        assert not out.exists() or not list(out.iterdir())


def test_vllm_config_folds_rslora_and_refuses_what_vllm_refuses():
    config = {"peft_type": "LORA", "r": 16, "lora_alpha": 8.0, "use_rslora": True, "target_modules": ["q_proj"],
              "bias": "none", "base_model_name_or_path": "x"}
    folded = vllm_config(config, "base")
    assert folded["use_rslora"] is False and peft_scale(folded) == pytest.approx(peft_scale(config))
    for bad in ({"use_dora": True}, {"modules_to_save": ["lm_head"]}, {"bias": "all"}, {"rank_pattern": {"q": 4}},
                {"peft_type": "IA3"}):
        with pytest.raises(P2PError, match="not loadable by vLLM"):
            vllm_config({**config, **bad}, "base")
