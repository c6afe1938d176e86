"""A user's history -> profile -> the vector the hypernet reads -> adapter -> PEFT files.

`ProfileEmbedder` is the first half, shared by the profiles job, the nightly refresh, serving,
`p2p generate` and the evaluation: the profile text (`p2p.profile.build_profile`) embedded by the
encoder, with the user's label statistics (`p2p.profile.profile_features`) appended when the
profile config asks for them. `Personalizer` adds the hypernet, checking once that the
embedder's dimension is the one the hypernet was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from p2p.encoder import ProfileEncoder
from p2p.errors import P2PError
from p2p.generate import adapter_files, generate_user_adapters
from p2p.hypernet import Hypernetwork
from p2p.lora import UserAdapter
from p2p.profile import ProfileConfig, build_profile, profile_features, profile_hash


@dataclass
class Profile:
    text: str
    features: np.ndarray  # [ProfileConfig.features] float32
    hash: str  # changes when text, features or encoder change


def embedder_id(encoder: str, profile: ProfileConfig) -> str:
    """Names what produced an embedding (stored in profiles and manifests): a new one means new vectors.

    The encoder's name, plus every profile setting that differs from `ProfileConfig`'s defaults
    (so profiles and stores written before those settings existed keep their ids).
    """
    default = ProfileConfig()
    changed = [f"{f.name}={getattr(profile, f.name)}" for f in fields(ProfileConfig)
               if getattr(profile, f.name) != getattr(default, f.name)]
    return encoder + ("|" + ",".join(changed) if changed else "")


class ProfileEmbedder:
    """Histories -> profiles -> float32 vectors of `dim` = encoder dim + feature dim."""

    def __init__(self, encoder: str | ProfileEncoder, profile: ProfileConfig | dict | None = None):
        self.encoder = encoder if isinstance(encoder, ProfileEncoder) else ProfileEncoder(encoder)
        self.profile = profile if isinstance(profile, ProfileConfig) else ProfileConfig(**(profile or {}))
        self.id = embedder_id(self.encoder.name, self.profile)
        self.dim = self.encoder.dim + self.profile.features

    def profiles(self, histories: list[list[dict]]) -> list[Profile]:
        out = []
        for history in histories:
            text = build_profile(history, self.profile)
            features = profile_features(history, self.profile)
            out.append(Profile(text, features, profile_hash(text, self.id, features)))
        return out

    def embed(self, profiles: list[Profile]) -> np.ndarray:
        text = self.encoder.encode([p.text for p in profiles])
        if not self.profile.features:
            return text
        feats = np.stack([p.features for p in profiles]) if profiles else np.zeros((0, self.profile.features))
        return np.ascontiguousarray(np.concatenate([text, feats.astype(np.float32)], axis=1))

    def __call__(self, histories: list[list[dict]]) -> np.ndarray:
        return self.embed(self.profiles(histories))


class Personalizer:
    """Histories -> per-user adapters (one batched hypernet pass) -> PEFT files."""

    def __init__(self, hypernet: Hypernetwork, hypernet_id: str, embedder: ProfileEmbedder | None = None):
        c = hypernet.config
        self.hypernet, self.hypernet_id = hypernet, hypernet_id
        self.embedder = embedder or ProfileEmbedder(c.encoder, c.profile)
        if self.embedder.dim != c.embed_dim:
            raise P2PError(f"encoder {self.embedder.id!r} gives {self.embedder.dim}-d vectors; hypernet "
                           f"{hypernet_id} expects {c.embed_dim}-d (was it trained with another encoder or "
                           "profile features?)")

    def adapters(self, histories: list[list[dict]]) -> list[UserAdapter]:
        return generate_user_adapters(self.hypernet, self.embedder(histories))

    def from_embeddings(self, embeddings: np.ndarray) -> list[UserAdapter]:
        return generate_user_adapters(self.hypernet, embeddings)

    def files(self, adapter: UserAdapter) -> dict[str, bytes]:
        return adapter_files(self.hypernet, self.hypernet_id, adapter)


def build_profiles(data: str, embedder: ProfileEmbedder, batch_size: int = 256):
    """The `profiles` table for every user, in one process (`p2p profiles` does it on Ray: pipelines/ingest.py)."""
    import pyarrow as pa

    from p2p.data.schemas import iter_tables, profiles_schema, users_uri

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
