"""One user, one id: the composed (NFC) and decomposed (NFD) spellings of `José` reach one adapter.

The replica and its HTTP app in this process (Starlette's test client), as in test_replica_health.py;
the live Serve path for user naming is in test_serve.py.
"""

import unicodedata

import pytest
from serve_support import PROMPT, commit
from starlette.testclient import TestClient

from p2p.store import AdapterStore
from pipelines.serve.api import build_api
from pipelines.serve.auth import Keys
from pipelines.serve.replica import Replica
from pipelines.serve.tokens import Tokens

NFC = unicodedata.normalize("NFC", "José")
NFD = unicodedata.normalize("NFD", "José")
SERVICE, ADMIN = {"Authorization": "Bearer svc"}, {"Authorization": "Bearer adm"}


@pytest.fixture
def client(tiny_hypernet, tmp_path, monkeypatch):
    monkeypatch.setenv("P2P_TOKEN_SECRET", "s" * 32)
    store = AdapterStore(str(tmp_path / "store"))
    commit(store, tiny_hypernet, [NFC, "other"], seed=1)
    server = Replica(store.uri, keys=Keys.resolve("svc", "adm"))
    yield TestClient(build_api(server))
    server.close()


def answer(client, headers=None, **body):
    r = client.post("/v1/completions", headers=headers or SERVICE,
                    json={"prompt": PROMPT, "max_tokens": 6, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_both_spellings_of_an_id_are_one_user(client):
    assert NFC != NFD
    stored = answer(client, user=NFC)
    assert stored["personalized"] and stored["user"] == NFC
    for named in ({"user": NFD}, {"model": f"tiny-random:{NFD}"}):
        got = answer(client, **named)
        assert got["user"] == NFC and got["personalized"], named
        assert got["choices"][0]["text"] == stored["choices"][0]["text"]
    # Two spellings of one user are one name, not a conflict.
    assert answer(client, user=NFC, model=f"tiny-random:{NFD}")["user"] == NFC
    record = client.get(f"/v1/users/{NFD}", headers=ADMIN)
    assert record.status_code == 200 and record.json()["user_id"] == NFC, record.text
    # A token issued for one spelling is the same user's under the other.
    token, _ = Tokens.resolve().issue(NFD, 600)
    mine = answer(client, user=NFC, headers={"Authorization": f"Bearer {token}"})
    assert mine["user"] == NFC
    r = client.post("/v1/completions", headers={"Authorization": f"Bearer {token}"},
                    json={"prompt": PROMPT, "max_tokens": 2, "user": "other"})
    assert r.status_code == 403
