"""After training, how strongly does the label binding still decide the choice between a movie's two themes,
and does writing it more strongly buy accuracy? (LaMP-2-shaped, val users only)

    python -m bench.lamp_binding_gain --run RUN --data /tmp/lamph [--scales 1,2,4,8] [--eval 1,4] [--out OUT]

Training keeps the binding's gains near their start, yet P2P chooses between the two themes at a coin flip
(docs/quality.md, "Label binding"). Either the binding's logit gap is small after training, or the rest of
the adapter's gap between the two themes is large and ignores the user. This reads both off the trained
hypernet, per val user, at the position that predicts the first answer token:
- `binding gap`: (logit A - logit B) with the user's adapter minus the same with the binding's write zeroed,
  A the theme the user tagged, B the other one;
- `rest gap`: (logit A - logit B) with the binding's write zeroed: what the rest of the adapter prefers;
- the first-token choice between the two themes with the gains multiplied by each of `--scales`, with the
  user's own profile and with the next val user's (a probe told the two themes, not decoding);
- `A[0] . x` per bound layer: the factor the write `gain * u` in B[:, 0] is multiplied by, at the answer
  position with the user's own adapter (x the module's adapted input), over the first `--column-users`.
With `--eval`, each listed scale's checkpoint (OUT/x<scale>, the gains multiplied, nothing else changed) is
also scored by `p2p eval`'s Evaluation on the val users, free decoding, `shuffled` and `p2p`: the figure that
counts, since a stronger write also acts on the answer's later tokens.

Writes OUT/lamp_binding_gain.{md,json} (default OUT: RUN/binding-gain).
"""

from __future__ import annotations

import argparse
import copy
import os

import numpy as np
import torch

from bench.lamp_shaped import themes_of
from bench.report import write
from p2p.data.schemas import read_table
from p2p.evaluation.evaluate import EvalConfig, Evaluation
from p2p.evaluation.report import report_markdown, write_report
from p2p.evaluation.stats import mean_ci
from p2p.model.adapted import AdaptedModel
from p2p.model.base import load_base_model
from p2p.model.hypernet import Hypernetwork, adapter_paths, load_hypernet, save_hypernet
from p2p.task.prompt import PromptFormat
from p2p.task.registry import LAMP_2_TAGS
from p2p.train.examples import example_rows


def scaled(hypernet: Hypernetwork, scale: float) -> Hypernetwork:
    """A copy whose binding gains are multiplied by `scale` (0: the binding's write off)."""
    out = copy.deepcopy(hypernet)
    with torch.no_grad():
        for gain in out.binding_gain.values():
            gain.mul_(scale)
    return out


