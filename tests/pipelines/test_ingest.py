"""`p2p profiles` on Ray Data equals the in-process profile build, and names bad files."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from p2p.data.schemas import read_table
from p2p.errors import P2PError
from p2p.profile.config import ProfileConfig
from p2p.profile.embedder import ProfileEmbedder, build_profiles


def test_profiles_job_matches_local_build(ray_cluster, synth_dir, tmp_path):
    from pipelines.ingest import run_profiles

    profile = {"max_chars": 900, "features": 16}  # text embedding + label statistics
    n = run_profiles(f"{synth_dir}/users", str(tmp_path / "profiles"), "hashing", profile, actors=2)
    got = read_table(str(tmp_path / "profiles"), "profiles").sort_by("user_id")
    want = build_profiles(synth_dir, ProfileEmbedder("hashing", ProfileConfig(**profile))).sort_by("user_id")
    assert n == got.num_rows == want.num_rows == 120
    assert got.column("encoder")[0].as_py() == "hashing|max_chars=900,features=16"
    assert len(got.column("embedding")[0]) == 384 + 16
    assert got.column("profile_hash").equals(want.column("profile_hash"))
    np.testing.assert_array_equal(np.stack(got.column("embedding").to_numpy(zero_copy_only=False)),
                                  np.stack(want.column("embedding").to_numpy(zero_copy_only=False)))


def test_profiles_job_names_the_bad_file(ray_cluster, synth_dir, tmp_path):
    from pipelines.ingest import run_profiles

    users = tmp_path / "users"
    users.mkdir()
    good = pq.read_table(f"{synth_dir}/users/part-00000.parquet")
    pq.write_table(good, users / "a.parquet")
    pq.write_table(pa.table({"user_id": ["x"], "history": [[]], "updated_at": ["soon"]}), users / "b.parquet")
    with pytest.raises(P2PError, match=r"b\.parquet: column 'updated_at' has type string"):
        run_profiles(str(users), str(tmp_path / "out"), "hashing")


def test_row_error_inside_the_job_is_one_clear_line(ray_cluster, synth_dir, tmp_path):
    """A duplicate user passes the footer check and is caught per block inside a Ray task."""
    from pipelines.ingest import run_profiles

    users = tmp_path / "users"
    users.mkdir()
    good = pq.read_table(f"{synth_dir}/users/part-00000.parquet").slice(0, 3)
    pq.write_table(pa.concat_tables([good, good.slice(1, 1)]), users / "dup.parquet")
    with pytest.raises(P2PError) as err:
        run_profiles(str(users), str(tmp_path / "out"), "hashing")
    assert "dup.parquet: column 'user_id' has duplicate value" in str(err.value)
    assert "\n" not in str(err.value)
