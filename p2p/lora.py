"""Batched per-example LoRA on a frozen model, and the PEFT folder format.

Target linear layers of a Hugging Face causal LM are wrapped so that row n of a batch adds
`scale * (x_n A_i^T) B_i^T` with i = index[n]: each example gets its own user's adapter, and
rows of one user share one adapter (an index, not a copy). With no adapters set the wrapper
returns exactly the base layer's output. The same mechanism serves training and mixed-user
serving batches.

Exported adapters are standard PEFT folders whose config reproduces the training-time scale
with `use_rslora: false` and `lora_alpha = scale * r`, so engines that ignore rsLoRA (vLLM,
Ray Serve LLM) apply exactly the scale the hypernetwork was trained with.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from safetensors.torch import load, load_file, save
from torch import nn

from p2p.errors import P2PError

# Adapters as the hypernetwork emits them: module -> (A [U, L, r, in], B [U, L, out, r]).
Generated = dict[str, tuple[torch.Tensor, torch.Tensor]]
# One user's adapter: module path -> (A [r, in], B [out, r]).
UserAdapter = dict[str, tuple[torch.Tensor, torch.Tensor]]

_LAYER = re.compile(r"\.(\d+)\.")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


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
    model: nn.Module, generated: Generated, layers: list[int], scale: float,
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


# --- per-user adapters and the PEFT folder -------------------------------------------------------


def split_users(generated: Generated, layers: list[int], paths: dict[tuple[int, str], str]) -> list[UserAdapter]:
    """The hypernetwork's batched output as one adapter (path -> (A, B)) per user."""
    n_users = next(iter(generated.values()))[0].shape[0]
    users: list[UserAdapter] = [{} for _ in range(n_users)]
    for module, (a, b) in generated.items():
        for i, layer in enumerate(layers):
            path = paths[(layer, module)]
            for u in range(n_users):
                users[u][path] = (a[u, i], b[u, i])
    return users


def stack_users(adapters: list[UserAdapter], layers: list[int], paths: dict[tuple[int, str], str]) -> Generated:
    """Inverse of `split_users`: several loaded adapters as one batch for `adapters_applied`."""
    modules = sorted({m for (_, m) in paths})
    out: Generated = {}
    for module in modules:
        a = torch.stack([torch.stack([ad[paths[(layer, module)]][0] for layer in layers]) for ad in adapters])
        b = torch.stack([torch.stack([ad[paths[(layer, module)]][1] for layer in layers]) for ad in adapters])
        out[module] = (a, b)
    return out


def peft_key(path: str, which: str) -> str:
    return f"base_model.model.{path}.lora_{which}.weight"


def peft_files(adapter: UserAdapter, base_model_name: str, rank: int, scale: float, target_modules: list[str],
               layers: list[int] | None = None, num_layers: int | None = None, fan_in_fan_out: bool = False,
               metadata: dict[str, str] | None = None) -> dict[str, bytes]:
    """A standard PEFT LoRA folder, in memory: {file name: bytes}. Reproduces `scale` without rsLoRA.

    In memory so the adapter store can put the same bytes on any fsspec filesystem and hash them.
    """
    from peft import LoraConfig

    layers_to_transform = None
    if layers is not None and num_layers is not None and sorted(layers) != list(range(num_layers)):
        layers_to_transform = sorted(layers)
    config = LoraConfig(
        r=rank,
        lora_alpha=scale * rank,  # alpha / r == scale: exact in PEFT and in engines ignoring rsLoRA
        use_rslora=False,
        target_modules=sorted(target_modules),
        layers_to_transform=layers_to_transform,
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=fan_in_fan_out,
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name,
    )
    config_dict = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.to_dict().items()}
    tensors = {}
    for path, (a, b) in sorted(adapter.items()):
        tensors[peft_key(path, "A")] = a.detach().to("cpu", torch.float32).contiguous()
        tensors[peft_key(path, "B")] = b.detach().to("cpu", torch.float32).contiguous()
    return {
        ADAPTER_CONFIG: json.dumps(config_dict, indent=2, sort_keys=True).encode(),
        ADAPTER_WEIGHTS: save(tensors, metadata={"format": "pt", **(metadata or {})}),
    }


def save_peft(adapter: UserAdapter, folder: str, **kwargs) -> None:
    """Write a standard PEFT LoRA folder (see `peft_files` for the arguments)."""
    os.makedirs(folder, exist_ok=True)
    for name, data in peft_files(adapter, **kwargs).items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)


def adapter_from_files(files: dict[str, bytes]) -> tuple[UserAdapter, dict]:
    """`peft_files`'s inverse: JSON + safetensors bytes -> (path -> (A, B), adapter_config)."""
    return adapter_from_tensors(load(files[ADAPTER_WEIGHTS])), json.loads(files[ADAPTER_CONFIG])


def load_peft(folder: str) -> tuple[UserAdapter, dict]:
    """Read a PEFT LoRA folder (JSON + safetensors only): (path -> (A, B), adapter_config)."""
    cfg_path = os.path.join(folder, "adapter_config.json")
    weights = os.path.join(folder, "adapter_model.safetensors")
    if not (os.path.exists(cfg_path) and os.path.exists(weights)):
        raise P2PError(f"{folder}: not a PEFT adapter folder (needs adapter_config.json, adapter_model.safetensors)")
    with open(cfg_path) as f:
        config = json.load(f)
    return adapter_from_tensors(load_file(weights)), config


def adapter_from_tensors(tensors: dict[str, torch.Tensor]) -> UserAdapter:
    adapter: dict[str, list] = {}
    for key, value in tensors.items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", key)
        if m is None:
            raise P2PError(f"unexpected tensor {key!r} in adapter")
        adapter.setdefault(m.group(1), [None, None])[0 if m.group(2) == "A" else 1] = value
    return {p: (ab[0], ab[1]) for p, ab in adapter.items()}


def peft_scale(config: dict) -> float:
    """The scale PEFT applies for this adapter_config (alpha/r, or alpha/sqrt(r) with rsLoRA)."""
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / r**0.5 if config.get("use_rslora") else alpha / r
