"""`p2p serve`: real `serve.run` on 127.0.0.1, real HTTP, tiny-random base model, keys on.

Behaviour (each user's adapter, chat template, continuous batching over HTTP), the security rules
(scopes, replace flag, delete), the input classes that once gave 500s, limits, store pickup and
an unreachable store. The OpenAI client, LangChain and the schemathesis fuzz are in
test_serve_openai.py.
"""

import concurrent.futures
import json
import os
import socket
import time

import numpy as np
import pytest
import requests
from serve_support import (
    ADMIN_KEY,
    PROMPT,
    SERVICE_KEY,
    USERS,
    Offline,
    commit,
    free_port,
    serve_on_a_free_port,
)

from p2p.model.files import ADAPTER_WEIGHTS
from p2p.model.peft_format import adapter_from_files
from p2p.store import AdapterNotFound, AdapterStore
from pipelines.serve.tokens import SECRET_ENV, Tokens

SERVICE = {"Authorization": f"Bearer {SERVICE_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
TOKEN_SECRET = "t" * 32
HISTORY = [{"item_id": f"i{i}", "text": f"A horror film number {i}.", "label": "scary", "ts": 1000 + i} for i in range(5)]


@pytest.fixture(scope="module")
def served(ray_cluster, tiny_hypernet, tmp_path_factory):
    from ray import serve

    from pipelines.serve import Limits, build_app

    root = tmp_path_factory.mktemp("serve")
    store = AdapterStore(str(root / "store"))
    run_id = commit(store, tiny_hypernet, USERS, seed=1, scale=20)
    os.environ[SECRET_ENV] = TOKEN_SECRET  # read by build_app in this driver, passed to the replicas
    try:
        app = build_app(store.uri, recheck_s=0.2, max_batch_size=16, service_key=SERVICE_KEY, admin_key=ADMIN_KEY,
                        limits=Limits(max_body_bytes=256 * 1024, max_tokens=1000, max_history_items=50))
    finally:
        del os.environ[SECRET_ENV]
    port = serve_on_a_free_port(serve, lambda: serve.run(app, name="p2p", route_prefix="/", blocking=False))
    url = f"http://127.0.0.1:{port}"
    assert requests.get(f"{url}/healthz", timeout=60).json() == {"status": "ok"}
    yield {"url": url, "store": store, "run_id": run_id, "port": port, "offline": Offline(tiny_hypernet)}
    serve.shutdown()


def complete(url, user=None, prompt=PROMPT, max_tokens=8, headers=SERVICE, **body):
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "return_token_ids": True, **body}
    if user is not None:
        body["user"] = user
    return requests.post(f"{url}/v1/completions", json=body, headers=headers, timeout=120)


def assert_error(r, status, *words):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    for w in words:
        assert w in error["message"] or w == error["param"] or w == error["code"], (w, error)
    return error


def adapter_of(store, uid):
    return adapter_from_files(store.read_adapter(uid)[0])[0]


# --- behaviour -----------------------------------------------------------------------------------


def test_users_get_their_own_adapters_however_they_are_named(served):
    url, store, offline = served["url"], served["store"], served["offline"]
    for uid in USERS[:2]:
        body = complete(url, uid).json()
        assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
        assert body["personalized"] is True and body["adapter"]["run_id"] == served["run_id"]
        expected = offline.tokens(PROMPT, adapter_of(store, uid))
        assert body["choices"][0]["token_ids"] == expected
        assert body["choices"][0]["text"] == offline.text(expected)
    stranger = complete(url, "stranger").json()
    assert stranger["personalized"] is False and stranger["adapter"] is None
    assert stranger["choices"][0]["token_ids"] == offline.tokens(PROMPT, None)
    assert stranger["choices"][0]["token_ids"] != complete(url, USERS[0]).json()["choices"][0]["token_ids"]
    # The same user by `model` (vLLM's <base>:<adapter>) and by the multiplexing header.
    by_model = complete(url, model=f"tiny-random:{USERS[1]}").json()
    by_header = complete(url, headers={**SERVICE, "serve_multiplexed_model_id": USERS[1]}).json()
    by_user = complete(url, USERS[1]).json()
    assert by_model["user"] == by_header["user"] == USERS[1] and by_model["model"] == f"tiny-random:{USERS[1]}"
    assert by_model["choices"][0]["token_ids"] == by_header["choices"][0]["token_ids"] == \
        by_user["choices"][0]["token_ids"]
    assert_error(complete(url, USERS[0], model=f"tiny-random:{USERS[1]}"), 400, "user_conflict")
    assert_error(complete(url, USERS[0], model="gpt-4o"), 404, "model_not_found")


