"""Refresh guards and modes: bad input never wipes or corrupts the store; embeddings-only refreshes.

Empty users file, duplicate ids across files, a missing bucket, a held lease and a Ray that will
not start, each with the exit code jobs/README.md gives it; then the embeddings-only mode and the
switches between modes, on a local Ray cluster.
"""

import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from numerics import HYPERNET_DEPTH, assert_same_function
from test_store_refresh import N_USERS, _check_every_row, _refresh, write_data40

from p2p.data.schemas import DataError, read_table
from p2p.errors import P2PError
from p2p.model.peft_format import adapter_from_files
from p2p.personalize import StoredAdapters
from p2p.store import AdapterStore, Lease, StoreUnavailable


@pytest.fixture(scope="module")
def data40(tmp_path_factory):
    return write_data40(tmp_path_factory)


def _cli_refresh(*args, env=None):
    env = dict(os.environ if env is None else env, PYTHONPATH=os.getcwd())
    return subprocess.run([sys.executable, "-m", "pipelines.cli", "refresh", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def test_an_empty_users_file_does_not_wipe_the_store(ray_cluster, data40, tiny_hypernet, tmp_path):
    uri = str(tmp_path / "store")
    first = _refresh(tiny_hypernet, data40, uri)
    empty = tmp_path / "empty" / "users"
    empty.mkdir(parents=True)
    pq.write_table(read_table(f"{data40}/users", "users").slice(0, 0), empty / "part-0.parquet")
    with pytest.raises(P2PError, match=f"would remove {N_USERS} of {N_USERS} committed users.*--allow-mass-removal"):
        _refresh(tiny_hypernet, str(tmp_path / "empty"), uri)
    assert AdapterStore(uri).current().run_id == first.run_id  # nothing committed
    wiped = _refresh(tiny_hypernet, str(tmp_path / "empty"), uri, allow_mass_removal=True)  # said explicitly
    assert wiped.committed and wiped.removed == N_USERS and AdapterStore(uri).current().users == 0


def test_duplicate_ids_across_files_are_named_before_anything_is_written(ray_cluster, data40, tiny_hypernet, tmp_path):
    users = tmp_path / "dup" / "users"
    users.mkdir(parents=True)
    table = read_table(f"{data40}/users", "users")
    pq.write_table(table.slice(0, 10), users / "a.parquet")
    pq.write_table(table.slice(9, 10), users / "b.parquet")  # row 9 of a.parquet is row 0 here
    dup = table.column("user_id")[9].as_py()
    with pytest.raises(DataError, match=rf"{dup!r} appears twice.*a\.parquet row 9 and .*b\.parquet row 0"):
        _refresh(tiny_hypernet, str(tmp_path / "dup"), str(tmp_path / "store"))
    store = AdapterStore(str(tmp_path / "store"))  # the guards ran before any run began: no run, no adapter
    assert store.current() is None and not store.objects.list("adapters") and not store.objects.list("manifests")


def test_missing_bucket_held_lease_and_ray_failure_exit_codes(data40, tiny_hypernet, tmp_path, moto_s3):
    uri = moto_s3()
    with pytest.raises(StoreUnavailable, match="does not exist"):
        _refresh(tiny_hypernet, data40, uri.replace("s3://", "s3://typo-"))
    r = _cli_refresh("--hypernet", tiny_hypernet, "--data", data40, "--store", uri.replace("s3://", "s3://typo-"))
    assert r.returncode == 4 and r.stderr.count("\n") == 1 and "--create" in r.stderr, r.stderr

    store = AdapterStore(str(tmp_path / "store"))
    with Lease(store.objects, "a refresh elsewhere", ttl_s=60):
        r = _cli_refresh("--hypernet", tiny_hypernet, "--data", data40, "--store", store.uri)
    assert r.returncode == 3 and r.stderr.count("\n") == 1 and "'a refresh elsewhere' by" in r.stderr, r.stderr

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = _cli_refresh("--hypernet", tiny_hypernet, "--data", data40, "--store", store.uri,
                     env={**env, "P2P_RAY_CPUS": "-1"})
    assert r.returncode == 6 and "could not start a local Ray cluster" in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("p2p refresh: error: could not start")
    assert Lease(store.objects, "next").acquire().held  # the failed run let go of the lease


def test_embeddings_only_refresh_and_switching_modes(ray_cluster, data40, tiny_hypernet, tmp_path):
    uri = str(tmp_path / "store")
    users = read_table(f"{data40}/users", "users").column("user_id").to_pylist()
    emb_run = _refresh(tiny_hypernet, data40, uri, mode="embeddings")
    assert (emb_run.committed, emb_run.written, emb_run.mode) == (True, N_USERS, "embeddings")
    store = AdapterStore(uri)
    assert not store.objects.list("adapters") and store.current().mode == "embeddings"
    stored = StoredAdapters(store)  # an embeddings-only row becomes its adapter through the row's hypernet
    generated = {u: adapter_from_files(stored.read(u)[0])[0] for u in users[:5]}

    # To adapters: same profiles, so nothing is embedded again; folders are made from the stored embeddings.
    folders = _refresh(tiny_hypernet, data40, uri, mode="adapters")
    assert (folders.changed, folders.regenerated, folders.written, folders.committed) == (0, N_USERS, N_USERS, True)
    assert _check_every_row(uri) == set(users)
    store = AdapterStore(uri)
    for u, want in generated.items():
        got, row = store.read_adapter(u)
        assert row["mode"] == "adapters"
        got = adapter_from_files(got)[0]
        for path in want:
            for a, b in zip(got[path], want[path], strict=True):
                assert_same_function(a, b, HYPERNET_DEPTH, what=f"{u} {path}")

    # And back: rows drop their folders (gc frees them), nothing is generated.
    back = _refresh(tiny_hypernet, data40, uri, mode="embeddings")
    assert (back.committed, back.written, back.unchanged) == (True, 0, N_USERS)
    table = AdapterStore(uri).manifest(AdapterStore(uri).current())
    assert table.column("adapter_uri").null_count == N_USERS and pa.types.is_fixed_size_list(
        table.schema.field("embedding").type)
