"""`p2p generate` in one process: users Parquet -> profiles -> embeddings -> PEFT folders.

The Ray refresh job does the same at scale; this is the readable single-machine version.
"""

from __future__ import annotations

import os

import numpy as np
from tqdm import tqdm

from p2p.data.schemas import iter_tables
from p2p.errors import P2PError
from p2p.generate import write_folder
from p2p.hypernet import load_hypernet
from p2p.personalizer import Personalizer, ProfileEmbedder
from p2p.userkey import user_key


def users_uri(data: str) -> str:
    sub = os.path.join(data, "users")
    return sub if os.path.isdir(sub) else data


def generate_folders(hypernet_dir: str, data: str, out: str, users: list[str] | None = None,
                     batch_size: int = 64) -> int:
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


def build_profiles(data: str, embedder: ProfileEmbedder, batch_size: int = 256):
    """The `profiles` table for every user, in one process (the Ray job: pipelines/ingest.py)."""
    import pyarrow as pa

    from p2p.data.schemas import profiles_schema

    parts = []
    for _, table in iter_tables(users_uri(data), "users"):
        ids = table.column("user_id").to_pylist()
        profiles = embedder.profiles(table.column("history").to_pylist())
        emb = np.concatenate([embedder.embed(profiles[i : i + batch_size]) for i in range(0, len(profiles), batch_size)])
        parts.append(pa.table({
            "user_id": ids, "profile_text": [p.text for p in profiles],
            "profile_hash": [p.hash for p in profiles],
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), embedder.dim),
            "encoder": [embedder.id] * len(ids),
        }, schema=profiles_schema(embedder.dim)))
    return pa.concat_tables(parts)


def examples_with_embeddings(data: str, profiles, splits: tuple[str, ...], tasks: list[str] | None = None,
                             limit: int | None = None) -> list[dict]:
    """Examples of `splits` (and `tasks`), each carrying its user's embedding."""
    from p2p.data.schemas import read_table

    vectors = np.asarray(profiles.column("embedding").combine_chunks().flatten()).reshape(len(profiles), -1)
    emb = dict(zip(profiles.column("user_id").to_pylist(), vectors, strict=True))
    ex = read_table(examples_uri(data), "examples")
    rows = []
    for r in ex.to_pylist():
        if r["split"] not in splits or (tasks and r["task"] not in tasks):
            continue
        if r["user_id"] not in emb:
            raise P2PError(f"example {r['example_id']!r}: user {r['user_id']!r} has no profile")
        rows.append({**r, "embedding": emb[r["user_id"]]})
        if limit is not None and len(rows) >= limit:
            break
    return rows


def examples_uri(data: str) -> str:
    return os.path.join(data, "examples")
