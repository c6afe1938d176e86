"""A refresh across `delete-users` (and `--readmit`), and a refresh stopped by SIGTERM, on a local Ray cluster."""

import signal
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from test_store_refresh import N_USERS, _check_every_row, _refresh, _start, _wait_for, write_data40

from p2p.data.schemas import read_table
from p2p.store import AdapterStore, layout
from p2p.store.lease import lease_holder


@pytest.fixture(scope="module")
def data40(tmp_path_factory):
    return write_data40(tmp_path_factory)


# Users for the SIGTERM test: enough that a refresh cannot write them all in the moments between the
# signal and the workers' stop. With 40, a fast machine wrote every one first, and the test then
# checked nothing about stopping mid-run.
N_SIGTERM_USERS = 200


@pytest.fixture(scope="module")
def data200(tmp_path_factory):
    from p2p.data.synthetic import write_synthetic

    out = tmp_path_factory.mktemp("data200")
    write_synthetic(str(out), N_SIGTERM_USERS, seed=7, tasks=("tag",), chunk_size=20)
    return str(out)


def test_refresh_across_delete_users_and_readmit(ray_cluster, data40, tiny_hypernet, tmp_path):
    """Deletion waits for the running refresh, then no later refresh brings the users back unless re-admitted."""
    uri = str(tmp_path / "store")
    users = read_table(f"{data40}/users", "users").column("user_id").to_pylist()
    gone = users[3:8]
    job = _start(ray_cluster, "--hypernet", tiny_hypernet, "--data", data40, "--store", uri)
    store = AdapterStore(uri)
    _wait_for(lambda: lease_holder(store.objects) is not None, job)
    removed = store.delete_users(gone, wait_s=300)  # blocks until the refresh has committed
    assert job.wait(timeout=300) == 0
    assert removed == len(gone)
    assert _check_every_row(uri) == set(users) - set(gone)

    again = _refresh(tiny_hypernet, data40, uri)  # the data still holds the deleted users
    assert again.deleted == len(gone) and not again.committed  # left out, nothing else changed
    assert _check_every_row(uri) == set(users) - set(gone)
    assert not store.objects.list(layout.adapter_prefix(again.hypernet_id, gone[0]))

    back = _refresh(tiny_hypernet, data40, uri, readmit=[gone[0]])
    assert back.committed and back.readmitted == 1 and back.written == 1 and back.deleted == len(gone) - 1
    assert _check_every_row(uri) == set(users) - set(gone[1:])

    # Two users leave the data: the night's layer holds their removal rows, and readers stop serving them.
    left = tmp_path / "left" / "users"
    left.mkdir(parents=True)
    table = read_table(f"{data40}/users", "users")
    pq.write_table(table.filter(pc.invert(pc.is_in(table.column("user_id"), pa.array(users[:2])))), left / "p.parquet")
    dropped = _refresh(tiny_hypernet, str(tmp_path / "left"), uri, max_layers=3)
    assert dropped.committed and dropped.removed == 2 and not dropped.compacted
    assert len(AdapterStore(uri).current().layers()) == 3
    assert _check_every_row(uri) == set(users[2:]) - set(gone[1:])
    assert AdapterStore(uri).current().users == N_USERS - 2 - len(gone[1:])
    # The committed run has max_layers layers: the next night that changes anything rewrites one layer.
    compacted = _refresh(tiny_hypernet, str(tmp_path / "left"), uri, max_layers=3, readmit=[gone[1]])
    assert compacted.committed and compacted.compacted and compacted.written == 1
    assert len(AdapterStore(uri).current().layers()) == 1
    assert _check_every_row(uri) == set(users[2:]) - set(gone[2:])


def test_sigterm_stops_the_driver_its_workers_and_frees_the_lease(ray_cluster, data200, tiny_hypernet, tmp_path):
    uri = str(tmp_path / "store")
    job = _start(ray_cluster, "--hypernet", tiny_hypernet, "--data", data200, "--store", uri)
    folders = tmp_path / "store" / "adapters"
    _wait_for(lambda: sum(1 for _ in folders.rglob("p2p.json")) >= 4, job)
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=60) == 143
    written = sum(1 for _ in folders.rglob("p2p.json"))
    time.sleep(3)
    assert sum(1 for _ in folders.rglob("p2p.json")) == written < N_SIGTERM_USERS  # no orphan kept writing
    store = AdapterStore(uri)
    assert lease_holder(store.objects) is None and store.current() is None
    resumed = _refresh(tiny_hypernet, data200, uri)  # no lease to wait out; the dead run's rows are reused
    assert resumed.committed and resumed.resumed + resumed.written == N_SIGTERM_USERS
    assert _check_every_row(uri) == set(read_table(f"{data200}/users", "users").column("user_id").to_pylist())
