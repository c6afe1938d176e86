"""The loss of a batch under its users' adapters, and the validation metric checkpoints are chosen by.

End-to-end SFT through the frozen LLM: each example's tokens pass through the base model with
*its own user's* adapter; cross-entropy on target tokens only (optional label smoothing), plus
an optional L2 penalty on the generated A and B, plus an optional personalization margin.

The margin (`contrast_weight` > 0) also runs each example with another user's adapter (the next
user of the batch) and asks the own adapter to beat it by `contrast_margin` nats of per-example
cross-entropy. Cross-entropy alone is mostly learned by the part of the adapter every user shares
(the answer format, which labels a question offers); in the margin's gradient that part cancels,
since it is the same in both runs, so the term trains only what depends on the profile.

What produces the adapters is the caller's: the hypernetwork (training), a DeepSpeed engine
around it (Ray workers), or a user's own LoRA tensors (OPPU). `p2p.train.loop` steps it.

Checkpoints are chosen on `val` users by the task-balanced val loss: each task's mean
per-example loss, averaged over tasks, so a task with long answers (headlines) does not drown
one with one-token answers (tags).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from p2p.model.adapted import AdaptedModel
from p2p.model.lora import AdapterBatch
from p2p.train.batch import IGNORE, Batch
from p2p.train.prefix_cache import PrefixCache

# What makes a batch's adapters from its users' embeddings [U, D]: a hypernet, its engine, fixed tensors.
AdapterSource = Callable[[torch.Tensor], AdapterBatch]


def per_example_ce(lm_head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                   label_smoothing: float = 0.0) -> torch.Tensor:
    """[N] mean next-token cross-entropy over each example's target tokens (NaN for none).

    The LM head runs only at positions that predict a target token: with a 49k vocabulary,
    projecting every prompt position would cost more than the adapted layers themselves.
    """
    keep = labels[:, 1:] != IGNORE
    logits = lm_head(hidden[:, :-1][keep]).float()
    per_token = F.cross_entropy(logits, labels[:, 1:][keep], label_smoothing=label_smoothing, reduction="none")
    row = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(keep)[keep]
    counts = keep.sum(1).to(per_token.dtype)
    sums = torch.zeros(labels.shape[0], dtype=per_token.dtype, device=per_token.device).index_add(0, row, per_token)
    return sums / counts  # 0/0 = NaN for an example without targets


def mean_over_examples(per_example: torch.Tensor) -> torch.Tensor:
    """The mean of each example's mean token loss: a 12-token headline and a one-token tag weigh the same."""
    return per_example[~per_example.isnan()].mean()


def target_loss(lm_head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0):
    return mean_over_examples(per_example_ce(lm_head, hidden, labels, label_smoothing))


class AdapterLoss:
    """The frozen base model as training sees it: per-row adapters, the frozen prefix cached.

    Unlike `AdaptedModel` (which applies adapters for any forward or decode), this object
    computes a batch's loss, and keeps the prefix cache that makes later epochs cheap.
    """

    def __init__(self, adapted: AdaptedModel, cache_prefix: bool = True, cache_max_bytes: int = 2 << 30,
                 label_smoothing: float = 0.0, l2_adapter: float = 0.0, contrast_weight: float = 0.0,
                 contrast_margin: float = 0.5):
        self.adapted, self.model = adapted, adapted.model
        self.label_smoothing, self.l2_adapter = label_smoothing, l2_adapter
        self.contrast_weight, self.contrast_margin = contrast_weight, contrast_margin
        self.cache = None
        first = min(adapted.layers)
        if cache_prefix and first > 0:
            cache = PrefixCache(self.model, first, cache_max_bytes)
            self.cache = cache if cache.usable else None

    def hidden(self, adapters: AdapterBatch, batch: Batch) -> torch.Tensor:
        if self.cache is not None:
            states = self.cache.hidden(batch)  # outside the adapter context: the prefix has none
            with self.adapted.applied(adapters, row_index=batch.row_index):
                return self.cache.top(inputs_embeds=states, attention_mask=batch.attention_mask,
                                      use_cache=False).last_hidden_state
        with self.adapted.applied(adapters, row_index=batch.row_index):
            return self.model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                         use_cache=False).last_hidden_state

    def per_example(self, source: AdapterSource, batch: Batch) -> tuple[AdapterBatch, torch.Tensor]:
        """(the batch's adapters, [N] per-example cross-entropy)."""
        adapters = source(batch.embeddings)
        hidden = self.hidden(adapters, batch)
        return adapters, per_example_ce(self.model.get_output_embeddings(), hidden, batch.labels, self.label_smoothing)

    def __call__(self, source: AdapterSource, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, cross-entropy) for a batch; the loss adds the L2 penalty on the adapters."""
        adapters, per_example = self.per_example(source, batch)
        ce = mean_over_examples(per_example)
        loss = ce
        if self.l2_adapter > 0:
            l2 = sum(a.pow(2).mean() + b.pow(2).mean() for a, b in adapters.values()) / len(adapters)
            loss = loss + self.l2_adapter * l2
        if self.contrast_weight > 0:
            # Run even for a batch of one user (whose term is then 0): every worker must make the same
            # forwards, since under ZeRO-3 each forward gathers the sharded weights with the others.
            present = float(batch.embeddings.shape[0] > 1)
            loss = loss + self.contrast_weight * present * self.margin(source, batch, per_example)
        return loss, ce

    def margin(self, source: AdapterSource, batch: Batch, own: torch.Tensor) -> torch.Tensor:
        """Mean hinge max(0, m - (CE with the next user's adapter - CE with the own one)) over the batch."""
        _, other = self.per_example(source, dataclasses.replace(batch, embeddings=batch.embeddings.roll(1, 0)))
        return mean_over_examples(F.relu(self.contrast_margin - (other - own)))


# --- validation -------------------------------------------------------------------------------------


def val_rows_sample(rows: list[dict], n: int) -> list[dict]:
    """`n` val examples spread over users and tasks: a fixed pseudo-random order (by example id),
    not the first n rows (which are a handful of users' every example)."""
    order = sorted(rows, key=lambda r: hashlib.sha256(r["example_id"].encode()).hexdigest())
    return order[:n]


@torch.no_grad()
def val_sums(loss: AdapterLoss, source: AdapterSource, batches: Iterable[Batch]) -> dict[str, float]:
    """Per task: the sum of per-example losses and the count (all-reduce these across workers)."""
    sums: dict[str, float] = {}
    for b in batches:
        _, per_example = loss.per_example(source, b)
        for task, value in zip(b.tasks, per_example.tolist(), strict=True):
            if not math.isnan(value):
                sums[f"{task}/sum"] = sums.get(f"{task}/sum", 0.0) + value
                sums[f"{task}/n"] = sums.get(f"{task}/n", 0.0) + 1
    return sums


def val_metrics(sums: dict[str, float]) -> dict[str, float]:
    """{"val_loss": mean over tasks of each task's mean per-example loss, "val_loss/<task>": ...}."""
    per_task = {k[: -len("/sum")]: v / sums[k[: -len("/sum")] + "/n"] for k, v in sums.items()
                if k.endswith("/sum") and sums[k[: -len("/sum")] + "/n"] > 0}
    if not per_task:
        return {}
    return {"val_loss": sum(per_task.values()) / len(per_task), **{f"val_loss/{t}": v for t, v in sorted(per_task.items())}}
