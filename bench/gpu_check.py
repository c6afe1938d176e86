"""`make gpu-check`: the GPU path in one table, ready to run the moment a GPU machine is at hand.

What a plain PyTorch image must do for this project, with nothing else installed and no network:
a few bf16 training steps of the hypernet through the frozen base model (the loss falls, no dtype
or device error), adapter generation throughput (users/s at batch 256, and as a share of the GPU's
bf16 matmul peak), per-row-adapter decoding of a mixed batch (tokens/s against the base model
alone), and the exact-export check (our adapted logits against PEFT loading the exported folder,
fp32 and bf16).

Needs only torch, transformers, peft, safetensors and numpy (pyarrow is not touched): no Ray, no
DeepSpeed, no fsspec, no pydantic. Tested with torch 2.13 / transformers as pinned in
pyproject.toml; the APIs it uses exist since torch 2.4 and transformers 4.56 (DynamicLayer caches),
so an image with torch 2.11 and transformers 5.17 runs it. The base model is SmolLM2-135M's
architecture with random weights (the embedded weights are a pip package the image lacks; random
weights change no shape, dtype or throughput). `--tiny` runs the same checks on a 4-layer model on
CPU in seconds: `make test` runs it so the script cannot rot.

    python -m bench.gpu_check                 # on the GPU machine: prints the table, writes JSON
    python -m bench.gpu_check --tiny --device cpu
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from p2p.generation.decoding import decode
from p2p.model.adapted import AdaptedModel
from p2p.model.files import ADAPTER_WEIGHTS
from p2p.model.hypernet import Hypernetwork, adapter_paths, make_config
from p2p.model.lora import adapters_applied, split_users, stack_users
from p2p.model.peft_format import adapter_from_files, peft_files, write_peft_folder

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
                    rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, rms_norm_eps=1e-5,
            bos_token_id=1, eos_token_id=2, pad_token_id=2)
# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets; others: pass --peak-tflops.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}
EXPORT_TOLERANCE = {"float32": 1e-4, "bfloat16": 1e-2}  # of the logits' largest magnitude


class Ids:
    """The two token ids decoding needs; no tokenizer on a bare image."""

    def __init__(self, config: LlamaConfig):
        self.eos_token_id, self.pad_token_id = None, config.pad_token_id  # no EOS: every row runs its budget


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    config = LlamaConfig(**(TINY if args.tiny else SMOLLM2_135M))
    model = LlamaForCausalLM(config).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    hconf = make_config(model, "smollm2-135m-random" if not args.tiny else "tiny", "none", args.embed_dim,
                        target_modules=("q_proj", "v_proj", "o_proj", "down_proj"))
    reference = copy.deepcopy(model).cpu().float()  # unwrapped, for the export check
    adapted = AdaptedModel(model, Ids(config), hconf)  # wraps the target modules in place
    rows = [train_steps(adapted, hconf, device, args), generation(hconf, device, args),
            mixed_decoding(adapted, hconf, device, args), *export_check(reference, hconf)]
    table = render(rows, device)
    print(table)
    out = {"device": device_name(device), "torch": torch.__version__, "tiny": args.tiny, "rows": rows}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"gpu-check: {sum(r['ok'] for r in rows)}/{len(rows)} checks pass; JSON in {args.out}")
    return 0 if all(r["ok"] for r in rows) else 1


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a 4-layer model and small sizes (CPU test mode)")
    p.add_argument("--device", default=None, help="default: cuda when there is one")
    p.add_argument("--embed-dim", type=int, default=512)
    p.add_argument("--users", type=int, default=None, help="adapter generation batch (default 256; tiny 16)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 30; tiny 8)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not in the table")
    p.add_argument("--out", default="bench/results/gpu_check.json")
    args = p.parse_args(argv)
    args.users = args.users or (16 if args.tiny else 256)
    args.steps = args.steps or (8 if args.tiny else 30)
    return args


def train_steps(adapted: AdaptedModel, hconf, device, args) -> dict:
    """bf16 autocast steps of the hypernet through the frozen model on a fixed batch: the loss must fall."""
    model = adapted.model
    hypernet = Hypernetwork(hconf).to(device).train()
    opt = torch.optim.AdamW(hypernet.parameters(), lr=1e-3)
    users, seq = (4, 32) if args.tiny else (8, 256)
    ids = torch.randint(3, model.config.vocab_size, (users, seq), device=device)
    emb = torch.randn(users, hconf.embed_dim, device=device)
    losses, start = [], time.perf_counter()
    for _ in range(args.steps):
        with torch.autocast(device.type, dtype=torch.bfloat16), \
                adapters_applied(model, hypernet(emb), hconf.layers, hconf.scale):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    sync(device)
    seconds = time.perf_counter() - start
    ok = all(map(torch.isfinite, map(torch.tensor, losses))) and losses[-1] < losses[0]
    return {"check": "hypernet training, bf16 autocast", "ok": ok,
            "result": f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {args.steps} steps ({seconds / args.steps:.3f} s/step, "
                      f"{users} x {seq} tokens)"}


def generation(hconf, device, args) -> dict:
    """Adapters for `args.users` users in one bf16 pass: users/s, and the hypernet's matmul FLOP/s vs peak."""
    hypernet = Hypernetwork(hconf).to(device, torch.bfloat16).eval()
    emb = torch.randn(args.users, hconf.embed_dim, device=device, dtype=torch.bfloat16)
    flops = [0]

    def count(module, inputs, output):
        flops[0] += 2 * inputs[0].numel() // inputs[0].shape[-1] * module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in hypernet.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        hypernet(emb)  # warm-up, and the FLOP count of one pass
        for h in hooks:
            h.remove()
        repeats = 3 if args.tiny else 20
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            hypernet(emb)
        sync(device)
    seconds = (time.perf_counter() - start) / repeats
    achieved = flops[0] / seconds / 1e12
    peak = args.peak_tflops or PEAK_BF16_TFLOPS.get(next((k for k in PEAK_BF16_TFLOPS if k in device_name(device)), ""))
    share = f", {achieved / peak:.1%} of the {peak:.0f} TFLOP/s bf16 peak" if peak and device.type == "cuda" else ""
    return {"check": f"adapter generation, batch {args.users}", "ok": seconds > 0, "users_per_s": args.users / seconds,
            "result": f"{args.users / seconds:,.0f} users/s ({achieved:.2f} TFLOP/s in the hypernet's matmuls{share})"}


