"""`p2p store stat|delete-users|gc|recover`: inspect and maintain the adapter store (rows and files only).

`store fetch` and `store export` read adapters, which for an embeddings-only row means running
the hypernet: they are in pipelines/commands/adapters.py, so these commands never load a model.
"""

from __future__ import annotations

import argparse
import json

from p2p.data.schemas import user_ids_from
from p2p.errors import P2PError
from p2p.store import AdapterStore
from p2p.store.deletion import delete_users
from p2p.store.gc import collect_garbage


def cmd_store(args: argparse.Namespace) -> int:
    store = AdapterStore(args.store)
    users = user_ids_from(args.users, args.users_file, f"store {args.action}")
    if args.action == "stat":
        print(json.dumps(store.stat(args.hypernet_id), indent=1))
    elif args.action == "delete-users":
        if not users:
            raise P2PError("store delete-users needs --users (or --users-file)")
        with store.leased("delete-users", wait_s=args.wait) as lease:
            print(delete_users(store, users, lease).line())
    elif args.action == "gc":
        with store.leased("gc", wait_s=args.wait) as lease:
            print(collect_garbage(store, lease, keep_runs=args.keep_runs, grace_s=args.grace,
                                  dry_run=args.dry_run).line())
    elif args.action == "recover":
        fixed = store.recover(args.hypernet_id)
        print("\n".join(f"{c.hypernet_id}: CURRENT -> run {c.run_id} ({c.users} users)" for c in fixed)
              or "nothing to recover: every CURRENT is readable")
    return 0
