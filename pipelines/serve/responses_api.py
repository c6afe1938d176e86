"""OpenAI's Responses API shapes (`POST /v1/responses`): one text answer as a response object or its events.

The generation is the chat path's (pipelines/serve/completions.py); this only says it the way
the Responses API does: an `output` list holding one assistant message of `output_text`, usage as
input/output tokens, and when streaming the typed events (`response.created`, ...
`response.output_text.delta`, ... `response.completed`), each as `event:` + `data:` lines.
"""

from __future__ import annotations

import json
import secrets
import time


class ResponseWriter:
    def __init__(self, model: str, request: dict, extras: dict):
        self.id, self.item_id = "resp_" + secrets.token_hex(12), "msg_" + secrets.token_hex(12)
        self.created, self.model, self.request, self.extras = int(time.time()), model, request, extras
        self.sequence = 0

    def response(self, text: str, finish_reason: str | None, input_tokens: int, output_tokens: int,
                 status: str | None = None) -> dict:
        status = status or ("incomplete" if finish_reason == "length" else "completed")
        done = status != "in_progress"
        message = {"type": "message", "id": self.item_id, "status": "completed" if done else "in_progress",
                   "role": "assistant", "content": [self._part(text)] if done else []}
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status, "model": self.model,
            "output": [message] if done else [], "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": self.request.get("instructions"), "max_output_tokens": self.request.get("max_output_tokens"),
            "temperature": self.request.get("temperature"), "top_p": self.request.get("top_p"),
            "metadata": self.request.get("metadata") or {}, "parallel_tool_calls": False, "tool_choice": "none",
            "tools": [], "text": self.request.get("text") or {"format": {"type": "text"}}, "store": False,
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens,
                      "total_tokens": input_tokens + output_tokens, "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens_details": {"reasoning_tokens": 0}},
            **({**self.extras} if done else {}),
        }

    def opening(self) -> list[str]:
        return [self.event("response.created", response=self.response("", None, 0, 0, status="in_progress")),
                self.event("response.output_item.added", output_index=0,
                           item={"type": "message", "id": self.item_id, "status": "in_progress",
                                 "role": "assistant", "content": []}),
                self.event("response.content_part.added", item_id=self.item_id, output_index=0, content_index=0,
                           part=self._part(""))]

    def delta(self, text: str) -> str:
        return self.event("response.output_text.delta", item_id=self.item_id, output_index=0, content_index=0,
                          delta=text, logprobs=[])

    def closing(self, text: str, finish_reason: str | None, input_tokens: int, output_tokens: int) -> list[str]:
        final = self.response(text, finish_reason, input_tokens, output_tokens)
        return [self.event("response.output_text.done", item_id=self.item_id, output_index=0, content_index=0,
                           text=text, logprobs=[]),
                self.event("response.content_part.done", item_id=self.item_id, output_index=0, content_index=0,
                           part=self._part(text)),
                self.event("response.output_item.done", output_index=0, item=final["output"][0]),
                self.event("response.completed" if final["status"] == "completed" else "response.incomplete",
                           response=final)]

    def failure(self, error: dict) -> str:
        return self.event("error", code=error.get("code"), message=error.get("message"), param=error.get("param"))

    def event(self, kind: str, **fields) -> str:
        body = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(body, ensure_ascii=True, separators=(',', ':'))}\n\n"

    @staticmethod
    def _part(text: str) -> dict:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
