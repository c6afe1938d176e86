"""The hypernet exported for a device: the same adapters as the library, loaded by PEFT, with torch alone."""

import inspect
import json
import os
import subprocess
import sys

import numpy as np
import torch
from numerics import TINY_DEPTH, assert_same_function
from peft import PeftModel

from p2p.model import device_export
from p2p.model.base import build_tiny_random
from p2p.model.device_export import adapter_on_device, export_for_device
from p2p.model.hypernet import load_hypernet
from p2p.model.peft_format import peft_key, write_peft_folder
from p2p.personalize import Personalizer


def test_the_device_artifact_makes_the_librarys_adapter_with_torch_alone(tiny_hypernet, tmp_path):
    hypernet, hid = load_hypernet(tiny_hypernet)
    for p in hypernet.parameters():  # visible adapters
        p.data.normal_(0, 0.05)
    artifact = export_for_device(hypernet, str(tmp_path / "device"))
    emb = np.random.default_rng(0).standard_normal((3, hypernet.config.embed_dim)).astype(np.float32)
    # The loader's source, run where p2p, peft and safetensors cannot be imported: what an app copies.
    code = (f"import sys, json, os, torch\nsys.modules.update(dict.fromkeys(['p2p', 'peft', 'safetensors']))\n"
            f"{inspect.getsource(adapter_on_device)}\n"
            f"LAYOUT, PROGRAM = {device_export.LAYOUT!r}, {device_export.PROGRAM!r}\n"
            f"for i, e in enumerate(json.loads(sys.argv[2])):\n"
            f"    adapter_on_device(sys.argv[1], e, os.path.join(sys.argv[3], f'user{{i}}'))\n")
    done = subprocess.run([sys.executable, "-c", code, artifact, json.dumps(emb.tolist()), str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    inputs = torch.tensor([[1, 5, 9, 13, 17, 21]])
    for i, want in enumerate(hypernet.user_adapters(emb)):
        got = torch.load(tmp_path / f"user{i}" / "adapter_model.bin")
        assert set(got) == {peft_key(path, w) for path in want for w in "AB"}
        for path, (a, b) in want.items():
            assert_same_function(got[peft_key(path, "A")], a, 6, what=f"user {i} {path} A")
            assert_same_function(got[peft_key(path, "B")], b, 6, what=f"user {i} {path} B")
        # PEFT loads the device's folder, and answers as it does with the server's folder for this user.
        write_peft_folder(Personalizer(hypernet, hid).files(want), str(tmp_path / f"server{i}"))
        with torch.no_grad():
            device = PeftModel.from_pretrained(build_tiny_random(0), str(tmp_path / f"user{i}")).eval()(inputs).logits
            server = PeftModel.from_pretrained(build_tiny_random(0), str(tmp_path / f"server{i}")).eval()(inputs).logits
            base = build_tiny_random(0).eval()(inputs).logits
        assert_same_function(device[0], server[0], TINY_DEPTH, what=f"user {i}: device vs server folder")
        assert (device - base).abs().max() > 1e-3  # the adapter is not a no-op
    assert sorted(os.listdir(artifact)) == ["adapter_config.json", "device.json", "hypernet.pt2"]


def test_the_export_device_command_writes_the_artifact(tiny_hypernet, tmp_path, capsys):
    from pipelines.cli import main

    assert main(["export-device", "--hypernet", tiny_hypernet, "--out", str(tmp_path / "art")]) == 0
    assert "torch only" in capsys.readouterr().out
    assert json.loads((tmp_path / "art" / "device.json").read_text())["embed_dim"] == load_hypernet(tiny_hypernet)[0].config.embed_dim
