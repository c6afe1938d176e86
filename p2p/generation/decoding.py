"""A decode batch whose rows may join and leave at any step, each with its own adapter and sampling.

`model.generate` takes one sampling config and one stopping rule per call and a fixed set of
rows; a serving batch mixes users and requests that arrive and finish at different times. So
this is a plain KV-cache loop over a `DecodeBatch`:

- `add(rows)`: prefill the newcomers together (left-padded, their own adapters), then merge
  them into the running batch: whichever KV cache is shorter is padded on the left and the two
  are concatenated along the batch dimension; the attention mask marks the padding and each
  row keeps its own position counter, so a row's attention never sees another row's padding.
- `step()`: sample one token per row (each row by its own sampler), let every row decide
  whether it is finished, drop the finished rows (`index_select` on the cache; leading columns
  that are padding for every remaining row are cut), and run one forward for the rest.

Per-row adapters are one stacked batch (`AdaptedModel.stack`), rebuilt only when membership
changes; rows that share an adapter share one copy through a row index. A row without an
adapter gets a zero adapter, which adds exactly 0.0: its tokens are the base model's.

`decode` (evaluation's static batch) is this loop with every row added at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers.cache_utils import DynamicLayer

from p2p.errors import P2PError
from p2p.generation.sampling import RowSampler, SamplingParams, TokenChoice, choose
from p2p.model.adapted import AdaptedModel
from p2p.model.lora import UserAdapter


class Row(Protocol):
    """One sequence in a `DecodeBatch`."""

    prompt: list[int]
    adapter: UserAdapter | None
    sampler: RowSampler

    def accept(self, choice: TokenChoice, batch_rows: int) -> bool:
        """Take the row's next token (sampled in a step of `batch_rows` rows); True when the row is done."""


