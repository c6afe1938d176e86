"""Batched per-example LoRA on a frozen model.

Target linear layers of a Hugging Face causal LM are wrapped so that row n of a batch adds
`scale * (x_n A_i^T) B_i^T` with i = index[n]: each example gets its own user's adapter, and
rows of one user share one adapter (an index, not a copy). With no adapters set the wrapper
returns exactly the base layer's output. The same mechanism serves training and mixed-user
serving batches.

Two shapes of adapters, named for what they hold:
- `AdapterBatch`: several users' adapters stacked, keyed by module type, as the hypernetwork
  emits them and as `adapters_applied` takes them: module -> (A [U, L, r, in], B [U, L, out, r]).
- `UserAdapter`: one user's adapter keyed by each module's full path, as a PEFT folder holds
  it: path -> (A [r, in], B [out, r]). `split_users` and `stack_users` convert between them.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from p2p.errors import P2PError

AdapterBatch = dict[str, tuple[torch.Tensor, torch.Tensor]]
UserAdapter = dict[str, tuple[torch.Tensor, torch.Tensor]]


_LAYER = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class Target:
    path: str  # full module name, e.g. model.layers.3.self_attn.q_proj
    module: str  # last name component, e.g. q_proj
    layer: int
    in_features: int
    out_features: int
    conv1d: bool  # GPT-2 style Conv1D (weight stored [in, out])


def _is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")


def find_targets(model: nn.Module, target_modules: list[str]) -> list[Target]:
    out = []
    for path, m in model.named_modules():
        if isinstance(m, BatchedLoRALinear):
            m = m.base
        elif path.endswith(".base") and isinstance(model.get_submodule(path.rsplit(".", 1)[0]), BatchedLoRALinear):
            continue
        name = path.rsplit(".", 1)[-1]
        match = _LAYER.search(path)
        if name not in target_modules or match is None:
            continue
        if isinstance(m, nn.Linear):
            out.append(Target(path, name, int(match.group(1)), m.in_features, m.out_features, False))
        elif _is_conv1d(m):
            out.append(Target(path, name, int(match.group(1)), m.weight.shape[0], m.weight.shape[1], True))
    return out


class BatchedLoRALinear(nn.Module):
    """A frozen linear layer plus an optional per-row low-rank update."""

    def __init__(self, base: nn.Module, target: Target):
        super().__init__()
        self.base = base
        self.target = target
        self.lora_A: torch.Tensor | None = None  # [U, r, in]
        self.lora_B: torch.Tensor | None = None  # [U, out, r]
        self.row_index: torch.Tensor | None = None  # [N] -> adapter, or None: one adapter per row
        self.scale = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.lora_A is None:
            return y
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        if self.row_index is not None:
            a, b = a[self.row_index], b[self.row_index]
        if a.shape[0] != x.shape[0]:
            raise ValueError(f"{self.target.path}: {a.shape[0]} adapters for a batch of {x.shape[0]} rows")
        flat = x.reshape(x.shape[0], -1, x.shape[-1])  # [N, T, in]
        delta = torch.bmm(torch.bmm(flat, a.transpose(1, 2)), b.transpose(1, 2))  # [N, T, out]
        return y + self.scale * delta.reshape(*x.shape[:-1], delta.shape[-1])


def wrap_model(model: nn.Module, target_modules: list[str], layers: list[int]) -> list[BatchedLoRALinear]:
    """Wrap the targets in `layers` (idempotent); returns the wrappers in model order."""
    wrappers = []
    for t in find_targets(model, target_modules):
        if t.layer not in layers:
            continue
        parent_path, _, child = t.path.rpartition(".")
        parent = model.get_submodule(parent_path)
        current = getattr(parent, child)
        if not isinstance(current, BatchedLoRALinear):
            current = BatchedLoRALinear(current, t)
            setattr(parent, child, current)
        wrappers.append(current)
    if not wrappers:
        raise P2PError(f"no target modules {target_modules} in layers {layers}")
    return wrappers


def wrappers_of(model: nn.Module) -> list[BatchedLoRALinear]:
    return [m for m in model.modules() if isinstance(m, BatchedLoRALinear)]


@contextlib.contextmanager
def adapters_applied(
    model: nn.Module, generated: AdapterBatch, layers: list[int], scale: float,
    row_index: torch.Tensor | None = None,
) -> Iterator[None]:
    """Set adapters for the duration of one forward/generate call; always cleared after.

    `generated[module] = (A [U, L, r, in], B [U, L, out, r])` over `layers`; row n of the batch
    uses adapter `row_index[n]` (or adapter n when `row_index` is None).
    """
    wrappers = wrappers_of(model)
    if not wrappers:
        raise P2PError("model has no LoRA wrappers; call wrap_model first")
    position = {layer: i for i, layer in enumerate(layers)}
    try:
        for w in wrappers:
            if w.target.module not in generated or w.target.layer not in position:
                continue
            a, b = generated[w.target.module]
            i = position[w.target.layer]
            w.lora_A, w.lora_B = a[:, i], b[:, i]
            w.row_index, w.scale = row_index, scale
        yield
    finally:
        for w in wrappers:
            w.lora_A = w.lora_B = w.row_index = None


def split_users(generated: AdapterBatch, layers: list[int], paths: dict[tuple[int, str], str]) -> list[UserAdapter]:
    """The hypernetwork's batched output as one adapter (path -> (A, B)) per user."""
    n_users = next(iter(generated.values()))[0].shape[0]
    users: list[UserAdapter] = [{} for _ in range(n_users)]
    for module, (a, b) in generated.items():
        for i, layer in enumerate(layers):
            path = paths[(layer, module)]
            for u in range(n_users):
                users[u][path] = (a[u, i], b[u, i])
    return users


def stack_users(adapters: list[UserAdapter], layers: list[int], paths: dict[tuple[int, str], str]) -> AdapterBatch:
    """Inverse of `split_users`: several loaded adapters as one batch for `adapters_applied`."""
    modules = sorted({m for (_, m) in paths})
    out: AdapterBatch = {}
    for module in modules:
        a = torch.stack([torch.stack([ad[paths[(layer, module)]][0] for layer in layers]) for ad in adapters])
        b = torch.stack([torch.stack([ad[paths[(layer, module)]][1] for layer in layers]) for ad in adapters])
        out[module] = (a, b)
    return out
