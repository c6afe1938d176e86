"""`p2p init-hypernet` and `p2p generate`: a hypernet checkpoint, and users' adapters from it."""

from __future__ import annotations

import argparse

import torch

from p2p.data.schemas import user_ids_from
from p2p.model.base import load_base_model
from p2p.model.device_export import export_for_device
from p2p.model.hypernet import Hypernetwork, load_hypernet, make_config, save_hypernet
from p2p.personalize import Personalizer
from p2p.profile.encoder import ProfileEncoder


def cmd_init_hypernet(args: argparse.Namespace) -> int:
    dim = ProfileEncoder(args.encoder).dim  # a mistyped encoder fails before the base model's load
    model, _ = load_base_model(args.base)
    config = make_config(
        model, args.base, args.encoder, dim, preset=args.preset, rank=args.rank, alpha=args.alpha,
        target_modules=tuple(t for t in args.targets.split(",") if t), top_k_layers=args.top_k_layers,
        seed=args.seed,
    )

    torch.manual_seed(args.seed)
    hypernet = Hypernetwork(config)
    hid = save_hypernet(hypernet, args.out)
    n = sum(p.numel() for p in hypernet.parameters())
    print(f"hypernet {hid}: {n / 1e6:.1f}M params, {len(config.layers)} layers x {config.target_modules}, "
          f"rank {config.rank} -> {args.out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    users = user_ids_from(args.users, None, "generate") or None
    n = Personalizer.from_checkpoint(args.hypernet).write_folders(args.data, args.out, users=users,
                                                                  batch_size=args.batch_size)
    print(f"wrote {n} adapters to {args.out}")
    return 0


def cmd_export_device(args: argparse.Namespace) -> int:
    hypernet, hid = load_hypernet(args.hypernet)
    folder = export_for_device(hypernet, args.out)
    print(f"device artifact of hypernet {hid}: {folder} (load with p2p.model.device_export.adapter_on_device: "
          f"torch only)")
    return 0

