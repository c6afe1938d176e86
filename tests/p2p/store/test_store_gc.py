"""`p2p store gc` and complete deletion, on file:// and moto S3 (no Ray: runs are written through the library)."""

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_store import _cli, make_store

from p2p.model.hypernet import load_hypernet
from p2p.personalize import Personalizer, publish_hypernet
from p2p.store import AdapterStore, UserDeleted, layout, user_hash
from p2p.store.gc import collect_garbage
from p2p.userkey import user_key

FORGET = "user-to-forget-7f3a"

@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    return make_store(request, tmp_path)


class Runs:
    """Commits runs the way a refresh does: changed users get new folders, the rest carry their rows."""

    def __init__(self, store, hypernet_dir):
        self.store = store
        self.hypernet, _ = load_hypernet(hypernet_dir)
        self.hid = publish_hypernet(store, hypernet_dir)
        self.rng = np.random.default_rng(0)
        self.embeddings: dict[str, list[np.ndarray]] = {}
        self.hashes: dict[str, list[str]] = {}

    def write(self, changed: list[str], carried: list[str], commit: bool = True) -> str:
        run_id = self.store.begin(self.hid)
        emb = self.rng.standard_normal((len(changed), 384)).astype(np.float32)
        items = []
        for uid, a, e in zip(changed, self.hypernet.user_adapters(emb), emb, strict=True):
            phash = f"profile-{uid}-{len(self.hashes.get(uid, []))}-{self.rng.integers(1 << 30):x}"
            self.embeddings.setdefault(uid, []).append(e)
            self.hashes.setdefault(uid, []).append(phash)
            items.append((uid, Personalizer(self.hypernet, self.hid).files(a), phash, e))
        rows = self.store.write_adapters(self.hid, run_id, items)
        committed = self.store.current(self.hid)
        if committed is not None and carried:
            old = self.store.manifest(committed).to_pylist()
            rows += [r for r in old if r["user_id"] in set(carried)]
        part = self.store.write_manifest_part(self.hid, run_id, rows, 384)
        if commit:
            self.store.commit(self.hid, run_id, [part], len(rows))
        else:
            self.store._release_implicit()  # the run "died": PENDING stays, its lease expires
        return run_id


def _listing(store):
    return {rel: info for rel, info in store.objects.list("").items() if not rel.endswith(".lock") and rel != "LEASE"}


def test_gc_frees_what_no_kept_run_points_at(store, tiny_hypernet):
    users = [f"u{i:02d}" for i in range(20)]
    runs = Runs(store, tiny_hypernet)
    runs.write(users, [])
    for night in range(1, 5):  # 10% churn a night
        changed = users[2 * night: 2 * night + 2]
        runs.write(changed, [u for u in users if u not in changed])
    committed = store.current(runs.hid)
    store.objects.write(f"{layout.run_dir(runs.hid, committed.run_id)}/part-stray.parquet",
                        store.objects.read(committed.parts[0]))  # a retried block's extra part
    emb = np.stack([np.full(384, 0.1, np.float32), np.full(384, -0.1, np.float32)])
    for adapter, e in zip(runs.hypernet.user_adapters(emb), emb, strict=True):  # the second supersedes
        store.write_on_demand(runs.hid, "newcomer", Personalizer(runs.hypernet, runs.hid).files(adapter), "h", e)
    before = _listing(store)
    live = {r["adapter_uri"] for r in store.manifest(committed).to_pylist()}
    folders = {layout.adapter_folder_of(rel) for rel in before if rel.startswith("adapters/")}
    assert len(folders - live) == 8 + 2  # 4 nights x 2 old versions; 2 on-demand folders, 1 superseded

    with store.leased("gc") as lease:
        young = collect_garbage(store, lease, keep_runs=1, grace_s=3600)
        assert young.objects == 0  # everything is younger than the grace period
        dry = collect_garbage(store, lease, keep_runs=1, grace_s=0, dry_run=True)
        assert _listing(store).keys() == before.keys()
        report = collect_garbage(store, lease, keep_runs=1, grace_s=0)
    after = _listing(store)
    assert (dry.objects, dry.bytes) == (report.objects, report.bytes)
    assert report.objects == len(before) - len(after)
    assert report.bytes == sum(i.size for i in before.values()) - sum(i.size for i in after.values())
    assert report.kinds["adapter folders"]["objects"] == 3 * 9  # PEFT config + weights + p2p.json each
    assert report.kinds["manifest parts"]["objects"] == 4 + 1 and report.kinds["commit records"]["objects"] == 4

    fresh = AdapterStore(store.uri)
    remaining = {layout.adapter_folder_of(rel) for rel in after if rel.startswith("adapters/")}
    record = fresh.adapter_row("newcomer", runs.hid)
    assert remaining == live | {record["adapter_uri"]}  # nothing unreferenced is left
    for uid in users:
        fresh.read_adapter(uid)  # and every user still reads, digest checked
    assert fresh.read_adapter("newcomer", runs.hid)[1]["source"] == "on-demand"
    assert len(fresh.runs.history(runs.hid)) == 1
    r = _cli("store", "gc", "--store", store.uri, "--keep-runs", "1", "--grace", "0")
    assert r.returncode == 0 and "gc freed 0 objects" in r.stdout, r.stdout + r.stderr


