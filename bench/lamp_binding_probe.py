"""Does the label binding point the right way, and how strongly does it start? (LaMP-2-shaped val users)

    python -m bench.lamp_binding_probe --data /tmp/lamph [--users 40] [--nats 1,3,10] [--run RUN]

Two figures, without any training:
- `direction`: for each val user, the higher of the movie's two themes by the binding's logit shift
  `E_t . u` (u = the user's centred label shares along the labels' output embeddings), against the
  count rule (the theme with the larger share). Says whether the fixed map points at the user's labels.
- `untrained`: a fresh hypernet with `label_binding_nats` = each of `--nats`, the base model otherwise
  untrained: the theme whose first answer token has the higher log-probability after the prompt, with
  the user's own profile and with the next val user's. This is a choice between the two themes the movie
  names (told to the probe), not decoding: the untrained model does not answer in the tag format.
- with `--run`: the trained run's gains and read . x at the answer position, against the start's.

Writes bench/results/lamp_binding_probe.{md,json}.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from bench.lamp_shaped import themes_of
from bench.report import write
from p2p.config import load_config
from p2p.data.schemas import read_table
from p2p.evaluation.stats import mean_ci
from p2p.model.adapted import AdaptedModel
from p2p.model.base import load_base_model
from p2p.model.hypernet import adapter_paths, load_hypernet
from p2p.model.label_binding import answer_position
from p2p.profile.features import label_bin
from p2p.task.prompt import PromptFormat
from p2p.task.registry import LAMP_2_TAGS
from p2p.train.examples import embedding_stats, example_rows, user_embeddings
from p2p.train.loop import binding_prompts, new_hypernet

CONFIG = "jobs/configs/train-quality-lamp-binding.yaml"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="the import of bench.lamp_shaped's files, with profiles")
    ap.add_argument("--users", type=int, default=40, help="val users for the untrained choice")
    ap.add_argument("--nats", default="1,3,10")
    ap.add_argument("--run", default=None, help="a trained run (RUN/best): its gains and read . x, against the start")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    config = load_config(CONFIG)
    model, tok = load_base_model(config.base)
    profiles = read_table(os.path.join(args.data, "profiles"), "profiles")
    train, val = example_rows(args.data, profiles, ("train",)), example_rows(args.data, profiles, ("val",))
    stats = embedding_stats(user_embeddings(train))
    # One start at 1 nat: the matrix and the read rows do not depend on `nats`, and the gain is proportional to it.
    start = new_hypernet(config.model_copy(update={"label_binding_nats": 1.0}), model, len(train[0]["embedding"]),
                         stats, tok, ["LaMP_2"], binding_prompts(train))
    first = {t: tok(t, add_special_tokens=False)["input_ids"][0] for t in LAMP_2_TAGS}
    labels_out = model.get_output_embeddings().weight.detach()[[first[t] for t in LAMP_2_TAGS]]
    bins = {t: label_bin(t, config.profile_features) for t in LAMP_2_TAGS}

    rows, direction, rule = [], [], []
    with torch.no_grad():
        shifts = start.bound_vector(torch.tensor([e["embedding"] for e in val])) @ labels_out.T  # [users, tags]
    for e, shift in zip(val, shifts, strict=True):
        themes, shares = themes_of(e["input"]), np.asarray(e["embedding"], np.float32)[-config.profile_features :]
        direction.append(float(max(themes, key=lambda t: float(shift[LAMP_2_TAGS.index(t)])) == e["target"]))
        rule.append(float(max(themes, key=lambda t: (shares[bins[t]], t)) == e["target"]))
    rows.append({"figure": "direction: the theme E_t . u favours", "users": len(val), "value": _ci(direction)})
    rows.append({"figure": "the count rule (larger share)", "users": len(val), "value": _ci(rule)})

    fmt, probe = PromptFormat(tok), val[: args.users]
    ids = [fmt.ids(e["input"]) for e in probe]
    rows.append({"figure": "read . x at the answer position, start (mean ± std over prompts and layers)",
                 "users": len(probe), "value": _read_spread(model, start, ids)})
    adapted = AdaptedModel(model, tok, start.config)
    one_nat = start.binding_gain["o_proj"].detach().clone()
    for nats in (float(x) for x in args.nats.split(",")):
        with torch.no_grad():
            start.binding_gain["o_proj"].copy_(one_nat * nats)
        rows.append({"figure": f"start gain at {nats:g} nats (mean over layers)", "users": "",
                     "value": f"{float(start.binding_gain['o_proj'].mean()):.3f}"})
        hits = {"own": [], "another user's": []}
        for k, (e, prompt) in enumerate(zip(probe, ids, strict=True)):
            themes = themes_of(e["input"])
            for who, profile in (("own", e), ("another user's", probe[(k + 1) % len(probe)])):
                with torch.no_grad(), adapted.applied(start(torch.tensor([profile["embedding"]]))):
                    logp = torch.log_softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1].float(), -1)
                hits[who].append(float(max(themes, key=lambda t: float(logp[first[t]])) == e["target"]))
        for who, h in hits.items():
            rows.append({"figure": f"untrained, {nats:g} nats, {who} profile", "users": len(probe), "value": _ci(h)})
    if args.run:
        trained, _ = load_hypernet(os.path.join(args.run, "best"))
        gains = trained.binding_gain["o_proj"].detach()
        rows.append({"figure": f"trained gain ({args.run}; min..max over layers)", "users": "",
                     "value": f"{float(gains.min()):.3f}..{float(gains.max()):.3f}"})
        rows.append({"figure": "read . x at the answer position, trained", "users": len(probe),
                     "value": _read_spread(model, trained, ids)})
    write("lamp_binding_probe", rows, {"config": CONFIG, "val users": len(val)}, args.out)
    return 0


def _read_spread(model, hypernet, ids: list[list[int]]) -> str:
    """read[l] . x over the prompts, x the bound module's input at each prompt's last position."""
    paths = {k: v for k, v in adapter_paths(hypernet.config).items() if k[1] in hypernet.bound}
    values = []
    for prompt in ids:
        inputs = answer_position(model, [prompt], paths).inputs
        for j, layer in enumerate(hypernet.config.layers):
            values.append(float(hypernet.binding_read["o_proj"][j].detach() @ inputs[(layer, "o_proj")]))
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def _ci(hits: list[float]) -> str:
    """Mean and 95% bootstrap interval (one question per user, so over users)."""
    return mean_ci(hits, [str(i) for i in range(len(hits))]).text()


if __name__ == "__main__":
    raise SystemExit(main())
