"""`p2p store export --layout vllm`: the store's adapters as a folder of PEFT folders vLLM loads by name.

    OUT/<name>/adapter_config.json         OUT/p2p_export.json   (index: user id -> name, base, run)
    OUT/<name>/adapter_model.safetensors

`<name>` is the user's store key (`p2p.userkey.user_key`): the user id itself when it is made of
letters, digits, `_` and `-`; other characters are percent-escaped so every name is one flat
folder. That one layout serves the three ways vLLM-based stacks find an adapter by name:

- `vllm serve BASE --enable-lora --lora-modules NAME=OUT/NAME ...`;
- vLLM's filesystem resolver (`VLLM_LORA_RESOLVER_CACHE_DIR=OUT`): a request for model NAME loads
  `OUT/NAME` if its `adapter_config.json` has `peft_type: LORA` and `base_model_name_or_path` equal
  to the served base model's name, hence `--base-model`;
- Ray Serve LLM's `dynamic_lora_loading_path=OUT` (an s3:// or gs:// prefix): model `BASE:NAME`
  loads `OUT/NAME`.

What vLLM reads from adapter_config.json (vllm/lora/peft_helper.py): `r`, `lora_alpha`,
`target_modules`, `use_rslora`, `use_dora`, `bias`, `modules_to_save`, `trainable_token_indices`;
it ignores the rest, `layers_to_transform`, `rank_pattern` and `alpha_pattern` included (the
layers come from the tensor names). It refuses DoRA, `modules_to_save`, a bias, and a rank above
`--max-lora-rank` (default 16), and scales by `lora_alpha / r` (`/ sqrt(r)` with rsLoRA). The
checks below hold every exported config to those rules, so what vLLM applies equals what p2p
applies. The weights are copied byte for byte.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from p2p.errors import P2PError
from p2p.fs import display, filesystem
from p2p.model.files import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from p2p.model.peft_format import peft_scale
from p2p.personalize import StoredAdapters
from p2p.store import AdapterStore
from p2p.userkey import check_no_case_collisions, user_key

LAYOUTS = ("vllm",)
INDEX = "p2p_export.json"
VLLM_DEFAULT_MAX_LORA_RANK = 16


@dataclass
class Exported:
    out: str
    base_model: str
    hypernet_id: str
    names: dict[str, str] = field(default_factory=dict)  # user id -> folder name
    max_rank: int = 0


def vllm_config(config: dict, base_model: str) -> dict:
    """`config` made valid for vLLM and matched to `base_model` (rsLoRA folded into lora_alpha, same scale)."""
    out = dict(config)
    out["base_model_name_or_path"] = base_model
    if out.get("use_rslora"):
        out["lora_alpha"], out["use_rslora"] = peft_scale(config) * config["r"], False
    problems = vllm_problems(out)
    if problems:
        raise P2PError("adapter_config.json is not loadable by vLLM: " + "; ".join(problems))
    return out


def vllm_problems(config: dict) -> list[str]:
    """What vLLM would refuse, or apply differently from PEFT, in this adapter_config."""
    problems = []
    for name in ("r", "lora_alpha", "target_modules"):
        if name not in config:
            problems.append(f"missing required field {name!r}")
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}, not 'LORA'")
    if not isinstance(config.get("r"), int) or config.get("r", 0) <= 0:
        problems.append(f"r must be a positive integer, got {config.get('r')!r}")
    if config.get("use_dora"):
        problems.append("DoRA is not supported by vLLM")
    if config.get("modules_to_save"):
        problems.append("vLLM only supports modules_to_save being None")
    if config.get("bias", "none") != "none":
        problems.append("vLLM does not support adapter biases")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        problems.append("vLLM ignores rank_pattern/alpha_pattern: per-module scales would differ")
    if config.get("trainable_token_indices") is not None:
        problems.append("trainable_token_indices is not exported")
    alpha = config.get("lora_alpha")
    if not isinstance(alpha, int | float) or not math.isfinite(alpha):
        problems.append(f"lora_alpha must be a finite number, got {alpha!r}")
    return problems


def export_vllm(store: AdapterStore, out: str, base_model: str | None = None, users: list[str] | None = None,
                hypernet_id: str | None = None) -> Exported:
    """Write one vLLM-loadable folder per user (default: every user of the committed manifest)."""
    committed = store.current(hypernet_id)
    hid = hypernet_id or (committed.hypernet_id if committed else None)
    if hid is None:
        raise P2PError(f"{store.uri}: nothing committed; pass --hypernet-id")
    if users is None:
        if committed is None:
            raise P2PError(f"{store.uri}: hypernet {hid} has no committed manifest; pass --users")
        users = sorted(store.manifest_rows(committed))
    fs, root = filesystem(out)
    root = root.rstrip("/")
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" in protocols:  # a local disk may fold case; S3 does not
        check_no_case_collisions(users, f"store export --out {out}")
    result = Exported(display(fs, root), "", hid)
    stored = StoredAdapters(store)
    for uid in users:
        files, row = stored.read(uid, hid)  # digest checked; an embeddings-only row is generated
        config = json.loads(files[ADAPTER_CONFIG])
        config = vllm_config(config, base_model or config.get("base_model_name_or_path") or "")
        result.base_model, result.max_rank = config["base_model_name_or_path"], max(result.max_rank, config["r"])
        name = user_key(uid)
        folder = f"{root}/{name}"
        fs.makedirs(folder, exist_ok=True)
        # weights first, config last: a resolver that sees the config finds the weights too
        fs.pipe_file(f"{folder}/{ADAPTER_WEIGHTS}", files[ADAPTER_WEIGHTS])
        fs.pipe_file(f"{folder}/{ADAPTER_CONFIG}", json.dumps(config, indent=2, sort_keys=True).encode())
        result.names[uid] = name
    index = {"layout": "vllm", "base_model": result.base_model, "hypernet_id": hid,
             "run_id": committed.run_id if committed else None, "users": result.names}
    fs.pipe_file(f"{root}/{INDEX}", json.dumps(index, indent=1, sort_keys=True).encode())
    return result


def vllm_command(exported: Exported, limit: int = 3) -> str:
    """A `vllm serve` line for (a few of) the exported adapters."""
    modules = " ".join(f"{n}={exported.out}/{n}" for n in list(exported.names.values())[:limit])
    more = " ..." if len(exported.names) > limit else ""
    rank = f" --max-lora-rank {exported.max_rank}" if exported.max_rank > VLLM_DEFAULT_MAX_LORA_RANK else ""
    return f"vllm serve {exported.base_model} --enable-lora{rank} --lora-modules {modules}{more}"
