"""`p2p serve`: real `serve.run` on 127.0.0.1, real HTTP requests, tiny-random base model."""

import json
import os
import socket
import threading

import numpy as np
import pytest
import requests

from p2p.adapted_model import AdaptedModel
from p2p.encoder import ProfileEncoder
from p2p.generate import adapter_files, generate_user_adapters
from p2p.hypernet import load_hypernet
from p2p.lora import ADAPTER_WEIGHTS, adapter_from_files
from p2p.models import load_base_model
from p2p.profile import ProfileConfig, build_profile
from p2p.store import AdapterStore

USERS = [f"user{i}" for i in range(8)]
PROMPT = "Which tag fits this movie: a haunted house at night?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _commit(store: AdapterStore, hypernet_dir: str, users: list[str], seed: int) -> str:
    hypernet, _ = load_hypernet(hypernet_dir)
    hid = store.publish_hypernet(hypernet_dir)
    run_id = store.begin(hid)
    emb = np.random.default_rng(seed).standard_normal((len(users), 384)).astype(np.float32)
    items = [(u, adapter_files(hypernet, hid, a), f"h{seed}-{u}", e)
             for u, a, e in zip(users, generate_user_adapters(hypernet, emb), emb, strict=True)]
    part = store.write_manifest_part(hid, run_id, store.write_adapters(hid, run_id, items), 384)
    store.commit(hid, run_id, [part], len(users))
    return run_id


class Offline:
    """What the server should answer, computed in this process with the same model and adapters."""

    def __init__(self, hypernet_dir: str):
        self.hypernet, _ = load_hypernet(hypernet_dir)
        c = self.hypernet.config
        self.model, self.tok = load_base_model("tiny-random")
        import copy

        self.adapted = AdaptedModel(copy.deepcopy(self.model), self.tok, c)

    def tokens(self, prompt: str, adapter: dict | None, max_tokens: int = 8) -> list[int]:
        ids = self.tok(prompt, add_special_tokens=False)["input_ids"]
        return self.adapted.decode([ids], [max_tokens], [adapter]).tokens[0]


@pytest.fixture(scope="module")
def served(ray_cluster, tiny_hypernet, tmp_path_factory):
    from ray import serve

    from pipelines.serve import build_app

    root = tmp_path_factory.mktemp("serve")
    store = AdapterStore(str(root / "store"))
    run_id = _commit(store, tiny_hypernet, USERS, seed=1)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(store.uri, recheck_s=0.2, max_batch_size=8, batch_wait_s=0.3), name="p2p",
              route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    assert requests.get(f"{url}/healthz", timeout=60).json()["status"] == "ok"
    yield {"url": url, "store": store, "run_id": run_id, "root": root, "port": port}
    serve.shutdown()


def _complete(url, user, prompt=PROMPT, max_tokens=8, **kw):
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    if user is not None:
        body["user"] = user
    return requests.post(f"{url}/v1/completions", json=body, timeout=120, **kw)


def test_users_get_their_own_adapters_and_unknown_gets_base(served, tiny_hypernet):
    offline = Offline(tiny_hypernet)
    store = served["store"]
    for uid in USERS[:2]:
        r = _complete(served["url"], uid)
        assert r.status_code == 200, r.text
        body = r.json()
        adapter, _ = adapter_from_files(store.read_adapter(uid)[0])
        assert body["personalized"] is True and body["adapter"]["run_id"] == served["run_id"]
        assert body["tokens"] == offline.tokens(PROMPT, adapter)
    r = _complete(served["url"], "stranger").json()
    assert r["personalized"] is False and r["adapter"] is None
    assert r["tokens"] == offline.tokens(PROMPT, None)
    # The adapters matter: user0's answer is not the base model's once the adapter is scaled up.
    a0, _ = adapter_from_files(store.read_adapter(USERS[0])[0])
    big = {p: (a * 20, b * 20) for p, (a, b) in a0.items()}
    assert offline.tokens(PROMPT, big) != offline.tokens(PROMPT, None)
    # The multiplexing header names the user too.
    h = requests.post(f"{served['url']}/v1/completions", json={"prompt": PROMPT, "max_tokens": 8},
                      headers={"serve_multiplexed_model_id": USERS[1]}, timeout=120).json()
    assert h["personalized"] is True and h["user"] == USERS[1]


