"""One completion or chat request, from validated body to response: prompts, jobs, the engine, the shape.

The user (and so the adapter) is already resolved (`Target`); this turns the prompt(s) into token
ids off the event loop (a 1 MB prompt takes a second to tokenize; the replica keeps answering),
checks them against the limits, makes one engine job per choice (prompt i, sample j: seed + i*n + j
when a seed is given) and answers either one body or an SSE stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi.responses import StreamingResponse

from p2p.generation.engine import Engine, EngineBusy, EngineClosed, EngineDead, Job
from p2p.generation.sampling import SEED_MAX, SamplingParams
from p2p.model.lora import UserAdapter
from p2p.task.prompt import chat_prompt
from pipelines.serve.errors import APIError
from pipelines.serve.responses import Choice, Responder, sse
from pipelines.serve.responses_api import ResponseWriter
from pipelines.serve.schemas import (
    ChatRequest,
    ChoiceSet,
    CompletionRequest,
    Limits,
    ResponsesRequest,
    Sampling,
)

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
GENERATION_FAILED = "generation failed on this replica (its log has the error); retry"  # no internals to callers


@dataclass
class Target:
    """Who a request is for: the adapter it decodes with and the p2p fields its answer carries."""

    model: str  # echoed in the response: the base name or `<base>:<user>`
    adapter: UserAdapter | None = None
    extras: dict = field(default_factory=lambda: {"user": None, "personalized": False, "adapter": None})


class Completions:
    def __init__(self, engine: Engine, tokenizer, limits: Limits, context: int):
        self.engine, self.tokenizer, self.limits, self.context = engine, tokenizer, limits, context
        self.max_prompt_tokens = min(limits.max_prompt_tokens or context, context - 1)

    async def completion(self, req: CompletionRequest, target: Target):
        prompts = await asyncio.to_thread(self._encode, req.prompts)
        budget = req.max_tokens or COMPLETION_DEFAULT_MAX_TOKENS
        return await self._answer(req, target, prompts, budget, chat=False, logprobs=req.logprobs)

    async def chat(self, req: ChatRequest, target: Target):
        prompt, budget = await self._chat_prompt(req)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        return await self._answer(req, target, [prompt], budget, chat=True, logprobs=logprobs)

    async def response(self, req: ResponsesRequest, target: Target):
        """OpenAI's Responses API: the chat turn `req` stands for, said as a response object or its events."""
        chat = req.as_chat()
        prompt, budget = await self._chat_prompt(chat)
        jobs, choice = self._jobs(chat, target, [prompt], budget, None)
        writer = ResponseWriter(target.model, req.model_dump(exclude_none=True), target.extras)
        if req.stream:
            return StreamingResponse(self._response_events(jobs, writer, len(prompt), choice),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        [answer] = await self._collect(jobs, choice)
        return writer.response(answer.text, answer.finish_reason, len(prompt), len(answer.tokens))

    async def _response_events(self, jobs: list[Job], writer: ResponseWriter, prompt_tokens: int,
                               choice: ChoiceSet | None) -> AsyncIterator[str]:
        answer = Choice()
        try:
            for event in writer.opening():
                yield event
            async for _, delta in self._deltas(jobs, choice):
                answer.add(delta)
                if delta.text:
                    yield writer.delta(delta.text)
            for event in writer.closing(answer.text, answer.finish_reason, prompt_tokens, len(answer.tokens)):
                yield event
        except APIError as exc:  # the status line is already sent: the error is an event
            yield writer.failure(exc.body()["error"])

    # --- prompts ---------------------------------------------------------------------------------

    async def _chat_prompt(self, req: ChatRequest) -> tuple[list[int], int]:
        """The chat's prompt ids (tokenized off the event loop) and its token budget."""
        [prompt] = await asyncio.to_thread(lambda: self._encode([self._chat_text(req)]))
        return prompt, req.budget or min(self.limits.max_tokens, self.context - len(prompt))

    def _chat_text(self, req: ChatRequest) -> str:
        """The chat as one prompt string, through the model's chat template when it has one."""
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in req.messages]
        if not getattr(self.tokenizer, "chat_template", None):
            system = next((m["content"] for m in messages if m["role"] == "system"), None)
            return chat_prompt(self.tokenizer, messages[-1]["content"], system)
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - a template that rejects this conversation (jinja raise_exception)
            raise APIError(400, f"the model's chat template rejects these messages: {exc}", "messages") from None

    def _encode(self, prompts: list[str | list[int]]) -> list[list[int]]:
        out = []
        for i, p in enumerate(prompts):
            ids = self.tokenizer(p, add_special_tokens=False)["input_ids"] if isinstance(p, str) else p
            where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            if not ids:
                raise APIError(400, f"{where} is empty", "prompt", "empty_prompt")
            bad = next((t for t in ids if t >= self.engine.vocab_size), None)
            if bad is not None:
                raise APIError(400, f"{where} has token id {bad}, outside the vocabulary [0, {self.engine.vocab_size})",
                               "prompt", "invalid_token_id")
            if len(ids) > self.max_prompt_tokens:
                raise APIError(400, f"{where} is {len(ids)} tokens; the limit is {self.max_prompt_tokens}",
                               "prompt", "context_length_exceeded")
            out.append(ids)
        return out

    # --- generation ------------------------------------------------------------------------------

    async def _answer(self, req: Sampling, target: Target, prompts: list[list[int]], budget: int, chat: bool,
                      logprobs: int | None):
        jobs, choice = self._jobs(req, target, prompts, budget, logprobs)
        responder = Responder(chat, target.model, self.tokenizer, logprobs is not None, bool(req.return_token_ids))
        prompt_tokens = sum(len(p) for p in prompts)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._events(jobs, responder, prompt_tokens, include_usage, choice),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return responder.body(await self._collect(jobs, choice), prompt_tokens, target.extras)

    def _jobs(self, req: Sampling, target: Target, prompts: list[list[int]], budget: int,
              logprobs: int | None) -> tuple[list[Job], ChoiceSet | None]:
        """One engine job per choice (prompt i, sample j), after the request's limits are checked."""
        n = req.n or 1
        self._check(prompts, budget, n)
        choice = req.choice_set
        labels = choice.labels if choice else None
        if labels and logprobs is not None:
            raise APIError(400, "logprobs are not available with constrained decoding (the answer is scored whole)",
                           "logprobs")
        jobs = [Job(p, target.adapter, self._params(req, budget, logprobs, i * n + j), labels)
                for i, p in enumerate(prompts) for j in range(n)]
        return jobs, choice

    async def _collect(self, jobs: list[Job], choice: ChoiceSet | None) -> list[Choice]:
        choices = [Choice() for _ in jobs]
        async for i, delta in self._deltas(jobs, choice):
            choices[i].add(delta)
        return choices

    def _check(self, prompts: list[list[int]], budget: int, n: int) -> None:
        if budget > self.limits.max_tokens:
            raise APIError(400, f"max_tokens is {budget}; the limit is {self.limits.max_tokens}", "max_tokens")
        if len(prompts) * n > self.limits.max_choices:
            raise APIError(400, f"{len(prompts)} prompt(s) x n={n} is {len(prompts) * n} choices; "
                                f"the limit is {self.limits.max_choices}", "n")
        held = sum(len(p) + budget for p in prompts) * n
        if held > self.limits.max_request_tokens:
            raise APIError(400, f"this request needs {held} tokens (choices x (prompt + max_tokens)); the limit "
                                f"is {self.limits.max_request_tokens}", "max_tokens", "request_too_large")
        longest = max(len(p) for p in prompts)
        if longest + budget > self.context:
            raise APIError(400, f"this model's maximum context length is {self.context} tokens; the prompt is "
                                f"{longest} tokens and max_tokens is {budget}", "max_tokens", "context_length_exceeded")

    @staticmethod
    def _params(req: Sampling, budget: int, logprobs: int | None, choice: int) -> SamplingParams:
        seed = None if req.seed is None else (req.seed + choice) % (SEED_MAX + 1)
        return SamplingParams(
            max_tokens=budget, temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, seed=seed, stop=req.stops,
            presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
            logprobs=logprobs)

    async def _deltas(self, jobs: list[Job], choice: ChoiceSet | None = None) -> AsyncIterator:
        try:
            async with asyncio.timeout(self.limits.request_timeout_s):
                async with contextlib.aclosing(self.engine.stream(jobs)) as deltas:
                    async for i, delta in deltas:
                        if delta.error is not None:  # the engine's text is in the replica's log, not the answer
                            raise APIError(503, GENERATION_FAILED, type="server_error", code="engine_error")
                        if choice is not None:  # the label, as the format asked
                            delta = dataclasses.replace(delta, text=choice.render(delta.text))
                        yield i, delta
        except TimeoutError:  # closing the stream above cancelled its rows
            raise APIError(503, f"the request was still generating after {self.limits.request_timeout_s} s",
                           type="server_error", code="request_timeout") from None
        except EngineBusy:
            raise APIError(429, "the server is at capacity; retry shortly", type="server_error", code="overloaded",
                           headers={"Retry-After": "1"}) from None
        except EngineDead:  # the health check has this replica replaced
            raise APIError(503, "this replica's engine failed; retry (another replica answers)",
                           type="server_error", code="engine_unavailable", headers={"Retry-After": "1"}) from None
        except EngineClosed:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down") from None
        except ValueError as exc:  # the engine's own check of a job (prompts are checked before this)
            raise APIError(400, str(exc), "prompt") from None

    async def _events(self, jobs: list[Job], responder: Responder, prompt_tokens: int,
                      include_usage: bool, choice: ChoiceSet | None = None) -> AsyncIterator[str]:
        generated = 0
        try:
            if responder.chat:
                for i in range(len(jobs)):
                    yield sse(responder.opening(i))
            async for i, delta in self._deltas(jobs, choice):
                generated += delta.token is not None
                chunk = responder.chunk(i, delta)
                if chunk is not None:
                    yield sse(chunk)
            if include_usage:
                yield sse(responder.usage_chunk(prompt_tokens, generated))
        except APIError as exc:  # the status line is already sent: the error goes in the stream
            yield sse(exc.body())
        yield sse("[DONE]")
