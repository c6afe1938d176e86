"""`p2p eval`: does a user's own adapter answer better than anything that ignores the user?

Only `test_id` and `test_ood` users are scored (never users seen in training or checkpoint
selection). Every method answers the same examples with the same decoder and budgets; every cell
carries its n (users / examples) and a 95% interval from a bootstrap over users.

The headline is the **personalization effect**: P2P minus the best of the controls (`rule`,
`shared`, `shuffled`; see `p2p.baselines`) on the task's primary metric, per task and split, with
a paired bootstrap 95% interval. "P2P better" is claimed only when that interval excludes zero.

Scoring is LaMP's official one by default (`p2p.metrics`); `--scoring lenient` is labelled as
such in every report.
"""

from __future__ import annotations

import copy
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field

from p2p.baselines import OPPU, P2P, Answerer, Base, Method, OPPUConfig, ProfileInPrompt, Rule, Shared
from p2p.data.schemas import examples_uri, read_table, read_user_id_file, users_uri
from p2p.errors import P2PError
from p2p.metrics import SCORINGS, primary_per_example, score
from p2p.stats import mean_ci, paired_diff_ci
from p2p.tasks import Task, tasks_of

METHODS = ("base", "prompt", "rule", "shared", "shuffled", "oppu", "p2p")
CONTROLS = ("rule", "shared", "shuffled")
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
    scoring: str = "official"
    bootstrap: int = 2000  # bootstrap samples per interval
    shared: str | None = None  # the shared control: a run or checkpoint (default RUN/shared)
    # A file of user ids (one per line) never to score: the users a recipe or setting was chosen on,
    # so that a reported figure does not stand on them.
    exclude_users: str | None = None


def checkpoint_dir(run: str) -> str:
    for candidate in (os.path.join(run, "best"), run):
        if os.path.exists(os.path.join(candidate, "config.json")):
            return candidate
    raise P2PError(f"{run}: neither a run directory with best/ nor a hypernet checkpoint")


def shared_dir(config: EvalConfig) -> str | None:
    """The shared control's checkpoint: given, or RUN/shared/best (what `p2p train --with-shared` writes)."""
    if config.shared:
        return checkpoint_dir(config.shared)
    try:
        return checkpoint_dir(os.path.join(config.run, "shared"))
    except P2PError:
        return None


def select(config: EvalConfig, allowed: tuple[str, ...] = HELD_OUT) -> tuple[dict[str, dict], list[dict], list[dict]]:
    """(held-out users, their examples, every example of the evaluated tasks: labels and the rule fit on them).

    `allowed` is the held-out splits for every reported figure; a bench that chooses a recipe
    passes ("val",), so the choice never sees a held-out user.
    """
    bad = [s for s in config.splits if s not in allowed]
    if bad:
        raise P2PError(f"eval scores held-out users only: split {bad[0]!r} is not one of {', '.join(allowed)}")
    every = [e for e in read_table(examples_uri(config.data), "examples").to_pylist()
             if not config.tasks or e["task"] in config.tasks]
    examples = [e for e in every if e["split"] in config.splits]
    if not examples:
        raise P2PError(f"{config.data}: no examples in splits {', '.join(config.splits)}")
    excluded = excluded_users(config.exclude_users) if config.exclude_users else set()
    rng = random.Random(config.seed)
    keep: set[str] = set()
    for split in config.splits:
        ids = sorted({e["user_id"] for e in examples if e["split"] == split} - excluded)
        keep |= set(rng.sample(ids, min(len(ids), config.users_per_split)) if config.users_per_split else ids)
    if not keep:
        raise P2PError(f"{config.exclude_users}: every user of splits {', '.join(config.splits)} is excluded")
    examples = [e for e in examples if e["user_id"] in keep]
    users = {r["user_id"]: r for r in read_table(users_uri(config.data), "users").to_pylist() if r["user_id"] in keep}
    missing = keep - set(users)
    if missing:
        raise P2PError(f"{len(missing)} evaluated user(s) have no history in {users_uri(config.data)}")
    return users, examples, every


def excluded_users(path: str) -> set[str]:
    try:
        return set(read_user_id_file(path))
    except OSError as exc:
        raise P2PError(f"{path}: cannot read the user ids to exclude ({exc.strerror or exc})") from None


def load_reference(data: str) -> dict[str, tuple]:
    """example_id -> (rule_key, rule answer, ceiling answer) when the data set ships a reference table."""
    path = os.path.join(data, "reference")
    if not os.path.isdir(path):
        return {}
    return {r["example_id"]: (r["rule_key"], r["rule"], r["ceiling"]) for r in read_table(path, "reference").to_pylist()}