def test_chat_uses_the_chat_template_and_prompt_lists_and_token_ids_work(served):
    url, store, offline = served["url"], served["store"], served["offline"]
    r = requests.post(f"{url}/v1/chat/completions", headers=SERVICE, timeout=120, json={
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}], "max_completion_tokens": 5,
        "temperature": 0, "user": USERS[0], "return_token_ids": True, "seed": None, "top_p": None})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    expected = offline.tokens(offline.chat_ids("Hello"), adapter_of(store, USERS[0]), 5)
    assert body["choices"][0]["token_ids"] == expected
    assert body["choices"][0]["message"] == {"role": "assistant", "content": offline.text(expected)}
    assert body["usage"]["prompt_tokens"] == len(offline.chat_ids("Hello"))
    # A list of prompts, and prompts of token ids: one choice per prompt, in order.
    adapter = adapter_of(store, USERS[2])
    expected = [offline.tokens(PROMPT, adapter, 4), offline.tokens("Rate the cafe", adapter, 4)]
    for prompt in ([PROMPT, "Rate the cafe"], [offline.ids(PROMPT), offline.ids("Rate the cafe")]):
        r = complete(url, USERS[2], prompt=prompt, max_tokens=4).json()
        assert [c["index"] for c in r["choices"]] == [0, 1]
        assert [c["token_ids"] for c in r["choices"]] == expected
    single = complete(url, USERS[2], prompt=offline.ids(PROMPT), max_tokens=4).json()
    assert [c["token_ids"] for c in single["choices"]] == expected[:1]


def test_requests_that_arrive_during_a_decode_join_it_and_a_closed_stream_stops(served):
    """Replaces 'fewer batches than requests': what matters is that the running loop admits newcomers.

    A long streamed request is running (its first token has arrived) when seven others are sent;
    each of them reports having decoded in a step together with it. The long one cannot finish
    first: it needs 900 tokens and runs until this test closes its stream.
    """
    url = served["url"]
    long = requests.post(f"{url}/v1/completions", headers=SERVICE, stream=True, timeout=120, json={
        "prompt": PROMPT, "max_tokens": 900, "temperature": 0, "user": USERS[0], "stream": True})
    lines = long.iter_lines()
    first = next(line for line in lines if line)
    assert json.loads(first[len(b"data: "):])["choices"][0]["finish_reason"] is None
    with concurrent.futures.ThreadPoolExecutor(7) as pool:
        results = list(pool.map(lambda i: complete(url, USERS[i], max_tokens=6), range(1, 8)))
    running = json.loads(next(line for line in lines if line)[len(b"data: "):])
    assert running["choices"][0]["finish_reason"] is None  # the long request was still decoding
    for r in results:
        assert r.status_code == 200 and r.json()["personalized"]
        assert r.json()["batch"]["max_rows"] >= 2, "a request that arrived during a decode waited for it"
    before = requests.get(f"{url}/healthz", headers=ADMIN, timeout=30).json()["engine"]
    long.close()  # the client goes away: its row leaves the batch
    for _ in range(100):
        engine = requests.get(f"{url}/healthz", headers=ADMIN, timeout=30).json()["engine"]
        if engine["running"] == 0:
            break
        time.sleep(0.1)
    assert engine["running"] == 0 and engine["cancelled"] > before["cancelled"]
    assert engine["tokens"] < before["tokens"] + 900


# --- security ------------------------------------------------------------------------------------


