"""How much of each task's hidden persona attribute a profile embedding carries: linear probes.

For synthetic users (hidden personas known), each variant of the hypernet's input is probed with
a logistic regression trained on 2/3 of the users and scored on the rest: the per-genre tag
choice (tag task), strictness and extremity (rate), prefix, casing and ending (headline). A
probe near chance means the hypernet cannot tell users apart on that attribute, whatever it learns.

    python -m bench.profile_probe [--users 1500] [--encoder minilm]

Prints a Markdown table and writes bench/results/profile_probe.json.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench.report import write
from p2p.data.synthetic import HEADLINE_CASINGS, HEADLINE_ENDINGS, HEADLINE_PREFIXES, generate_chunk
from p2p.profile.config import ProfileConfig
from p2p.profile.encoder import ProfileEncoder
from p2p.profile.features import profile_features
from p2p.profile.text import build_profile
from p2p.task.registry import GENRES


def attributes(users) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """attribute -> (labels per user, mask of users for whom it is observable, classes)."""
    out = {}
    for g, genre in enumerate(GENRES):
        seen = np.array([any(h["label"] and h["item_id"].split("-")[-2] == "tag" and genre in h["text"]
                             for h in u.history) for u in users])
        out[f"tag choice: {genre}"] = (np.array([u.persona.tag_choice[g] for u in users]), seen, 3)
    every = np.ones(len(users), bool)
    out["rate: strictness"] = (np.array([u.persona.strictness for u in users]), every, 3)
    out["rate: extreme"] = (np.array([int(u.persona.extreme) for u in users]), every, 2)
    out["headline: prefix"] = (np.array([u.persona.prefix for u in users]), every, len(HEADLINE_PREFIXES))
    out["headline: casing"] = (np.array([u.persona.casing for u in users]), every, len(HEADLINE_CASINGS))
    out["headline: ending"] = (np.array([u.persona.ending for u in users]), every, len(HEADLINE_ENDINGS))
    return out


def probe(x: np.ndarray, y: np.ndarray, mask: np.ndarray, n_train: int) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    train = np.arange(len(y)) < n_train
    a, b = train & mask, ~train & mask
    if len(set(y[a])) < 2 or not b.any():
        return float("nan")
    scaler = StandardScaler().fit(x[a])
    clf = LogisticRegression(max_iter=3000, C=1.0).fit(scaler.transform(x[a]), y[a])
    return float((clf.predict(scaler.transform(x[b])) == y[b]).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--encoder", default="minilm")
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--fitted-chars", type=int, default=900, help="a profile text cut to fit the encoder window")
    args = parser.parse_args()

    users = generate_chunk(0, args.users, args.users, seed=args.seed)
    config = ProfileConfig(features=args.features)
    fitted = ProfileConfig(features=args.features, max_chars=args.fitted_chars)
    encoder = ProfileEncoder(args.encoder)
    tok = getattr(getattr(encoder, "_model", None), "tokenizer", None)
    t0 = time.perf_counter()
    texts = [build_profile(u.history, config) for u in users]
    fitted_texts = [build_profile(u.history, fitted) for u in users]
    text_emb = encoder.encode(texts)
    fitted_emb = encoder.encode(fitted_texts)
    feats = np.stack([profile_features(u.history, config) for u in users])
    seconds = time.perf_counter() - t0
    variants = {
        "profile text (before)": text_emb,
        f"text cut to {args.fitted_chars} chars": fitted_emb,
        f"label features ({args.features})": feats,
        "text + label features": np.concatenate([text_emb, feats], 1),
        "cut text + label features": np.concatenate([fitted_emb, feats], 1),
    }
    n_train = 2 * len(users) // 3
    attrs = attributes(users)
    table = {name: {a: probe(x, *attrs[a][:2], n_train) for a in attrs} for name, x in variants.items()}
    window = getattr(getattr(encoder, "_model", None), "max_seq_length", None)
    over = None
    if tok is not None and window:
        over = {name: float(np.mean([len(tok(t)["input_ids"]) > window for t in ts]))
                for name, ts in (("before", texts), ("cut", fitted_texts))}

    names = list(variants)
    rows = [{"attribute": a, "chance": 1 / classes, **{n: table[n][a] for n in names}}
            for a, (_, _, classes) in attrs.items()]
    rows.append({"attribute": "mean", "chance": float(np.mean([r["chance"] for r in rows])),
                 **{n: float(np.nanmean(list(table[n].values()))) for n in names}})
    write("profile_probe", rows, {
        "users": len(users), "probe_train_users": n_train, "seed": args.seed, "encoder": args.encoder,
        "encoder_window_tokens": window, "profiles_longer_than_window": over, "embed_seconds": seconds,
    })


if __name__ == "__main__":
    main()
