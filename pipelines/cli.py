"""The `p2p` command line: every command's arguments, and one error line instead of a traceback.

It lives in `pipelines/` because its commands compose both the library (`p2p/`) and the Ray jobs;
the library never imports Ray. What each command does is in `pipelines/commands/`.
Errors the user can fix (`P2PError`) print as one line and exit 2 (bad input) or the code their
type names (a held lease 3, an unavailable store 4, a damaged store 5, Ray not starting 6); no
traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from p2p import hub, logs
from p2p.errors import P2PError

# Where each command's code lives (pipelines/commands/). Imported once the arguments parsed, so
# `p2p --help` and argument errors answer at once and a command loads only what it uses (torch,
# transformers and Ray together take ~8 s to import).
COMMANDS = {"info": "models", "complete": "models", "init-hypernet": "hypernet", "generate": "hypernet",
            "export-device": "hypernet",
            "synth": "data", "import-lamp": "data", "profiles": "jobs", "train": "jobs", "refresh": "jobs",
            "serve": "jobs", "eval": "evaluate", "store": "store", "token": "token"}  # store fetch / export: "adapters"


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

    p = sub.add_parser("complete", help="greedy answer of the base model to one prompt")
    p.add_argument("--prompt", required=True)
    p.add_argument("--base", default="smollm2-135m", help="smollm2-135m, tiny-random, HF id or directory")
    p.add_argument("--max-tokens", type=int, default=32)

    p = sub.add_parser("synth", help="write the synthetic personalization benchmark as Parquet")
    p.add_argument("--out", required=True, help="output directory (gets users/ and examples/)")
    p.add_argument("--users", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", default="tag,rate,headline", help="comma-separated subset of tag,rate,headline")
    p.add_argument("--chunk-size", type=int, default=5000, help="users generated and written per file")
    p.add_argument("--workers", type=int, default=1, help="processes generating chunks in parallel")

    p = sub.add_parser("import-lamp", help="convert LaMP / LongLaMP JSON files to users + examples Parquet")
    p.add_argument("--questions", required=True, help="the questions JSON (list of {id, input, profile})")
    p.add_argument("--outputs", required=True, help="the outputs JSON ({task, golds: [{id, output}]})")
    p.add_argument("--split", required=True, help="train, val, test_id or test_ood")
    p.add_argument("--out", required=True)
    p.add_argument("--history-examples", type=int, default=0, metavar="K",
                   help="train split only: also ask each user about their K most recent history items "
                        "(taken out of their profile); default 0")

    p = sub.add_parser("init-hypernet", help="write an untrained hypernetwork checkpoint for a base model")
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default="small", choices=["small", "paper"])
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    p.add_argument("--targets", default="q_proj,v_proj", help="comma-separated module names")
    p.add_argument("--top-k-layers", type=int, default=None, help="adapters on the top K layers only")
    p.add_argument("--encoder", default="minilm", help="minilm, wordllama, hashing, none, or a sentence-transformers path")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("generate", help="profile -> embedding -> adapter: one PEFT folder per user")
    p.add_argument("--hypernet", required=True, help="hypernet checkpoint folder")
    p.add_argument("--data", required=True, help="data directory with users/ (or a users Parquet path)")
    p.add_argument("--out", required=True)
    p.add_argument("--users", default=None, help="comma-separated user ids (default: all)")
    p.add_argument("--batch-size", type=int, default=64)

    p = sub.add_parser("export-device", help="the hypernet for users' devices: embedding -> PEFT adapter, torch only")
    p.add_argument("--hypernet", required=True, help="hypernet checkpoint folder (e.g. RUN/best)")
    p.add_argument("--out", required=True, help="artifact folder (hypernet.pt2, device.json, adapter_config.json)")

    p = sub.add_parser("profiles", help="Ray Data: users -> profile text -> embedding -> profiles Parquet")
    p.add_argument("--data", required=True, help="data directory with users/ (local or s3://)")
    p.add_argument("--out", required=True, help="profiles output directory")
    p.add_argument("--config", default=None, help="training config whose encoder and profile settings to use")
    p.add_argument("--encoder", default=None, help="override the config's encoder (default minilm)")
    p.add_argument("--actors", type=int, default=1, help="encoder actors (one model each)")

    p = sub.add_parser("train", help="Ray Train + DeepSpeed: train the hypernetwork")
    p.add_argument("--config", required=True, help="YAML training config (see jobs/configs/)")
    p.add_argument("--data", required=True, help="data directory with users/, examples/ [, profiles/]")
    p.add_argument("--out", required=True, help="run directory: latest/, best/, summary.json")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--zero-stage", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--with-shared", action="store_true",
                   help="also train the non-personalized control (same config and budget) into OUT/shared")
    p.add_argument("--with-retrieval", action="store_true",
                   help="also train the retrieval control (one adapter, the user's profile text in every prompt; "
                        "same config and steps) into OUT/retrieval")

    p = sub.add_parser("refresh", help="Ray Data: new/changed users -> adapters in the store, manifest committed last")
    p.add_argument("--config", default=None, help="YAML refresh config (see jobs/configs/refresh-*.yaml)")
    p.add_argument("--hypernet", default=None, help="checkpoint folder (published to the store) or stored hypernet id")
    p.add_argument("--data", default=None, help="data directory with users/ (local or s3://)")
    p.add_argument("--store", default=None, help="store root: path, file://... or s3://bucket/prefix")
    p.add_argument("--full", action="store_true", help="regenerate every user")
    p.add_argument("--mode", default=None, choices=["adapters", "embeddings"],
                   help="adapters: a PEFT folder per user (default); embeddings: embeddings only, adapters made on a miss")
    p.add_argument("--adapter-dtype", default=None, choices=["float32", "bfloat16"],
                   help="adapters mode: the stored weights' dtype (bfloat16: half the bytes; add --full to convert a store)")
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
    p.add_argument("--max-layers", type=int, default=None,
                   help="rewrite every row into one layer once the committed run has this many (default 8)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")

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
    p.add_argument("--max-request-tokens", type=int, default=32768,
                   help="largest choices x (prompt + max_tokens) of one request (400 above)")
    p.add_argument("--max-waiting", type=int, default=256,
                   help="sequences queued per replica beyond the running batch (429 with Retry-After above)")
    p.add_argument("--request-timeout", type=int, default=300, help="seconds a request may generate (then 503)")

    p = sub.add_parser("token", help="issue an end-user token: the server answers its holder as that one user only")
    p.add_argument("action", choices=["issue"])
    p.add_argument("--user", required=True, help="the user id the token is for")
    p.add_argument("--ttl", type=float, default=3600.0, help="seconds until it expires (at most 30 days)")
    p.add_argument("--json", action="store_true", help="print token, user and expiry as JSON")

    p = sub.add_parser("eval", help="P2P vs the controls and baselines on held-out users: report with CIs + plots")
    p.add_argument("--run", required=True, help="training run directory (uses best/) or a hypernet checkpoint")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--split", default="test_id,test_ood", help="held-out splits to score")
    p.add_argument("--decoding", default="free", metavar="free,labels",
                   help="free: greedy decoding; labels: the most likely label of a classification or rating task's "
                        "list (reported as METHOD+labels); both: free,labels")
    p.add_argument("--methods", default="base,prompt,rule,shared,shuffled,oppu,p2p",
                   help="any of base, prompt, rule, shared, retrieval, shuffled, oppu, p2p")
    p.add_argument("--tasks", default=None, help="comma-separated tasks (default: all)")
    p.add_argument("--users-per-split", type=int, default=None, help="sample this many users per split")
    p.add_argument("--scoring", default="official", choices=["official", "lenient"],
                   help="official: LaMP's eval/evaluation.py; lenient: the forgiving variant, labelled as such")
    p.add_argument("--shared", default=None, help="the shared control's run or checkpoint (default RUN/shared)")
    p.add_argument("--retrieval", default=None,
                   help="the retrieval control's run or checkpoint (default RUN/retrieval)")
    p.add_argument("--exclude-users", default=None, metavar="FILE",
                   help="never score the user ids in FILE (one per line): the users a recipe was chosen on")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap samples per 95%% interval")
    p.add_argument("--oppu-users", type=int, default=4, help="users per split OPPU trains a LoRA for")
    p.add_argument("--oppu-epochs", type=int, default=6, help="cap on OPPU epochs (it stops when the loss stalls)")
    p.add_argument("--oppu-max-items", type=int, default=256, help="task-matched history items per task and user")
    p.add_argument("--seed", type=int, default=0)

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
        group = "adapters" if getattr(args, "action", None) in ("fetch", "export") else COMMANDS[args.command]
        module = importlib.import_module(f"pipelines.commands.{group}")  # lazy: see COMMANDS
        return int(getattr(module, "cmd_" + args.command.replace("-", "_"))(args) or 0)
    except P2PError as exc:  # one line; the exit code says which kind (jobs/README.md)
        print(f"p2p {args.command}: error: {exc}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 2))
    except KeyboardInterrupt:
        print(f"p2p {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
