"""Embeddings-only rows -> adapters: what a server does on a cache miss when the store keeps no folders.

An adapter is a pure function of the user's embedding and the hypernet, so a store may keep the
1.5 KB embedding instead of the ~500 KB PEFT folder (`p2p refresh --mode embeddings`). A replica
that misses its cache turns the rows of all its cold users into adapters in one batched hypernet
pass. The row's hypernet id must be the loaded hypernet's (an adapter made by another hypernet
would be silently wrong), and its embedding must match the digest the manifest recorded.
"""

from __future__ import annotations

import numpy as np

from p2p.generate import adapter_files, generate_user_adapters
from p2p.hypernet import Hypernetwork
from p2p.lora import UserAdapter
from p2p.store.errors import AdapterCorrupt, StoreError
from p2p.store.manifest import embedding_digest


def check_embedding_rows(rows: list[dict], hypernet_id: str, dim: int) -> np.ndarray:
    """The rows' embeddings as one (n, dim) float32 matrix, each checked against its row."""
    matrix = np.zeros((len(rows), dim), np.float32)
    for i, row in enumerate(rows):
        uid = row.get("user_id")
        if row.get("hypernet_id") != hypernet_id:
            raise StoreError(f"user {uid!r}: row made for hypernet {row.get('hypernet_id')}, not {hypernet_id}; "
                             f"load that hypernet, or refresh the store for this one")
        emb = row.get("embedding")
        if emb is None:
            raise StoreError(f"user {uid!r}: row has no embedding (read it with adapter_row(..., embedding=True))")
        emb = np.asarray(emb, np.float32).reshape(-1)
        if emb.shape[0] != dim:
            raise AdapterCorrupt(f"user {uid!r}: embedding has {emb.shape[0]} values, hypernet expects {dim}")
        if row.get("adapter_uri") is None and embedding_digest(emb) != row.get("sha256"):
            raise AdapterCorrupt(f"user {uid!r}: embedding fails its sha256 check (manifest "
                                 f"{str(row.get('sha256'))[:12]}..., stored {embedding_digest(emb)[:12]}...): corrupted")
        matrix[i] = emb
    return matrix


def adapters_from_rows(hypernet: Hypernetwork, hypernet_id: str, rows: list[dict]) -> list[UserAdapter]:
    """One adapter per row (module path -> (A, B)), all in one batched hypernet pass."""
    if not rows:
        return []
    return generate_user_adapters(hypernet, check_embedding_rows(rows, hypernet_id, hypernet.config.embed_dim))


def files_from_rows(hypernet: Hypernetwork, hypernet_id: str, rows: list[dict]) -> list[dict[str, bytes]]:
    """The same as PEFT folders ({file name: bytes}), for `p2p store fetch` and exports."""
    return [adapter_files(hypernet, hypernet_id, a) for a in adapters_from_rows(hypernet, hypernet_id, rows)]
