"""Examples/s of our per-example-adapter training step against a single shared LoRA trained
with peft on the same base, batch and sequence length (goal: ratio >= 0.7), and peak memory.

    python -m bench.train [--base smollm2-135m] [--batch 4] [--seq 128] [--steps 5] [--top-k-layers K]

Both sides run the same optimizer (AdamW), the same targets (q_proj, v_proj), rank and layers.
Ours includes generating every example's adapter with the hypernetwork in the step.
"""

from __future__ import annotations

import argparse
import copy
import resource
import time

import torch
from peft import LoraConfig, get_peft_model

from bench.report import write
from p2p.config import TrainConfig
from p2p.model.adapted import AdaptedModel
from p2p.model.base import load_base_model
from p2p.model.hypernet import Hypernetwork
from p2p.train.batch import IGNORE, Batch
from p2p.train.loop import hypernet_config_for
from p2p.train.step import AdapterLoss, target_loss


def make_batch(n: int, seq: int, vocab: int, target_len: int = 8) -> Batch:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, vocab - 100, (n, seq), generator=g)
    labels = torch.full_like(ids, IGNORE)
    labels[:, -target_len:] = ids[:, -target_len:]
    return Batch(example_ids=[f"e{i}" for i in range(n)], input_ids=ids, attention_mask=torch.ones_like(ids),
                 labels=labels, embeddings=torch.randn(n, 384), row_index=torch.arange(n))


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def steps_per_s(step, n: int) -> float:
    step()  # warm-up (and, for ours, fills the prefix cache: later epochs reuse it)
    t = time.perf_counter()
    for _ in range(n):
        step()
    return n / (time.perf_counter() - t)


def measure_ours(base, tokenizer, batch: Batch, args) -> tuple[float, list[int]]:
    cfg = TrainConfig(base=args.base, encoder="minilm", top_k_layers=args.top_k_layers, lr=1e-3)
    model = copy.deepcopy(base)
    hypernet = Hypernetwork(hypernet_config_for(cfg, model, 384))
    lm = AdapterLoss(AdaptedModel(model, tokenizer, hypernet.config), cache_prefix=True)
    opt = torch.optim.AdamW(hypernet.parameters(), lr=1e-4)

    def step():
        loss, _ = lm(hypernet, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return steps_per_s(step, args.steps) * args.batch, hypernet.config.layers


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top-k-layers", type=int, default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    base, tokenizer = load_base_model(args.base)
    batch = make_batch(args.batch, args.seq, base.config.vocab_size)
    rate_ours, layers = measure_ours(base, tokenizer, batch, args)
    mem_ours = rss_gb()

    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
        layers_to_transform=None if len(layers) == base.config.num_hidden_layers else layers))
    popt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)

    def shared():
        hidden = peft_model.base_model.model.model(input_ids=batch.input_ids, use_cache=False).last_hidden_state
        loss = target_loss(peft_model.get_output_embeddings(), hidden, batch.labels)
        popt.zero_grad()
        loss.backward()
        popt.step()

    rate_peft = steps_per_s(shared, args.steps) * args.batch
    rows = [
        {"method": "one shared LoRA (peft)", "examples_per_s": rate_peft, "ratio": 1.0},
        {"method": f"p2p: per-example adapters ({len(layers)} layers)", "examples_per_s": rate_ours,
         "ratio": rate_ours / rate_peft},
    ]
    write("train", rows, {"base": args.base, "batch": args.batch, "seq": args.seq, "layers": len(layers),
                          "peak_rss_GB_after_ours": mem_ours, "peak_rss_GB_process": rss_gb(),
                          "goal": "ratio >= 0.7"})


if __name__ == "__main__":
    main()
