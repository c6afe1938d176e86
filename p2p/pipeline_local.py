"""`p2p generate` in one process: users Parquet -> profiles -> embeddings -> PEFT folders.

The Ray refresh job does the same at scale; this is the readable single-machine version.
"""

from __future__ import annotations

import os

from tqdm import tqdm

from p2p.data.schemas import iter_tables
from p2p.encoder import ProfileEncoder
from p2p.errors import P2PError
from p2p.generate import export_adapter, generate_user_adapters
from p2p.hypernet import load_hypernet
from p2p.profile import ProfileConfig, build_profile
from p2p.userkey import user_key


def users_uri(data: str) -> str:
    sub = os.path.join(data, "users")
    return sub if os.path.isdir(sub) else data


def generate_folders(hypernet_dir: str, data: str, out: str, users: list[str] | None = None,
                     batch_size: int = 64) -> int:
    hypernet, hypernet_id = load_hypernet(hypernet_dir)
    encoder = ProfileEncoder(hypernet.config.encoder)
    if encoder.dim != hypernet.config.embed_dim:
        raise P2PError(f"encoder {encoder.name} gives {encoder.dim}-d, hypernet expects {hypernet.config.embed_dim}")
    profile_config = ProfileConfig(**hypernet.config.profile)
    wanted = set(users) if users is not None else None
    found: set[str] = set()
    pending: list[tuple[str, str]] = []
    written = 0
    bar = tqdm(total=len(wanted) if wanted is not None else None, unit="user", desc="generate", disable=None)

    def flush() -> int:
        if not pending:
            return 0
        emb = encoder.encode([text for _, text in pending])
        for (uid, _), adapter in zip(pending, generate_user_adapters(hypernet, emb), strict=True):
            export_adapter(hypernet, hypernet_id, adapter, os.path.join(out, user_key(uid)))
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
            pending.append((uid, build_profile(row["history"], profile_config)))
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
