"""Embeddings-only rows: no adapter folder in the store; adapters made from the rows in one hypernet pass."""


import numpy as np
import pytest
import torch
from numerics import HYPERNET_DEPTH, assert_same_function
from peft import PeftModel
from store_support import commit_embeddings
from test_store import make_store

from p2p.model.base import build_tiny_random
from p2p.model.peft_format import adapter_from_files
from p2p.personalize import Personalizer, StoredAdapters
from p2p.store import AdapterCorrupt, AdapterStore, StoreError, layout


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    return make_store(request, tmp_path)


@pytest.mark.numerics
def test_embedding_rows_become_the_same_adapters_in_one_pass(store, tiny_hypernet, tmp_path):
    users = ["e1", "e2", "../e3"]
    hypernet, hid, emb = commit_embeddings(store, tiny_hypernet, users)
    assert not [rel for rel in store.objects.list("adapters")]  # no folder was written
    fresh = AdapterStore(store.uri)
    assert fresh.current().mode == "embeddings"
    stat = fresh.stat()["committed"]
    assert (stat["embeddings_only_users"], stat["adapter_bytes"]) == (3, 0)

    rows = [fresh.adapter_row(u, embedding=True) for u in users]
    assert [r["mode"] for r in rows] == ["embeddings"] * 3 and all(r["adapter_uri"] is None for r in rows)
    np.testing.assert_array_equal(np.stack([r["embedding"] for r in rows]), emb)
    got = Personalizer(hypernet, hid).adapters_from_rows(rows)
    want = hypernet.user_adapters(emb)  # the same batch: the same numbers
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for path in w:
            assert all(torch.equal(a, b) for a, b in zip(g[path], w[path], strict=True))  # one path, one batch

    # read_adapter / fetch make the PEFT folder from the row (what a server without the batched path gets)
    files, row = StoredAdapters(fresh).read("e2")
    assert row["mode"] == "embeddings" and row["source"] == "manifest"
    one, _ = adapter_from_files(files)
    ref, _ = adapter_from_files(Personalizer(hypernet, hid).files(want[1]))
    for path in ref:
        for a, b in zip(one[path], ref[path], strict=True):
            assert_same_function(a, b, HYPERNET_DEPTH, what=path)  # batch of 1 vs 3: float rounding
    StoredAdapters(fresh).fetch("../e3", str(tmp_path / "peft"))
    PeftModel.from_pretrained(build_tiny_random(0), str(tmp_path / "peft"))


def test_rows_are_checked_before_a_pass(store, tiny_hypernet):
    hypernet, hid, _ = commit_embeddings(store, tiny_hypernet, ["e1", "e2"])
    row = AdapterStore(store.uri).adapter_row("e1", embedding=True)
    with pytest.raises(StoreError, match="made for hypernet other"):
        Personalizer(hypernet, hid).adapters_from_rows([{**row, "hypernet_id": "other"}])
    tampered = {**row, "embedding": row["embedding"] + np.float32(1e-3)}
    with pytest.raises(AdapterCorrupt, match="sha256"):
        Personalizer(hypernet, hid).adapters_from_rows([tampered])
    with pytest.raises(StoreError, match="no embedding"):
        Personalizer(hypernet, hid).adapters_from_rows([{k: v for k, v in row.items() if k != "embedding"}])


def test_on_demand_embedding_only_record(store, tiny_hypernet):
    hypernet, hid, _ = commit_embeddings(store, tiny_hypernet, ["e1"])
    emb = np.full(384, 0.25, np.float32)
    record = store.write_on_demand(hid, "newbie", None, "h-newbie", emb)  # files=None: the embedding only
    assert record["adapter_uri"] is None and record["bytes"] == 0
    row = AdapterStore(store.uri).adapter_row("newbie", hid, embedding=True)
    assert (row["mode"], row["source"]) == ("embeddings", "on-demand")
    np.testing.assert_array_equal(row["embedding"], emb)
    [adapter] = Personalizer(hypernet, hid).adapters_from_rows([row])
    [want] = hypernet.user_adapters(emb[None])
    assert all(torch.equal(adapter[p][0], want[p][0]) for p in want)  # one path, one batch of 1


def test_an_on_demand_record_of_another_user_is_never_served(store, tiny_hypernet):
    """What `Alice` and `alice` sharing one key on a case-insensitive disk (or a copied object) would do."""
    _, hid, _ = commit_embeddings(store, tiny_hypernet, ["e1"])
    store.write_on_demand(hid, "alice", None, "h-alice", np.full(384, 0.25, np.float32))
    data = store.objects.read(layout.on_demand_record(hid, "alice"))
    store.objects.write(layout.on_demand_record(hid, "bob"), data)  # bob's key, alice's record
    with pytest.raises(AdapterCorrupt, match="belongs to another user"):
        AdapterStore(store.uri).adapter_row("bob", hid)
    assert AdapterStore(store.uri).adapter_row("alice", hid)["user_id"] == "alice"