class DecodeBatch:
    """The rows decoding together, their left-padded KV cache and their pending next-token logits."""

    def __init__(self, adapted: AdaptedModel):
        self.adapted = adapted
        self.rows: list[Row] = []
        self.cache = None  # transformers DynamicCache over the rows
        self.mask: torch.Tensor | None = None  # [rows, cached positions]: 1 real token, 0 padding
        self.next_pos: torch.Tensor | None = None  # [rows]: position id of each row's next token
        self.logits: torch.Tensor | None = None  # [rows, vocab]: each row's next-token logits
        self.forward_passes = 0
        self._adapters: tuple | None = None  # (stacked adapters, row index) for the current rows

    def __len__(self) -> int:
        return len(self.rows)

    @torch.no_grad()
    def add(self, rows: list[Row]) -> None:
        """Prefill `rows` in one forward and merge them into the running batch."""
        if not rows:
            return
        if any(len(r.prompt) == 0 for r in rows):
            raise ValueError("a row has an empty prompt")
        device = self.adapted.device
        width = max(len(r.prompt) for r in rows)
        ids = torch.full((len(rows), width), self.adapted.pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
        for i, r in enumerate(rows):
            ids[i, width - len(r.prompt):] = torch.tensor(r.prompt, device=device)
            mask[i, width - len(r.prompt):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with self.adapted.applied(*_stacked(self.adapted, rows)):
            logits, cache = self._forward(ids, mask, positions, None)
        if not self.rows:
            self.cache, self.mask, self.next_pos, self.logits = cache, mask, mask.sum(-1), logits
        else:
            next_pos, all_logits = torch.cat([self.next_pos, mask.sum(-1)]), torch.cat([self.logits, logits])
            self.mask = _merge(self.cache, cache, self.mask, mask)  # all or nothing: see _merge
            self.next_pos, self.logits = next_pos, all_logits
        self.rows = self.rows + list(rows)
        self._adapters = None

    @torch.no_grad()
    def step(self) -> list[Row]:
        """One token for every row; returns the rows that finished (they have left the batch)."""
        if not self.rows:
            return []
        choices = choose(self.logits, [r.sampler for r in self.rows])
        n = len(self.rows)
        done = [r.accept(c, n) for r, c in zip(self.rows, choices, strict=True)]
        finished = [r for r, d in zip(self.rows, done, strict=True) if d]
        keep = [i for i, d in enumerate(done) if not d]
        tokens = torch.tensor([choices[i].token for i in keep], dtype=torch.long, device=self.adapted.device)
        self._select(keep)
        if self.rows:
            self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
            with self.adapted.applied(*self._current_adapters()):
                self.logits, self.cache = self._forward(tokens[:, None], self.mask, self.next_pos[:, None], self.cache)
            self.next_pos = self.next_pos + 1
        return finished

    def remove(self, rows: list[Row]) -> None:
        """Drop rows before they finish (a cancelled request)."""
        gone = {id(r) for r in rows}
        self._select([i for i, r in enumerate(self.rows) if id(r) not in gone])

    def _select(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        self._adapters = None
        if not keep:
            self.rows, self.cache, self.mask, self.next_pos, self.logits = [], None, None, None, None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.adapted.device)
        self.cache.batch_select_indices(index)
        self.rows = [self.rows[i] for i in keep]
        self.mask, self.next_pos, self.logits = self.mask[index], self.next_pos[index], self.logits[index]
        first = int(self.mask.any(0).nonzero()[0])  # columns before it are padding in every row
        if first > 0 and _full_attention(self.cache):
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
            self.mask = self.mask[:, first:]

    def _current_adapters(self) -> tuple:
        if self._adapters is None:
            self._adapters = _stacked(self.adapted, self.rows)
        return self._adapters

    def _forward(self, ids, mask, positions, cache):
        # Only the last position's logits are needed: projecting every prompt position onto the
        # vocabulary would cost ~20% of a SmolLM2 prefill for nothing.
        out = self.adapted.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                                 use_cache=True, logits_to_keep=1)
        self.forward_passes += 1
        return out.logits[:, -1], out.past_key_values


def _stacked(adapted: AdaptedModel, rows: list[Row]) -> tuple:
    """(stacked adapters, row index) for `applied`: one copy per distinct adapter, None if none has one."""
    distinct: dict[int, int] = {}
    adapters: list[UserAdapter | None] = []
    index = []
    for r in rows:
        key = id(r.adapter)
        if key not in distinct:
            distinct[key] = len(adapters)
            adapters.append(r.adapter)
        index.append(distinct[key])
    generated = adapted.stack(adapters)
    if generated is None or len(adapters) == len(rows):
        return generated, None
    return generated, torch.tensor(index, dtype=torch.long, device=adapted.device)


def _full_attention(cache) -> bool:
    """Whether every layer is a plain growing cache whose tensors may be padded, cut and concatenated."""

    return all(type(layer) is DynamicLayer for layer in cache.layers)


def _layers(cache) -> list:
    if not _full_attention(cache):
        kinds = sorted({type(layer).__name__ for layer in cache.layers})
        raise P2PError(f"rows can join a running batch only with a full-attention KV cache (DynamicLayer); "
                       f"this model's cache has {kinds}")
    return cache.layers


def _merge(running, new, running_mask: torch.Tensor, new_mask: torch.Tensor) -> torch.Tensor:
    """Append `new`'s rows to `running` (in place), left-padding the shorter; returns the merged mask."""
    width = max(running_mask.shape[1], new_mask.shape[1])
    pad_running, pad_new = width - running_mask.shape[1], width - new_mask.shape[1]
    pairs = list(zip(_layers(running), _layers(new), strict=True))
    # Every layer is built before any is replaced: a failure half-way (out of memory) leaves the running
    # batch as it was, rather than layers with different row counts that fail every running row.
    merged = [(torch.cat([_pad_left(a.keys, pad_running), _pad_left(b.keys, pad_new)]),
               torch.cat([_pad_left(a.values, pad_running), _pad_left(b.values, pad_new)])) for a, b in pairs]
    mask = torch.cat([_pad_left(running_mask, pad_running, dim=1), _pad_left(new_mask, pad_new, dim=1)])
    for (a, _), (keys, values) in zip(pairs, merged, strict=True):
        a.keys, a.values = keys, values
    return mask


def _pad_left(t: torch.Tensor, n: int, dim: int = -2) -> torch.Tensor:
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


# --- evaluation's static batch -------------------------------------------------------------------


@dataclass
class Decoded:
    tokens: list[list[int]]  # generated ids per row (without the prompt, without EOS)
    finish_reasons: list[str]  # "stop" (EOS) or "length" (max_tokens)
    forward_passes: int


@dataclass(eq=False)
class _BudgetRow:
    """A row that stops at EOS (not kept) or after `max_tokens` tokens."""

    prompt: list[int]
    adapter: UserAdapter | None
    sampler: RowSampler
    eos_id: int | None
    tokens: list[int] = field(default_factory=list)
    reason: str = "length"

    def accept(self, choice: TokenChoice, batch_rows: int) -> bool:
        if self.eos_id is not None and choice.token == self.eos_id:
            self.reason = "stop"
            return True
        self.tokens.append(choice.token)
        self.sampler.observe(choice.token)
        return len(self.tokens) >= self.sampler.params.max_tokens


def decode(adapted: AdaptedModel, prompts: list[list[int]], max_tokens: list[int],
           adapters: list[UserAdapter | None] | None = None, temperatures: list[float] | None = None,
           seed: int = 0) -> Decoded:
    """Generate for each row of a static batch; `adapters[i]` None means the base model for row i.

    Every row samples from its own generator seeded with `seed`, so a row's tokens do not depend
    on which rows share its batch. A row with `max_tokens <= 0` gets no tokens.
    """
    adapters = adapters or [None] * len(prompts)
    temperatures = temperatures or [0.0] * len(prompts)
    rows = [_BudgetRow(p, a, RowSampler(SamplingParams(max_tokens=max(m, 1), temperature=max(t, 0.0), seed=seed)),
                       adapted.eos_id)
            for p, m, t, a in zip(prompts, max_tokens, temperatures, adapters, strict=True)]
    batch = DecodeBatch(adapted)
    batch.add([r for r, m in zip(rows, max_tokens, strict=True) if m > 0])
    while len(batch):
        batch.step()
    return Decoded([r.tokens for r in rows], [r.reason for r in rows], batch.forward_passes)
