"""`p2p eval`: does a user's own adapter answer better than anything that ignores the user?

Only `test_id` and `test_ood` users are scored (never users seen in training or checkpoint
selection). Every method answers the same examples with the same decoder and budgets; every cell
carries its n (users / examples) and a 95% interval from a bootstrap over users.

The headline is the **personalization effect**: P2P minus the best of the controls (`rule`,
`shared`, `shuffled`; see `p2p.evaluation.baselines`) on the task's primary metric, per task and split, with
a paired bootstrap 95% interval. "P2P better" is claimed only when that interval excludes zero.

Scoring is LaMP's official one by default (`p2p.evaluation.metrics`); `--scoring lenient` is labelled as
such in every report.
"""

from __future__ import annotations

import copy
import os
import random
import time
from dataclasses import asdict, dataclass, field

from p2p.data.schemas import examples_uri, read_table, read_user_id_file, users_uri
from p2p.errors import P2PError
from p2p.evaluation.baselines import DECODINGS, OPPU, Answerer, Method, OPPUConfig, Sources, build_methods
from p2p.evaluation.metrics import SCORINGS, primary_per_example, score
from p2p.evaluation.report import BUCKETS, write_report
from p2p.evaluation.stats import mean_ci, paired_diff_ci, verdict
from p2p.model.adapted import AdaptedModel
from p2p.model.base import load_base_model
from p2p.personalize import Personalizer
from p2p.task.registry import Task, tasks_of

METHODS = ("base", "prompt", "rule", "shared", "retrieval", "shuffled", "oppu", "p2p")
CONTROLS = ("rule", "shared", "retrieval", "shuffled")
HELD_OUT = ("test_id", "test_ood")


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
    # "free" (greedy decoding) and/or "labels" (the most likely label of a classification or rating
    # task's list); with both, each method is reported under each, "<method>+labels" for the second.
    decodings: tuple[str, ...] = ("free",)
    shared: str | None = None  # the shared control: a run or checkpoint (default RUN/shared)
    retrieval: str | None = None  # the retrieval control: a run or checkpoint (default RUN/retrieval)
    # A file of user ids (one per line) never to score: the users a recipe or setting was chosen on,
    # so that a reported figure does not stand on them.
    exclude_users: str | None = None


def checkpoint_dir(run: str) -> str:
    for candidate in (os.path.join(run, "best"), run):
        if os.path.exists(os.path.join(candidate, "config.json")):
            return candidate
    raise P2PError(f"{run}: neither a run directory with best/ nor a hypernet checkpoint")


def control_dir(config: EvalConfig, control: str) -> str | None:
    """A control's checkpoint: given (`shared`, `retrieval`), or RUN/<control>/best (what `p2p train
    --with-shared` / `--with-retrieval` write)."""
    given = getattr(config, control)
    if given:
        return checkpoint_dir(given)
    try:
        return checkpoint_dir(os.path.join(config.run, control))
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


def with_decoding(method: str, decoding: str) -> str:
    """A method's name in the report: `p2p` under free decoding, `p2p+labels` within the label set."""
    return method if decoding == "free" else f"{method}+{decoding}"


def suffixed(cell: str, decoding: str) -> str:
    return cell if decoding == "free" else f"{cell} ({decoding})"


def history_bucket(n: int) -> str:
    return next(name for low, high, name in BUCKETS if low <= n <= high)


