"""What store tests share: a committed embeddings-only store."""

import time

import numpy as np

from p2p.model.hypernet import load_hypernet
from p2p.personalize import publish_hypernet
from p2p.store.manifest import embedding_row


def commit_embeddings(store, hypernet_dir, users):
    """Publish the hypernet and commit an embeddings-only run of `users` (random 384-d embeddings)."""
    hypernet, hid = load_hypernet(hypernet_dir)
    publish_hypernet(store, hypernet_dir)
    emb = np.random.default_rng(3).standard_normal((len(users), 384)).astype(np.float32)
    rows = [embedding_row(u, hid, f"h-{u}", e, int(time.time())) for u, e in zip(users, emb, strict=True)]
    run_id = store.begin(hid)
    part = store.write_manifest_part(hid, run_id, rows, 384)
    store.commit(hid, run_id, [part], len(rows), mode="embeddings")
    return hypernet, hid, emb
