"""`p2p profiles`: users Parquet -> profile text -> embedding -> profiles Parquet, on Ray Data.

Streams block by block (no full materialisation, no shuffle): profiles are built in tasks,
embeddings in an actor pool that loads the encoder once per actor.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy

from p2p.data.schemas import check_schemas, profiles_schema, validate
from p2p.personalizer import Profile, ProfileEmbedder, embedder_id
from p2p.profile import ProfileConfig, build_profile, profile_features, profile_hash
from pipelines.ray_setup import ensure_ray, user_errors


def profile_texts(batch: pa.Table, profile: dict, encoder: str) -> pa.Table:
    """Validate the block against the users contract, then build each profile: text, features, hash."""
    source = batch.column("path")[0].as_py() if "path" in batch.column_names and len(batch) else "users"
    users = validate(batch.drop_columns(["path"]) if "path" in batch.column_names else batch, "users", source)
    config = ProfileConfig(**profile)
    eid = embedder_id(encoder, config)
    texts, features, hashes = [], [], []
    for h in users.column("history").to_pylist():
        texts.append(build_profile(h, config))
        features.append(profile_features(h, config))
        hashes.append(profile_hash(texts[-1], eid, features[-1]))
    return pa.table({"user_id": users.column("user_id"), "profile_text": texts,
                     "features": pa.array([f.tolist() for f in features], pa.list_(pa.float32())),
                     "profile_hash": hashes, "updated_at": users.column("updated_at")})


class Embed:
    """Actor: loads the encoder once, embeds blocks of profiles."""

    def __init__(self, encoder: str, profile: dict):
        self.embedder = ProfileEmbedder(encoder, profile)

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column("profile_text").to_pylist()
        features = [np.asarray(f, np.float32) for f in batch.column("features").to_pylist()]
        hashes = batch.column("profile_hash").to_pylist()
        profiles = [Profile(t, f, h) for t, f, h in zip(texts, features, hashes, strict=True)]
        dim = self.embedder.dim
        emb = self.embedder.embed(profiles) if profiles else np.zeros((0, dim), np.float32)
        return pa.table({
            "user_id": batch.column("user_id"), "profile_text": texts, "profile_hash": hashes,
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), dim),
            "encoder": [self.embedder.id] * len(texts),
        }, schema=profiles_schema(dim))


def profiles_dataset(users_uri: str, encoder: str, profile: dict | None = None, actors: int = 1,
                     batch_size: int = 256) -> ray.data.Dataset:
    check_schemas(users_uri, "users")  # a bad file is named now, before Ray unifies schemas
    ds = ray.data.read_parquet(users_uri, include_paths=True)
    ds = ds.map_batches(profile_texts, fn_kwargs={"profile": profile or {}, "encoder": encoder},
                        batch_format="pyarrow", batch_size=batch_size)
    return ds.map_batches(Embed, fn_constructor_kwargs={"encoder": encoder, "profile": profile or {}},
                          batch_format="pyarrow",
                          batch_size=batch_size, compute=ActorPoolStrategy(min_size=1, max_size=actors))


def run_profiles(users_uri: str, out: str, encoder: str = "minilm", profile: dict | None = None,
                 actors: int = 1) -> int:
    ensure_ray()
    ds = profiles_dataset(users_uri, encoder, profile, actors)
    with user_errors():
        ds.write_parquet(out)
    return ray.data.read_parquet(out).count()
