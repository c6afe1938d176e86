"""Profiles -> adapters -> PEFT folders: what `p2p generate`, the refresh job and the server share."""

from __future__ import annotations

import os

import numpy as np
import torch
from tqdm import tqdm

from p2p.hypernet import Hypernetwork, adapter_paths
from p2p.lora import UserAdapter, peft_files, split_users
from p2p.userkey import user_key


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


def generate_folders(hypernet_dir: str, data: str, out: str, users: list[str] | None = None,
                     batch_size: int = 64) -> int:
    """`p2p generate`: users Parquet -> profiles -> embeddings -> one PEFT folder per user, in one process.

    The Ray refresh job does the same at scale into a store; this is the readable single-machine
    version, and the oracle the refresh is tested against.
    """
    from p2p.data.schemas import iter_tables, users_uri
    from p2p.errors import P2PError
    from p2p.hypernet import load_hypernet
    from p2p.personalizer import Personalizer  # it builds on this module

    hypernet, hypernet_id = load_hypernet(hypernet_dir)
    personalizer = Personalizer(hypernet, hypernet_id)
    wanted = set(users) if users is not None else None
    found: set[str] = set()
    pending: list[tuple[str, list[dict]]] = []
    written = 0
    bar = tqdm(total=len(wanted) if wanted is not None else None, unit="user", desc="generate", disable=None)

    def flush() -> int:
        if not pending:
            return 0
        adapters = personalizer.adapters([history for _, history in pending])
        for (uid, _), adapter in zip(pending, adapters, strict=True):
            write_folder(personalizer.files(adapter), os.path.join(out, user_key(uid)))
        bar.update(len(pending))
        n = len(pending)
        pending.clear()
        return n

    for _, table in iter_tables(users_uri(data), "users"):
        for row in table.to_pylist():
            uid = row["user_id"]
            if wanted is not None and uid not in wanted:
                continue
            found.add(uid)
            pending.append((uid, row["history"]))
            if len(pending) >= batch_size:
                written += flush()
    if wanted is not None and wanted - found:
        bar.close()
        missing = sorted(wanted - found)
        raise P2PError(f"user(s) not in {users_uri(data)}: {', '.join(map(repr, missing[:10]))}"
                       + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
    written += flush()
    bar.close()
    return written