def _bucket(n: int) -> str:
    return next(name for low, high, name in BUCKETS if low <= n <= high)


class Evaluation:
    """One `p2p eval` run: the methods, their answers, every score, the effect, the report."""

    def __init__(self, config: EvalConfig, progress=print, allowed_splits: tuple[str, ...] = HELD_OUT):
        from p2p.hypernet import load_hypernet
        from p2p.models import load_base_model
        from p2p.personalizer import Personalizer

        if config.scoring not in SCORINGS:
            raise P2PError(f"unknown scoring {config.scoring!r}; valid: {', '.join(SCORINGS)}")
        unknown = [m for m in config.methods if m not in METHODS]
        if unknown:
            raise P2PError(f"unknown method {unknown[0]!r}; valid: {', '.join(METHODS)}")
        self.config, self.progress = config, progress
        self.hypernet, self.hypernet_id = load_hypernet(checkpoint_dir(config.run))
        self.personalizer = Personalizer(self.hypernet, self.hypernet_id)
        self.users, self.examples, every = select(config, allowed_splits)
        self.tasks: dict[str, Task] = tasks_of(every)
        self.labels = {t: sorted({e["target"].strip() for e in every if e["task"] == t}) for t in self.tasks}
        self.train = [e for e in every if e["split"] == "train"]
        self.reference = load_reference(config.data)
        base, tok = load_base_model(self.hypernet.config.base_model)
        from p2p.adapted_model import AdaptedModel

        self.answerer = Answerer(AdaptedModel(copy.deepcopy(base), tok, self.hypernet.config), self.tasks,
                                 config.batch_size)
        self.notes: list[str] = []
        if config.exclude_users:
            self.notes.append(f"users listed in {config.exclude_users} were not scored")

    # --- methods ---------------------------------------------------------------------------------

    def _shared_hypernet(self):
        from p2p.hypernet import load_hypernet

        path = shared_dir(self.config)
        if path is None:
            return None
        shared, _ = load_hypernet(path)
        c, s = self.hypernet.config, shared.config
        if (c.layers, c.target_modules, c.rank, c.base_model) != (s.layers, s.target_modules, s.rank, s.base_model):
            raise P2PError(f"{path}: the shared control adapts other layers/modules/rank/base than {self.config.run}")
        return shared

    def methods(self) -> dict[str, Method]:
        from p2p.generate import generate_user_adapters

        c = self.config
        shared = self._shared_hypernet() if {"shared", "oppu"} & set(c.methods) else None
        out: dict[str, Method] = {}
        for name in c.methods:
            if name == "base":
                out[name] = Base(name, self.answerer)
            elif name == "prompt":
                from p2p.profile import ProfileConfig

                out[name] = ProfileInPrompt(name, self.answerer, ProfileConfig(**self.hypernet.config.profile))
            elif name == "rule":
                refs = {k: v[:2] for k, v in self.reference.items()}
                out[name] = Rule(name, self.tasks, self.train, refs)
            elif name == "shared":
                if shared is None:
                    self.notes.append("shared: no shared control in the run (train it with `p2p train --with-shared`)")
                    continue
                out[name] = Shared(name, self.answerer, shared)
            elif name == "shuffled":
                out[name] = P2P(name, self.answerer, self.personalizer, shuffle_seed=c.seed)
            elif name == "p2p":
                out[name] = P2P(name, self.answerer, self.personalizer)
            else:
                start = generate_user_adapters(shared, shared.shared_embedding()[None])[0] if shared else None
                if start is None:
                    self.notes.append("oppu: no shared control, so each user's LoRA starts from PEFT's init")
                out[name] = OPPU(name, self.answerer, self.tasks, start, c.oppu)
        return out

    def _oppu_users(self) -> set[str]:
        rng = random.Random(self.config.seed)
        chosen: set[str] = set()
        for split in self.config.splits:
            ids = sorted({e["user_id"] for e in self.examples if e["split"] == split})
            chosen |= set(rng.sample(ids, min(len(ids), self.config.oppu_users)))
        return chosen

    # --- scoring ---------------------------------------------------------------------------------

    def _cells(self, examples: list[dict], preds: list[str | None]) -> dict[str, dict]:
        """Per task/split: every metric, the primary's per-example values, users, examples."""
        groups: dict[str, list[tuple[dict, str]]] = {}
        for e, p in zip(examples, preds, strict=True):
            if p is not None:
                groups.setdefault(f"{e['task']}/{e['split']}", []).append((e, p))
        cells = {}
        for key, rows in sorted(groups.items()):
            task = self.tasks[key.split("/")[0]]
            golds, ps = [e["target"] for e, _ in rows], [p for _, p in rows]
            labels = self.labels[task.name]
            cells[key] = {
                "metrics": score(task, ps, golds, self.config.scoring, labels),
                "per_example": dict(zip((e["example_id"] for e, _ in rows),
                                        primary_per_example(task, ps, golds, self.config.scoring, labels), strict=True)),
                "users": len({e["user_id"] for e, _ in rows}), "examples": len(rows),
            }
        return cells

    def run(self) -> dict:
        c = self.config
        methods = self.methods()
        self.progress(f"eval: {len(self.users)} held-out users, {len(self.examples)} examples, "
                      f"methods {', '.join(methods)}; scoring {c.scoring}")
        oppu_users = self._oppu_users()
        user_of = {e["example_id"]: e["user_id"] for e in self.examples}
        history_len = {u: len(r["history"]) for u, r in self.users.items()}
        results: dict = {"hypernet_id": self.hypernet_id, "run": c.run, "data": c.data, "splits": list(c.splits),
                         "scoring": c.scoring, "users": len(self.users), "examples": len(self.examples),
                         "tasks": {n: {"kind": t.kind, "primary": t.primary, "higher_is_better": t.higher_is_better}
                                   for n, t in self.tasks.items()},
                         "methods": {}, "notes": self.notes}
        per_example: dict[str, dict[str, float]] = {}
        for name, method in methods.items():
            subset = [e for e in self.examples if e["user_id"] in oppu_users] if name == "oppu" else self.examples
            t = time.perf_counter()
            preds = method.predict(self.users, subset)
            cells = self._cells(subset, preds)
            per_example[name] = {eid: v for cell in cells.values() for eid, v in cell["per_example"].items()}
            results["methods"][name] = {
                "scores": {k: {**v["metrics"], "users": v["users"], "examples": v["examples"],
                               **self._ci(v["per_example"], user_of)} for k, v in cells.items()},
                "by_history": self._by_history(subset, preds, history_len),
                "cost": asdict(method.cost),
                "samples": [{"example_id": e["example_id"], "user_id": e["user_id"], "target": e["target"],
                             "prediction": p} for e, p in list(zip(subset, preds, strict=True))[:5]],
                "seconds": time.perf_counter() - t,
            }
            if isinstance(method, OPPU):
                results["methods"][name]["oppu"] = {"epochs": method.epochs_run, "items": method.items_used,
                                                    "seconds": method.train_seconds}
            self.progress(f"eval: {name} on {len({e['user_id'] for e in subset})} users, {len(subset)} examples: "
                          f"{time.perf_counter() - t:.0f}s")
        if self.reference:
            results["ceiling"] = self._ceiling(user_of)
        results["effects"] = self._effects(per_example, user_of)
        if "oppu" in per_example and "p2p" in per_example:
            results["p2p_vs_oppu"] = self._paired(per_example, "p2p", "oppu", user_of)
            p2p_s = methods["p2p"].cost.personalize_seconds_per_user
            oppu_s = methods["oppu"].cost.personalize_seconds_per_user
            results["p2p_vs_oppu_personalize_speedup"] = oppu_s / p2p_s if p2p_s else None
        return results

    def _ci(self, values: dict[str, float], user_of: dict[str, str]) -> dict:
        ids = sorted(values)
        ci = mean_ci([values[i] for i in ids], [user_of[i] for i in ids], self.config.bootstrap, self.config.seed)
        return {"primary": ci.value, "ci95": [ci.low, ci.high]}

    def _by_history(self, examples: list[dict], preds: list, history_len: dict[str, int]) -> dict:
        groups: dict[str, list[tuple[dict, str]]] = {}
        for e, p in zip(examples, preds, strict=True):
            if p is not None:
                groups.setdefault(f"{e['task']}/{_bucket(history_len[e['user_id']])}", []).append((e, p))
        out = {}
        for key, rows in groups.items():
            task = self.tasks[key.split("/")[0]]
            values = primary_per_example(task, [p for _, p in rows], [e["target"] for e, _ in rows],
                                         self.config.scoring, self.labels[task.name])
            out[key] = {"primary": sum(values) / len(values), "users": len({e["user_id"] for e, _ in rows}),
                        "examples": len(rows)}
        return out

    def _ceiling(self, user_of: dict[str, str]) -> dict:
        """What answering with the hidden persona known scores (the data set's reference answers)."""
        rows = [e for e in self.examples if self.reference.get(e["example_id"], (None, None, None))[2] is not None]
        preds = [self.reference[e["example_id"]][2] for e in rows]
        return {k: {**v["metrics"], "users": v["users"], "examples": v["examples"],
                    **self._ci(v["per_example"], user_of)} for k, v in self._cells(rows, preds).items()}

    def _paired(self, per_example: dict, a: str, b: str, user_of: dict[str, str]) -> dict:
        """a minus b (sign: positive = a better) per cell, on the examples both answered."""
        out = {}
        by_key: dict[str, list[str]] = {}
        for e in self.examples:
            if e["example_id"] in per_example[a] and e["example_id"] in per_example[b]:
                by_key.setdefault(f"{e['task']}/{e['split']}", []).append(e["example_id"])
        for key, ids in sorted(by_key.items()):
            task = self.tasks[key.split("/")[0]]
            if not ids:
                continue
            sign = 1 if task.higher_is_better else -1
            diff = paired_diff_ci([sign * per_example[a][i] for i in ids], [sign * per_example[b][i] for i in ids],
                                  [user_of[i] for i in ids], self.config.bootstrap, self.config.seed)
            out[key] = {"metric": task.primary, "effect": diff.value, "ci95": [diff.low, diff.high],
                        "users": len({user_of[i] for i in ids}), "examples": len(ids)}
        return out

    def _effects(self, per_example: dict, user_of: dict[str, str]) -> dict:
        """Per cell: P2P minus each control, and minus the best control (by its point estimate)."""
        if "p2p" not in per_example:
            return {}
        by_control = {ctrl: self._paired(per_example, "p2p", ctrl, user_of) for ctrl in CONTROLS if ctrl in per_example}
        out = {}
        for key in sorted({k for v in by_control.values() for k in v}):
            options = {ctrl: v[key] for ctrl, v in by_control.items() if key in v}
            # the strongest control is the one P2P beats by the least
            best = min(options, key=lambda ctrl: options[ctrl]["effect"])
            effect = options[best]
            low, high = effect["ci95"]
            verdict = "P2P better" if low > 0 else "P2P worse" if high < 0 else "no difference shown"
            out[key] = {**effect, "control": best, "verdict": verdict,
                        "by_control": {k: {"effect": v["effect"], "ci95": v["ci95"]} for k, v in options.items()}}
        return out


