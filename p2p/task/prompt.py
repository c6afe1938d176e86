"""A user's text -> the model's prompt tokens, and how a prompt too long for its budget is cut.

One rule for training, evaluation and serving: the chat template's header and footer are always
kept, and so are the beginning and the end of the user's text; what goes is the middle, replaced
by an ellipsis. Task prompts put their instruction first (LaMP: "Generate a headline for the
following article: ...") and often their question or options last (LaMP-1's references), so
cutting from the left, as before, dropped the chat header and the instruction.
"""

from __future__ import annotations


def chat_prompt(tokenizer, user_text: str, system: str | None = None) -> str:
    """The prompt string for one user turn, through the model's chat template if it has one."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": user_text}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return user_text + "\n"


def profile_context(profile_text: str) -> str:
    """The system message that puts a user's profile in the prompt: the `prompt` baseline and the
    trained retrieval control read the same words."""
    return f"What you know about this user:\n{profile_text}"


MARKER = "\x00p2p-user-text\x00"
ELLIPSIS = " ... "


class PromptFormat:
    """Chat-formats user texts for one tokenizer and fits them into a token budget."""

    def __init__(self, tokenizer, system: str | None = None):
        self.tokenizer, self.system = tokenizer, system
        rendered = chat_prompt(tokenizer, MARKER, system)
        if MARKER in rendered:
            self._head, self._tail = rendered.split(MARKER, 1)
        else:  # a template that rewrites its input: no cut inside it, whole prompts only
            self._head = self._tail = None
        self._ellipsis = self._encode(ELLIPSIS)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def text(self, user_text: str) -> str:
        return chat_prompt(self.tokenizer, user_text, self.system)

    def ids(self, user_text: str, budget: int | None = None) -> list[int]:
        """Token ids of the chat prompt; if longer than `budget`, the middle of `user_text` is cut."""
        ids = self._encode(self.text(user_text))
        if budget is None or len(ids) <= budget or self._head is None:
            return ids
        head, tail = self._encode(self._head), self._encode(self._tail)
        body = self._encode(user_text)
        room = budget - len(head) - len(tail) - len(self._ellipsis)
        if room < 2:  # not even two tokens of the user's text fit: keep its end
            return (head + body + tail)[-budget:]
        front = (room + 1) // 2
        back = room - front
        return head + body[:front] + self._ellipsis + body[len(body) - back :] + tail