def test_keys_and_scopes(served):
    url = served["url"]
    r = complete(url, USERS[0], headers={})
    assert_error(r, 401, "invalid_api_key")
    assert r.headers["www-authenticate"] == "Bearer"
    assert_error(complete(url, USERS[0], headers={"Authorization": "Bearer wrong"}), 401)
    assert complete(url, USERS[0], headers=SERVICE).status_code == 200
    assert complete(url, USERS[0], headers=ADMIN).status_code == 200  # the admin key covers the service scope
    for method, path in (("GET", f"/v1/users/{USERS[0]}"), ("DELETE", f"/v1/users/{USERS[0]}"),
                         ("POST", f"/v1/users/{USERS[0]}/adapter")):
        assert_error(requests.request(method, url + path, headers=SERVICE, json={"history": HISTORY}, timeout=30),
                     403, "insufficient_scope")
        assert_error(requests.request(method, url + path, json={"history": HISTORY}, timeout=30), 401)
    assert requests.get(f"{url}/v1/users/{USERS[0]}", headers=ADMIN, timeout=30).json()["adapter"]["user_id"] == USERS[0]
    # /healthz: alive for anyone, details only for a key
    assert requests.get(f"{url}/healthz", timeout=30).json() == {"status": "ok"}
    details = requests.get(f"{url}/healthz", headers=SERVICE, timeout=30).json()
    assert details["hypernet_id"] and details["auth"] == "keys" and "engine" in details
    # The OpenAPI spec declares the bearer scheme on the operations that need it
    spec = requests.get(f"{url}/openapi.json", timeout=30).json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http", "scheme": "bearer", "description": "P2P_SERVICE_KEY or P2P_ADMIN_KEY"}
    assert spec["paths"]["/v1/completions"]["post"]["security"] == [{"HTTPBearer": []}]
    assert "security" not in spec["paths"]["/healthz"]["get"]


def test_an_end_user_token_reaches_its_own_user_only(served):
    url, store, offline = served["url"], served["store"], served["offline"]
    r = requests.post(f"{url}/v1/tokens", json={"user": USERS[0], "ttl_s": 600}, headers=ADMIN, timeout=30)
    assert r.status_code == 200, r.text
    assert Tokens((TOKEN_SECRET,)).user_of(r.json()["token"]) == USERS[0] and r.json()["expires_at"] > time.time()
    assert_error(requests.post(f"{url}/v1/tokens", json={"user": "x"}, headers=SERVICE, timeout=30), 403)
    mine = {"Authorization": f"Bearer {r.json()['token']}"}
    # Completions: naming nobody (or the base) means the token's user; naming anyone else is 403 however named.
    expected = offline.tokens(PROMPT, adapter_of(store, USERS[0]))
    for body in ({}, {"user": USERS[0]}, {"model": "tiny-random"}, {"model": f"tiny-random:{USERS[0]}"}):
        answer = complete(url, headers=mine, **body).json()
        assert answer["user"] == USERS[0] and answer["choices"][0]["token_ids"] == expected, body
    for body, headers in (({"user": USERS[1]}, {}), ({"model": f"tiny-random:{USERS[1]}"}, {}),
                          ({}, {"serve_multiplexed_model_id": USERS[1]})):
        assert_error(complete(url, headers={**mine, **headers}, **body), 403, "wrong_user")
    chat = requests.post(f"{url}/v1/chat/completions", headers=mine, timeout=60,
                         json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "user": USERS[1]})
    assert_error(chat, 403, "wrong_user")
    # The user endpoints: their own record and adapter, nobody else's, and no tokens for anyone.
    assert requests.get(f"{url}/v1/users/{USERS[0]}", headers=mine, timeout=30).json()["adapter"]["user_id"] == USERS[0]
    for method, path in (("GET", f"/v1/users/{USERS[1]}"), ("DELETE", f"/v1/users/{USERS[1]}"),
                         ("POST", f"/v1/users/{USERS[1]}/adapter")):
        assert_error(requests.request(method, url + path, headers=mine, json={"history": HISTORY}, timeout=30),
                     403, "wrong_user")
    assert store.adapter_row(USERS[1]) is not None  # the refused delete deleted nothing
    assert_error(requests.post(f"{url}/v1/tokens", json={"user": USERS[1]}, headers=mine, timeout=30), 403)
    assert requests.get(f"{url}/healthz", headers=mine, timeout=30).json() == {"status": "ok"}
    # A new user's app builds their own adapter with their token, then gets it.
    newcomer = {"Authorization": f"Bearer {Tokens((TOKEN_SECRET,)).issue('tok-user', 60)[0]}"}
    r = requests.post(f"{url}/v1/users/tok-user/adapter", json={"history": HISTORY}, headers=newcomer, timeout=120)
    assert r.status_code == 200, r.text
    assert complete(url, headers=newcomer).json()["personalized"] is True
    # Tokens that do not verify are 401 with a reason, not a fall-back to no key.
    expired = Tokens((TOKEN_SECRET,)).issue(USERS[0], 1, now=time.time() - 60)[0]
    assert_error(complete(url, headers={"Authorization": f"Bearer {expired}"}), 401, "invalid_token", "expired")
    foreign = Tokens(("f" * 32,)).issue(USERS[0], 60)[0]
    assert_error(complete(url, headers={"Authorization": f"Bearer {foreign}"}), 401, "invalid_token")


