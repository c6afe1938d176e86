"""A user's history -> profile -> the vector the hypernet reads.

`ProfileEmbedder` is shared by the profiles job, the nightly refresh, serving, `p2p generate`
and the evaluation: the profile text (`p2p.profile.text`) embedded by the encoder, with the
user's label statistics (`p2p.profile.features`) appended when the profile config asks for them.
Its id names the encoder and every non-default profile setting, and is part of every profile
hash, so changing either re-embeds every user.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, fields

import numpy as np
import pyarrow as pa

from p2p.data.schemas import iter_tables, profiles_schema, users_uri
from p2p.profile.config import ID_BASE, ProfileConfig
from p2p.profile.encoder import ProfileEncoder
from p2p.profile.features import profile_features
from p2p.profile.text import build_profile


def profile_hash(profile_text: str, encoder_id: str, features: np.ndarray | None = None) -> str:
    """Changes when the profile text, its features or the encoder changes: each means a new embedding."""
    h = hashlib.sha256(f"{encoder_id}\n{profile_text}".encode())
    if features is not None and len(features):
        h.update(np.ascontiguousarray(features, np.float32).tobytes())
    return h.hexdigest()


@dataclass
class Profile:
    text: str
    features: np.ndarray  # [ProfileConfig.features] float32
    hash: str  # changes when text, features or encoder change


def embedder_id(encoder: str, profile: ProfileConfig) -> str:
    """Names what produced an embedding (stored in profiles and manifests): a new one means new vectors.

    The encoder's name, plus every profile setting that differs from `ID_BASE` (so profiles and
    stores written before a setting existed, or before a default changed, keep their ids).
    """
    default = ID_BASE
    changed = [f"{f.name}={getattr(profile, f.name)}" for f in fields(ProfileConfig)
               if getattr(profile, f.name) != getattr(default, f.name)]
    return encoder + ("|" + ",".join(changed) if changed else "")


class ProfileEmbedder:
    """Histories -> profiles -> float32 vectors of `dim` = encoder dim + feature dim.

    The encoder is loaded on first use (`encoder`, `dim`, `embed`): building profiles (text,
    features, hash) needs none, so a Ray task that only builds profiles never loads a model.
    """

    def __init__(self, encoder: str | ProfileEncoder, profile: ProfileConfig | dict | None = None):
        self._encoder = encoder if isinstance(encoder, ProfileEncoder) else None
        self.encoder_name = encoder.name if isinstance(encoder, ProfileEncoder) else encoder
        self.profile = profile if isinstance(profile, ProfileConfig) else ProfileConfig(**(profile or {}))
        self.id = embedder_id(self.encoder_name, self.profile)
        self._lock = threading.Lock()

    @property
    def encoder(self) -> ProfileEncoder:
        with self._lock:
            if self._encoder is None:
                self._encoder = ProfileEncoder(self.encoder_name)
            return self._encoder

    @property
    def dim(self) -> int:
        return self.encoder.dim + self.profile.features

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

    def table(self, user_ids: list[str], texts: list[str], hashes: list[str], embeddings: np.ndarray) -> pa.Table:
        """The `profiles` table (schema: p2p.data.schemas.profiles_schema) for these users."""
        dim = embeddings.shape[1] if embeddings.ndim == 2 else self.dim
        return pa.table({
            "user_id": user_ids, "profile_text": texts, "profile_hash": hashes,
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1), pa.float32()), dim),
            "encoder": [self.id] * len(user_ids),
        }, schema=profiles_schema(dim))


def build_profiles(data: str, embedder: ProfileEmbedder, batch_size: int = 256) -> pa.Table:
    """The `profiles` table for every user, in one process (`p2p profiles` does it on Ray: pipelines/ingest.py)."""
    parts = []
    for _, table in iter_tables(users_uri(data), "users"):
        profiles = embedder.profiles(table.column("history").to_pylist())
        emb = np.concatenate([embedder.embed(profiles[i : i + batch_size]) for i in range(0, len(profiles), batch_size)])
        parts.append(embedder.table(table.column("user_id").to_pylist(), [p.text for p in profiles],
                                    [p.hash for p in profiles], emb))
    return pa.concat_tables(parts)
