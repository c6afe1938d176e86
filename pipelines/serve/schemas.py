"""The request bodies the API accepts: OpenAI's completions and chat, and p2p's adapter builds.

Strict and closed on purpose. Numbers must be numbers (no "5" for 5, no NaN or Infinity),
strings must be valid UTF-8 (a lone surrogate would fail the tokenizer or the store later),
and a parameter this server does not implement is a 400 naming it (`extra="forbid"`), never
silently ignored. Explicit nulls mean "default", as in OpenAI's API.

`Limits` holds the bounds that depend on deployment (body size, tokens, choices, history).
"""

from __future__ import annotations

import json as _json
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from p2p.errors import P2PError
from p2p.generation.sampling import MAX_LOGPROBS, SEED_MAX, SEED_MIN
from p2p.userkey import canonical_user_id
from pipelines.serve.tokens import MAX_TTL_S

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_STOP, MAX_STOP_CHARS = 4, 256


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. Each bound answers 400/413 with a message, never a stalled replica."""

    max_body_bytes: int = 1 << 20  # any request body; checked from Content-Length, then while reading
    max_prompt_tokens: int | None = None  # per prompt; None: the base model's context
    max_tokens: int = 512  # generated tokens per choice (also the chat default when none is asked)
    max_choices: int = 16  # prompts x n in one request
    max_history_items: int = 1000  # items in one adapter build
    max_request_tokens: int = 32768  # choices x (prompt + max_tokens): what one request may make the engine hold
    max_waiting: int = 256  # sequences queued for the engine beyond the running batch; more is 429
    request_timeout_s: int = 300  # a request still generating after this is ended with a 503

    def __post_init__(self):
        for name in ("max_body_bytes", "max_prompt_tokens", "max_tokens", "max_choices", "max_history_items",
                     "max_request_tokens", "max_waiting", "request_timeout_s"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise P2PError(f"serve limit {name} must be a positive integer, got {value!r}")


def check_utf8(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid UTF-8 text (it contains a lone surrogate)") from None
    return value


Text = Annotated[str, AfterValidator(check_utf8)]
# A user id a request names, in its one stored form (NFC: p2p/userkey.py).
UserIdText = Annotated[str, Field(min_length=1, max_length=512), AfterValidator(check_utf8),
                       AfterValidator(canonical_user_id)]
Name = Annotated[str, Field(min_length=1, max_length=512), AfterValidator(check_utf8)]
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
Seed = Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]
StopText = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS), AfterValidator(check_utf8)]


MAX_CHOICES_IN_SET = 256  # labels one constrained request may offer (each is scored by one forward row)


@dataclass(frozen=True)
class ChoiceSet:
    """Constrained decoding: the answer is one of `labels`, the one the user's model finds most likely.

    From vLLM's `guided_choice` (the label as the answer) or OpenAI's `response_format` with a JSON
    schema that is a string enum (the answer is the JSON string) or an object of one enum property
    (the answer is that object). Scored whole, each label's tokens after the prompt
    (p2p/generation/label_choice.py): no sampling, so `temperature` and `n` do not change it.
    """

    labels: tuple[str, ...]
    key: str | None = None  # None: plain label; "": a JSON string; else {key: label}
    json: bool = False

    def render(self, label: str) -> str:
        if not self.json:
            return label
        return _json.dumps(label if not self.key else {self.key: label})

    @classmethod
    def parse(cls, guided_choice: list[str] | None, response_format: dict | None) -> ChoiceSet | None:
        if guided_choice is not None:
            if response_format not in (None, {"type": "text"}):
                raise ValueError("send guided_choice or response_format, not both")
            return cls(_labels(guided_choice, "guided_choice"))
        if response_format in (None, {"type": "text"}):
            return None
        if not isinstance(response_format, dict) or response_format.get("type") != "json_schema":
            raise ValueError("response_format must be {'type': 'text'} or {'type': 'json_schema', ...}")
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if isinstance(schema, dict) and "enum" in schema and schema.get("type", "string") == "string":
            return cls(_labels(schema["enum"], "response_format.json_schema.schema.enum"), key="", json=True)
        props = schema.get("properties") if isinstance(schema, dict) and schema.get("type") == "object" else None
        if isinstance(props, dict) and len(props) == 1:
            [(key, prop)] = props.items()
            if isinstance(prop, dict) and "enum" in prop:
                return cls(_labels(prop["enum"], f"response_format.json_schema.schema.properties.{key}.enum"),
                           key=key, json=True)
        raise ValueError("response_format json_schema: only a string enum, or an object with one enum property, "
                         "is supported (constrained decoding over a label set)")


def _labels(values, where: str) -> tuple[str, ...]:
    if not isinstance(values, list) or not values or not all(isinstance(v, str) and v for v in values):
        raise ValueError(f"{where} must be a non-empty list of non-empty strings")
    if len(values) > MAX_CHOICES_IN_SET:
        raise ValueError(f"{where} has {len(values)} choices; the limit is {MAX_CHOICES_IN_SET}")
    if len(set(values)) != len(values):
        raise ValueError(f"{where} repeats a choice")
    for v in values:
        check_utf8(v)
    return tuple(values)


class Closed(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(Closed):
    include_usage: bool | None = None


class Sampling(Closed):
    """What both completion endpoints take besides the prompt."""

    model: Annotated[str, Field(max_length=1024), AfterValidator(check_utf8)] | None = None
    user: Name | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] | None = None
    n: Annotated[int, Field(ge=1)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOP)] | None = None
    seed: Seed | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, float] | None = None
    return_token_ids: bool | None = None  # vLLM's extension: each choice's generated token ids
    guided_choice: list | None = None  # vLLM's extension: the answer is one of these (ChoiceSet)

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value):
        if value:
            raise ValueError("logit_bias is not supported")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    @property
    def choice_set(self) -> ChoiceSet | None:
        return ChoiceSet.parse(self.guided_choice, getattr(self, "response_format", None))

    @model_validator(mode="after")
    def _valid_choice_set(self):
        self.choice_set  # noqa: B018 - raises ValueError (a 400) for a malformed set
        return self

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionRequest(Sampling):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"prompt": "Which tag fits this movie?", "max_tokens": 8, "user": "u0000042"}]})
    prompt: Text | Annotated[list[Text], Field(min_length=1)] | Annotated[list[TokenId], Field(min_length=1)] \
        | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)]
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None
    suffix: Text | None = None

    @model_validator(mode="after")
    def _unsupported(self):
        if self.echo:
            raise ValueError("echo is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise ValueError("best_of other than n is not supported")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list: each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: Text | None = None

    @model_validator(mode="after")
    def _text_only(self):
        if self.type != "text":
            raise ValueError(f"content part type {self.type!r} is not supported (only 'text')")
        if self.text is None:
            raise ValueError("a text content part needs 'text'")
        if self.model_extra:
            raise ValueError(f"unsupported content part field(s) {sorted(self.model_extra)}")
        return self


class Message(Closed):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = None

    @field_validator("name")
    @classmethod
    def _no_name(cls, value):
        if value is not None:
            raise ValueError("message names are not supported")
        return value

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text or "" for part in self.content)
        return self.content or ""


class ChatRequest(Sampling):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"messages": [{"role": "user", "content": "Which tag fits this movie?"}], "max_completion_tokens": 8,
         "user": "u0000042", "stream": True}]})
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None

    @model_validator(mode="after")
    def _consistent(self):
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens disagree; send one of them")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.tools or self.tool_choice not in (None, "none"):
            raise ValueError("tools are not supported")
        if self.messages[-1].role != "user":
            raise ValueError("the last message must have role 'user'")
        return self

    @property
    def budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class HistoryItem(Closed):
    item_id: Name
    text: Annotated[str, Field(max_length=100_000), AfterValidator(check_utf8)]
    label: Annotated[str, Field(max_length=10_000), AfterValidator(check_utf8)] | None = None
    ts: Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]


class AdapterRequest(Closed):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"history": [{"item_id": "1", "text": "A haunted house at night.", "label": "horror", "ts": 1700000000}],
         "replace": False}]})
    history: Annotated[list[HistoryItem], Field(min_length=1)]
    updated_at: Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)] | None = None
    replace: bool = False  # an existing user's adapter is replaced only when this is true (else 409)


class TokenRequest(Closed):
    """`POST /v1/tokens` (admin key): an end-user token for one user id (pipelines/serve/tokens.py)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"user": "u1", "ttl_s": 3600}]})
    user: UserIdText
    ttl_s: Annotated[int, Field(gt=0, le=MAX_TTL_S)] = 3600