def _raw_post(port: int, path: str, headers: dict, body_prefix: bytes) -> bytes:
    """POST announcing a 50 MB body but sending only its first bytes; return the response head."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
                f"Content-Length: {50 * 1024 * 1024}", *(f"{k}: {v}" for k, v in headers.items()), "", ""]
        s.sendall("\r\n".join(head).encode() + body_prefix)
        return s.recv(65536)


def test_keys_and_body_limit_are_checked_before_the_body_is_read(served):
    # The server answers while 50 MB of announced body were never sent: it did not wait to read it.
    assert _raw_post(served["port"], "/v1/completions", {}, b'{"prompt": "').startswith(b"HTTP/1.1 401")
    assert _raw_post(served["port"], "/v1/completions", SERVICE, b'{"prompt": "').startswith(b"HTTP/1.1 413")
    r = requests.post(f"{served['url']}/v1/completions", headers=SERVICE, timeout=60,
                      json={"prompt": "word " * 100_000, "max_tokens": 2})  # 500 KB, over the 256 KB limit
    assert_error(r, 413, "request_too_large")


def test_on_demand_adapter_replace_flag_and_concurrent_builds(served):
    url, store, offline = served["url"], served["store"], served["offline"]
    assert complete(url, "newbie").json()["personalized"] is False
    r = requests.post(f"{url}/v1/users/newbie/adapter", json={"history": HISTORY}, headers=ADMIN, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["adapter"]["user_id"] == "newbie" and r.json()["replaced"] is False
    body = complete(url, "newbie").json()
    assert body["personalized"] is True and body["adapter"]["source"] == "on-demand"
    assert body["choices"][0]["token_ids"] == offline.tokens(PROMPT, adapter_of(store, "newbie"))
    # An existing user is not replaced without the flag...
    other = [{**h, "text": f"A cooking show, episode {h['ts']}."} for h in HISTORY]
    assert_error(requests.post(f"{url}/v1/users/newbie/adapter", json={"history": other}, headers=ADMIN, timeout=60),
                 409, "adapter_exists")
    assert_error(requests.post(f"{url}/v1/users/{USERS[3]}/adapter", json={"history": other}, headers=ADMIN,
                               timeout=60), 409, "adapter_exists")
    # ...and is with it.
    before = store.adapter_row("newbie")["sha256"]
    r = requests.post(f"{url}/v1/users/newbie/adapter", json={"history": other, "replace": True}, headers=ADMIN,
                      timeout=120)
    assert r.status_code == 200 and r.json()["replaced"] is True
    assert store.adapter_row("newbie")["sha256"] != before
    assert complete(url, "newbie").json()["choices"][0]["token_ids"] == offline.tokens(PROMPT, adapter_of(store, "newbie"))
    # Twelve concurrent builds for one new user: one builds, the others find it built (409); one adapter.
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(lambda _: requests.post(f"{url}/v1/users/crowd/adapter", json={"history": HISTORY},
                                                      headers=ADMIN, timeout=120).status_code, range(12)))
    assert sorted(codes) == [200] + [409] * 11
    versions = store.fs.ls(store.path(store.adapter_prefix(store.current().hypernet_id, "crowd")))
    assert len(versions) == 1
    assert requests.get(f"{url}/v1/users/crowd", headers=ADMIN, timeout=30).json()["adapter"]["source"] == "on-demand"


def test_a_device_sends_only_its_embedding_and_gets_the_same_adapter(served):
    """The private mode: no history reaches the server, and the adapter equals the library's for that vector."""
    url, store, offline = served["url"], served["store"], served["offline"]
    dim = offline.hypernet.config.embed_dim
    rng = np.random.default_rng(7)
    for uid, keep in (("device-a", "adapter"), ("device-b", "embedding")):
        emb = rng.standard_normal(dim).astype(np.float32)
        r = requests.post(f"{url}/v1/users/{uid}/embedding", headers=ADMIN, timeout=120,
                          json={"embedding": emb.tolist(), "store": keep})
        assert r.status_code == 200, r.text
        assert (r.json()["adapter"]["adapter_uri"] is None) == (keep == "embedding")
        [want] = offline.hypernet.user_adapters(emb[None])
        body = complete(url, uid).json()
        assert body["personalized"] is True and body["choices"][0]["token_ids"] == offline.tokens(PROMPT, want)
        assert "history" not in store.adapter_row(uid)  # the store never saw one
    r = requests.post(f"{url}/v1/users/device-a/embedding", headers=ADMIN, timeout=60, json={"embedding": [0.0] * dim})
    assert_error(r, 409, "adapter_exists")
    assert_error(requests.post(f"{url}/v1/users/device-c/embedding", headers=ADMIN, timeout=60,
                               json={"embedding": [0.0] * (dim - 1)}), 400, "embedding_dimension")
    assert_error(requests.post(f"{url}/v1/users/device-c/embedding", headers=ADMIN, timeout=60,
                               json={"embedding": [1e39] * dim}), 400, "embedding")
    other = {"Authorization": f"Bearer {Tokens((TOKEN_SECRET,)).issue('device-d', 60)[0]}"}
    assert_error(requests.post(f"{url}/v1/users/device-c/embedding", headers=other, timeout=60,
                               json={"embedding": [0.0] * dim}), 403, "wrong_user")
    assert requests.post(f"{url}/v1/users/device-d/embedding", headers=other, timeout=60,
                         json={"embedding": [0.0] * dim}).status_code == 200  # a user's own device, with its token


