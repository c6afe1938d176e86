"""Commits are atomic, the lease admits one writer, pointers are retried or named: file:// and moto S3."""

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from test_store import _cli, _write, make_store

from p2p.model.hypernet import load_hypernet
from p2p.personalize import Personalizer, publish_hypernet
from p2p.store import (
    AdapterStore,
    Lease,
    LeaseHeld,
    StoreDamaged,
    StoreUnavailable,
    UserDeleted,
    adapter_store,
    layout,
    new_run_id,
)


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    return make_store(request, tmp_path)


def test_readers_never_see_a_partial_commit(store, tiny_hypernet):
    """The issue's reader got 10,597 JSONDecodeErrors in 3,000 commits; atomic pointers give none."""
    hid, run_id, part, _ = _write(store, tiny_hypernet, ["u1", "u2"])
    store.commit(hid, run_id, [part], 2)
    stop, errors, reads = threading.Event(), [], [0]

    def reader():  # through the store: what a server does
        mine = AdapterStore(store.uri)
        while not stop.is_set():
            try:
                assert mine.current().users == 2
                mine.read_adapter("u1")
                reads[0] += 1
            except Exception as exc:  # noqa: BLE001 - any failure is what this test looks for
                errors.append(repr(exc))

    def raw_reader():  # the pointer's bytes as any other tool reads them: no retries to hide a torn write
        mine = AdapterStore(store.uri)
        while not stop.is_set():
            try:
                assert json.loads(mine.objects.read(layout.current(hid)))["users"] == 2
            except Exception as exc:  # noqa: BLE001
                errors.append(repr(exc))

    threads = [threading.Thread(target=reader), threading.Thread(target=raw_reader)]
    for t in threads:
        t.start()
    commits = 300 if store.objects.local else 60
    with store.leased("commit storm") as lease:
        for _ in range(commits):
            store.runs.commit(hid, new_run_id(), [part], 2, lease)
    stop.set()
    for t in threads:
        t.join()
    assert errors == [] and reads[0] > 0, errors[:3]
    assert len(store.runs.history(hid)) == commits + 1


def test_empty_current_is_a_clear_error_and_recover_repairs_it(store, tiny_hypernet, synth_dir):
    hid, first, part1, _ = _write(store, tiny_hypernet, ["u1", "u2"])
    store.commit(hid, first, [part1], 2)
    _, second, part2, _ = _write(store, tiny_hypernet, ["u1", "u2", "u3"])
    store.commit(hid, second, [part2], 3)
    store.fs.pipe_file(store.path(layout.current(hid)), b"")  # what a crash mid-write left before
    store.fs.invalidate_cache()

    with pytest.raises(StoreDamaged, match=r"CURRENT is unreadable \(empty\).*p2p store recover"):
        AdapterStore(store.uri).current()
    r = _cli("store", "stat", "--store", store.uri)
    assert r.returncode == 5 and r.stderr.count("\n") == 1 and "p2p store recover" in r.stderr, r.stderr
    from pipelines.refresh import RefreshConfig, run_refresh

    with pytest.raises(StoreDamaged, match="p2p store recover"):  # refresh stops before writing anything
        run_refresh(RefreshConfig(hypernet=hid, data=synth_dir, store=store.uri))

    r = _cli("store", "recover", "--store", store.uri)
    assert r.returncode == 0 and f"CURRENT -> run {second} (3 users)" in r.stdout, r.stderr
    fresh = AdapterStore(store.uri)
    assert fresh.current().run_id == second and fresh.read_adapter("u3")[1]["run_id"] == second


