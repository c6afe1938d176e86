"""`p2p refresh` on a local Ray cluster, into a file store and into S3 (moto server, real HTTP)."""

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from numerics import HYPERNET_DEPTH, assert_same_function
from peft import PeftModel

from p2p.data.schemas import read_table
from p2p.errors import P2PError
from p2p.model.base import build_tiny_random
from p2p.model.files import ADAPTER_WEIGHTS
from p2p.model.peft_format import adapter_from_files, load_peft
from p2p.personalize import Personalizer, StoredAdapters
from p2p.store import AdapterStore
from p2p.userkey import user_key
from pipelines.refresh import RefreshConfig

N_USERS = 300


@pytest.fixture(scope="module")
def data300(tmp_path_factory):
    from p2p.data.synthetic import write_synthetic

    out = tmp_path_factory.mktemp("data300")
    write_synthetic(str(out), N_USERS, seed=5, tasks=("tag",), chunk_size=100)
    return str(out)


def _refresh(hypernet, data, store, **kw):
    from pipelines.refresh import run_refresh

    return run_refresh(RefreshConfig(hypernet=hypernet, data=data, store=store, batch_size=32, **kw))


def _adapter_uris(store):
    manifest = store.manifest(store.current(), ["user_id", "adapter_uri"])
    return dict(zip(manifest.column("user_id").to_pylist(), manifest.column("adapter_uri").to_pylist(), strict=True))


def _change_histories(data, out, users):
    """A copy of `data` where `users` got one more history item."""
    table = read_table(f"{data}/users", "users")
    rows = table.to_pylist()
    for r in rows:
        if r["user_id"] in users:
            r["history"].append({"item_id": "new", "text": "A brand new horror film.", "label": "scary", "ts": 1})
    os.makedirs(f"{out}/users", exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), f"{out}/users/part-0.parquet")
    return out


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_refresh_is_incremental_and_equals_p2p_generate(kind, ray_cluster, data300, tiny_hypernet, tmp_path,
                                                        request):
    uri = f"file://{tmp_path}/store" if kind == "file" else request.getfixturevalue("moto_s3")()
    first = _refresh(tiny_hypernet, data300, uri)
    assert (first.users_seen, first.changed, first.written, first.failed, first.committed) == (N_USERS,) * 3 + (0, True)
    store = AdapterStore(uri)
    committed = store.current()
    assert committed.users == N_USERS and committed.run_id == first.run_id

    users = read_table(f"{data300}/users", "users").column("user_id").to_pylist()
    # Every adapter equals `p2p generate`'s for that user (float rounding aside: other batch shapes);
    # over S3 a sample, since the file store has checked every user through the same code.
    Personalizer.from_checkpoint(tiny_hypernet).write_folders(data300, str(tmp_path / "gen"), users=users if kind == "file" else users[:10])
    for uid in users if kind == "file" else users[:10]:
        got, _ = adapter_from_files(store.read_adapter(uid)[0])
        want, _ = load_peft(str(tmp_path / "gen" / user_key(uid)))
        assert got.keys() == want.keys()
        for path in want:
            for g, w in zip(got[path], want[path], strict=True):
                assert_same_function(g, w, HYPERNET_DEPTH, what=f"{uid} {path}")
    for uid in users[:2]:  # and peft itself loads them
        StoredAdapters(store).fetch(uid, str(tmp_path / "peft" / uid))
        PeftModel.from_pretrained(build_tiny_random(0), str(tmp_path / "peft" / uid))

    changed = set(users[10:30])
    before = _adapter_uris(store)
    second_data = _change_histories(data300, str(tmp_path / "changed"), changed)
    second = _refresh(tiny_hypernet, second_data, uri)
    assert (second.changed, second.written, second.unchanged, second.committed) == (20, 20, N_USERS - 20, True)
    store = AdapterStore(uri)
    after = _adapter_uris(store)
    assert {u for u in users if after[u] != before[u]} == changed
    layers = store.current().layers()  # the night wrote a layer of its 20 changes over the first night's rows
    assert len(layers) == 2 and sum(len(t) for t in store.manifests.read_parts(layers[-1], ["user_id"])) == 20
    assert store.current().users == N_USERS

    third = _refresh(tiny_hypernet, second_data, uri)
    assert (third.changed, third.written, third.committed) == (0, 0, False)
    assert AdapterStore(uri).current().run_id == second.run_id
    assert not store.fs.exists(store.path(f"manifests/{second.hypernet_id}/PENDING"))
    if kind == "file":  # --adapter-dtype bfloat16 --full: every user rewritten at half the bytes, same adapter
        half = _refresh(tiny_hypernet, second_data, uri, full=True, adapter_dtype="bfloat16")
        assert half.written == N_USERS and half.compacted and len(AdapterStore(uri).current().layers()) == 1
        uid = users[0]
        files = AdapterStore(uri).read_adapter(uid)[0]
        got, _ = adapter_from_files(files)
        want, _ = load_peft(str(tmp_path / "gen" / user_key(uid)))
        for path in want:
            for g, w in zip(got[path], want[path], strict=True):
                assert (g - w).abs().max() <= w.abs().max() * 2**-8  # within bf16 rounding
        full_size = os.path.getsize(tmp_path / "gen" / user_key(uid) / ADAPTER_WEIGHTS)
        assert len(files[ADAPTER_WEIGHTS]) < 0.6 * full_size