def test_events_rebuild_the_users_adapter_at_once_and_count_once(served):
    url, store, offline = served["url"], served["store"], served["offline"]
    r = requests.post(f"{url}/v1/users/eventful/adapter", json={"history": HISTORY}, headers=ADMIN, timeout=120)
    assert r.status_code == 200, r.text
    before = store.adapter_row("eventful")["sha256"]
    new = [{"item_id": "e1", "text": "A cooking show about bread.", "label": "cozy", "ts": 5000}]
    r = requests.post(f"{url}/v1/users/eventful/events", json={"items": new}, headers=ADMIN, timeout=120)
    assert r.status_code == 200, r.text
    assert (r.json()["added"], r.json()["history_items"]) == (1, len(HISTORY) + 1)
    after = store.adapter_row("eventful")["sha256"]
    assert after != before  # rebuilt from the whole history, served from the next request
    embedder = offline.personalizer.embedder
    [profile] = embedder.profiles([HISTORY + new])
    [want] = offline.hypernet.user_adapters(embedder.embed([profile]))
    assert complete(url, "eventful").json()["choices"][0]["token_ids"] == offline.tokens(PROMPT, want)
    again = requests.post(f"{url}/v1/users/eventful/events", json={"items": new}, headers=ADMIN, timeout=120)
    assert again.json()["added"] == 0 and again.json()["duplicates"] == 1  # an event sent twice lands once
    assert_error(requests.post(f"{url}/v1/users/stranger/events", json={"items": new}, headers=ADMIN, timeout=60),
                 409, "no_history")
    other = {"Authorization": f"Bearer {Tokens((TOKEN_SECRET,)).issue('stranger', 60)[0]}"}
    assert_error(requests.post(f"{url}/v1/users/eventful/events", json={"items": new}, headers=other, timeout=60),
                 403, "wrong_user")


