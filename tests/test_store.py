"""The adapter store on a local filesystem and on S3 (moto server on 127.0.0.1, real HTTP via s3fs)."""

import os

import numpy as np
import pytest
import torch
from peft import PeftModel

from p2p.errors import P2PError
from p2p.generate import adapter_files, generate_user_adapters
from p2p.hypernet import load_hypernet
from p2p.lora import ADAPTER_WEIGHTS, adapter_from_files
from p2p.models import build_tiny_random
from p2p.store import AdapterNotFound, AdapterStore, StoreError

HOSTILE = ["../x", "a/b", "..", "ctl\x01\n", "Zoë", "CURRENT", "plain-user_1"]


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    if request.param == "file":
        return AdapterStore(f"file://{tmp_path}/store")
    return AdapterStore(request.getfixturevalue("moto_s3")())


def _write(store, hypernet_dir, users, run_id=None):
    hypernet, _ = load_hypernet(hypernet_dir)
    hid = store.publish_hypernet(hypernet_dir)
    run_id = run_id or store.begin(hid)
    emb = np.random.default_rng(0).standard_normal((len(users), 384)).astype(np.float32)
    adapters = generate_user_adapters(hypernet, emb)
    items = [(u, adapter_files(hypernet, hid, a), f"hash-{u}", e) for u, a, e in zip(users, adapters, emb, strict=True)]
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
        store.fetch_adapter(uid, str(tmp_path / uid))
        model = PeftModel.from_pretrained(build_tiny_random(0), str(tmp_path / uid)).eval()
        adapter, _ = adapter_from_files(files)
        loaded = {k: v for k, v in model.state_dict().items() if "lora_A" in k}
        assert len(loaded) == len(adapter)
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits)
    assert (logits[0] - logits[1]).abs().max() > 1e-4


def test_corrupted_adapter_is_an_error_not_a_wrong_adapter(store, tiny_hypernet):
    hid, run_id, part, _ = _write(store, tiny_hypernet, ["u1", "u2"])
    store.commit(hid, run_id, [part], 2)
    _, row = store.read_adapter("u1")
    path = store.path(row["adapter_uri"], ADAPTER_WEIGHTS)
    data = bytearray(store.fs.cat_file(path))
    data[len(data) // 2] ^= 0x01  # one flipped bit in the tensor data
    store.fs.pipe_file(path, bytes(data))
    store.fs.invalidate_cache()
    with pytest.raises(StoreError, match="sha256"):
        store.read_adapter("u1")
    assert store.read_adapter("u2")[1]["user_id"] == "u2"  # the others are unaffected


def test_delete_users_removes_adapter_and_manifest_row(store, tiny_hypernet):
    hid, run_id, part, _ = _write(store, tiny_hypernet, ["keep", "gone", "../x"])
    store.commit(hid, run_id, [part], 3)
    assert store.delete_users(["gone", "../x", "never-existed"]) == 2
    for uid in ("gone", "../x"):
        with pytest.raises(AdapterNotFound):
            store.read_adapter(uid)
        assert not store.fs.exists(store.path(store.adapter_prefix(hid, uid)))
    assert store.read_adapter("keep")[1]["user_id"] == "keep"
    assert store.current().users == 1


def test_pending_run_is_resumed_and_digest_checked(tmp_path, tiny_hypernet):
    store = AdapterStore(str(tmp_path / "store"))
    hid, run_id, _, items = _write(store, tiny_hypernet, ["u1", "u2"])
    assert store.begin(hid) == run_id  # not committed: a rerun resumes the same run
    assert store.completed_adapter(hid, run_id, "u1", "hash-u1")["sha256"]
    assert store.completed_adapter(hid, run_id, "u1", "another-profile") is None
    weights = store.path(store.adapter_dir(hid, "u2", run_id), ADAPTER_WEIGHTS)
    with open(weights, "r+b") as f:  # a torn write: the file is shorter than the record says
        f.truncate(100)
    assert store.completed_adapter(hid, run_id, "u2", "hash-u2") is None


def test_unknown_hypernet_and_unreachable_store_are_clear(tmp_path):
    store = AdapterStore(str(tmp_path / "store"))
    with pytest.raises(StoreError, match="neither a checkpoint folder nor a hypernet"):
        store.resolve_hypernet("0123456789abcdef")
    assert store.current() is None and store.stat()["committed"] is None