def column_factor(hypernet: Hypernetwork, adapted: AdaptedModel, prompts: list[list[int]], rows: list[dict]) -> list[dict]:
    """A[0] . x at the answer position per bound (layer, module), mean ± std over users' own adapters."""
    paths = {k: v for k, v in adapter_paths(hypernet.config).items() if k[1] in hypernet.bound}
    values: dict[tuple[int, str], list[float]] = {k: [] for k in paths}
    inputs: dict[tuple[int, str], torch.Tensor] = {}

    def keep(key):
        return lambda _m, args, _out: inputs.__setitem__(key, args[0][0, -1].float())

    hooks = [adapted.model.get_submodule(p).register_forward_hook(keep(k)) for k, p in paths.items()]
    try:
        for prompt, row in zip(prompts, rows, strict=True):
            with torch.no_grad():
                generated = hypernet(torch.tensor([row["embedding"]]))
                with adapted.applied(generated):
                    adapted.model(input_ids=torch.tensor([prompt]))
            for (layer, m) in paths:
                a = generated[m][0][0, hypernet.config.layers.index(layer), 0]  # user 0, rank row 0
                values[(layer, m)].append(float(a @ inputs[(layer, m)]))
    finally:
        for h in hooks:
            h.remove()
    return [{"figure": f"A[0] . x at the answer position, layer {layer} {m}, mean ± std over users", "scale": 1,
             "value": f"{np.mean(v):+.2f} ± {np.std(v):.2f} (n = {len(v)})"} for (layer, m), v in values.items() if v]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a run trained with label_binding (RUN/best)")
    ap.add_argument("--data", required=True, help="the import of bench.lamp_shaped's files, with profiles")
    ap.add_argument("--scales", default="1,2,4,8")
    ap.add_argument("--eval", default="", help="scales whose checkpoints are also scored by free decoding")
    ap.add_argument("--column-users", type=int, default=30, help="val users for A[0] . x (0: skip)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    out = args.out or os.path.join(args.run, "binding-gain")
    trained, _ = load_hypernet(os.path.join(args.run, "best"))
    if not trained.bound:
        raise SystemExit(f"{args.run}: this hypernet has no label binding")
    model, tok = load_base_model(trained.config.base_model)
    profiles = read_table(os.path.join(args.data, "profiles"), "profiles")
    val = [e for e in example_rows(args.data, profiles, ("val",)) if e["task"] == "LaMP_2"]
    first = {t: tok(t, add_special_tokens=False)["input_ids"][0] for t in LAMP_2_TAGS}
    adapted, fmt = AdaptedModel(model, tok, trained.config), PromptFormat(tok)
    prompts = [fmt.ids(e["input"]) for e in val]
    pairs = []  # (tagged theme, other theme) per user
    for e in val:
        themes = themes_of(e["input"])
        pairs.append((e["target"], next(t for t in themes if t != e["target"])))

    def gaps(hypernet: Hypernetwork, donor_offset: int) -> np.ndarray:
        """Per val user, logit(tagged theme) - logit(other theme) at the answer position."""
        values = []
        for k, (prompt, (a, b)) in enumerate(zip(prompts, pairs, strict=True)):
            profile = val[(k + donor_offset) % len(val)]["embedding"]
            with torch.no_grad(), adapted.applied(hypernet(torch.tensor([profile]))):
                logits = model(input_ids=torch.tensor([prompt])).logits[0, -1].float()
            values.append(float(logits[first[a]] - logits[first[b]]))
        return np.asarray(values)

    ids = [str(i) for i in range(len(val))]
    rest = gaps(scaled(trained, 0.0), 0)
    rows = [{"figure": "rest gap (binding off), mean ± std over users", "scale": 0,
             "value": f"{rest.mean():+.2f} ± {rest.std():.2f} nats"},
            {"figure": "choice, binding off (own profile)", "scale": 0,
             "value": mean_ci((rest > 0).astype(float).tolist(), ids).text()}]
    rows += column_factor(trained, adapted, prompts[: args.column_users], val[: args.column_users])
    for s in (float(x) for x in args.scales.split(",") if x):
        hypernet = scaled(trained, s)
        own, other = gaps(hypernet, 0), gaps(hypernet, 1)
        bind = own - rest
        rows += [{"figure": "binding gap (own - binding off), mean ± std over users", "scale": s,
                  "value": f"{bind.mean():+.2f} ± {bind.std():.2f} nats"},
                 {"figure": "choice, own profile", "scale": s,
                  "value": mean_ci((own > 0).astype(float).tolist(), ids).text()},
                 {"figure": "choice, the next val user's profile", "scale": s,
                  "value": mean_ci((other > 0).astype(float).tolist(), ids).text()}]
        print(rows[-3:], flush=True)
    for s in (float(x) for x in args.eval.split(",") if x):
        folder = os.path.join(out, f"x{s:g}")
        save_hypernet(scaled(trained, s), folder)
        config = EvalConfig(run=folder, data=args.data, out=os.path.join(folder, "val"), splits=("val",),
                            methods=("shuffled", "p2p"), decodings=("free",), oppu_users=1)
        results = Evaluation(config, progress=print, allowed_splits=("val",)).run()
        write_report(results, config.out)
        rows.append({"figure": "free decoding, val: shuffled, p2p and the effect in", "scale": s,
                     "value": os.path.join(config.out, "report.md")})
        report = report_markdown(results)
        print(report[: report.find("\n## By history") if "\n## By history" in report else len(report)], flush=True)
    write("lamp_binding_gain", rows, {"run": args.run, "val users": len(val)}, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