def test_delete_forgets_the_user(served):
    url, store = served["url"], served["store"]
    uid = USERS[5]
    assert complete(url, uid).json()["personalized"] is True  # cached in the replica now
    r = requests.delete(f"{url}/v1/users/{uid}", headers=ADMIN, timeout=60)
    assert r.status_code == 200 and r.json() == {"user_id": uid, "deleted": True, "manifest_rows_removed": 1}
    assert_error(requests.get(f"{url}/v1/users/{uid}", headers=ADMIN, timeout=30), 404, "user_not_found")
    assert complete(url, uid).json()["personalized"] is False  # the replica's cache forgot it too
    with pytest.raises(AdapterNotFound):
        store.read_adapter(uid)
    assert_error(requests.delete(f"{url}/v1/users/{uid}", headers=ADMIN, timeout=60), 404)


def test_a_delete_while_a_refresh_holds_the_store_is_503_and_the_user_stops_being_served(served):
    url, store = served["url"], served["store"]
    uid = USERS[6]
    assert complete(url, uid).json()["personalized"] is True
    with store.leased("refresh (the test's)"):
        t = time.monotonic()
        r = requests.delete(f"{url}/v1/users/{uid}", headers=ADMIN, timeout=120)
        assert time.monotonic() - t < 30  # it once waited 60 s, then answered 500 LeaseHeld
        assert_error(r, 503, "store_busy")
        assert int(r.headers["retry-after"]) > 0 and store.uri not in r.text
        assert store.is_deleted(uid)  # tombstoned at once: no refresh or build brings them back
        assert complete(url, uid).json()["personalized"] is False
    r = requests.delete(f"{url}/v1/users/{uid}", headers=ADMIN, timeout=120)  # the retry finishes it
    assert r.status_code == 200 and r.json()["manifest_rows_removed"] == 1
    with pytest.raises(AdapterNotFound):
        store.read_adapter(uid)


# --- bad input -----------------------------------------------------------------------------------


def _raw(url, path, data: bytes, headers=SERVICE):
    return requests.post(url + path, data=data, headers={**headers, "content-type": "application/json"}, timeout=60)