@dataclass
class Scorer:
    """Per task and split: every metric, a bootstrap CI over users, paired differences between methods."""

    tasks: dict[str, Task]
    labels: dict[str, list[str]]  # the label list of each task (macro F1 and exact match over it)
    scoring: str
    bootstrap: int
    seed: int
    user_of: dict[str, str]  # example id -> user id: the bootstrap resamples users

    def cells(self, examples: list[dict], preds: list[str | None]) -> dict[str, dict]:
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
                "metrics": score(task, ps, golds, self.scoring, labels),
                "per_example": dict(zip((e["example_id"] for e, _ in rows),
                                        primary_per_example(task, ps, golds, self.scoring, labels), strict=True)),
                "users": len({e["user_id"] for e, _ in rows}), "examples": len(rows),
            }
        return cells

    def summary(self, cells: dict[str, dict]) -> dict[str, dict]:
        """The report's view of `cells`: metrics, n, the primary metric and its 95% CI."""
        return {k: {**v["metrics"], "users": v["users"], "examples": v["examples"], **self.ci(v["per_example"])}
                for k, v in cells.items()}

    def ci(self, values: dict[str, float]) -> dict:
        ids = sorted(values)
        ci = mean_ci([values[i] for i in ids], [self.user_of[i] for i in ids], self.bootstrap, self.seed)
        return {"primary": ci.value, "ci95": [ci.low, ci.high]}

    def by_history(self, examples: list[dict], preds: list, history_len: dict[str, int]) -> dict:
        """The primary metric per task and activity level (history length), splits pooled."""
        groups: dict[str, list[tuple[dict, str]]] = {}
        for e, p in zip(examples, preds, strict=True):
            if p is not None:
                groups.setdefault(f"{e['task']}/{history_bucket(history_len[e['user_id']])}", []).append((e, p))
        out = {}
        for key, rows in groups.items():
            task = self.tasks[key.split("/")[0]]
            values = primary_per_example(task, [p for _, p in rows], [e["target"] for e, _ in rows],
                                         self.scoring, self.labels[task.name])
            out[key] = {"primary": sum(values) / len(values), "users": len({e["user_id"] for e, _ in rows}),
                        "examples": len(rows)}
        return out

    def paired(self, examples: list[dict], per_example: dict, a: str, b: str) -> dict:
        """a minus b (sign: positive = a better) per cell, on the examples both answered."""
        out = {}
        by_key: dict[str, list[str]] = {}
        for e in examples:
            if e["example_id"] in per_example[a] and e["example_id"] in per_example[b]:
                by_key.setdefault(f"{e['task']}/{e['split']}", []).append(e["example_id"])
        for key, ids in sorted(by_key.items()):
            task = self.tasks[key.split("/")[0]]
            sign = 1 if task.higher_is_better else -1
            diff = paired_diff_ci([sign * per_example[a][i] for i in ids], [sign * per_example[b][i] for i in ids],
                                  [self.user_of[i] for i in ids], self.bootstrap, self.seed)
            out[key] = {"metric": task.primary, "effect": diff.value, "ci95": [diff.low, diff.high],
                        "users": len({self.user_of[i] for i in ids}), "examples": len(ids)}
        return out

    def effects(self, examples: list[dict], per_example: dict, treated: str = "p2p",
                controls: tuple[str, ...] = CONTROLS) -> dict:
        """Per cell: P2P minus each control, and minus the best control (by its point estimate)."""
        if treated not in per_example:
            return {}
        by_control = {c: self.paired(examples, per_example, treated, c) for c in controls if c in per_example}
        out = {}
        for key in sorted({k for v in by_control.values() for k in v}):
            options = {ctrl: v[key] for ctrl, v in by_control.items() if key in v}
            # the strongest control is the one P2P beats by the least
            best = min(options, key=lambda ctrl: options[ctrl]["effect"])
            effect = options[best]
            out[key] = {**effect, "control": best, "verdict": verdict(effect["ci95"]),
                        "by_control": {k: {"effect": v["effect"], "ci95": v["ci95"]} for k, v in options.items()}}
        return out


