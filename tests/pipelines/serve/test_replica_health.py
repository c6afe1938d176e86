"""A replica whose engine dies, sticks or is asked too much: fast 4xx/5xx, an unhealthy health check.

The replica (pipelines/serve/replica.py) with its HTTP app in this process, through Starlette's
ASGI test client rather than Ray Serve: the faults are injected into its engine thread, which a
Serve replica keeps in another process. The Serve path itself is in test_serve.py.
"""

import time

import pytest
from serve_support import PROMPT, USERS, commit
from starlette.testclient import TestClient

from p2p.generation.engine import EngineDead
from p2p.store import AdapterStore
from pipelines.serve.api import build_api
from pipelines.serve.replica import Replica
from pipelines.serve.schemas import Limits


@pytest.fixture
def replica(tiny_hypernet, tmp_path):
    store = AdapterStore(str(tmp_path / "store"))
    commit(store, tiny_hypernet, USERS[:2], seed=1)
    server = Replica(store.uri, limits=Limits(max_request_tokens=400, request_timeout_s=1))
    yield server
    server.close()


def complete(client, **body):
    return client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "user": USERS[0], **body})


def test_limits_timeouts_and_a_dead_engine_answer_fast_and_mark_the_replica_unhealthy(replica):
    client = TestClient(build_api(replica))
    assert complete(client).status_code == 200
    # One request may not make the engine hold more than max_request_tokens.
    r = complete(client, prompt=[PROMPT] * 8, max_tokens=40)
    assert r.status_code == 400 and r.json()["error"]["code"] == "request_too_large", r.text
    # A request still generating after request_timeout_s ends with a 503, and its rows leave the engine.
    replica.engine.on_step = lambda rows: time.sleep(0.2)
    r = complete(client, max_tokens=40)
    assert r.status_code == 503 and r.json()["error"]["code"] == "request_timeout", r.text
    replica.engine.on_step = None
    deadline = time.monotonic() + 30
    while replica.engine.snapshot()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert replica.engine.snapshot()["running"] == 0
    # The loop dies (out of memory outside a step): the request in flight fails without internals...
    replica.engine._drop_cancelled = lambda: (_ for _ in ()).throw(MemoryError("injected at /secret/path"))
    r = complete(client)
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_error"
    assert "secret" not in r.text and "MemoryError" not in r.text
    # ...later ones fail at once, /healthz says so, and Serve's health check replaces the replica.
    r = complete(client)
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable" and r.headers["retry-after"]
    assert client.get("/healthz").status_code == 503
    with pytest.raises(EngineDead):
        replica.check_health()


def test_a_store_that_vanishes_is_503_until_it_is_back_never_the_base_model(tiny_hypernet, tmp_path):
    """A store directory renamed away (an unmount, a moved volume) is an outage, not an empty store."""
    import os

    store = AdapterStore(str(tmp_path / "store"))
    commit(store, tiny_hypernet, USERS[:2], seed=1)
    server = Replica(store.uri, recheck_s=0)
    try:
        client = TestClient(build_api(server))
        first = complete(client, temperature=0)
        assert first.status_code == 200 and first.json()["personalized"] is True
        os.rename(tmp_path / "store", tmp_path / "away")
        gone = complete(client, temperature=0)
        assert gone.status_code == 503 and gone.json()["error"]["code"] == "store_unavailable", gone.text
        assert str(tmp_path) not in gone.text  # no paths in the body
        os.rename(tmp_path / "away", tmp_path / "store")
        back = complete(client, temperature=0)
        assert back.status_code == 200 and back.json()["personalized"] is True
        assert back.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]
    finally:
        server.close()
