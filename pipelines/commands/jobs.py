"""`p2p profiles`, `train`, `refresh`, `serve`: the Ray jobs."""

from __future__ import annotations

import argparse
import json
import sys

from p2p.config import load_config
from p2p.data.schemas import user_ids_from, users_uri
from pipelines.ingest import run_profiles
from pipelines.refresh import RefreshConfig, run_refresh, summary_dict
from pipelines.serve import Limits, run_server
from pipelines.train import run_training_with_controls


def cmd_profiles(args: argparse.Namespace) -> int:
    # The training config decides how profiles are built; its defaults when none is given.
    config = load_config(args.config, encoder=args.encoder)

    n = run_profiles(users_uri(args.data), args.out, config.encoder, config.profile_config(), actors=args.actors)
    print(f"wrote {n} profiles to {args.out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    # Validated here, before Ray starts: an unknown field or a wrong type names the field.
    config = load_config(args.config, workers=args.workers, zero_stage=args.zero_stage, max_steps=args.max_steps)

    controls = tuple(c for c, on in (("shared", args.with_shared), ("retrieval", args.with_retrieval)) if on)
    for summary in run_training_with_controls(config, args.data, args.out, controls):
        what = "P2P" if summary["control"] == "none" else f"the {summary['control']} control"
        print(f"trained {what}: {summary['steps']} steps in {summary['seconds']:.0f}s; task-balanced val loss "
              f"{summary['val_loss']:.4f}, best {summary['best_val_loss']:.4f} (step {summary['best_step']}); "
              f"checkpoints: {summary['latest']} and {summary['best']}")
    return 0


def cmd_refresh(args: argparse.Namespace) -> int:
    # Validated before Ray starts.
    readmit = user_ids_from(args.readmit, args.readmit_file, "--readmit") or None
    config = load_config(args.config, RefreshConfig, hypernet=args.hypernet, data=args.data, store=args.store,
                         full=args.full or None, mode=args.mode, adapter_dtype=args.adapter_dtype, batch_size=args.batch_size,
                         embed_actors=args.embed_actors, generate_actors=args.generate_actors,
                         create=args.create or None, max_removed_share=args.max_removed_share,
                         allow_mass_removal=args.allow_mass_removal or None, readmit=readmit,
                         lease_wait_s=args.wait, lease_ttl_s=args.lease_ttl,
                         max_layers=args.max_layers)

    summary = run_refresh(config)
    print(json.dumps(summary_dict(summary), indent=1) if args.json else summary.line())
    for failure in summary.failures:
        print(f"  failed: {failure}", file=sys.stderr)
    return 1 if summary.failed else 0


def cmd_serve(args: argparse.Namespace) -> int:
    limits = Limits(max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens,
                    max_tokens=args.max_tokens, max_choices=args.max_choices, max_history_items=args.max_history_items,
                    max_request_tokens=args.max_request_tokens, max_waiting=args.max_waiting,
                    request_timeout_s=args.request_timeout)
    run_server(args.store, hypernet_id=args.hypernet, base=args.base, host=args.host, port=args.port,
               unknown_user=args.unknown_user, replicas=args.replicas, cpus_per_replica=args.cpus_per_replica,
               max_batch_size=args.max_batch_size, batching=args.batching, limits=limits)
    return 0