def run_eval(config: EvalConfig, progress=print) -> dict:
    results = Evaluation(config, progress).run()
    write_report(results, config.out)
    return results


# --- report -----------------------------------------------------------------------------------------


def _cell(s: dict | None) -> str:
    if s is None:
        return "-"
    low, high = s["ci95"]
    ci = "" if low != low else f" [{low:.3f}, {high:.3f}]"  # NaN: one user, no interval
    return f"{s['primary']:.3f}{ci} (n={s['users']}/{s['examples']})"


def report_markdown(results: dict) -> str:
    """report.md: the effect table first, then quality, history buckets and cost.

    Kept as one function because the report is read top to bottom: its sections appear here in the
    order a reader meets them.
    """
    methods = list(results["methods"])
    has_ceiling = "ceiling" in results
    keys = sorted({k for m in results["methods"].values() for k in m["scores"]})
    scoring = ("official LaMP scoring (eval/evaluation.py)" if results["scoring"] == "official"
               else "LENIENT scoring (first word / first number / stemmed ROUGE): not LaMP's official scoring")
    lines = [f"# p2p eval: hypernet {results['hypernet_id']}", "",
             f"Held-out users only (splits: {', '.join(results['splits'])}): {results['users']} users, "
             f"{results['examples']} examples. Run: `{results['run']}`; data: `{results['data']}`. "
             f"Metrics: {scoring}.", ""]
    effects = results.get("effects") or {}
    if effects:
        lines += ["## Personalization effect: P2P minus the best control", "",
                  "Positive = P2P better. The best control is the one P2P beats by the least; 95% intervals from "
                  "a paired bootstrap over users.", "",
                  "| task / split | metric | effect [95% CI] | vs | every control | n | verdict |",
                  "|---|---|---|---|---|---|---|"]
        for key, e in effects.items():
            every = ", ".join(f"{c} {v['effect']:+.3f}" for c, v in e["by_control"].items())
            lines.append(f"| {key} | {e['metric']} | {e['effect']:+.3f} [{e['ci95'][0]:+.3f}, {e['ci95'][1]:+.3f}] | "
                         f"{e['control']} | {every} | {e['users']}/{e['examples']} | **{e['verdict']}** |")
        lines.append("")
    lines += ["## Quality (primary metric per task, [95% CI], n = users / examples)", "",
              "| task / split | metric | " + " | ".join(methods) + (" | ceiling (persona known)" if has_ceiling else "")
              + " |", "|---|---|" + "---|" * (len(methods) + has_ceiling)]
    for key in keys:
        t = results["tasks"][key.split("/")[0]]
        metric = f"{t['primary']} ({'higher' if t['higher_is_better'] else 'lower'} is better)"
        cells = [_cell(results["methods"][m]["scores"].get(key)) for m in methods]
        if has_ceiling:
            cells.append(_cell(results["ceiling"].get(key)))
        lines.append(f"| {key} | {metric} | " + " | ".join(cells) + " |")
    if results.get("p2p_vs_oppu"):
        lines += ["", "## P2P against OPPU, on the users OPPU trained for", "",
                  "| task / split | metric | P2P - OPPU [95% CI] | n |", "|---|---|---|---|"]
        for key, e in results["p2p_vs_oppu"].items():
            lines.append(f"| {key} | {e['metric']} | {e['effect']:+.3f} [{e['ci95'][0]:+.3f}, {e['ci95'][1]:+.3f}] | "
                         f"{e['users']}/{e['examples']} |")
    lines += ["", "## By history length (activity level), held-out splits pooled (primary metric)", "",
              "| task / history | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    order = {name: i for i, (_, _, name) in enumerate(BUCKETS)}
    hkeys = sorted({k for m in results["methods"].values() for k in m["by_history"]},
                   key=lambda k: (k.split("/")[0], order.get(k.split("/")[1], 9)))
    for key in hkeys:
        cells = []
        for m in methods:
            s = results["methods"][m]["by_history"].get(key)
            cells.append("-" if s is None else f"{s['primary']:.3f} (n={s['users']}/{s['examples']})")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
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
    if results.get("notes"):
        lines += ["", "Notes:", *(f"- {n}" for n in results["notes"])]
    lines += ["", "All other figures: `report.json`. Plots: `quality.png`, `effect.png`, `cost.png`.", ""]
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
    keys = sorted({k for m in results["methods"].values() for k in m["scores"]})
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(keys)), 4))
    width = 0.8 / max(len(methods), 1)
    for i, m in enumerate(methods):
        vals, errs = [], [[], []]
        for k in keys:
            s = results["methods"][m]["scores"].get(k)
            v = float("nan") if s is None else s["primary"]
            vals.append(v)
            low, high = (float("nan"), float("nan")) if s is None else s["ci95"]
            errs[0].append(0 if low != low else v - low)
            errs[1].append(0 if high != high else high - v)
        ax.bar([j + i * width for j in range(len(keys))], vals, width, yerr=errs, label=m, capsize=2)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))])
    ax.set_xticklabels([f"{k}\n({results['tasks'][k.split('/')[0]]['primary']})" for k in keys], fontsize=7)
    ax.set_title("held-out users, 95% CI over users (MAE: lower is better)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "quality.png"), dpi=110)
    plt.close(fig)

    effects = results.get("effects") or {}
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * max(len(effects), 1)), 3.5))
    ek = list(effects)
    vals = [effects[k]["effect"] for k in ek]
    low = [effects[k]["effect"] - effects[k]["ci95"][0] for k in ek]
    high = [effects[k]["ci95"][1] - effects[k]["effect"] for k in ek]
    ax.bar(range(len(ek)), vals, yerr=[low, high], capsize=3, color=["tab:green" if v > 0 else "tab:red" for v in vals])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(ek)))
    ax.set_xticklabels([f"{k}\nvs {effects[k]['control']}" for k in ek], fontsize=7)
    ax.set_title("personalization effect: P2P minus the best control (positive = P2P better)", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "effect.png"), dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for ax, (field_name, title) in zip(axes, (("personalize_seconds_per_user", "seconds to personalize a user"),
                                              ("bytes_per_user", "bytes stored per user"),
                                              ("seconds_per_answer", "seconds per answer")), strict=True):
        vals = [max(results["methods"][m]["cost"][field_name], 1e-6) for m in methods]
        ax.bar(methods, vals)
        ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "cost.png"), dpi=110)
    plt.close(fig)
