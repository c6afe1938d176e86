"""A frozen base model wrapped for one hypernetwork: per-row adapters in every forward and decode.

Training, evaluation, every baseline, refresh checks and serving all need the same four things
around a base model: which layers and modules carry adapters, the PEFT paths of those modules,
the scale the hypernet was trained with, and a way to run a batch where row i uses adapter i.
This object holds them once, so none of those callers re-derives them (or gets one wrong).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from p2p.model.hypernet import HypernetConfig, adapter_paths
from p2p.model.lora import AdapterBatch, UserAdapter, adapters_applied, stack_users, wrap_model


class AdaptedModel:
    """`model` with its target modules wrapped for `config`'s layers (idempotent), plus its tokenizer."""

    def __init__(self, model: nn.Module, tokenizer, config: HypernetConfig):
        wrap_model(model, config.target_modules, config.layers)
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.layers: list[int] = list(config.layers)
        self.paths = adapter_paths(config)
        self.scale: float = config.scale

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def applied(self, generated: AdapterBatch | None, row_index: torch.Tensor | None = None
                ) -> contextlib.AbstractContextManager:
        """Adapters on for one forward / decode: row n uses adapter `row_index[n]` (or n). None: base model."""
        if generated is None:
            return contextlib.nullcontext()
        return adapters_applied(self.model, generated, self.layers, self.scale, row_index=row_index)

    def stack(self, adapters: list[UserAdapter | None] | None) -> AdapterBatch | None:
        """Loaded per-user adapters as one batch; a None row gets a zero adapter (exactly the base model)."""
        if adapters is None or all(a is None for a in adapters):
            return None
        template = next(a for a in adapters if a is not None)
        zero = {p: (torch.zeros_like(a), torch.zeros_like(b)) for p, (a, b) in template.items()}
        return stack_users([a if a is not None else zero for a in adapters], self.layers, self.paths)
