"""Two refreshes at once, on a local Ray cluster, file:// and moto S3.

The second driver runs in a subprocess on the same cluster, as a second scheduler would start it.
The helpers here are shared with tests/test_store_lifecycle.py.
"""

import os
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from p2p.data.schemas import read_table
from p2p.store import AdapterStore, LeaseHeld
from p2p.store.lease import lease_holder
from pipelines.refresh import RefreshConfig

N_USERS = 40


def write_data40(tmp_path_factory) -> str:
    from p2p.data.synthetic import write_synthetic

    out = tmp_path_factory.mktemp("data40")
    write_synthetic(str(out), N_USERS, seed=7, tasks=("tag",), chunk_size=20)
    return str(out)


@pytest.fixture(scope="module")
def data40(tmp_path_factory):
    return write_data40(tmp_path_factory)


def _refresh(hypernet, data, store, **kw):
    from pipelines.refresh import run_refresh

    return run_refresh(RefreshConfig(hypernet=hypernet, data=data, store=store, batch_size=8, **kw))


def _changed(data, out, users, item="A brand new horror film."):
    table = read_table(f"{data}/users", "users")
    rows = table.to_pylist()
    for r in rows:
        if r["user_id"] in users:
            r["history"].append({"item_id": "new", "text": item, "label": "scary", "ts": 1})
    os.makedirs(f"{out}/users", exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), f"{out}/users/part-0.parquet")
    return out


def _start(ray_cluster, *args):
    """`p2p refresh` as a second driver on the test's cluster (a job another scheduler started)."""
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address, PYTHONPATH=os.getcwd())
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", "refresh", "--batch-size", "2", *args], env=env,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, job, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if job.poll() is not None:
            raise AssertionError(f"the refresh ended first (rc {job.returncode}): {job.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError("timed out")


def _check_every_row(uri):
    store = AdapterStore(uri)
    manifest = store.manifest(store.current(), ["user_id"])
    for uid in manifest.column("user_id").to_pylist():
        store.read_adapter(uid)  # exists and passes its digest
    return set(manifest.column("user_id").to_pylist())


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_two_refreshes_at_once(kind, ray_cluster, data40, tiny_hypernet, tmp_path, request):
    """The second refresh does not join the first's run: it exits naming the holder, or waits its turn."""
    uri = f"file://{tmp_path}/store" if kind == "file" else request.getfixturevalue("moto_s3")()
    users = read_table(f"{data40}/users", "users").column("user_id").to_pylist()
    other = _changed(data40, str(tmp_path / "other"), set(users[::2]))
    first = _start(ray_cluster, "--hypernet", tiny_hypernet, "--data", data40, "--store", uri)
    store = AdapterStore(uri)
    _wait_for(lambda: lease_holder(store.objects) is not None, first)
    holder = lease_holder(store.objects)
    assert holder.owner.endswith(f"pid {first.pid}") and holder.purpose.startswith("refresh")

    with pytest.raises(LeaseHeld, match=f"leased to 'refresh .*' by .* pid {first.pid}"):
        _refresh(tiny_hypernet, other, uri)
    second = _refresh(tiny_hypernet, other, uri, lease_wait_s=300)  # waits, then runs on top of the first
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    assert second.committed and second.changed == len(users[::2]) and second.unchanged == N_USERS - len(users[::2])
    assert AdapterStore(uri).current().run_id == second.run_id
    assert _check_every_row(uri) == set(users)