def test_a_pointer_that_vanishes_for_a_moment_is_retried(tmp_path, tiny_hypernet):
    store = AdapterStore(str(tmp_path / "store"))
    hid, run_id, part, _ = _write(store, tiny_hypernet, ["u1"])
    store.commit(hid, run_id, [part], 1)
    reader = AdapterStore(store.uri)
    assert reader.current().run_id == run_id
    path = store.path(layout.current(hid))
    os.rename(path, path + ".away")
    threading.Timer(0.05, os.rename, (path + ".away", path)).start()
    assert reader.current().run_id == run_id  # retried, not "no commit"
    os.rename(path, path + ".away")
    assert AdapterStore(store.uri).current() is None  # a reader that never saw it: nothing committed
    # One that saw it and finds it gone for good: the store was moved or cut off, not emptied.
    with pytest.raises(StoreUnavailable, match="was there and is gone"):
        reader.current()
    os.rename(path + ".away", path)
    assert reader.current().run_id == run_id


def test_one_lease_holder_at_a_time(store):
    takers, won, refused = 8, [], []
    barrier = threading.Barrier(takers)

    def take(i):
        lease = Lease(AdapterStore(store.uri).objects, f"taker {i}", ttl_s=30)
        barrier.wait()
        try:
            won.append(lease.acquire())
        except LeaseHeld as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=take, args=(i,)) for i in range(takers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == takers - 1
    assert all(f"leased to {won[0].purpose!r} by " in m and f"pid {os.getpid()}" in m for m in refused)
    won[0].release()
    Lease(store.objects, "after release").acquire().release()


def test_a_dead_holders_lease_expires(store):
    """A process that took the lease and died (no release): others wait out its ttl, then take it."""
    code = ("import os, sys; from p2p.store import AdapterStore, Lease; "
            "Lease(AdapterStore(sys.argv[1]).objects, 'doomed run', ttl_s=3).acquire(); print(os.getpid()); os._exit(0)")
    dead = subprocess.run([sys.executable, "-c", code, store.uri], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert dead.returncode == 0, dead.stderr
    with pytest.raises(LeaseHeld, match=f"'doomed run' by .* pid {dead.stdout.strip()}"):
        Lease(store.objects, "impatient").acquire()
    t = time.monotonic()
    lease = Lease(store.objects, "patient", wait_s=30).acquire()
    assert lease.held and time.monotonic() - t < 30
    lease.release()


def test_a_holder_that_lost_its_lease_cannot_commit(store, tiny_hypernet):
    hid, first, part, _ = _write(store, tiny_hypernet, ["u1"])
    store.commit(hid, first, [part], 1)
    stalled = Lease(store.objects, "stalled run", ttl_s=1, heartbeat_s=3600).acquire()  # stops beating
    time.sleep(1.2)
    late = new_run_id()
    with Lease(store.objects, "next run", ttl_s=30), pytest.raises(LeaseHeld, match="lost the lease.*'next run'"):
        store.runs.commit(hid, late, [part], 1, stalled)
    stalled.release()
    assert AdapterStore(store.uri).current().run_id == first
    # ...and leaves no commit record that gc would keep or recover promote.
    assert not store.objects.exists(layout.commit_record(hid, late))
    assert [c.run_id for c in store.runs.history(hid)] == [first]


def test_concurrent_deletes_through_one_store_object_each_hold_the_lease(store, tiny_hypernet, monkeypatch):
    """A server's threads share one store: a delete that began while another held the lease reused that
    lease, the first released it, and the second rewrote manifests holding none (a 500, half deleted)."""
    users = [f"u{i}" for i in range(6)]
    hid, run_id, part, _ = _write(store, tiny_hypernet, users)
    store.commit(hid, run_id, [part], len(users))
    shared, errors, leases, first_holds = AdapterStore(store.uri), [], [], threading.Event()
    delete_users = adapter_store.delete_users

    def slow_delete(store_, ids, lease):  # the first delete holds the lease while the others begin
        leases.append(lease)
        first_holds.set()
        time.sleep(0.5)
        return delete_users(store_, ids, lease)

    monkeypatch.setattr(adapter_store, "delete_users", slow_delete)

    def delete(uid):
        try:
            shared.delete_users([uid])
        except Exception as exc:  # noqa: BLE001 - any failure is what this test looks for
            errors.append(repr(exc))

    threads = [threading.Thread(target=delete, args=(u,)) for u in users[:3]]
    threads[0].start()
    assert first_holds.wait(60)
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len({id(lease) for lease in leases}) == 3  # one lease each, taken in turn
    fresh = AdapterStore(store.uri)
    assert sorted(fresh.manifest_rows(fresh.current())) == users[3:]
    assert all(fresh.is_deleted(u) for u in users[:3])
    Lease(store.objects, "after the deletes").acquire().release()  # nobody left holding it


def test_an_on_demand_build_that_races_a_delete_is_undone(store, tiny_hypernet, monkeypatch):
    """The delete lands after the build checked the tombstones and before it wrote: the build must not win."""
    hypernet, _ = load_hypernet(tiny_hypernet)
    hid = publish_hypernet(store, tiny_hypernet)
    emb = np.random.default_rng(1).standard_normal((1, 384)).astype(np.float32)
    files = Personalizer(hypernet, hid).files(hypernet.user_adapters(emb)[0])
    replica, cli = AdapterStore(store.uri), AdapterStore(store.uri)
    write = replica.write_adapters

    def delete_first(*args, **kwargs):
        cli.delete_users(["racer"])  # another replica or `p2p store delete-users`, in between
        return write(*args, **kwargs)

    monkeypatch.setattr(replica, "write_adapters", delete_first)
    with pytest.raises(UserDeleted):
        replica.write_on_demand(hid, "racer", files, "h-racer", emb[0])
    assert AdapterStore(store.uri).adapter_row("racer", hid) is None
    assert not list(store.objects.list(layout.adapter_prefix(hid, "racer")))


def test_a_lease_write_that_landed_but_whose_retry_was_refused_is_still_ours(store, monkeypatch):
    """A client retry of a conditional write that had succeeded reads "already exists": the lease is ours."""
    objects = AdapterStore(store.uri).objects
    create, replace = objects.create, objects.replace
    monkeypatch.setattr(objects, "create", lambda rel, data: (create(rel, data), None)[1])
    lease = Lease(objects, "retried take", ttl_s=30).acquire()  # it once blocked itself for the ttl here
    assert lease.held
    monkeypatch.setattr(objects, "replace", lambda rel, data, version: (replace(rel, data, version), None)[1])
    lease._renew()  # a heartbeat whose retry was refused
    assert lease.held
    monkeypatch.setattr(objects, "replace", replace)
    lease.check()
    lease.release()
    Lease(objects, "after it").acquire().release()  # released for real: the next taker gets it at once


def test_a_waiting_taker_gets_the_lease_once_released(store):
    holder = Lease(store.objects, "first", ttl_s=30).acquire()
    got = []
    waiter = threading.Thread(target=lambda: got.append(Lease(store.objects, "second", wait_s=20).acquire()))
    waiter.start()
    time.sleep(0.5)
    assert not got
    holder.release()
    waiter.join()
    assert got and got[0].held
    got[0].release()


def test_concurrent_on_demand_builds_converge_to_one_adapter(store, tiny_hypernet):
    """N replicas making the same new user's adapter at once: one record, one folder, no torn JSON."""
    hypernet, _ = load_hypernet(tiny_hypernet)
    hid = publish_hypernet(store, tiny_hypernet)
    emb = np.random.default_rng(1).standard_normal((1, 384)).astype(np.float32)
    files = Personalizer(hypernet, hid).files(hypernet.user_adapters(emb)[0])
    builders, barrier, errors, stop = 12, threading.Barrier(12), [], threading.Event()

    def build():
        replica = AdapterStore(store.uri)
        barrier.wait()
        try:
            replica.write_on_demand(hid, "newbie", files, "h-newbie", emb[0])
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc))

    def read():
        replica = AdapterStore(store.uri)
        while not stop.is_set():
            try:
                if replica.adapter_row("newbie", hid) is not None:
                    assert replica.read_adapter("newbie", hid)[0] == files
            except Exception as exc:  # noqa: BLE001
                errors.append(repr(exc))

    reader = threading.Thread(target=read)
    reader.start()
    threads = [threading.Thread(target=build) for _ in range(builders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    reader.join()
    assert errors == [], errors[:3]
    listed = store.objects.list(layout.adapter_prefix(hid, "newbie"))
    assert len({layout.adapter_folder_of(rel) for rel in listed}) == 1  # one folder, not one per build
    records = [r for r in store.objects.list(layout.on_demand_root(hid)) if r.endswith(".json")]
    assert len(records) == 1
    record = json.loads(store.objects.read(records[0]))
    assert record["adapter_uri"] == layout.adapter_folder_of(next(iter(listed)))
    assert AdapterStore(store.uri).read_adapter("newbie", hid)[0] == files


def test_a_server_store_answers_from_the_index_it_holds_while_a_new_commit_is_read(tmp_path, tiny_hypernet,
                                                                                   monkeypatch):
    """A refresh or an API delete commits again; a server's reads must not wait for the new manifest."""
    from store_support import commit_embeddings

    from p2p.store import manifest

    writer = AdapterStore(str(tmp_path / "store"))
    _, hid, _ = commit_embeddings(writer, tiny_hypernet, ["u0", "u1"])
    server = AdapterStore(writer.uri, index_in_background=True)
    first = server.adapter_row("u0")["run_id"]  # the first index is built in place: nothing older to answer from
    gate, reading = threading.Event(), threading.Event()
    real_init = manifest.ManifestIndex.__init__

    def slow_init(self, *args, **kwargs):
        reading.set()
        assert gate.wait(60)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(manifest.ManifestIndex, "__init__", slow_init)
    commit_embeddings(writer, tiny_hypernet, ["u0", "u1", "u2"])
    newest = writer.current(hid).run_id
    answers = []
    reader = threading.Thread(target=lambda: answers.extend(server.adapter_row(u) for u in ("u0", "u2")))
    reader.start()
    assert reading.wait(60)
    reader.join(60)  # it returns while the new manifest is still being read
    assert not reader.is_alive() and answers[0]["run_id"] == first and answers[1] is None
    gate.set()
    deadline = time.monotonic() + 60
    while server.adapter_row("u2") is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert server.adapter_row("u0")["run_id"] == server.adapter_row("u2")["run_id"] == newest
    # A store that is not a server's sees its own commit at once.
    assert AdapterStore(writer.uri).adapter_row("u2")["run_id"] == newest


def test_a_failed_background_index_build_is_retried_after_a_pause_not_on_every_read(tmp_path, tiny_hypernet,
                                                                                    monkeypatch):
    from store_support import commit_embeddings

    from p2p.store import manifest

    writer = AdapterStore(str(tmp_path / "store"))
    commit_embeddings(writer, tiny_hypernet, ["u0"])
    server = AdapterStore(writer.uri, index_in_background=True)
    assert server.adapter_row("u0") is not None
    builds, real_init = [], manifest.ManifestIndex.__init__

    def failing_init(self, *args, **kwargs):
        builds.append(1)
        raise StoreDamaged("a part is missing")

    monkeypatch.setattr(manifest.ManifestIndex, "__init__", failing_init)
    commit_embeddings(writer, tiny_hypernet, ["u0", "u1"])

    def settle():
        deadline = time.monotonic() + 60
        while server._index_building is not None:
            assert time.monotonic() < deadline
            time.sleep(0.02)

    for _ in range(5):  # the held index answers; one build was tried, and is not tried again at once
        assert server.adapter_row("u0") is not None and server.adapter_row("u1") is None
        settle()
    assert len(builds) == 1
    monkeypatch.setattr(adapter_store, "INDEX_RETRY_S", 0.0)
    monkeypatch.setattr(manifest.ManifestIndex, "__init__", real_init)
    server.adapter_row("u0")
    settle()
    assert server.adapter_row("u1") is not None  # the retry built the new commit's index
