"""The live server as the ecosystem drives it: the official `openai` client, LangChain, schemathesis.

Real Ray Serve on 127.0.0.1 with keys on; every answer is checked against tokens decoded in
this process with the same model and adapter. The fuzz test runs schemathesis against the
app's own /openapi.json with a bounded budget and fails on any 5xx.
"""

import json

import httpx
import openai
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation import GenerationMode
from serve_support import ADMIN_KEY, PROMPT, SERVICE_KEY, USERS, Offline, commit, serve_on_a_free_port

from p2p.model.peft_format import adapter_from_files
from p2p.store import AdapterStore

BASE = "tiny-random"


@pytest.fixture(scope="module")
def served(ray_cluster, tiny_hypernet, tmp_path_factory):
    from ray import serve

    from pipelines.serve import Limits, build_app

    store = AdapterStore(str(tmp_path_factory.mktemp("openai") / "store"))
    commit(store, tiny_hypernet, USERS, seed=1, scale=20)
    # Small limits keep every fuzzed request cheap: at most 4 choices of 8 tokens, 64 KB bodies.
    limits = Limits(max_body_bytes=64 * 1024, max_tokens=8, max_choices=4, max_history_items=20)
    port = serve_on_a_free_port(serve, lambda: serve.run(
        build_app(store.uri, recheck_s=0.2, service_key=SERVICE_KEY, admin_key=ADMIN_KEY, limits=limits),
        name="p2p", route_prefix="/", blocking=False))
    url = f"http://127.0.0.1:{port}"
    requests.get(f"{url}/healthz", timeout=60).raise_for_status()
    yield {"url": url, "store": store, "offline": Offline(tiny_hypernet)}
    serve.shutdown()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served["url"] + "/v1", api_key=SERVICE_KEY, max_retries=0, timeout=120)


def adapter_of(store, uid):
    return adapter_from_files(store.read_adapter(uid)[0])[0]


def test_openai_client_completions_stop_n_and_streaming(served, client):
    offline, adapter = served["offline"], adapter_of(served["store"], USERS[0])
    expected = offline.text(offline.tokens(PROMPT, adapter, 8))
    r = client.completions.create(model=BASE, prompt=PROMPT, max_tokens=8, temperature=0, user=USERS[0])
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == BASE
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens == len(offline.ids(PROMPT))
    # stop: the text ends right before the stop string, which is not returned
    stop = expected[len(expected) // 2: len(expected) // 2 + 2]
    r = client.completions.create(model=BASE, prompt=PROMPT, max_tokens=8, temperature=0, user=USERS[0], stop=[stop])
    assert r.choices[0].text == expected[: expected.index(stop)] and r.choices[0].finish_reason == "stop"
    # n: sampled choices with a seed are reproducible, and differ from each other
    kw = dict(model=f"{BASE}:{USERS[0]}", prompt=PROMPT, max_tokens=8, temperature=1.0, n=3, seed=7)
    first, again = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert len({c.text for c in first.choices}) > 1
    # streaming: the chunks add up to the same text, the last one says why it stopped
    chunks = list(client.completions.create(model=BASE, prompt=PROMPT, max_tokens=8, temperature=0, user=USERS[0],
                                            stream=True, stream_options={"include_usage": True}))
    assert len(chunks) > 2 and all(c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8
    # logprobs: the greedy token is the most likely one
    r = client.completions.create(model=BASE, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 3 and all(max(top.values()) == pytest.approx(t) for top, t in
                                       zip(lp.top_logprobs, lp.token_logprobs, strict=True))


def test_openai_client_chat_streaming_and_models(served, client):
    offline, adapter = served["offline"], adapter_of(served["store"], USERS[1])
    expected = offline.text(offline.tokens(offline.chat_ids("Hello"), adapter, 6))
    r = client.chat.completions.create(model=f"{BASE}:{USERS[1]}", messages=[{"role": "user", "content": "Hello"}],
                                       max_completion_tokens=6, temperature=0)
    assert r.id.startswith("chatcmpl-") and r.choices[0].message.content == expected
    assert r.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "Hello"}], max_tokens=6,
                                            temperature=0, user=USERS[1], stream=True,
                                            stream_options={"include_usage": True}, logprobs=True, top_logprobs=2)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == 6
    logprobs = [lp for c in chunks if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.content]
    assert len(logprobs) == 6 and all(len(lp.top_logprobs) == 2 for lp in logprobs)
    assert [m.id for m in client.models.list().data] == [BASE]
    assert client.models.retrieve(f"{BASE}:{USERS[1]}").id == f"{BASE}:{USERS[1]}"


