"""Profiles -> adapters -> PEFT folders: what `p2p generate`, the refresh job and the server share."""

from __future__ import annotations

import os

import numpy as np
import torch

from p2p.hypernet import Hypernetwork, adapter_paths
from p2p.lora import UserAdapter, peft_files, split_users


@torch.no_grad()
def generate_user_adapters(hypernet: Hypernetwork, embeddings: np.ndarray | torch.Tensor) -> list[UserAdapter]:
    """One adapter (module path -> (A, B)) per embedding row, in one batched hypernet pass."""
    emb = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
    generated = hypernet(emb)
    return split_users(generated, hypernet.config.layers, adapter_paths(hypernet.config))


def adapter_files(hypernet: Hypernetwork, hypernet_id: str, adapter: UserAdapter) -> dict[str, bytes]:
    """One user's PEFT folder as {file name: bytes}, tagged with the hypernet that made it."""
    c = hypernet.config
    return peft_files(
        adapter, base_model_name=c.base_model, rank=c.rank, scale=c.scale,
        target_modules=c.target_modules, layers=c.layers, num_layers=c.num_layers,
        fan_in_fan_out=c.fan_in_fan_out, metadata={"hypernet_id": hypernet_id},
    )


def write_folder(files: dict[str, bytes], folder: str) -> None:
    """A PEFT folder's files (from `adapter_files`) on the local disk."""
    os.makedirs(folder, exist_ok=True)
    for name, data in files.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)


def export_adapter(hypernet: Hypernetwork, hypernet_id: str, adapter: UserAdapter, folder: str) -> None:
    write_folder(adapter_files(hypernet, hypernet_id, adapter), folder)