class EventsRequest(Closed):
    """`POST /v1/users/{id}/events`: new history items; the user's adapter is rebuilt from the whole history."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"items": [{"item_id": "42", "text": "A haunted house at night.", "label": "horror", "ts": 1700000000}]}]})
    items: Annotated[list[HistoryItem], Field(min_length=1)]


class EmbeddingRequest(Closed):
    """`POST /v1/users/{id}/embedding`: the private mode, where the history never leaves the device.

    The device builds its profile and embedding itself (p2p.profile: the label statistics and, with
    an encoder, the text embedding) and sends only the vector. `store`: "adapter" makes and stores
    the PEFT folder now; "embedding" stores only the vector (the adapter is made on each load).
    """

    model_config = ConfigDict(json_schema_extra={"examples": [{"embedding": [0.0, 0.1], "replace": False}]})
    embedding: Annotated[list[Annotated[float, Field(allow_inf_nan=False)]], Field(min_length=1, max_length=65536)]
    replace: bool = False
    store: Literal["adapter", "embedding"] = "adapter"



class InputText(Closed):
    type: Literal["input_text", "output_text", "text"]
    text: Text


class InputMessage(Closed):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | Annotated[list[InputText], Field(min_length=1)]
    type: Literal["message"] | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ResponsesRequest(Closed):
    """`POST /v1/responses` (OpenAI's Responses API), text in and text out: one chat turn underneath.

    `input` is a string (the user's turn) or a list of messages; `instructions` becomes the system
    message; `text.format` may be a JSON-schema enum (constrained decoding, as in chat). Nothing is
    stored server-side, so `store: true` and `previous_response_id` are refused, not ignored.
    """

    model_config = ConfigDict(json_schema_extra={"examples": [{"input": "Which tag fits this movie?",
                                                               "user": "u0000042", "max_output_tokens": 8}]})
    model: Annotated[str, Field(max_length=1024), AfterValidator(check_utf8)] | None = None
    input: Text | Annotated[list[InputMessage], Field(min_length=1)]
    instructions: Text | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] | None = None
    stream: bool | None = None
    user: Name | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    text: dict | None = None
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = None

    @model_validator(mode="after")
    def _supported(self):
        if self.store:
            raise ValueError("store: true is not supported (this server keeps no responses); send store: false")
        if self.previous_response_id is not None:
            raise ValueError("previous_response_id is not supported (no responses are stored); send the turns in input")
        self.as_chat()  # the chat request's own checks (last turn is the user's, text.format)
        return self

    def as_chat(self) -> ChatRequest:
        turns = [{"role": "user", "content": self.input}] if isinstance(self.input, str) else \
            [{"role": m.role, "content": m.text} for m in self.input]
        if self.instructions:
            turns.insert(0, {"role": "system", "content": self.instructions})
        fmt = (self.text or {}).get("format")
        response_format = None
        if fmt not in (None, {"type": "text"}):  # Responses puts the schema beside name/type, not under json_schema
            if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
                raise ValueError("text.format must be {'type': 'text'} or a json_schema")
            response_format = {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}
        return ChatRequest.model_validate(
            {"model": self.model, "messages": turns, "max_tokens": self.max_output_tokens,
             "temperature": self.temperature, "top_p": self.top_p, "user": self.user, "stream": self.stream,
             "response_format": response_format}, strict=False)