def test_every_input_class_that_once_gave_500_is_a_4xx_with_an_openai_error(served):
    url = served["url"]
    chat = "/v1/chat/completions"
    cases = [
        (complete(url, USERS[0], prompt=""), 400, "empty_prompt"),
        (_raw(url, "/v1/completions", b'{"prompt": "\\ud800 ghost"}'), 400, "prompt"),
        (_raw(url, "/v1/completions", b'{"prompt": "x", "user": "\\udfff"}'), 400, "user"),
        (_raw(url, "/v1/completions", b'{"prompt": "x", "temperature": NaN}'), 400, "temperature"),
        (_raw(url, "/v1/completions", b'{"prompt": "x", "temperature": Infinity}'), 400, "temperature"),
        (complete(url, prompt="x", seed=2**80), 400, "seed"),
        (_raw(url, "/v1/completions", b"{not json"), 400, "invalid_json"),
        (complete(url, prompt="x", max_tokens=0), 400, "max_tokens"),
        (complete(url, prompt="x", max_tokens=1001), 400, "max_tokens"),
        (complete(url, prompt="word " * 600, max_tokens=500), 400, "context_length_exceeded"),
        (complete(url, prompt="x", n=17), 400, "n"),
        (complete(url, prompt="x", echo=True), 400, "echo is not supported"),
        (complete(url, prompt="x", logit_bias={"5": 1.0}), 400, "logit_bias is not supported"),
        (complete(url, prompt="x", best_of=3), 400, "best_of"),
        (complete(url, prompt="x", stop=["a", "b", "c", "d", "e"]), 400, "stop"),
        (complete(url, prompt="x", stream_options={"include_usage": True}), 400, "stream_options"),
        (complete(url, prompt=[10**9]), 400, "prompt"),
        (complete(url, prompt="x", max_tokens="5"), 400, "max_tokens"),
        (complete(url, prompt="x", frobnicate=1), 400, "unsupported_parameter"),
        (requests.post(url + chat, headers=SERVICE, timeout=30, json={"messages": []}), 400, "messages"),
        (requests.post(url + chat, headers=SERVICE, timeout=30,
                       json={"messages": [{"role": "assistant", "content": "hi"}]}), 400, "role 'user'"),
        (requests.post(url + chat, headers=SERVICE, timeout=30, json={"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x"}}]}]}), 400, "image_url"),
        (requests.post(url + chat, headers=SERVICE, timeout=30, json={
            "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}), 400, "tools"),
        (requests.post(url + chat, headers=SERVICE, timeout=30, json={
            "messages": [{"role": "tool", "content": "hi"}]}), 400, "messages.0.role"),
        (requests.post(url + chat, headers=SERVICE, timeout=30, json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "max_completion_tokens": 4}),
         400, "disagree"),
        (_raw(url, "/v1/users/x/adapter", json.dumps({"history": [{**HISTORY[0], "ts": 10**30}]}).encode(), ADMIN),
         400, "history.0.ts"),
        (_raw(url, "/v1/users/x/adapter", b'{"history": [{"item_id": "1", "text": "\\ud800", "ts": 1}]}', ADMIN),
         400, "history.0.text"),
        (_raw(url, "/v1/users/x/adapter", json.dumps({"history": [{"text": "no id", "ts": 1}]}).encode(), ADMIN),
         400, "history.0.item_id"),
        (requests.post(f"{url}/v1/users/x/adapter", headers=ADMIN, timeout=30,
                       json={"history": [{**HISTORY[0], "item_id": str(i)} for i in range(51)]}), 400, "history_too_long"),
        (requests.post(f"{url}/v1/users/x/adapter", headers=ADMIN, timeout=30,
                       json={"history": [{**HISTORY[0], "item_id": str(i)} for i in range(200_000)]}), 413, "request_too_large"),
        (requests.post(f"{url}/v1/users/x/adapter", headers=ADMIN, timeout=30, json={"history": []}), 400, "history"),
        (requests.get(f"{url}/v1/nothing", headers=SERVICE, timeout=30), 404, "no such endpoint"),
        (requests.get(f"{url}/v1/completions", headers=SERVICE, timeout=30), 405, "not allowed"),
    ]
    for r, status, word in cases:
        assert_error(r, status, word)
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 200


# --- the store -----------------------------------------------------------------------------------


def test_new_current_is_picked_up_and_corruption_falls_back(served, tiny_hypernet):
    url, store = served["url"], served["store"]
    assert complete(url, USERS[2]).json()["adapter"]["run_id"] == served["run_id"]
    new_run = commit(store, tiny_hypernet, USERS, seed=2, scale=20)  # a nightly refresh lands
    # The replica answers from the run it holds while it reads the new manifest on a thread of its
    # own, then from the new run: every answer is one of the two, and the new one comes.
    deadline, seen = time.monotonic() + 60, []
    while not seen or seen[-1]["adapter"]["run_id"] != new_run:
        assert time.monotonic() < deadline, seen[-3:]
        seen.append(complete(url, USERS[2]).json())
        time.sleep(0.1)
    assert {b["adapter"]["run_id"] for b in seen} <= {served["run_id"], new_run}
    assert all(b["personalized"] for b in seen)
    # A user whose adapter file is corrupted gets the base model, flagged; the replica stays up.
    _, row = store.read_adapter(USERS[7])
    path = store.path(row["adapter_uri"], ADAPTER_WEIGHTS)
    data = bytearray(store.fs.cat_file(path))
    data[-10] ^= 0xFF
    store.fs.pipe_file(path, bytes(data))
    body = complete(url, USERS[7]).json()
    assert body["personalized"] is False and "sha256" in body["adapter_error"]
    assert store.uri not in body["adapter_error"] and row["adapter_uri"] not in body["adapter_error"]  # no paths
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 200


def test_open_dev_mode_and_an_unreachable_store(served, tiny_hypernet, moto_s3):
    from moto.server import ThreadedMotoServer
    from ray import serve

    from pipelines.serve import build_app

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = os.environ["AWS_ENDPOINT_URL"]
    os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
    os.environ["AWS_MAX_ATTEMPTS"] = "1"
    try:
        import boto3

        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}").create_bucket(Bucket="gone")
        s3 = AdapterStore("s3://gone/store")
        commit(s3, tiny_hypernet, USERS[:2], seed=3)
        # No keys at all: open development mode, every endpoint without a key, health details too.
        serve.run(build_app(s3.uri, service_key="", admin_key=""), name="s3", route_prefix="/s3", blocking=False)
        url = served["url"] + "/s3"
        assert complete(url, USERS[0], headers={}).json()["personalized"] is True
        assert requests.get(f"{url}/healthz", timeout=30).json()["auth"] == "open"
        assert requests.get(f"{url}/v1/users/{USERS[0]}", timeout=30).status_code == 200
        server.stop()
        # The store goes away: 503 with a message, and the replica keeps answering.
        error = assert_error(complete(url, USERS[1], headers={}), 503, "store_unavailable")
        assert "gone" not in error["message"] and "127.0.0.1" not in error["message"]  # no bucket, no endpoint
        assert requests.get(f"{url}/healthz", timeout=30).status_code == 200
        assert complete(url, None, headers={}).status_code == 200  # the base model needs no store
    finally:
        os.environ["AWS_ENDPOINT_URL"] = saved
        os.environ.pop("AWS_MAX_ATTEMPTS", None)