def test_chat_endpoint_uses_the_chat_template(served):
    r = requests.post(f"{served['url']}/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "user": USERS[0]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    assert body["personalized"] is True and body["usage"]["prompt_tokens"] > 5


def test_on_demand_adapter_for_a_new_user(served, tiny_hypernet):
    history = [{"item_id": f"i{i}", "text": f"A horror film number {i}.", "label": "scary", "ts": 1000 + i}
               for i in range(5)]
    assert _complete(served["url"], "newbie").json()["personalized"] is False
    r = requests.post(f"{served['url']}/v1/users/newbie/adapter", json={"history": history}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["adapter"]["user_id"] == "newbie"
    body = _complete(served["url"], "newbie").json()
    assert body["personalized"] is True and body["adapter"]["source"] == "on-demand"
    # Offline: the same profile -> embedding -> adapter gives the same tokens.
    offline = Offline(tiny_hypernet)
    c = offline.hypernet.config
    emb = ProfileEncoder(c.encoder).encode([build_profile(history, ProfileConfig(**c.profile))])
    [adapter] = generate_user_adapters(offline.hypernet, emb)
    assert body["tokens"] == offline.tokens(PROMPT, adapter)
    info = requests.get(f"{served['url']}/v1/users/newbie", timeout=30).json()
    assert info["personalized"] is True and info["adapter"]["source"] == "on-demand"
    assert requests.get(f"{served['url']}/v1/users/nobody-here", timeout=30).status_code == 404
    bad = requests.post(f"{served['url']}/v1/users/x/adapter", json={"history": [{"text": "no id"}]}, timeout=30)
    assert bad.status_code == 422


def test_concurrent_users_share_forward_batches(served):
    before = requests.get(f"{served['url']}/healthz", timeout=30).json()["stats"]
    results = [None] * 8
    barrier = threading.Barrier(8)

    def one(i):
        barrier.wait()
        results[i] = _complete(served["url"], USERS[i], max_tokens=4)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.status_code == 200 and r.json()["personalized"] for r in results)
    after = requests.get(f"{served['url']}/healthz", timeout=30).json()["stats"]
    batches = after["batches"] - before["batches"]
    assert after["requests"] - before["requests"] == 8
    assert batches < 8, f"8 requests from 8 users took {batches} batches"
    assert max(r.json()["batch_size"] for r in results) > 1


def test_bad_inputs_are_4xx_with_a_message(served):
    url = served["url"]
    r = requests.post(f"{url}/v1/completions", data="{not json", headers={"content-type": "application/json"},
                      timeout=30)
    assert r.status_code == 422 and "detail" in r.json()
    r = requests.post(f"{url}/v1/completions", json={"max_tokens": 4}, timeout=30)
    assert r.status_code == 422 and "prompt" in json.dumps(r.json())
    r = requests.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 0}, timeout=30)
    assert r.status_code == 422
    r = _complete(url, USERS[0], prompt="word " * 5000)
    assert r.status_code == 400 and "context" in r.json()["detail"]
    r = requests.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "assistant", "content": "hi"}]},
                      timeout=30)
    assert r.status_code == 400


def test_new_current_is_picked_up_and_corruption_falls_back(served, tiny_hypernet):
    url, store = served["url"], served["store"]
    assert _complete(url, USERS[2]).json()["adapter"]["run_id"] == served["run_id"]
    new_run = _commit(store, tiny_hypernet, USERS, seed=2)  # a nightly refresh lands
    import time

    time.sleep(0.5)
    body = _complete(url, USERS[2]).json()
    assert body["personalized"] is True and body["adapter"]["run_id"] == new_run
    # A user whose adapter file is corrupted gets the base model, flagged; the replica stays up.
    _, row = store.read_adapter(USERS[7])
    path = store.path(row["adapter_uri"], ADAPTER_WEIGHTS)
    data = bytearray(store.fs.cat_file(path))
    data[-10] ^= 0xFF
    store.fs.pipe_file(path, bytes(data))
    body = _complete(url, USERS[7]).json()
    assert body["personalized"] is False and "sha256" in body["adapter_error"]
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 200


def test_auth_and_unreachable_store(served, tiny_hypernet, moto_s3):
    from moto.server import ThreadedMotoServer
    from ray import serve

    from pipelines.serve import build_app

    # Bearer auth: a second app on the same proxy, with a key.
    serve.run(build_app(served["store"].uri, api_key="s3cret"), name="auth", route_prefix="/auth", blocking=False)
    url = served["url"] + "/auth"
    assert _complete(url, USERS[0]).status_code == 401
    assert _complete(url, USERS[0], headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert _complete(url, USERS[0], headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 200

    # An S3 store that goes away: 503 with a message, and the replica keeps answering.
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = os.environ["AWS_ENDPOINT_URL"]
    os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
    os.environ["AWS_MAX_ATTEMPTS"] = "1"
    try:
        import boto3

        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}").create_bucket(Bucket="gone")
        s3 = AdapterStore("s3://gone/store")
        _commit(s3, tiny_hypernet, USERS[:2], seed=3)
        serve.run(build_app(s3.uri), name="s3", route_prefix="/s3", blocking=False)
        url = served["url"] + "/s3"
        assert _complete(url, USERS[0]).json()["personalized"] is True
        server.stop()
        r = _complete(url, USERS[1])
        assert r.status_code == 503 and "unavailable" in r.json()["detail"]
        assert requests.get(f"{url}/healthz", timeout=30).status_code == 200
    finally:
        os.environ["AWS_ENDPOINT_URL"] = saved
        os.environ.pop("AWS_MAX_ATTEMPTS", None)