def test_gc_keeps_a_pending_run_and_runs_replaced_within_the_grace(store, tiny_hypernet):
    runs = Runs(store, tiny_hypernet)
    first = runs.write(["a", "b"], [])
    runs.write(["a"], ["b"])
    dead = runs.write(["b"], ["a"], commit=False)  # a crashed refresh a rerun would resume
    with store.leased("gc") as lease:
        report = collect_garbage(store, lease, keep_runs=1, grace_s=600)
    assert report.objects == 0
    assert set(report.kept_runs[runs.hid]) >= {first}  # replaced a moment ago: readers may still use it
    assert store.runs.run_parts(runs.hid, [dead])  # the dead run's rows stay resumable


def test_deleted_user_is_in_no_object_grep_or_parquet(store, tiny_hypernet):
    """After delete-users nothing of the user remains: not in any manifest of any run, raw or in Parquet."""
    runs = Runs(store, tiny_hypernet)
    runs.write(["keep", FORGET], [])
    for _ in range(3):  # the user's profile changes every night: rows in every old manifest
        runs.write([FORGET], ["keep"])
    runs.write(["keep", FORGET], [], commit=False)  # and a dead run's folder and part
    emb = np.full(384, 0.5, np.float32)
    store.write_on_demand(runs.hid, FORGET, None, "profile-on-demand", emb)
    runs.embeddings[FORGET].append(emb)
    runs.hashes[FORGET].append("profile-on-demand")
    before = store.current(runs.hid)

    r = _cli("store", "delete-users", "--store", store.uri, "--users", FORGET)
    assert r.returncode == 0 and "tombstoned" in r.stdout, r.stderr

    secrets = [FORGET.encode(), user_key(FORGET).encode(), *(h.encode() for h in runs.hashes[FORGET]),
               *(e.tobytes() for e in runs.embeddings[FORGET])]
    for rel in store.objects.list(""):
        assert FORGET not in rel and user_key(FORGET) not in rel
        data = store.objects.read(rel)
        assert not any(s in data for s in secrets), rel  # grep
        if rel.endswith(".parquet") and not rel.startswith(layout.TOMBSTONES):
            table = pq.read_table(io.BytesIO(data))
            assert FORGET not in table.column("user_id").to_pylist(), rel  # Parquet hides ids from grep
            assert not set(runs.hashes[FORGET]) & set(table.column("profile_hash").to_pylist()), rel
    fresh = AdapterStore(store.uri)
    after = fresh.current(runs.hid)
    assert after.run_id != before.run_id and after.users == before.users - 1  # servers see a new run
    assert all(c.users == 1 for c in fresh.runs.history(runs.hid) if c.run_id != after.run_id)
    with pytest.raises(UserDeleted):
        fresh.read_adapter(FORGET)
    assert fresh.read_adapter("keep")[1]["user_id"] == "keep"
    assert user_hash(FORGET) in fresh.deleted_since(None)[1]  # what a server evicts from its caches
    with pytest.raises(UserDeleted):
        fresh.write_on_demand(runs.hid, FORGET, None, "again", emb)  # stays deleted unless re-admitted
