"""`p2p profiles`: users Parquet -> profile text -> embedding -> profiles Parquet, on Ray Data.

Streams block by block (no full materialisation, no shuffle): profiles are built in tasks
(`profile_texts`: no model needed), embeddings in an actor pool that loads the encoder once per
actor (`EmbedProfiles`, which the nightly refresh uses too, on its changed users only). Both
call the library's `ProfileEmbedder`, so a profile built here equals one built anywhere else.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy

from p2p.data.schemas import check_schemas, validate
from p2p.profile.embedder import Profile, ProfileEmbedder
from pipelines.ray_setup import ensure_ray, user_errors


def profile_texts(batch: pa.Table, profile: dict, encoder: str) -> pa.Table:
    """Validate the block against the users contract, then build each profile: text, features, hash."""
    source = batch.column("path")[0].as_py() if "path" in batch.column_names and len(batch) else "users"
    users = validate(batch.drop_columns(["path"]) if "path" in batch.column_names else batch, "users", source)
    profiles = ProfileEmbedder(encoder, profile).profiles(users.column("history").to_pylist())
    return pa.table({"user_id": users.column("user_id"), "profile_text": [p.text for p in profiles],
                     "features": pa.array([p.features.tolist() for p in profiles], pa.list_(pa.float32())),
                     "profile_hash": [p.hash for p in profiles], "updated_at": users.column("updated_at")})


class EmbedProfiles:
    """Actor: loads the encoder once; embeds a block's profiles (with a `status` column: the "embed" rows).

    Appends `embedding` (null where not embedded) and drops the `features` it consumed.
    """

    def __init__(self, encoder: str, profile: dict):
        self.embedder = ProfileEmbedder(encoder, profile)

    def __call__(self, batch: pa.Table) -> pa.Table:
        todo = (list(range(len(batch))) if "status" not in batch.column_names
                else [i for i, s in enumerate(batch.column("status").to_pylist()) if s == "embed"])
        texts = batch.column("profile_text").to_pylist()
        features = batch.column("features").to_pylist()
        hashes = batch.column("profile_hash").to_pylist()
        emb = self.embedder.embed([Profile(texts[i], np.asarray(features[i], np.float32), hashes[i]) for i in todo])
        column: list = [None] * len(batch)
        for j, i in enumerate(todo):
            column[i] = emb[j].tolist()
        return batch.drop_columns(["features"]).append_column("embedding",
                                                              pa.array(column, pa.list_(pa.float32())))


def as_profiles(batch: pa.Table, profile: dict, encoder: str) -> pa.Table:
    """An embedded block as the `profiles` table."""
    embedder = ProfileEmbedder(encoder, profile)
    emb = np.asarray(batch.column("embedding").to_pylist(), np.float32).reshape(len(batch), -1)
    return embedder.table(batch.column("user_id").to_pylist(), batch.column("profile_text").to_pylist(),
                          batch.column("profile_hash").to_pylist(), emb)


def profiles_dataset(users_uri: str, encoder: str, profile: dict | None = None, actors: int = 1,
                     batch_size: int = 256) -> ray.data.Dataset:
    check_schemas(users_uri, "users")  # a bad file is named now, before Ray unifies schemas
    settings = {"profile": profile or {}, "encoder": encoder}
    ds = ray.data.read_parquet(users_uri, include_paths=True)
    ds = ds.map_batches(profile_texts, fn_kwargs=settings, batch_format="pyarrow", batch_size=batch_size)
    ds = ds.map_batches(EmbedProfiles, fn_constructor_kwargs=settings, batch_format="pyarrow",
                        batch_size=batch_size, compute=ActorPoolStrategy(min_size=1, max_size=actors))
    return ds.map_batches(as_profiles, fn_kwargs=settings, batch_format="pyarrow", batch_size=batch_size)


def run_profiles(users_uri: str, out: str, encoder: str = "minilm", profile: dict | None = None,
                 actors: int = 1) -> int:
    ensure_ray()
    ds = profiles_dataset(users_uri, encoder, profile, actors)
    with user_errors():
        ds.write_parquet(out)
    return ray.data.read_parquet(out).count()
