"""Embeddings-only rows: no adapter folder in the store; adapters made from the rows in one hypernet pass."""

import time

import numpy as np
import pytest
import torch
from numerics import HYPERNET_DEPTH, assert_same_function
from peft import PeftModel
from test_store import make_store

from p2p.generate import adapter_files, generate_user_adapters
from p2p.hypernet import load_hypernet
from p2p.lora import adapter_from_files
from p2p.models import build_tiny_random
from p2p.store import AdapterCorrupt, AdapterStore, StoreError, adapters_from_rows
from p2p.store.manifest import embedding_row


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    return make_store(request, tmp_path)


def _commit_embeddings(store, hypernet_dir, users):
    hypernet, hid = load_hypernet(hypernet_dir)
    store.publish_hypernet(hypernet_dir)
    emb = np.random.default_rng(3).standard_normal((len(users), 384)).astype(np.float32)
    rows = [embedding_row(u, hid, f"h-{u}", e, int(time.time())) for u, e in zip(users, emb, strict=True)]
    run_id = store.begin(hid)
    part = store.write_manifest_part(hid, run_id, rows, 384)
    store.commit(hid, run_id, [part], len(rows), mode="embeddings")
    return hypernet, hid, emb


@pytest.mark.numerics
def test_embedding_rows_become_the_same_adapters_in_one_pass(store, tiny_hypernet, tmp_path):
    users = ["e1", "e2", "../e3"]
    hypernet, hid, emb = _commit_embeddings(store, tiny_hypernet, users)
    assert not [rel for rel in store.objects.list("adapters")]  # no folder was written
    fresh = AdapterStore(store.uri)
    assert fresh.current().mode == "embeddings"
    stat = fresh.stat()["committed"]
    assert (stat["embeddings_only_users"], stat["adapter_bytes"]) == (3, 0)

    rows = [fresh.adapter_row(u, embedding=True) for u in users]
    assert [r["mode"] for r in rows] == ["embeddings"] * 3 and all(r["adapter_uri"] is None for r in rows)
    np.testing.assert_array_equal(np.stack([r["embedding"] for r in rows]), emb)
    got = adapters_from_rows(hypernet, hid, rows)
    want = generate_user_adapters(hypernet, emb)  # the same batch: the same numbers
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for path in w:
            assert all(torch.equal(a, b) for a, b in zip(g[path], w[path], strict=True))  # one path, one batch

    # read_adapter / fetch make the PEFT folder from the row (what a server without the batched path gets)
    files, row = fresh.read_adapter("e2")
    assert row["mode"] == "embeddings" and row["source"] == "manifest"
    one, _ = adapter_from_files(files)
    ref, _ = adapter_from_files(adapter_files(hypernet, hid, want[1]))
    for path in ref:
        for a, b in zip(one[path], ref[path], strict=True):
            assert_same_function(a, b, HYPERNET_DEPTH, what=path)  # batch of 1 vs 3: float rounding
    fresh.fetch_adapter("../e3", str(tmp_path / "peft"))
    PeftModel.from_pretrained(build_tiny_random(0), str(tmp_path / "peft"))


def test_rows_are_checked_before_a_pass(store, tiny_hypernet):
    hypernet, hid, _ = _commit_embeddings(store, tiny_hypernet, ["e1", "e2"])
    row = AdapterStore(store.uri).adapter_row("e1", embedding=True)
    with pytest.raises(StoreError, match="made for hypernet other"):
        adapters_from_rows(hypernet, hid, [{**row, "hypernet_id": "other"}])
    tampered = {**row, "embedding": row["embedding"] + np.float32(1e-3)}
    with pytest.raises(AdapterCorrupt, match="sha256"):
        adapters_from_rows(hypernet, hid, [tampered])
    with pytest.raises(StoreError, match="no embedding"):
        adapters_from_rows(hypernet, hid, [{k: v for k, v in row.items() if k != "embedding"}])


def test_on_demand_embedding_only_record(store, tiny_hypernet):
    hypernet, hid, _ = _commit_embeddings(store, tiny_hypernet, ["e1"])
    emb = np.full(384, 0.25, np.float32)
    record = store.write_on_demand(hid, "newbie", None, "h-newbie", emb)  # files=None: the embedding only
    assert record["adapter_uri"] is None and record["bytes"] == 0
    row = AdapterStore(store.uri).adapter_row("newbie", hid, embedding=True)
    assert (row["mode"], row["source"]) == ("embeddings", "on-demand")
    np.testing.assert_array_equal(row["embedding"], emb)
    [adapter] = adapters_from_rows(hypernet, hid, [row])
    [want] = generate_user_adapters(hypernet, emb[None])
    assert all(torch.equal(adapter[p][0], want[p][0]) for p in want)  # one path, one batch of 1


@pytest.mark.numerics
def test_the_server_store_access_serves_embedding_rows_and_drops_deleted_users(tiny_hypernet, tmp_path):
    """What a serving replica reads (pipelines.serve.store_access), on an embeddings-only store."""
    from p2p.store import AdapterNotFound, StoreUnavailable, UserDeleted
    from pipelines.serve.store_access import BROKEN, NOT_FOUND, UNAVAILABLE, StoreAccess, classify

    store = AdapterStore(str(tmp_path / "store"), create=True)
    hypernet, hid, emb = _commit_embeddings(store, tiny_hypernet, ["e1", "e2"])
    access = StoreAccess(store.uri)
    assert access.hypernet_id == hid
    loaded = access.load("e2")
    assert loaded.error is None and loaded.row["mode"] == "embeddings"
    [want] = generate_user_adapters(hypernet, emb[1:2])
    for path in want:
        assert_same_function(loaded.adapter[path][0], want[path][0], HYPERNET_DEPTH, what=path)
    assert access.load("nobody").adapter is None

    assert access.delete("e2") == 1
    assert access.row("e2") is None and access.load("e2").adapter is None  # replicas drop it on the next check
    assert [classify(e) for e in (AdapterNotFound("x"), UserDeleted("x"), StoreUnavailable("x"),
                                  AdapterCorrupt("x"), StoreError("x"))] == [NOT_FOUND, NOT_FOUND, UNAVAILABLE,
                                                                             BROKEN, BROKEN]
