"""`p2p eval`: P2P against base, profile-in-prompt and OPPU on held-out users; report.md/json + plots.

Only `test_id` and `test_ood` users are scored (never users seen in training or checkpoint
selection). Every figure records how many users and examples it stands on; OPPU may run on a
sample of users, and the report says how many.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass, field

from p2p.adapted_model import AdaptedModel
from p2p.baselines import OPPU, P2P, Answerer, Base, Method, OPPUConfig, ProfileInPrompt
from p2p.data.schemas import read_table
from p2p.errors import P2PError
from p2p.metrics import PRIMARY, score, task_kind
from p2p.pipeline_local import examples_uri, users_uri
from p2p.profile import ProfileConfig

METHODS = ("base", "prompt", "oppu", "p2p")
HELD_OUT = ("test_id", "test_ood")
BUCKETS = ((0, 47, "<48 items"), (48, 95, "48-95 items"), (96, 10**9, ">=96 items"))


@dataclass
class EvalConfig:
    run: str  # a training run directory (its best/ checkpoint) or a checkpoint folder
    data: str
    out: str
    splits: tuple[str, ...] = HELD_OUT
    methods: tuple[str, ...] = METHODS
    tasks: tuple[str, ...] | None = None
    users_per_split: int | None = None  # sample this many users per split (None: all)
    oppu_users: int = 4  # OPPU trains one LoRA per user: this many users per split
    oppu: OPPUConfig = field(default_factory=OPPUConfig)
    seed: int = 0
    batch_size: int = 16


def checkpoint_dir(run: str) -> str:
    for candidate in (os.path.join(run, "best"), run):
        if os.path.exists(os.path.join(candidate, "config.json")):
            return candidate
    raise P2PError(f"{run}: neither a run directory with best/ nor a hypernet checkpoint")


def select(config: EvalConfig) -> tuple[dict[str, dict], list[dict]]:
    """Held-out users (optionally sampled per split) and their examples."""
    bad = [s for s in config.splits if s not in HELD_OUT]
    if bad:
        raise P2PError(f"eval scores held-out users only: split {bad[0]!r} is not one of {', '.join(HELD_OUT)}")
    examples = [e for e in read_table(examples_uri(config.data), "examples").to_pylist()
                if e["split"] in config.splits and (not config.tasks or e["task"] in config.tasks)]
    if not examples:
        raise P2PError(f"{config.data}: no examples in splits {', '.join(config.splits)}")
    rng = random.Random(config.seed)
    keep: set[str] = set()
    for split in config.splits:
        ids = sorted({e["user_id"] for e in examples if e["split"] == split})
        keep |= set(rng.sample(ids, min(len(ids), config.users_per_split)) if config.users_per_split else ids)
    examples = [e for e in examples if e["user_id"] in keep]
    users = {r["user_id"]: r for r in read_table(users_uri(config.data), "users").to_pylist() if r["user_id"] in keep}
    missing = keep - set(users)
    if missing:
        raise P2PError(f"{len(missing)} evaluated user(s) have no history in {users_uri(config.data)}")
    return users, examples


_BUCKET_ORDER = {name: i for i, (_, _, name) in enumerate(BUCKETS)}


def _bucket(n: int) -> str:
    return next(name for low, high, name in BUCKETS if low <= n <= high)


def scores_by(examples: list[dict], preds: list[str], key) -> dict:
    groups: dict = {}
    for e, p in zip(examples, preds, strict=True):
        groups.setdefault(key(e), ([], [], set()))
        groups[key(e)][0].append(p)
        groups[key(e)][1].append(e["target"])
        groups[key(e)][2].add(e["user_id"])
    return {k: {**score(k[0], ps, gs), "examples": len(gs), "users": len(us)} for k, (ps, gs, us) in groups.items()}


def run_eval(config: EvalConfig, progress=print) -> dict:
    from p2p.data.synthetic import INSTRUCTIONS
    from p2p.encoder import ProfileEncoder
    from p2p.hypernet import load_hypernet
    from p2p.models import load_base_model

    unknown = [m for m in config.methods if m not in METHODS]
    if unknown:
        raise P2PError(f"unknown method {unknown[0]!r}; valid: {', '.join(METHODS)}")
    hypernet, hid = load_hypernet(checkpoint_dir(config.run))
    users, examples = select(config)
    progress(f"eval: {len(users)} held-out users, {len(examples)} examples, methods {', '.join(config.methods)}")
    base_model, tok = load_base_model(hypernet.config.base_model)
    import copy

    answerer = Answerer(AdaptedModel(copy.deepcopy(base_model), tok, hypernet.config), batch_size=config.batch_size)
    encoder = ProfileEncoder(hypernet.config.encoder) if {"p2p"} & set(config.methods) else None
    methods: dict[str, Method] = {}
    for name in config.methods:
        if name == "base":
            methods[name] = Base(name, answerer)
        elif name == "prompt":
            methods[name] = ProfileInPrompt(name, answerer, ProfileConfig(**hypernet.config.profile))
        elif name == "p2p":
            methods[name] = P2P(name, answerer, hypernet, hid, encoder)
        else:
            methods[name] = OPPU(name, answerer, base_model, hypernet, INSTRUCTIONS, config.oppu)

    rng = random.Random(config.seed)
    oppu_users = set()
    for split in config.splits:
        ids = sorted({e["user_id"] for e in examples if e["split"] == split})
        oppu_users |= set(rng.sample(ids, min(len(ids), config.oppu_users)))

    results: dict = {"hypernet_id": hid, "run": config.run, "data": config.data, "splits": list(config.splits),
                     "users": len(users), "examples": len(examples), "methods": {}}
    history_len = {u: len(r["history"]) for u, r in users.items()}
    for name, method in methods.items():
        subset = [e for e in examples if e["user_id"] in oppu_users] if name == "oppu" else examples
        t = time.perf_counter()
        progress(f"eval: {name} on {len({e['user_id'] for e in subset})} users, {len(subset)} examples ...")
        preds = method.predict(users, subset)
        by_task_split = scores_by(subset, preds, lambda e: (e["task"], e["split"]))
        by_bucket = scores_by(subset, preds, lambda e: (e["task"], _bucket(history_len[e["user_id"]])))
        results["methods"][name] = {
            "scores": {f"{task}/{split}": v for (task, split), v in sorted(by_task_split.items())},
            "by_history": {f"{task}/{bucket}": v for (task, bucket), v in
                           sorted(by_bucket.items(), key=lambda kv: (kv[0][0], _BUCKET_ORDER[kv[0][1]]))},
            "cost": asdict(method.cost),
            "samples": [{"example_id": e["example_id"], "user_id": e["user_id"], "target": e["target"], "prediction": p}
                        for e, p in list(zip(subset, preds, strict=True))[:5]],
            "seconds": time.perf_counter() - t,
        }
        progress(f"eval: {name} done in {time.perf_counter() - t:.0f}s")
    if "oppu" in methods and "p2p" in methods:
        p2p_s = methods["p2p"].cost.personalize_seconds_per_user
        oppu_s = methods["oppu"].cost.personalize_seconds_per_user
        results["p2p_vs_oppu_personalize_speedup"] = oppu_s / p2p_s if p2p_s else None
    write_report(results, config.out)
    return results


# --- report -----------------------------------------------------------------------------------------


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _ordered_keys(results: dict, section: str) -> list[str]:
    """Keys in the order the methods list them (tasks, then splits or history buckets in order)."""
    keys: dict[str, None] = {}
    for m in results["methods"].values():
        keys.update(dict.fromkeys(m[section]))
    order = {name: i for i, name in enumerate(keys)}
    return sorted(keys, key=lambda k: (k.split("/")[0], _BUCKET_ORDER.get(k.split("/")[1], order[k])))


def _cells(results: dict, section: str, key: str) -> list[str]:
    """One table row's cells: each method's primary metric for `key`, with the n it stands on."""
    metric, _ = PRIMARY[task_kind(key.split("/")[0])]
    cells = []
    for m in results["methods"].values():
        s = m[section].get(key)
        cells.append("-" if s is None else f"{s[metric]:.3f} (n={s['users']}/{s['examples']})")
    return cells


def report_markdown(results: dict) -> str:
    methods = list(results["methods"])
    keys = sorted({k for m in results["methods"].values() for k in m["scores"]})
    lines = [f"# p2p eval: hypernet {results['hypernet_id']}", "",
             f"Held-out users only (splits: {', '.join(results['splits'])}): {results['users']} users, "
             f"{results['examples']} examples. Run: `{results['run']}`; data: `{results['data']}`.", "",
             "## Quality (primary metric per task; n = users / examples behind each cell)", "",
             "| task / split | metric | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for key in keys:
        task = key.split("/")[0]
        metric, better = PRIMARY[task_kind(task)]
        lines.append(f"| {key} | {metric} ({better} is better) | " + " | ".join(_cells(results, "scores", key)) + " |")
    lines += ["", "## By history length (activity level), all held-out splits pooled", "",
              "| task / history | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for key in _ordered_keys(results, "by_history"):
        lines.append(f"| {key} | " + " | ".join(_cells(results, "by_history", key)) + " |")
    lines += ["", "## Deployment cost per user", "",
              "| method | seconds to personalize one user | bytes stored per user | seconds per answer | users |",
              "|---|---|---|---|---|"]
    for m in methods:
        c = results["methods"][m]["cost"]
        lines.append(f"| {m} | {c['personalize_seconds_per_user']:.4f} | {c['bytes_per_user']:,} | "
                     f"{c['seconds_per_answer']:.3f} | {c['users']} |")
    if results.get("p2p_vs_oppu_personalize_speedup"):
        lines += ["", f"P2P personalizes a user {results['p2p_vs_oppu_personalize_speedup']:,.0f}x faster than "
                      "OPPU trains one (same run, same machine; P2P timed for one user alone, no batching)."]
    lines += ["", "All other figures: `report.json`. Plots: `quality.png`, `by_history.png`, `cost.png`.", ""]
    return "\n".join(lines)


def write_report(results: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(report_markdown(results))
    plot(results, out)


def plot(results: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(results["methods"])
    for fname, section in (("quality.png", "scores"), ("by_history.png", "by_history")):
        keys = _ordered_keys(results, section)
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(keys)), 4))
        width = 0.8 / max(len(methods), 1)
        for i, m in enumerate(methods):
            vals = []
            for k in keys:
                s = results["methods"][m][section].get(k)
                vals.append(float("nan") if s is None else s[PRIMARY[task_kind(k.split("/")[0])][0]])
            ax.bar([j + i * width for j in range(len(keys))], vals, width, label=m)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))])
        ax.set_xticklabels([f"{k}\n({PRIMARY[task_kind(k.split('/')[0])][0]})" for k in keys], fontsize=7)
        ax.set_title("held-out users: accuracy / ROUGE-L higher is better, MAE lower is better", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, fname), dpi=110)
        plt.close(fig)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for ax, (field_name, title) in zip(axes, (("personalize_seconds_per_user", "seconds to personalize a user"),
                                              ("bytes_per_user", "bytes stored per user"),
                                              ("seconds_per_answer", "seconds per answer")), strict=True):
        vals = [max(results["methods"][m]["cost"][field_name], 1e-6) for m in methods]
        ax.bar(methods, vals)
        ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "cost.png"), dpi=110)
    plt.close(fig)
