"""`p2p eval`'s report: report.md (the effect first, then quality, activity levels and cost), report.json, plots.

It reads only the results dictionary `p2p.evaluation.evaluate.Evaluation.run` returns, so a
report can be rebuilt from a kept report.json.
"""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")  # files only: no display, in a job or a test
import matplotlib.pyplot as plt  # noqa: E402

from p2p.evaluation.stats import verdict  # noqa: E402

# Activity levels: users by history length (the paper reports robustness across them).
BUCKETS = ((0, 47, "<48 items"), (48, 95, "48-95 items"), (96, 10**9, ">=96 items"))


def _cell(s: dict | None) -> str:
    if s is None:
        return "-"
    low, high = s["ci95"]
    ci = "" if low != low else f" [{low:.3f}, {high:.3f}]"  # NaN: one user, no interval
    return f"{s['primary']:.3f}{ci} (n={s['users']}/{s['examples']})"


def report_markdown(results: dict) -> str:
    """report.md: the effect table first, then quality, history buckets and cost.

    Long because the report is read top to bottom: its sections appear here in the
    order a reader meets them.
    """
    methods = list(results["methods"])
    has_ceiling = "ceiling" in results
    keys = sorted({k for m in results["methods"].values() for k in m["scores"]})
    scoring = ("official LaMP scoring (eval/evaluation.py)" if results["scoring"] == "official"
               else "LENIENT scoring (first word / first number / stemmed ROUGE): not LaMP's official scoring")
    lines = [f"# p2p eval: hypernet {results['hypernet_id']}", "",
             f"Users no training step saw (splits: {', '.join(results['splits'])}): {results['users']} users, "
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
                  "Positive = P2P better, for an error metric too; 95% intervals from a paired bootstrap over users.",
                  "", "| task / split | metric | P2P against OPPU [95% CI] | n | verdict |", "|---|---|---|---|---|"]
        for key, e in results["p2p_vs_oppu"].items():
            lines.append(f"| {key} | {e['metric']} | {e['effect']:+.3f} [{e['ci95'][0]:+.3f}, {e['ci95'][1]:+.3f}] | "
                         f"{e['users']}/{e['examples']} | **{verdict(e['ci95'])}** |")
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
    lines += ["", "## Cost: per user (to personalize, to store) and per query (prompt, answer)", "",
              "| method | seconds to personalize one user | bytes stored per user | prompt tokens per query "
              "| seconds per answer | users |", "|---|---|---|---|---|---|"]
    for m in methods:
        c = results["methods"][m]["cost"]
        lines.append(f"| {m} | {c['personalize_seconds_per_user']:.4f} | {c['bytes_per_user']:,} | "
                     f"{c.get('prompt_tokens_per_answer', 0):.0f} | {c['seconds_per_answer']:.3f} | {c['users']} |")
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
    write_lamp_outputs(results, os.path.join(out, "lamp"))
    plot(results, out)


def write_lamp_outputs(results: dict, out: str) -> None:
    """OUT/<method>/<task>.json in LaMP's own output format (`{"task", "golds": [{"id", "output"}]}`),
    so LaMP's `eval/evaluation.py` scores each method's predictions unchanged."""
    for method, m in results["methods"].items():
        for task, predictions in m.get("predictions", {}).items():
            os.makedirs(os.path.join(out, method), exist_ok=True)
            golds = [{"id": eid, "output": p} for eid, p in sorted(predictions.items())]
            with open(os.path.join(out, method, f"{task}.json"), "w") as f:
                json.dump({"task": task, "golds": golds}, f, indent=1)


def plot(results: dict, out: str) -> None:
    """quality.png, effect.png and cost.png.

    Long because the three figures are drawn in sequence from the same results; each block is one figure.
    """

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
