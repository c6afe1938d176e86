"""Where the label gate loses the user's choice, on LaMP-2-shaped *training* users (no val or held-out user).

The gate's fit (p2p/train/gate_fit.py) gathers, for a sample of training examples run with their own
user's adapter, the input of the gated module and the final residual at every answer position, and holds
out a quarter of the users. On that quarter this bench scores the choice of the first answer token:

- `no gate`: the trained hypernet as it is;
- `share rule`: among the two themes the movie names (read off the data, which the model is not told),
  the one with the larger share of the user's answers: the ceiling of anything that reads the shares;
- `oracle gate`: the gate with its read replaced by "the movie names this tag" (x 0.5), at each gain;
- the fitted gate for each regression target (the gold answer; the model's own top-k labels) and gain,
  with how unequal the two named themes' gates come out (mean |log ratio|).

    python -m bench.lamp_gate_probe --run RUN --data DATA --out OUT [--examples 2560] [--config CONFIG]

Writes OUT/lamp_gate_probe.md and .json (and caches the gathered states in OUT/states.pt).
"""

from __future__ import annotations

import argparse
import os

import torch

from bench.lamp_shaped import themes_of
from bench.report import write
from p2p.config import load_config
from p2p.data.schemas import read_table
from p2p.model.adapted import AdaptedModel
from p2p.model.base import load_base_model
from p2p.model.hypernet import load_hypernet
from p2p.train import gate_fit
from p2p.train.examples import example_rows
from p2p.train.step import val_rows_sample

GAINS = (16, 32, 64, 128, 256, 512, 1024)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a run trained with label_gate (RUN/best)")
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", default="jobs/configs/train-quality-lamp-gate.yaml")
    ap.add_argument("--examples", type=int, default=2560)
    args = ap.parse_args(argv)
    config = load_config(args.config)
    hypernet, _ = load_hypernet(os.path.join(args.run, "best"))
    model, tok = load_base_model(config.base)
    adapted = AdaptedModel(model, tok, hypernet.config)
    rows = example_rows(args.data, read_table(os.path.join(args.data, "profiles"), "profiles")
                        .select(["user_id", "embedding"]), ("train",), config.tasks)
    rows = val_rows_sample(rows, args.examples)
    os.makedirs(args.out, exist_ok=True)
    cache = os.path.join(args.out, "states.pt")
    if os.path.exists(cache):
        s = gate_fit.GateStates(**torch.load(cache))
    else:
        s = gate_fit.gather_states(adapted, hypernet, rows, config.max_seq_len, config.batch_size, lambda n: None)
        torch.save(vars(s), cache)

    labels = hypernet.config.gate_labels
    first_tokens = [tok(label, add_special_tokens=False)["input_ids"][0] for label in labels]
    norm, head = model.get_decoder().norm, model.get_output_embeddings()
    with torch.no_grad():
        logits = head(norm(s.h[s.first]))[:, first_tokens].float()  # [E, n] in example order
    named = torch.zeros(len(rows), len(labels))
    for i, r in enumerate(rows):
        for theme in themes_of(r["input"]):
            named[i, labels.index(theme)] = 1
    held = s.held_out
    gold, shares, x = s.gold, s.shares, s.x[s.first]
    pair = torch.stack([torch.where(named[i] > 0)[0] for i in range(len(rows))])

    def accuracy(bias: torch.Tensor | float) -> float:
        return float(((logits + bias)[held].argmax(1) == gold[held]).float().mean())

    table = [("no gate", "", "", accuracy(0.0))]
    rule = shares.masked_fill(named == 0, -1.0)
    table.append(("share rule (among the named themes)", "", "", float((rule[held].argmax(1) == gold[held]).float().mean())))
    for g in GAINS:
        table.append(("oracle gate", "", g, accuracy(g * 0.5 * named * shares)))
    fit = ~held[s.example]
    for target in ("gold", "top-1", "top-2", "top-3"):
        if target == "gold":
            y = torch.zeros(len(s.token), len(labels))
            labelled = s.first & (s.gold[s.example] >= 0)
            y[labelled, s.gold[s.example][labelled]] = 1.0
        else:
            y = gate_fit.offered_targets(s, logits, int(target[-1]))
        for ridge in gate_fit.RIDGES:
            gate = x @ gate_fit.ridge_read(s.x[fit], y[fit], ridge)
            two = gate.gather(1, pair)[held].clamp(min=1e-3)
            ratio = float((two[:, 0] / two[:, 1]).log().abs().mean())
            for g in GAINS:
                table.append((f"fitted, target {target}, ridge {ridge}", f"{ratio:.3f}", g, accuracy(g * gate * shares)))
    write("lamp_gate_probe", [dict(zip(("gate", "named themes' gates, mean abs log ratio", "gain", "first-token accuracy"),
                                       r, strict=True)) for r in table],
          {"run": args.run, "examples sampled": len(rows), "held out of the regression": int(held.sum())}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
