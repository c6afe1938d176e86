"""Generated token ids -> text pieces that are safe to send, cut at the first stop string.

Streaming needs text as tokens arrive, but a token is not always a whole character (byte-level
BPE splits multi-byte characters across tokens) and a stop string may span several tokens and
must not be sent at all. So each push decodes only a short window of recent tokens (the
offsets scheme vLLM uses: O(1) per token, and the window's left context keeps the spacing of
tokenizers that drop a word's leading space when it is decoded alone), holds back an
incomplete character, and holds back any tail that could still grow into a stop string.
The concatenation of everything handed out is the final text.
"""

from __future__ import annotations

CONTEXT_TOKENS = 4  # prompt tokens kept as the decoding window's left context


class TextStream:
    def __init__(self, tokenizer, stop: tuple[str, ...] = (), context: list[int] | None = None):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self._tokens: list[int] = list(context or [])[-CONTEXT_TOKENS:]
        self._prefix, self._read = 0, len(self._tokens)  # window [prefix, read) is already decoded
        self.text = ""  # the decoded completion so far (cut at a stop string once one appears)
        self.sent = 0  # characters of `text` already handed out
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one generated token; return the new text that is safe to send (maybe "")."""
        self._tokens.append(token)
        self._decode_window(final=False)
        return self._release(final=self.stopped)

    def finish(self) -> str:
        """The sequence ended without a stop string: everything still held back."""
        if not self.stopped:
            self._decode_window(final=True)
        return self._release(final=True)

    def _decode_window(self, final: bool) -> None:
        if self.stopped:
            return
        before = self._decode(self._tokens[self._prefix : self._read])
        after = self._decode(self._tokens[self._prefix :])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return  # a special token, or half a character: wait for the rest
        self._prefix, self._read = self._read, len(self._tokens)
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0) + 1)
        self.text += after[len(before) :]
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True

    def _release(self, final: bool) -> str:
        end = len(self.text) if final else len(self.text) - self._held()
        if end <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent : end], end
        return piece

    def _held(self) -> int:
        """Length of the longest tail of `text` that is the start of a stop string."""
        held = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), held, -1):
                if self.text.endswith(s[:k]):
                    held = k
                    break
        return held

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
