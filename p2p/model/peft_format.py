"""One user's adapter as a standard PEFT LoRA folder: written, read and checked in one place.

The folder's config reproduces the training-time scale with `use_rslora: false` and
`lora_alpha = scale * r`, so engines that ignore rsLoRA (vLLM, Ray Serve LLM) apply exactly the
scale the hypernetwork was trained with. Files are built in memory ({file name: bytes}) so the
adapter store can put the same bytes on any fsspec filesystem and hash them; only JSON and
safetensors are read back.
"""

from __future__ import annotations

import json
import os
import re

import torch
from safetensors.torch import load, save

from p2p.errors import P2PError
from p2p.model.files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_FILES, read_local_files
from p2p.model.hypernet import HypernetConfig
from p2p.model.lora import UserAdapter

_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")


def peft_key(path: str, which: str) -> str:
    return f"base_model.model.{path}.lora_{which}.weight"


ADAPTER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def peft_files(adapter: UserAdapter, config: HypernetConfig, metadata: dict[str, str] | None = None,
               dtype: str = "float32") -> dict[str, bytes]:
    """The PEFT folder of an adapter shaped by `config` (base model, rank, scale, modules, layers).

    `dtype="bfloat16"` halves the bytes per user; PEFT and vLLM load bf16 safetensors as they are,
    and `adapter_from_files` widens them back to float32 (each value within bf16's rounding, 2^-8).
    """
    if dtype not in ADAPTER_DTYPES:
        raise P2PError(f"adapter dtype must be one of {', '.join(ADAPTER_DTYPES)}, got {dtype!r}")
    # lazy: peft imports transformers (~3 s); every Ray task that only plans or embeds would pay it
    from peft import LoraConfig  # lazy: see above
    layers_to_transform = None
    if sorted(config.layers) != list(range(config.num_layers)):
        layers_to_transform = sorted(config.layers)
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.scale * config.rank,  # alpha / r == scale: exact in PEFT and in engines ignoring rsLoRA
        use_rslora=False,
        target_modules=sorted(config.target_modules),
        layers_to_transform=layers_to_transform,
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=config.fan_in_fan_out,
        task_type="CAUSAL_LM",
        base_model_name_or_path=config.base_model,
    )
    config_dict = {k: (sorted(v) if isinstance(v, set) else v) for k, v in lora.to_dict().items()}
    tensors = {}
    for path, (a, b) in sorted(adapter.items()):
        tensors[peft_key(path, "A")] = a.detach().to("cpu", ADAPTER_DTYPES[dtype]).contiguous()
        tensors[peft_key(path, "B")] = b.detach().to("cpu", ADAPTER_DTYPES[dtype]).contiguous()
    return {
        ADAPTER_CONFIG: json.dumps(config_dict, indent=2, sort_keys=True).encode(),
        ADAPTER_WEIGHTS: save(tensors, metadata={"format": "pt", **(metadata or {})}),
    }


def write_peft_folder(files: dict[str, bytes], folder: str) -> None:
    """A PEFT folder's files on the local disk (for `PeftModel.from_pretrained`)."""
    os.makedirs(folder, exist_ok=True)
    for name, data in files.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)


def read_peft_folder(folder: str) -> dict[str, bytes]:
    return read_local_files(folder, PEFT_FILES, "a PEFT adapter folder")


def adapter_from_files(files: dict[str, bytes]) -> tuple[UserAdapter, dict]:
    """`peft_files`'s inverse: JSON + safetensors bytes -> (path -> (A, B) in float32, adapter_config)."""
    adapter: dict[str, list] = {}
    for key, value in load(files[ADAPTER_WEIGHTS]).items():
        m = _KEY.fullmatch(key)
        if m is None:
            raise P2PError(f"unexpected tensor {key!r} in adapter")
        adapter.setdefault(m.group(1), [None, None])[0 if m.group(2) == "A" else 1] = value.float()
    return {p: (ab[0], ab[1]) for p, ab in adapter.items()}, json.loads(files[ADAPTER_CONFIG])


def load_peft(folder: str) -> tuple[UserAdapter, dict]:
    """Read a PEFT LoRA folder (JSON + safetensors only): (path -> (A, B), adapter_config)."""
    return adapter_from_files(read_peft_folder(folder))


def peft_scale(config: dict) -> float:
    """The scale PEFT applies for this adapter_config (alpha/r, or alpha/sqrt(r) with rsLoRA)."""
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / r**0.5 if config.get("use_rslora") else alpha / r
