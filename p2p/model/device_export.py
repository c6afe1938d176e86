"""The hypernet for a user's own device: profile embedding in, PEFT adapter out, with torch alone.

Private personalization: the device keeps the history, builds the profile and its embedding, and
turns that into the user's adapter locally, so nothing about the user leaves it (or, with the
server's `POST /v1/users/{id}/embedding`, only the vector does). The artifact is a folder:

- `hypernet.pt2`: the hypernet as a `torch.export` program (weights included), any batch of users;
- `adapter_config.json`: the PEFT LoRA config every adapter of this hypernet shares;
- `device.json`: the embedding width and, per output tensor, its PEFT key.

`adapter_on_device` below is the whole loader: torch and json only (no p2p, no peft, no
safetensors), written so it can be copied into an app as is. It writes `adapter_model.bin`, which
PEFT's `from_pretrained` loads like the safetensors file the server stores. ONNX would suit a
phone runtime as well; onnxruntime is not pinned here, so the portable form is `torch.export`.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from p2p.model.files import ADAPTER_CONFIG
from p2p.model.hypernet import Hypernetwork, adapter_paths
from p2p.model.peft_format import peft_files, peft_key

PROGRAM, LAYOUT = "hypernet.pt2", "device.json"
MAX_USERS = 4096  # the exported batch dimension's upper bound


class _FlatHypernet(nn.Module):
    """The hypernet with one flat tuple out (A and B of each module, per layer): a plain export signature."""

    def __init__(self, hypernet: Hypernetwork):
        super().__init__()
        self.hypernet = hypernet
        self.modules_in_order = list(hypernet.config.target_modules)

    def forward(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.hypernet(embeddings)
        return tuple(t for name in self.modules_in_order for t in out[name])


def export_for_device(hypernet: Hypernetwork, folder: str) -> str:
    """Write the device artifact of `hypernet` into `folder`; returns the folder."""
    c = hypernet.config
    flat = _FlatHypernet(hypernet.eval().float().cpu())
    users = torch.export.Dim("users", min=1, max=MAX_USERS)
    with torch.no_grad():
        program = torch.export.export(flat, (torch.zeros(2, c.embed_dim),), dynamic_shapes={"embeddings": {0: users}})
    os.makedirs(folder, exist_ok=True)
    torch.export.save(program, os.path.join(folder, PROGRAM))
    paths = adapter_paths(c)
    outputs = [[peft_key(paths[(layer, name)], which) for layer in c.layers]
               for name in flat.modules_in_order for which in ("A", "B")]
    with open(os.path.join(folder, LAYOUT), "w") as f:
        json.dump({"embed_dim": c.embed_dim, "outputs": outputs, "format": 1}, f, indent=1)
    zero = {paths[(layer, name)]: (torch.zeros(c.rank, c.shapes[name][0]), torch.zeros(c.shapes[name][1], c.rank))
            for name in c.target_modules for layer in c.layers}
    with open(os.path.join(folder, ADAPTER_CONFIG), "wb") as f:
        f.write(peft_files(zero, c)[ADAPTER_CONFIG])
    return folder


def adapter_on_device(artifact: str, embedding, out: str) -> str:
    """One user's embedding (a list or 1-d tensor of floats) -> a PEFT adapter folder at `out`. Torch + json only."""
    with open(os.path.join(artifact, LAYOUT)) as f:
        layout = json.load(f)
    x = torch.as_tensor(embedding, dtype=torch.float32).reshape(1, -1)
    if x.shape[1] != layout["embed_dim"]:
        raise ValueError(f"the embedding has {x.shape[1]} values; this hypernet reads {layout['embed_dim']}")
    program = torch.export.load(os.path.join(artifact, PROGRAM)).module()
    with torch.no_grad():
        tensors = program(x)
    state = {key: t[0, i].contiguous() for keys, t in zip(layout["outputs"], tensors, strict=True)
             for i, key in enumerate(keys)}
    os.makedirs(out, exist_ok=True)
    torch.save(state, os.path.join(out, "adapter_model.bin"))
    with open(os.path.join(artifact, "adapter_config.json"), "rb") as src, \
            open(os.path.join(out, "adapter_config.json"), "wb") as dst:
        dst.write(src.read())
    return out
