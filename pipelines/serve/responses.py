"""OpenAI's response shapes for one request: bodies, SSE chunks, logprobs, usage.

Completions are `text_completion` with `cmpl-` ids, chat is `chat.completion` (stream:
`chat.completion.chunk`) with `chatcmpl-` ids, one id per request shared by its chunks; a stream
is `data: {json}` events ending with `data: [DONE]`. Choice `i*n + j` is the j-th sample of
prompt i. p2p's own fields (`user`, `personalized`, `adapter`, `batch`) sit beside OpenAI's in
non-streamed bodies; OpenAI clients ignore them.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from dataclasses import dataclass, field

from p2p.generation.engine import Delta
from p2p.generation.sampling import TokenChoice

LOGPROB_FLOOR = -9999.0  # JSON has no -inf


@dataclass
class Choice:
    """Everything one choice produced, gathered from its deltas."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenChoice] = field(default_factory=list)
    finish_reason: str | None = None
    max_rows: int = 0

    def add(self, delta: Delta) -> None:
        self.text += delta.text
        if delta.token is not None:
            self.tokens.append(delta.token)
        if delta.choice is not None:
            self.logprobs.append(delta.choice)
        self.finish_reason = delta.finish_reason or self.finish_reason
        self.max_rows = max(self.max_rows, delta.batch_rows)


class Responder:
    """Builds one request's bodies and chunks; `chat` picks the chat shapes."""

    def __init__(self, chat: bool, model: str, tokenizer, logprobs: bool, token_ids: bool):
        self.chat, self.model, self.tokenizer = chat, model, tokenizer
        self.logprobs, self.token_ids = logprobs, token_ids
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self._offsets: dict[int, int] = {}  # completions' text_offset, per streamed choice

    # --- whole bodies --------------------------------------------------------------------------

    def body(self, choices: list[Choice], prompt_tokens: int, extras: dict) -> dict:
        out = {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
               "choices": [self._choice(i, c) for i, c in enumerate(choices)],
               "usage": usage(prompt_tokens, sum(len(c.tokens) for c in choices)),
               "system_fingerprint": None}
        return {**out, **extras, "batch": {"max_rows": max((c.max_rows for c in choices), default=0)}}

    def _choice(self, index: int, c: Choice) -> dict:
        if self.chat:
            out = {"index": index, "message": {"role": "assistant", "content": c.text},
                   "logprobs": self._chat_logprobs(c.logprobs) if self.logprobs else None,
                   "finish_reason": c.finish_reason}
        else:
            out = {"index": index, "text": c.text,
                   "logprobs": self._completion_logprobs(index, c.logprobs) if self.logprobs else None,
                   "finish_reason": c.finish_reason}
        if self.token_ids:
            out["token_ids"] = c.tokens
        return out

    # --- stream chunks ---------------------------------------------------------------------------

    def opening(self, index: int) -> dict:
        """Chat streams open each choice with the assistant role."""
        return self._chunk({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None})

    def chunk(self, index: int, delta: Delta) -> dict | None:
        """The chunk for one delta, or None when it carries nothing a client would see."""
        if not delta.text and delta.finish_reason is None and delta.choice is None:
            return None
        picks = [delta.choice] if delta.choice is not None else []
        if self.chat:
            choice = {"index": index, "delta": {"content": delta.text} if delta.text or picks else {},
                      "logprobs": self._chat_logprobs(picks) if self.logprobs else None,
                      "finish_reason": delta.finish_reason}
        else:
            choice = {"index": index, "text": delta.text,
                      "logprobs": self._completion_logprobs(index, picks) if self.logprobs else None,
                      "finish_reason": delta.finish_reason}
        if self.token_ids:
            choice["token_ids"] = [delta.token] if delta.token is not None else []
        return self._chunk(choice)

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return {**self._chunk(None), "choices": [], "usage": usage(prompt_tokens, completion_tokens)}

    def _chunk(self, choice: dict | None) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice] if choice else [],
                "system_fingerprint": None}

    # --- logprobs --------------------------------------------------------------------------------

    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _completion_logprobs(self, index: int, picks: list[TokenChoice]) -> dict:
        tokens = [self._token(p.token) for p in picks]
        offsets = []
        for t in tokens:
            offsets.append(self._offsets.get(index, 0))
            self._offsets[index] = offsets[-1] + len(t)
        return {"tokens": tokens, "token_logprobs": [_finite(p.logprob) for p in picks],
                "top_logprobs": [{self._token(t): _finite(lp) for t, lp in p.top or []} for p in picks],
                "text_offset": offsets}

    def _chat_logprobs(self, picks: list[TokenChoice]) -> dict:
        def entry(token_id: int, logprob: float) -> dict:
            text = self._token(token_id)
            return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8", "replace"))}

        return {"content": [{**entry(p.token, p.logprob), "top_logprobs": [entry(t, lp) for t, lp in p.top or []]}
                            for p in picks]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(event: dict | str) -> str:
    """One server-sent event: a JSON object, or the literal `[DONE]`."""
    data = event if isinstance(event, str) else json.dumps(event, ensure_ascii=True, separators=(",", ":"))
    return f"data: {data}\n\n"


def _finite(x: float | None) -> float | None:
    return None if x is None else (x if math.isfinite(x) else LOGPROB_FLOOR)
