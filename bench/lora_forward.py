"""Forward of SmolLM2 on 8 prompts x 128 tokens: the base model, our batched path with 8
different adapters (one per row), and one adapter through peft. Goal: ours <= 1.25x base.

    python -m bench.lora_forward [--batch 8] [--seq 128] [--base smollm2-135m]
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch
from peft import PeftModel

from bench.report import timed, write
from p2p.model.base import load_base_model
from p2p.model.hypernet import Hypernetwork, make_config
from p2p.model.lora import adapters_applied, wrap_model
from p2p.model.peft_format import write_peft_folder
from p2p.personalize import Personalizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    base, _ = load_base_model(args.base)
    ids = torch.randint(100, base.config.vocab_size - 100, (args.batch, args.seq))

    wrapped = copy.deepcopy(base)
    config = make_config(wrapped, args.base, "minilm", 384, rank=8)
    hypernet = Hypernetwork(config).eval()
    with torch.no_grad():
        for p in hypernet.heads.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
        generated = hypernet(torch.randn(args.batch, 384))
    wrap_model(wrapped, config.target_modules, config.layers)
    with tempfile.TemporaryDirectory() as tmp:
        write_peft_folder(Personalizer(hypernet, "bench").files(hypernet.user_adapters(torch.randn(1, 384))[0]), tmp)
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp).eval()

    def ours():
        with adapters_applied(wrapped, generated, config.layers, config.scale):
            wrapped(input_ids=ids)

    with torch.inference_mode():
        t_base = timed(lambda: base(input_ids=ids), repeat=args.repeat)
        t_ours = timed(ours, repeat=args.repeat)
        t_peft = timed(lambda: peft_model(input_ids=ids), repeat=args.repeat)
    rows = [
        {"path": "base model", "adapters": 0, "ms": t_base * 1e3, "x_base": 1.0},
        {"path": "p2p batched LoRA", "adapters": args.batch, "ms": t_ours * 1e3, "x_base": t_ours / t_base},
        {"path": "peft LoRA", "adapters": 1, "ms": t_peft * 1e3, "x_base": t_peft / t_base},
    ]
    write("lora_forward", rows, {"batch": args.batch, "seq": args.seq, "targets": "q_proj,v_proj x 30 layers",
                                 "rank": 8, "goal": "p2p x_base <= 1.25"})


if __name__ == "__main__":
    main()