def test_a_night_whose_data_predates_an_event_keeps_the_event(ray_cluster, data300, tiny_hypernet, tmp_path):
    """The server recorded a user's event; the nightly data lacks it: the refresh unions it in, once."""
    uri = f"file://{tmp_path}/store"
    _refresh(tiny_hypernet, data300, uri)
    store = AdapterStore(uri)
    rows = {r["user_id"]: r["history"] for r in read_table(f"{data300}/users", "users").to_pylist()}
    uid = sorted(rows)[0]
    event = {"item_id": "event-1", "text": "A brand new horror film seen today.", "label": "scary", "ts": 1_800_000_000}
    store.histories.put(uid, rows[uid] + [event])  # what POST .../events leaves behind
    second = _refresh(tiny_hypernet, data300, uri)
    assert (second.changed, second.written) == (1, 1)  # that user only: the event is in their profile now
    embedder = Personalizer.from_checkpoint(tiny_hypernet).embedder
    [merged] = embedder.profiles([rows[uid] + [event]])
    assert AdapterStore(uri).adapter_row(uid)["profile_hash"] == merged.hash
    assert _refresh(tiny_hypernet, data300, uri).changed == 0  # and it is not applied a second time


def test_killed_refresh_resumes_and_readers_keep_the_old_run(ray_cluster, data300, tiny_hypernet, tmp_path):
    uri = str(tmp_path / "store")
    first = _refresh(tiny_hypernet, data300, uri)
    data = _change_histories(data300, str(tmp_path / "changed"), set(
        read_table(f"{data300}/users", "users").column("user_id").to_pylist()))  # everyone changed
    store = AdapterStore(uri)
    hid = first.hypernet_id
    seen_runs, errors, stop = set(), [], threading.Event()

    def reader():  # a server reading through CURRENT while the refresh runs and dies
        reader_store = AdapterStore(uri)
        while not stop.is_set():
            try:
                seen_runs.add(reader_store.current().run_id)
                reader_store.read_adapter("u0000007")
            except Exception as exc:  # noqa: BLE001 - any failure is what this test looks for
                errors.append(repr(exc))
            time.sleep(0.02)

    thread = threading.Thread(target=reader)
    thread.start()
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    job = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "refresh", "--hypernet", tiny_hypernet, "--data", data,
                            "--store", uri, "--batch-size", "4", "--lease-ttl", "4"], env=env, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    adapters = tmp_path / "store" / "adapters" / hid
    # Its first write comes after a Python start, two Ray Data passes and a shuffle: past 120 s on a
    # loaded CI machine, so the wait is long and its end is named.
    deadline = time.time() + 600
    while sum(1 for _ in adapters.rglob("p2p.json")) <= N_USERS and job.poll() is None:  # until the new run writes
        assert time.time() < deadline, "the refresh wrote nothing in 600 s"
        time.sleep(0.1)  # each look lists ~300 folders: looking more often takes CPU from the refresh
    assert job.poll() is None, "the refresh finished before it could be killed"
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    time.sleep(2)
    written_by_dead_run = sum(1 for _ in adapters.rglob("p2p.json")) - N_USERS
    stop.set()
    thread.join()
    assert errors == [] and seen_runs == {first.run_id}
    assert 0 < written_by_dead_run < N_USERS, written_by_dead_run
    assert AdapterStore(uri).current().run_id == first.run_id

    # The dead driver's lease outlives it by its ttl; the rerun waits for it, then starts a run of
    # its own that reuses the rows the dead run finished (no per-user store checks).
    resumed = _refresh(tiny_hypernet, data, uri, lease_wait_s=30)
    assert resumed.committed and resumed.resumed > 0 and resumed.resumed + resumed.written == N_USERS
    store = AdapterStore(uri)
    committed = store.current()
    assert committed.run_id == resumed.run_id != first.run_id and committed.users == N_USERS
    assert store.runs.pending(hid) is None
    manifest = store.manifest(committed)
    assert sorted(manifest.column("user_id").to_pylist()) == sorted(
        read_table(f"{data}/users", "users").column("user_id").to_pylist())
    for uid in manifest.column("user_id").to_pylist():
        store.read_adapter(uid)  # every row's adapter exists and passes its digest


def test_bad_file_fails_before_anything_is_written(ray_cluster, data300, tiny_hypernet, tmp_path):
    users = tmp_path / "bad" / "users"
    users.mkdir(parents=True)
    pq.write_table(pq.read_table(f"{data300}/users/part-00000.parquet"), users / "good.parquet")
    pq.write_table(pa.table({"user_id": ["x"], "history": [[]], "updated_at": ["soon"]}), users / "broken.parquet")
    with pytest.raises(P2PError, match=r"broken\.parquet: column 'updated_at'"):
        _refresh(tiny_hypernet, str(tmp_path / "bad"), str(tmp_path / "store"))
    assert not (tmp_path / "store").exists()


def test_hostile_and_empty_ids(ray_cluster, data300, tiny_hypernet, tmp_path):
    table = read_table(f"{data300}/users", "users").slice(0, 5)
    ids = ["../escape", "a/b", "", "ctl\x07", "Zoë"]
    users = tmp_path / "hostile" / "users"
    users.mkdir(parents=True)
    pq.write_table(table.set_column(0, "user_id", pa.array(ids)), users / "part.parquet")
    uri = str(tmp_path / "store")
    summary = _refresh(tiny_hypernet, str(tmp_path / "hostile"), uri)
    assert (summary.written, summary.failed, summary.committed) == (4, 1, True)
    assert "non-empty" in summary.failures[0]
    store = AdapterStore(uri)
    histories = table.column("history").to_pylist()
    for uid in [i for i in ids if i]:
        _, row = store.read_adapter(uid)
        assert row["user_id"] == uid
    assert len({tuple(np.round(store.embedding(u), 6)) for u in ids if u}) == 4 == len(histories) - 1
    for p in (tmp_path / "store").rglob("*"):
        assert p.resolve().is_relative_to((tmp_path / "store").resolve())
