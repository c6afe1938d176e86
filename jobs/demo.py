"""`make demo`: the whole product end to end on this machine, on the embedded defaults.

    synth users -> p2p profiles (Ray Data) -> p2p train (Ray Train + DeepSpeed ZeRO-2, 2 workers)
    -> p2p refresh into a file:// store (Ray Data) -> p2p serve (Ray Serve, HTTP)
    -> held-out users who should answer one question differently, and their answers -> p2p eval (base, rule,
    shuffled, oppu, p2p)

One local Ray cluster runs every step; it is shut down at the end, on errors and on Ctrl-C.
Outputs stay in P2P_DEMO_DIR (default ./demo-output). Sizes: P2P_DEMO_USERS (300),
P2P_DEMO_STEPS (the training steps of jobs/configs/train-demo.yaml), P2P_DEMO_EVAL_USERS (8 per split;
the demo scores the tag task only, to stay within its time budget: `p2p eval` without --tasks scores all).
Each step prints the `p2p` command that does the same on its own. Framework logs (Ray, DeepSpeed,
transformers) go to a log file whose path is printed first; P2P_VERBOSE=1 shows them here instead.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

HERE = os.path.dirname(os.path.abspath(__file__))
START = time.perf_counter()


def step(title: str, command: str) -> None:
    print(f"\n=== [{time.perf_counter() - START:5.0f}s] {title} ===\n    $ {command}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def contrasting_users(data: str, n: int = 3) -> tuple[str, list[tuple[str, str]]]:
    """One held-out tag question and up to `n` held-out users whose own tag for its genre differs.

    The synthetic benchmark knows each user's tag for a genre (the reference's `ceiling`, from the
    hidden persona), so the demo can pick users who should answer the same question differently.
    Returns (question, [(user id, that user's tag for the genre)]).
    """
    from p2p.data.schemas import read_table

    examples = read_table(os.path.join(data, "examples"), "examples").to_pylist()
    reference = {r["example_id"]: r for r in read_table(os.path.join(data, "reference"), "reference").to_pylist()}
    by_genre: dict[str, dict[str, tuple[str, dict]]] = {}  # genre -> own tag -> (user, example)
    for e in examples:
        if e["split"] == "test_id" and e["task"] == "tag":
            ref = reference[e["example_id"]]
            by_genre.setdefault(ref["rule_key"], {}).setdefault(ref["ceiling"], (e["user_id"], e))
    genre = max(sorted(by_genre), key=lambda g: len(by_genre[g]))
    picked = sorted(by_genre[genre].items())[:n]
    question = picked[0][1][1]["input"]
    return question, [(user, tag) for tag, (user, _) in picked]


def run(out: str, users: int, steps: int | None, eval_users: int, tiny: bool = False) -> int:
    import requests

    from p2p.config import load_config
    from p2p.data.synthetic import write_synthetic
    from p2p.evaluation.baselines import OPPUConfig
    from p2p.evaluation.evaluate import EvalConfig, run_eval
    from p2p.evaluation.report import report_markdown
    from pipelines.refresh import RefreshConfig

    shutil.rmtree(out, ignore_errors=True)
    data, run_dir, store = f"{out}/data", f"{out}/run", f"file://{out}/store"
    config_path = os.path.join(HERE, "configs", "train-tiny.yaml" if tiny else "train-demo.yaml")

    step(f"synthetic users ({users}, three tasks; hidden personas)", f"p2p synth --out {data} --users {users} --seed 0")
    counts = write_synthetic(data, users, seed=0, chunk_size=max(50, users // 2), workers=2)
    print(f"    {counts}")

    config = load_config(config_path, max_steps=steps)
    step("profiles: history -> profile text + label statistics -> embedding (Ray Data)",
         f"p2p profiles --config {os.path.relpath(config_path)} --data {data} --out {data}/profiles")
    from pipelines.ingest import run_profiles
    from pipelines.ray_setup import ensure_ray

    ensure_ray()
    n = run_profiles(os.path.join(data, "users"), f"{data}/profiles", config.encoder, config.profile_config())
    print(f"    {n} profiles")

    step("train the hypernetwork (Ray Train + DeepSpeed ZeRO-2, 2 workers)",
         f"p2p train --config {os.path.relpath(config_path)} --data {data} --out {run_dir}")
    from pipelines.train import run_training

    summary = run_training(config, data, run_dir, profiles=f"{data}/profiles")
    print(f"    {summary['steps']} steps in {summary['seconds']:.0f}s; val loss {summary['val_loss']:.3f} "
          f"(best {summary['best_val_loss']:.3f})")

    step("refresh: every user's adapter into the store, manifest committed last (Ray Data)",
         f"p2p refresh --hypernet {run_dir}/best --data {data} --store {store}")
    from pipelines.refresh import run_refresh

    refreshed = run_refresh(RefreshConfig(hypernet=f"{run_dir}/best", data=data, store=store))
    print(f"    {refreshed.line()}")

    port = free_port()
    step("serve: Ray Serve on 127.0.0.1, adapters from the store", f"p2p serve --store {store} --port {port}")
    from pipelines.serve import start

    url = start(store, port=port)
    requests.get(f"{url}/healthz", timeout=300).raise_for_status()
    print(f"    {url} is up")
    question, users = contrasting_users(data)
    print(f"\n    One question, {len(users)} held-out users (never seen in training) whose histories tag this genre "
          "differently:")
    print("      " + question.split("\n")[-1])

    def answer(user: str | None) -> dict:
        body = {"messages": [{"role": "user", "content": question}], "max_tokens": 8, "temperature": 0}
        if user:
            body["user"] = user
        return requests.post(f"{url}/v1/chat/completions", json=body, timeout=300).json()

    print(f"      {'base model (no user)':<34} {answer(None)['choices'][0]['message']['content']!r}")
    for user, own_tag in users:
        reply = answer(user)
        print(f"      {'user ' + user + ' (tags it ' + repr(own_tag) + ')':<34} "
              f"{reply['choices'][0]['message']['content']!r}   personalized (p2p), run {reply['adapter']['run_id']}")
    from ray import serve

    serve.shutdown()

    methods = ("base", "rule", "shuffled", "oppu", "p2p")
    step("eval on held-out users: P2P against the controls (rule, shuffled profiles), base and OPPU",
         f"p2p eval --run {run_dir} --data {data} --out {out}/report --tasks tag --users-per-split {eval_users} "
         f"--methods {','.join(methods)} --oppu-users 1 --oppu-epochs 1 --oppu-max-items 32")
    results = run_eval(EvalConfig(run=run_dir, data=data, out=f"{out}/report", users_per_split=eval_users, tasks=("tag",),
                                  methods=methods, oppu_users=1, oppu=OPPUConfig(max_epochs=1, max_items=32)),
                       progress=lambda line: print(f"    {line}", flush=True))
    report = report_markdown(results)
    cut = min(i for i in (report.find("\n## P2P against OPPU"), report.find("\n## By history"), len(report)) if i >= 0)
    print("\n" + report[:cut].rstrip())  # the effect and quality tables; the rest is in report.md
    print(f"report: {out}/report/report.md (+ report.json and plots); total {time.perf_counter() - START:.0f}s")
    return 0


def main() -> int:
    from p2p import logs

    out = os.path.abspath(os.environ.get("P2P_DEMO_DIR", "demo-output"))
    logs.setup("demo", os.environ.get("P2P_VERBOSE") == "1")
    logs.announce()
    steps = os.environ.get("P2P_DEMO_STEPS")
    tiny = os.environ.get("P2P_DEMO_TINY") == "1"  # tests: tiny-random model and hashing encoder
    try:
        return run(out, int(os.environ.get("P2P_DEMO_USERS", "300")), int(steps) if steps else None,
                   int(os.environ.get("P2P_DEMO_EVAL_USERS", "8")), tiny)
    except KeyboardInterrupt:
        print("\ndemo: interrupted; stopping Ray", file=sys.stderr)
        return 130
    finally:
        import ray

        if ray.is_initialized():
            try:
                from ray import serve

                serve.shutdown()
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
            ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