class Evaluation:
    """One `p2p eval` run: the held-out users and examples, the methods' answers, the scores."""

    def __init__(self, config: EvalConfig, progress=print, allowed_splits: tuple[str, ...] = HELD_OUT):
        if config.scoring not in SCORINGS:
            raise P2PError(f"unknown scoring {config.scoring!r}; valid: {', '.join(SCORINGS)}")
        unknown = [m for m in config.methods if m not in METHODS]
        if unknown:
            raise P2PError(f"unknown method {unknown[0]!r}; valid: {', '.join(METHODS)}")
        self.config, self.progress = config, progress
        self.personalizer = Personalizer.from_checkpoint(checkpoint_dir(config.run))
        self.hypernet_id = self.personalizer.hypernet_id
        self.users, self.examples, every = select(config, allowed_splits)
        self.tasks: dict[str, Task] = tasks_of(every)
        labels = {t: sorted({e["target"].strip() for e in every if e["task"] == t}) for t in self.tasks}
        self.scorer = Scorer(self.tasks, labels, config.scoring, config.bootstrap, config.seed,
                             {e["example_id"]: e["user_id"] for e in self.examples})
        self.train = [e for e in every if e["split"] == "train"]
        self.reference = load_reference(config.data)
        hconfig = self.personalizer.hypernet.config
        base, tok = load_base_model(hconfig.base_model)
        bad = [d for d in config.decodings if d not in DECODINGS]
        if bad or not config.decodings:
            raise P2PError(f"unknown decoding {bad[0] if bad else '(none)'!r}; valid: {', '.join(DECODINGS)}")
        adapted = AdaptedModel(copy.deepcopy(base), tok, hconfig)
        self.answerers = {d: Answerer(adapted, self.tasks, config.batch_size, d, labels) for d in config.decodings}
        self.notes: list[str] = []
        if config.exclude_users:
            self.notes.append(f"users listed in {config.exclude_users} were not scored")

    def _control(self, control: str) -> Personalizer | None:
        path = control_dir(self.config, control)
        if path is None:
            return None
        loaded = Personalizer.from_checkpoint(path)
        c, s = self.personalizer.hypernet.config, loaded.hypernet.config
        if (c.layers, c.target_modules, c.rank, c.base_model) != (s.layers, s.target_modules, s.rank, s.base_model):
            raise P2PError(f"{path}: the {control} control adapts other layers/modules/rank/base than {self.config.run}")
        return loaded

    def methods(self) -> dict[str, Method]:
        """The configured methods (baselines, controls, OPPU, P2P) under each decoding, built on this
        evaluation's models and data; the rule decodes nothing and appears once."""
        c = self.config
        shared = self._control("shared") if {"shared", "oppu"} & set(c.methods) else None
        retrieval = self._control("retrieval") if "retrieval" in c.methods else None
        out: dict[str, Method] = {}
        for decoding, answerer in self.answerers.items():
            sources = Sources(answerer, self.personalizer, shared, retrieval, self.tasks, self.train,
                              {k: v[:2] for k, v in self.reference.items()}, c.oppu, c.seed)
            names = c.methods if decoding == c.decodings[0] else tuple(m for m in c.methods if m != "rule")
            methods, notes = build_methods(names, sources)
            self.notes += [n for n in notes if n not in self.notes]
            out |= {with_decoding(name, decoding): m for name, m in methods.items()}
        for name, m in out.items():
            m.name = name
        return out

    def _oppu_users(self) -> set[str]:
        rng = random.Random(self.config.seed)
        chosen: set[str] = set()
        for split in self.config.splits:
            ids = sorted({e["user_id"] for e in self.examples if e["split"] == split})
            chosen |= set(rng.sample(ids, min(len(ids), self.config.oppu_users)))
        return chosen

    def run(self) -> dict:
        """Every method on the same examples, scored, then the effects.

        Long because it is the evaluation's one pass, read top to bottom: the methods answer,
        each answer set is scored into the results, then the comparisons are added.
        """
        c = self.config
        methods = self.methods()
        self.progress(f"eval: {len(self.users)} held-out users, {len(self.examples)} examples, "
                      f"methods {', '.join(methods)}; scoring {c.scoring}")
        oppu_users = self._oppu_users()
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
            cells = self.scorer.cells(subset, preds)
            per_example[name] = {eid: v for cell in cells.values() for eid, v in cell["per_example"].items()}
            results["methods"][name] = {
                "scores": self.scorer.summary(cells),
                "by_history": self.scorer.by_history(subset, preds, history_len),
                "cost": asdict(method.cost),
                "samples": [{"example_id": e["example_id"], "user_id": e["user_id"], "target": e["target"],
                             "prediction": p} for e, p in list(zip(subset, preds, strict=True))[:5]],
                "predictions": {e["task"]: {} for e in subset},
                "seconds": time.perf_counter() - t,
            }
            for e, p in zip(subset, preds, strict=True):
                if p is not None:
                    results["methods"][name]["predictions"][e["task"]][e["example_id"]] = p
            if isinstance(method, OPPU):
                results["methods"][name]["oppu"] = {"epochs": method.epochs_run, "items": method.items_used,
                                                    "seconds": method.train_seconds}
            self.progress(f"eval: {name} on {len({e['user_id'] for e in subset})} users, {len(subset)} examples: "
                          f"{time.perf_counter() - t:.0f}s")
        if self.reference:
            results["ceiling"] = self._ceiling()
        results["effects"], results["p2p_vs_oppu"] = {}, {}
        for d in c.decodings:
            p2p, oppu = with_decoding("p2p", d), with_decoding("oppu", d)
            controls = tuple(ctrl if ctrl == "rule" else with_decoding(ctrl, d) for ctrl in CONTROLS)
            results["effects"] |= {suffixed(k, d): v for k, v in
                                   self.scorer.effects(self.examples, per_example, p2p, controls).items()}
            if oppu in per_example and p2p in per_example:
                results["p2p_vs_oppu"] |= {suffixed(k, d): v for k, v in
                                           self.scorer.paired(self.examples, per_example, p2p, oppu).items()}
        if "oppu" in methods and "p2p" in methods:
            p2p_s = methods["p2p"].cost.personalize_seconds_per_user
            oppu_s = methods["oppu"].cost.personalize_seconds_per_user
            results["p2p_vs_oppu_personalize_speedup"] = oppu_s / p2p_s if p2p_s else None
        return results

    def _ceiling(self) -> dict:
        """What answering with the hidden persona known scores (the data set's reference answers)."""
        rows = [e for e in self.examples if self.reference.get(e["example_id"], (None, None, None))[2] is not None]
        preds = [self.reference[e["example_id"]][2] for e in rows]
        return self.scorer.summary(self.scorer.cells(rows, preds))


def run_eval(config: EvalConfig, progress=print) -> dict:
    results = Evaluation(config, progress).run()
    write_report(results, config.out)
    return results
