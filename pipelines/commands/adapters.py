"""`p2p store fetch|export`: users' adapters as PEFT folders (an embeddings-only row is generated)."""

from __future__ import annotations

import argparse
import os

from p2p.data.schemas import user_ids_from
from p2p.errors import P2PError
from p2p.export import export_vllm, vllm_command
from p2p.personalize import StoredAdapters
from p2p.store import AdapterStore
from p2p.userkey import check_no_case_collisions, user_key


def cmd_store(args: argparse.Namespace) -> int:
    store = AdapterStore(args.store)
    users = user_ids_from(args.users, args.users_file, f"store {args.action}")
    if args.action == "fetch":
        if not (users and args.out):
            raise P2PError("store fetch needs --users (or --users-file) and --out")
        check_no_case_collisions(users, f"store fetch --out {args.out}")
        stored = StoredAdapters(store)
        for uid in users:
            folder = os.path.join(args.out, user_key(uid))  # escaped as `p2p generate` does: never outside --out
            row = stored.fetch(uid, folder, args.hypernet_id)
            print(f"{uid!r} -> {folder}: {row['mode']} row of run {row['run_id']} (sha256 ok)")
    elif args.action == "export":
        if not args.out:
            raise P2PError("store export needs --out (a folder, or an s3:// prefix for Ray Serve LLM)")
        done = export_vllm(store, args.out, args.base_model, users or None, args.hypernet_id)
        print(f"exported {len(done.names)} adapter(s) of hypernet {done.hypernet_id} to {done.out} "
              f"(layout {args.layout}, base_model_name_or_path {done.base_model!r}; index {done.out}/p2p_export.json)")
        if done.names:
            print(f"  {vllm_command(done)}")
    return 0
