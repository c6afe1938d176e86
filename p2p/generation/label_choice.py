"""Decoding within a label set: the label whose full token sequence the model finds most likely.

A classification task has a fixed label list (the task registry's), and free decoding on a small
model spends much of its error on answers that are no label at all. Scoring each label's whole
token sequence (plus the end-of-sequence token, so "fun" does not win over "funny" by being a
prefix of it) and taking the most likely is what OpenAI-style `guided_choice` / an enum in
`response_format` do in vLLM and SGLang. The prompt runs once; its KV cache is repeated for the
labels, which run together in one forward. Reported next to free decoding, never instead of it.
"""

from __future__ import annotations

import torch

from p2p.model.adapted import AdaptedModel
from p2p.model.lora import UserAdapter


class LabelChooser:
    """The most likely of a fixed list of answers, each scored by its full token sequence."""

    def __init__(self, adapted: AdaptedModel, labels: list[str] | tuple[str, ...]):
        if not labels:
            raise ValueError("a label set needs at least one label")
        self.adapted, self.labels = adapted, list(labels)
        tok = adapted.tokenizer
        eos = [] if adapted.eos_id is None else [adapted.eos_id]
        self.label_ids = [tok(label, add_special_tokens=False)["input_ids"] + eos for label in self.labels]

    @torch.no_grad()
    def scores(self, prompt: list[int], adapter: UserAdapter | None = None) -> torch.Tensor:
        """[labels] log-probability of each label's tokens (and EOS) after `prompt`."""
        a = self.adapted
        device, n = a.device, len(self.labels)
        width = max(len(ids) for ids in self.label_ids)
        ids = torch.full((n, width), a.pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((n, width), dtype=torch.long, device=device)
        for i, label in enumerate(self.label_ids):
            ids[i, : len(label)] = torch.tensor(label, device=device)
            mask[i, : len(label)] = 1
        stacked = a.stack([adapter]) if adapter is not None else None
        with a.applied(stacked):
            out = a.model(input_ids=torch.tensor([prompt], device=device), use_cache=True)
        cache = out.past_key_values
        cache.batch_repeat_interleave(n)
        first = torch.log_softmax(out.logits[0, -1].float(), -1)  # the first label token follows the prompt
        positions = torch.arange(len(prompt), len(prompt) + width, device=device)[None].expand(n, -1)
        full_mask = torch.cat([torch.ones((n, len(prompt)), dtype=torch.long, device=device), mask], dim=1)
        row_index = torch.zeros(n, dtype=torch.long, device=device)
        with a.applied(stacked, row_index=row_index if stacked is not None else None):
            logits = a.model(input_ids=ids, attention_mask=full_mask, position_ids=positions,
                             past_key_values=cache, use_cache=False).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]  # tokens 2.. of each label
        total = first[ids[:, 0]] + (logp * mask[:, 1:]).sum(1)
        return total

    def choose(self, prompt: list[int], adapter: UserAdapter | None = None) -> str:
        return self.labels[int(self.scores(prompt, adapter).argmax())]
