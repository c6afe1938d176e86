"""A training batch: tokenized prompt + target per example, and one embedding per distinct user.

Rows of one user share one embedding (a row index, not a copy), so a batch of eight examples
from three users runs the hypernetwork for three users. Labels score the target tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from p2p.task.prompt import PromptFormat

IGNORE = -100


def encode_example(fmt: PromptFormat, prompt: str, target: str, max_len: int) -> tuple[list[int], list[int]]:
    """Token ids of chat(prompt) + target + eos, and labels that score only the target.

    A target longer than half the budget is cut at its end; a prompt that does not fit the rest
    loses the middle of its user text (`PromptFormat`), never its chat header or instruction.
    """
    tok = fmt.tokenizer
    t = tok(target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    p = fmt.ids(prompt)
    if len(p) + len(t) > max_len:
        t = t[: max(1, max_len // 2)] if len(t) > max_len // 2 else t
        p = fmt.ids(prompt, budget=max_len - len(t))
    return p + t, [IGNORE] * len(p) + t


@dataclass
class Batch:
    example_ids: list[str]
    input_ids: torch.Tensor  # [N, T], right-padded
    attention_mask: torch.Tensor  # [N, T]
    labels: torch.Tensor  # [N, T], IGNORE outside targets
    embeddings: torch.Tensor  # [U, D]: one per distinct user in the batch
    row_index: torch.Tensor  # [N] -> row of `embeddings`
    tasks: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.example_ids)

    @property
    def target_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.example_ids, self.input_ids.to(device), self.attention_mask.to(device),
                     self.labels.to(device), self.embeddings.to(device), self.row_index.to(device), self.tasks)


def collate(rows: list[dict], fmt: PromptFormat, max_len: int, memo: dict | None = None) -> Batch:
    """rows: dicts with example_id, user_id, input, target, embedding (and task; and system, a system
    message of that example's prompt: the retrieval control's profile).

    `memo` (example id -> token ids) saves re-tokenizing an example every epoch.
    """
    encoded = []
    for r in rows:
        ids = memo.get(r["example_id"]) if memo is not None else None
        if ids is None:
            row_fmt = PromptFormat(fmt.tokenizer, r["system"]) if r.get("system") else fmt
            ids = encode_example(row_fmt, r["input"], r["target"], max_len)
            if memo is not None:
                memo[r["example_id"]] = ids
        encoded.append(ids)
    width = max(len(ids) for ids, _ in encoded)
    pad = fmt.tokenizer.pad_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(encoded):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    users: dict[str, int] = {}
    for r in rows:
        users.setdefault(r["user_id"], len(users))
    emb = np.zeros((len(users), len(rows[0]["embedding"])), dtype=np.float32)
    for r in rows:
        emb[users[r["user_id"]]] = np.asarray(r["embedding"], dtype=np.float32)
    return Batch(
        example_ids=[r["example_id"] for r in rows], input_ids=input_ids, attention_mask=mask, labels=labels,
        embeddings=torch.from_numpy(emb), row_index=torch.tensor([users[r["user_id"]] for r in rows]),
        tasks=[r.get("task", "") for r in rows],
    )


def batches_of(rows: list[dict], size: int, fmt: PromptFormat, max_len: int) -> list[Batch]:
    """Consecutive batches of `rows`, in order (validation)."""
    return [collate(rows[i : i + size], fmt, max_len) for i in range(0, len(rows), size)]