def test_serve_command_fails_in_one_line_before_starting_ray(tmp_path, capsys):
    from pipelines.cli import main

    assert main(["serve", "--store", str(tmp_path / "empty")]) == 2
    assert "no committed manifest" in capsys.readouterr().err
    assert main(["serve", "--store", str(tmp_path / "empty"), "--max-tokens", "0"]) == 2
    assert "max_tokens must be a positive integer" in capsys.readouterr().err


def test_keys_resolve_from_the_environment_and_legacy_key_never_opens_the_server():
    from pipelines.serve.auth import Keys

    assert Keys.resolve(env={}).open
    assert Keys.resolve(env={"P2P_SERVICE_KEY": "a,b", "P2P_ADMIN_KEY": "c"}) == Keys(("a", "b"), ("c",))
    assert Keys.resolve(env={"P2P_API_KEY": "old"}) == Keys(("old",), ("old",))
    assert Keys.resolve("x", env={"P2P_API_KEY": "old"}) == Keys(("x",), ())
    keys = Keys(("s",), ("a",))
    assert keys.scopes("Bearer s") == {"service"} and keys.scopes("bearer a") == {"service", "admin"}
    assert keys.scopes("Bearer nope") == set() and keys.scopes(None) == set() and keys.scopes("Basic s") == set()


def test_locks_serialize_one_user_only():
    import asyncio

    from pipelines.serve.users import KeyedLocks

    async def run():
        locks, order = KeyedLocks(), []

        async def hold(key, tag, wait):
            async with locks.hold(key):
                order.append(f"{tag}+")
                await asyncio.sleep(wait)
                order.append(f"{tag}-")

        await asyncio.gather(hold("u", "a", 0.05), hold("u", "b", 0), hold("v", "c", 0))
        return order, locks._locks

    order, left = asyncio.run(run())
    assert order.index("a-") < order.index("b+")  # same user: one after the other
    assert order.index("c+") < order.index("a-")  # another user: not blocked
    assert left == {}

