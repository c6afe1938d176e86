"""The adapter store on a local filesystem and on S3 (moto server on 127.0.0.1, real HTTP via s3fs)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from peft import PeftModel

from p2p.errors import P2PError
from p2p.model.base import build_tiny_random
from p2p.model.files import ADAPTER_WEIGHTS
from p2p.model.hypernet import load_hypernet
from p2p.model.peft_format import adapter_from_files
from p2p.personalize import Personalizer, StoredAdapters, publish_hypernet, resolve_hypernet
from p2p.store import (
    AdapterCorrupt,
    AdapterNotFound,
    AdapterStore,
    StoreError,
    StoreUnavailable,
    UserDeleted,
)
from p2p.userkey import user_key

HOSTILE = ["../x", "a/b", "..", "ctl\x01\n", "Zoë", "CURRENT", "plain-user_1"]


def make_store(request, tmp_path) -> AdapterStore:
    """A fresh store on the parametrized filesystem ("file" or "s3"); other store test modules share it."""
    if request.param == "file":
        return AdapterStore(f"file://{tmp_path}/store")
    return AdapterStore(request.getfixturevalue("moto_s3")())


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    return make_store(request, tmp_path)


def _write(store, hypernet_dir, users, run_id=None):
    hypernet, _ = load_hypernet(hypernet_dir)
    hid = publish_hypernet(store, hypernet_dir)
    run_id = run_id or store.begin(hid)
    emb = np.random.default_rng(0).standard_normal((len(users), 384)).astype(np.float32)
    adapters = hypernet.user_adapters(emb)
    items = [(u, Personalizer(hypernet, hid).files(a), f"hash-{u}", e) for u, a, e in zip(users, adapters, emb, strict=True)]
    rows = store.write_adapters(hid, run_id, items)
    part = store.write_manifest_part(hid, run_id, rows, 384)
    return hid, run_id, part, items


def test_commit_then_read_every_user_hostile_ids_included(store, tiny_hypernet, tmp_path):
    hid, run_id, part, items = _write(store, tiny_hypernet, HOSTILE)
    with pytest.raises(AdapterNotFound):  # written but not committed: invisible
        store.read_adapter("plain-user_1")
    store.commit(hid, run_id, [part], len(items))
    assert store.current().run_id == run_id and store.current(hid).users == len(HOSTILE)
    for uid, files, _, emb in items:
        got, row = store.read_adapter(uid)
        assert got == files and row["user_id"] == uid
        np.testing.assert_array_equal(store.embedding(uid), emb)
    # Nothing escaped the store root, and every user has a folder of its own.
    fs, root = store.fs, store.root
    paths = fs.find(os.path.dirname(root))
    assert all(p.startswith(root + "/") for p in paths)
    assert len({p.rsplit("/", 2)[0] for p in paths if p.endswith(ADAPTER_WEIGHTS)}) == len(HOSTILE)
    with pytest.raises(P2PError, match="non-empty"):
        store.adapter_dir(hid, "", run_id)


def test_fetched_adapter_loads_in_peft(store, tiny_hypernet, tmp_path):
    hid, run_id, part, items = _write(store, tiny_hypernet, ["u1", "u2"])
    store.commit(hid, run_id, [part], 2)
    ids = torch.tensor([[1, 2, 3, 4]])
    logits = []
    for uid, files, _, _ in items:
        StoredAdapters(store).fetch(uid, str(tmp_path / uid))
        model = PeftModel.from_pretrained(build_tiny_random(0), str(tmp_path / uid)).eval()
        adapter, _ = adapter_from_files(files)
        loaded = {k: v for k, v in model.state_dict().items() if "lora_A" in k}
        assert len(loaded) == len(adapter)
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits)
    assert (logits[0] - logits[1]).abs().max() > 1e-4


def test_corrupted_adapter_is_an_error_not_a_wrong_adapter(store, tiny_hypernet):
    hid, run_id, part, _ = _write(store, tiny_hypernet, ["u1", "u2", "u3"])
    store.commit(hid, run_id, [part], 3)
    _, row = store.read_adapter("u1")
    path = store.path(row["adapter_uri"], ADAPTER_WEIGHTS)
    data = bytearray(store.fs.cat_file(path))
    data[len(data) // 2] ^= 0x01  # one flipped bit in the tensor data
    store.fs.pipe_file(path, bytes(data))
    store.fs.rm(store.path(store.read_adapter("u3")[1]["adapter_uri"]), recursive=True)  # a folder gone
    store.fs.invalidate_cache()
    with pytest.raises(AdapterCorrupt, match="sha256"):
        store.read_adapter("u1")
    with pytest.raises(AdapterCorrupt, match="missing"):
        store.read_adapter("u3")
    assert store.read_adapter("u2")[1]["user_id"] == "u2"  # the others are unaffected


def test_delete_users_removes_adapter_and_manifest_row(store, tiny_hypernet):
    hid, run_id, part, _ = _write(store, tiny_hypernet, ["keep", "gone", "../x"])
    store.commit(hid, run_id, [part], 3)
    assert store.delete_users(["gone", "../x", "never-existed"]) == 2
    for uid in ("gone", "../x"):
        with pytest.raises(UserDeleted):
            store.read_adapter(uid)
        assert not store.fs.exists(store.path(store.adapter_prefix(hid, uid)))
    with pytest.raises(AdapterNotFound) as info:
        store.read_adapter("never-existed")  # tombstoned too: it may show up in tomorrow's data
    assert isinstance(info.value, UserDeleted)
    assert store.read_adapter("keep")[1]["user_id"] == "keep"
    assert store.current().users == 1


def test_a_new_run_never_shares_the_dead_runs_id(tmp_path, tiny_hypernet):
    store = AdapterStore(str(tmp_path / "store"))
    hid, dead_run, part, _ = _write(store, tiny_hypernet, ["u1", "u2"])  # begin, write, then "die"
    store._release_implicit()  # what the lease's expiry does for a driver that died
    run = store.runs.begin(hid, store._held_lease("rerun"))
    assert run.run_id != dead_run and run.resume_from == [dead_run]
    assert store.runs.run_parts(hid, run.resume_from) == [part]  # the rows the dead run finished
    store.abandon(hid, run.run_id)


def test_unknown_hypernet_and_missing_store_are_clear(tmp_path):
    store = AdapterStore(str(tmp_path / "store"))
    with pytest.raises(StoreError, match="neither a checkpoint folder nor a hypernet"):
        resolve_hypernet(store, "0123456789abcdef")
    assert store.current() is None
    with pytest.raises(StoreUnavailable, match="no store at"):
        store.stat()


def test_missing_bucket_is_an_error_and_never_created(moto_s3):
    import boto3

    existing = moto_s3()  # starts the server; a bucket we do not use
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    before = {b["Name"] for b in client.list_buckets()["Buckets"]}
    typo = "p2p-no-such-bucket-" + existing.split("/")[2][-6:]
    with pytest.raises(StoreUnavailable, match=f"bucket '{typo}' does not exist.*--create"):
        AdapterStore(f"s3://{typo}/store")
    r = _cli("store", "stat", "--store", f"s3://{typo}/store")
    assert r.returncode == 4 and r.stderr.count("\n") == 1 and "does not exist" in r.stderr
    assert {b["Name"] for b in client.list_buckets()["Buckets"]} == before  # nothing created
    AdapterStore(f"s3://{typo}/store", create=True)
    assert typo in {b["Name"] for b in client.list_buckets()["Buckets"]}


def test_unreachable_store_is_unavailable_not_corrupt(tiny_hypernet):
    """A store that goes away mid-life: StoreUnavailable (a server answers 503), never AdapterCorrupt."""
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_MAX_ATTEMPTS", "AWS_ACCESS_KEY_ID",
                                            "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_MAX_ATTEMPTS": "1",
                       "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    try:
        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}").create_bucket(Bucket="going")
        store = AdapterStore("s3://going/store")
        store.fs.retries = 1
        hid, run_id, part, _ = _write(store, tiny_hypernet, ["u1"])
        store.commit(hid, run_id, [part], 1)
        server.stop()
        with pytest.raises(StoreUnavailable, match="unavailable") as info:
            store.read_adapter("u1")
        assert not isinstance(info.value, AdapterCorrupt)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_fetch_escapes_ids_and_reads_them_from_a_file(tiny_hypernet, tmp_path):
    ids = ["../x", "..", "a/../../b", "/abs/olute", "with,comma", "plain"]
    store = AdapterStore(str(tmp_path / "store"))
    hid, run_id, part, items = _write(store, tiny_hypernet, ids)
    store.commit(hid, run_id, [part], len(ids))
    (tmp_path / "ids.txt").write_text("\n".join(ids) + "\n")
    out = tmp_path / "jail" / "out"
    r = _cli("store", "fetch", "--store", store.uri, "--users-file", str(tmp_path / "ids.txt"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    written = [p for p in (tmp_path / "jail").rglob("*") if p.is_file()]
    assert len(written) == 2 * len(ids)
    assert all(p.resolve().is_relative_to(out.resolve()) for p in written)  # nothing outside --out
    for uid, files, _, _ in items:
        assert (out / user_key(uid) / ADAPTER_WEIGHTS).read_bytes() == files[ADAPTER_WEIGHTS]
    assert not (tmp_path / "x").exists() and not (tmp_path / "b").exists()


def test_unknown_scheme_is_one_line_exit_2():
    r = _cli("store", "stat", "--store", "foo://bucket/store")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "unsupported storage scheme 'foo'" in r.stderr


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True, timeout=300,
                          env=env)