def mixed_decoding(adapted: AdaptedModel, hconf, device, args) -> dict:
    """A batch where every row has its own adapter, against the same batch on the base model alone."""
    hypernet = Hypernetwork(hconf).to(device).eval()
    rows, new_tokens = (4, 8) if args.tiny else (32, 64)
    with torch.no_grad():
        adapters = split_users(hypernet(torch.randn(rows, hconf.embed_dim, device=device)), hconf.layers,
                               adapter_paths(hconf))
    vocab = adapted.model.config.vocab_size
    prompts = [torch.randint(3, vocab, (16 + 8 * (i % 4),)).tolist() for i in range(rows)]
    timings = {}
    for name, per_row in (("base", [None] * rows), ("mixed", adapters)):
        decode(adapted, prompts, [2] * rows, per_row)  # warm-up
        sync(device)
        start = time.perf_counter()
        decode(adapted, prompts, [new_tokens] * rows, per_row)
        sync(device)
        timings[name] = rows * new_tokens / (time.perf_counter() - start)
    ratio = timings["mixed"] / timings["base"]
    return {"check": f"decoding {rows} rows, one adapter each", "ok": ratio > 0, "ratio_vs_base": ratio,
            "result": f"{timings['mixed']:,.0f} tokens/s, {ratio:.2f}x the base model alone ({timings['base']:,.0f})"}


def export_check(reference: LlamaForCausalLM, hconf) -> list[dict]:
    """Our adapted logits against PEFT's `from_pretrained` of the exported folder, fp32 and bf16 files (CPU)."""
    from peft import PeftModel  # lazy: the other checks run without it

    torch.manual_seed(1)
    hypernet = Hypernetwork(hconf).eval()
    for p in hypernet.parameters():  # visible adapters: the untrained heads are near zero
        p.data.normal_(0, 0.05)
    with torch.no_grad():
        adapter = split_users(hypernet(torch.randn(1, hconf.embed_dim)), hconf.layers, adapter_paths(hconf))[0]
    peft_bases = {dtype: copy.deepcopy(reference).eval() for dtype in EXPORT_TOLERANCE}
    ours_model = AdaptedModel(reference.eval(), Ids(reference.config), hconf).model
    ids = torch.randint(3, reference.config.vocab_size, (1, 24))
    with torch.no_grad():
        base = ours_model(input_ids=ids).logits
    out = []
    for dtype, limit in EXPORT_TOLERANCE.items():
        files = peft_files(adapter, hconf, dtype=dtype)
        loaded, _ = adapter_from_files(files)
        with tempfile.TemporaryDirectory() as folder:
            write_peft_folder(files, folder)
            peft_model = PeftModel.from_pretrained(peft_bases[dtype], folder).eval()
            with torch.no_grad():
                ref = peft_model(input_ids=ids).logits.float()
        with torch.no_grad(), adapters_applied(ours_model, stack_users([loaded], hconf.layers, adapter_paths(hconf)),
                                               hconf.layers, hconf.scale):
            ours = ours_model(input_ids=ids).logits
        error = float((ours - ref).abs().max() / ref.abs().max())
        moved = float((ours - base).abs().max() / base.abs().max())  # else agreeing would prove nothing
        size = len(files[ADAPTER_WEIGHTS])
        out.append({"check": f"export: PEFT loads the {dtype} folder", "ok": error <= limit < moved,
                    "relative_error": error, "adapter_effect": moved, "bytes": size,
                    "result": f"ours vs PEFT: max difference {error:.1e} of the largest logit (limit {limit:.0e}; "
                              f"the adapter moves them {moved:.1e}); {size:,} bytes of weights"})
    return out


def render(rows: list[dict], device: torch.device) -> str:
    lines = [f"gpu-check on {device_name(device)} (torch {torch.__version__})", "", "| check | result | ok |",
             "|---|---|---|"]
    lines += [f"| {r['check']} | {r['result']} | {'yes' if r['ok'] else '**NO**'} |" for r in rows]
    return "\n".join(lines)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    sys.exit(main())