def test_openai_client_errors_are_typed_with_messages(served, client):
    with pytest.raises(openai.BadRequestError, match="max_tokens is 9; the limit is 8"):
        client.completions.create(model=BASE, prompt=PROMPT, max_tokens=9)
    with pytest.raises(openai.BadRequestError, match="unsupported parameter 'frobnicate'"):
        client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"frobnicate": 1})
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    wrong = openai.OpenAI(base_url=served["url"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="invalid API key"):
        wrong.models.list()
    with pytest.raises(openai.PermissionDeniedError, match="admin"):  # the service key on an admin route
        client.get(f"/users/{USERS[0]}", cast_to=httpx.Response)


def test_openai_client_constrained_decoding_answers_the_users_likeliest_label(served, client):
    """`response_format` with a JSON schema enum (OpenAI) and `guided_choice` (vLLM), scored per user."""
    store, offline = served["store"], served["offline"]
    tags = ["scary", "funny", "sad", "epic", "cozy"]
    question = "Which tag fits this movie: a haunted house at night?"
    for uid in USERS[:4]:
        want = offline.label(offline.chat_ids(question), tags, adapter_of(store, uid))
        as_string = client.chat.completions.create(
            model=f"{BASE}:{uid}", messages=[{"role": "user", "content": question}],
            response_format={"type": "json_schema", "json_schema": {"name": "tag", "schema": {"type": "string",
                                                                                           "enum": tags}}})
        assert json.loads(as_string.choices[0].message.content) == want
        as_object = client.chat.completions.create(
            model=f"{BASE}:{uid}", messages=[{"role": "user", "content": question}],
            response_format={"type": "json_schema", "json_schema": {"name": "tag", "schema": {
                "type": "object", "properties": {"tag": {"type": "string", "enum": tags}}, "required": ["tag"]}}})
        assert json.loads(as_object.choices[0].message.content) == {"tag": want}
        guided = client.completions.create(model=f"{BASE}:{uid}", prompt=PROMPT, max_tokens=4,
                                           extra_body={"guided_choice": tags})
        assert guided.choices[0].text == offline.label(offline.ids(PROMPT), tags, adapter_of(store, uid))
    stream = client.chat.completions.create(model=f"{BASE}:{USERS[0]}", messages=[{"role": "user", "content": question}],
                                            stream=True, extra_body={"guided_choice": tags})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) in tags
    for bad in ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer"}}},
                {"type": "json_object"}):
        with pytest.raises(openai.BadRequestError, match="response_format"):
            client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hi"}], response_format=bad)
    with pytest.raises(openai.BadRequestError, match="repeats"):
        client.completions.create(model=BASE, prompt="hi", extra_body={"guided_choice": ["a", "a"]})


def test_openai_client_responses_api_text_and_streaming(served, client):
    store, offline = served["store"], served["offline"]
    uid = USERS[1]
    want = offline.text(offline.tokens(offline.chat_ids(PROMPT), adapter_of(store, uid), max_tokens=6))
    plain = client.responses.create(model=f"{BASE}:{uid}", input=PROMPT, max_output_tokens=6, temperature=0)
    assert plain.output_text == want and plain.status in ("completed", "incomplete")
    assert plain.usage.input_tokens == len(offline.chat_ids(PROMPT)) and plain.usage.output_tokens <= 6
    as_messages = client.responses.create(model=f"{BASE}:{uid}", input=[{"role": "user", "content": PROMPT}],
                                          max_output_tokens=6, temperature=0)
    assert as_messages.output_text == want
    events = list(client.responses.create(model=f"{BASE}:{uid}", input=PROMPT, max_output_tokens=6, temperature=0,
                                          stream=True))
    assert events[0].type == "response.created" and [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    # 6 tokens end it by length: OpenAI's last event is then response.incomplete, else response.completed
    assert events[-1].type in ("response.completed", "response.incomplete")
    assert "".join(deltas) == want == events[-1].response.output_text
    tags = ["scary", "funny", "sad"]
    constrained = client.responses.create(model=f"{BASE}:{uid}", input=PROMPT, text={"format": {
        "type": "json_schema", "name": "tag", "schema": {"type": "string", "enum": tags}}})
    assert json.loads(constrained.output_text) == offline.label(offline.chat_ids(PROMPT), tags, adapter_of(store, uid))
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        client.responses.create(model=BASE, input="hi", previous_response_id="resp_1")
    with pytest.raises(openai.BadRequestError, match="store"):
        client.responses.create(model=BASE, input="hi", store=True)


def test_langchain_chat_openai_invoke_and_stream(served):
    from langchain_openai import ChatOpenAI

    offline, adapter = served["offline"], adapter_of(served["store"], USERS[2])
    expected = offline.text(offline.tokens(offline.chat_ids("Hello"), adapter, 6))
    llm = ChatOpenAI(base_url=served["url"] + "/v1", api_key=SERVICE_KEY, model=f"{BASE}:{USERS[2]}", max_tokens=6,
                     temperature=0, max_retries=0)
    message = llm.invoke("Hello")
    assert message.content == expected
    assert message.usage_metadata["output_tokens"] == 6  # max_tokens arrives (as max_completion_tokens)
    chunks = list(llm.stream("Hello"))
    assert "".join(c.content for c in chunks) == expected and len(chunks) > 2


# --- fuzz ----------------------------------------------------------------------------------------

FUZZ_EXAMPLES = 20  # per operation and mode: ~320 requests, well under a minute on 2 cores


def test_fuzz_never_gives_a_server_error(served):
    """Schemathesis against the live /openapi.json: valid and schema-breaking requests, zero 5xx.

    Every operation, in schemathesis' positive mode (requests the schema allows) and negative mode
    (requests it forbids), sent with the admin key so every route is reached past authentication.
    The strategies are driven with hypothesis directly: schemathesis' pytest loader
    (`schemathesis.pytest.from_fixture`) fails under pytest 9 (it reads `request.node._nodeid`).
    """
    api = schemathesis.openapi.from_url(served["url"] + "/openapi.json")
    failures, sent = [], [0]
    operations = [result.ok() for result in api.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/users/{user_id}/adapter"}
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
            def call(case):
                response = case.call(headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
                sent[0] += 1
                if response.status_code >= 500:
                    failures.append(f"{response.status_code} {response.text[:200]}\n{case.as_curl_command()}")

            try:
                call()
            except Unsatisfiable:  # nothing to break: e.g. GET /v1/models takes no parameters at all
                assert mode == GenerationMode.NEGATIVE, operation.path
    assert sent[0] >= len(operations) * FUZZ_EXAMPLES
    assert not failures, "\n\n".join(failures[:5])
