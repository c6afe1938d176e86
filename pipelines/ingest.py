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
from p2p.encoder import ProfileEncoder
from p2p.profile import ProfileConfig, build_profile, profile_hash
from pipelines.ray_setup import ensure_ray, user_errors


def profile_texts(batch: pa.Table, profile: dict) -> pa.Table:
    """Validate the block against the users contract, then build each profile text."""
    source = batch.column("path")[0].as_py() if "path" in batch.column_names and len(batch) else "users"
    users = validate(batch.drop_columns(["path"]) if "path" in batch.column_names else batch, "users", source)
    config = ProfileConfig(**profile)
    texts = [build_profile(h, config) for h in users.column("history").to_pylist()]
    return pa.table({"user_id": users.column("user_id"), "profile_text": texts,
                     "updated_at": users.column("updated_at")})


class Embed:
    """Actor: loads the encoder once, embeds blocks of profile texts."""

    def __init__(self, encoder: str):
        self.encoder = ProfileEncoder(encoder)

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column("profile_text").to_pylist()
        emb = self.encoder.encode(texts) if texts else np.zeros((0, self.encoder.dim), np.float32)
        eid = self.encoder.encoder_id
        return pa.table({
            "user_id": batch.column("user_id"), "profile_text": texts,
            "profile_hash": [profile_hash(t, eid) for t in texts],
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), self.encoder.dim),
            "encoder": [eid] * len(texts),
        }, schema=profiles_schema(self.encoder.dim))


def profiles_dataset(users_uri: str, encoder: str, profile: dict | None = None, actors: int = 1,
                     batch_size: int = 256) -> ray.data.Dataset:
    check_schemas(users_uri, "users")  # a bad file is named now, before Ray unifies schemas
    ds = ray.data.read_parquet(users_uri, include_paths=True)
    ds = ds.map_batches(profile_texts, fn_kwargs={"profile": profile or {}}, batch_format="pyarrow",
                        batch_size=batch_size)
    return ds.map_batches(Embed, fn_constructor_kwargs={"encoder": encoder}, batch_format="pyarrow",
                          batch_size=batch_size, compute=ActorPoolStrategy(min_size=1, max_size=actors))


def run_profiles(users_uri: str, out: str, encoder: str = "minilm", profile: dict | None = None,
                 actors: int = 1) -> int:
    ensure_ray()
    ds = profiles_dataset(users_uri, encoder, profile, actors)
    with user_errors():
        ds.write_parquet(out)
    return ray.data.read_parquet(out).count()
