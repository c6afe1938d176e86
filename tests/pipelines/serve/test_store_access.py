"""What a serving replica reads from the store (pipelines.serve.store_access), on an embeddings-only store."""

import pytest
from numerics import HYPERNET_DEPTH, assert_same_function
from store_support import commit_embeddings

from p2p.store import AdapterCorrupt, AdapterStore, StoreError


@pytest.mark.numerics
def test_the_server_store_access_serves_embedding_rows_and_drops_deleted_users(tiny_hypernet, tmp_path):
    """What a serving replica reads (pipelines.serve.store_access), on an embeddings-only store."""
    from p2p.store import AdapterNotFound, StoreUnavailable, UserDeleted
    from pipelines.serve.store_access import BROKEN, NOT_FOUND, UNAVAILABLE, StoreAccess, classify

    store = AdapterStore(str(tmp_path / "store"), create=True)
    hypernet, hid, emb = commit_embeddings(store, tiny_hypernet, ["e1", "e2"])
    access = StoreAccess(store.uri)
    assert access.hypernet_id == hid
    loaded = access.load("e2")
    assert loaded.error is None and loaded.row["mode"] == "embeddings"
    [want] = hypernet.user_adapters(emb[1:2])
    for path in want:
        assert_same_function(loaded.adapter[path][0], want[path][0], HYPERNET_DEPTH, what=path)
    assert access.load("nobody").adapter is None

    assert access.delete("e2") == 1
    assert access.row("e2") is None and access.load("e2").adapter is None  # replicas drop it on the next check
    assert [classify(e) for e in (AdapterNotFound("x"), UserDeleted("x"), StoreUnavailable("x"),
                                  AdapterCorrupt("x"), StoreError("x"))] == [NOT_FOUND, NOT_FOUND, UNAVAILABLE,
                                                                             BROKEN, BROKEN]
