"""The server's record of users' histories: events merge by item_id, concurrently, and leave with the user."""

import threading

import pytest
from test_store import _write, make_store

from p2p.store import AdapterStore


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    return make_store(request, tmp_path)


def item(i: int) -> dict:
    return {"item_id": f"i{i}", "text": f"A film number {i}.", "label": "scary", "ts": 1000 + i}


def test_events_merge_once_each_and_concurrent_writers_lose_nothing(store):
    histories = store.histories
    assert histories.extend("u1", [item(1)]) is None  # no record: nothing to extend
    histories.put("u1", [item(0), item(1)])
    history, added = histories.extend("u1", [item(1), item(2)])
    assert added == 1 and [h["item_id"] for h in history] == ["i0", "i1", "i2"]
    assert histories.extend("u1", [item(2)])[1] == 0  # sent twice, added once
    # Eight replicas' events for one user at once: every item lands (conditional writes, retried).
    barrier, errors = threading.Barrier(8), []

    def writer(i: int) -> None:
        mine = AdapterStore(store.uri).histories
        barrier.wait()
        try:
            mine.extend("u1", [item(10 + i)])
        except Exception as exc:  # noqa: BLE001 - any failure is what this test looks for
            errors.append(repr(exc))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert {h["item_id"] for h in histories.read("u1")} == {"i0", "i1", "i2", *(f"i{10 + i}" for i in range(8))}
    assert histories.has(histories.keys(), "u1") and not histories.has(histories.keys(), "u2")


def test_a_deleted_user_takes_their_recorded_history_along(store, tiny_hypernet):
    hid, run_id, part, _ = _write(store, tiny_hypernet, ["u1", "u2"])
    store.commit(hid, run_id, [part], 2)
    store.histories.put("u1", [item(0)])
    store.delete_users(["u1"])
    assert store.histories.read("u1") is None and store.histories.keys() == set()
