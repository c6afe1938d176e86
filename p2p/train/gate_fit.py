"""Fitting the label gate (p2p/model/label_gate.py) to a trained hypernet, on training users.

Why after training and not by it: the gate reads the input of the top layer's MLP output projection,
and that input moves while the adapters below it train (as the label binding's read of o_proj's
input did: from 1.0 to 0.6 at the answer position in 300 steps, docs/quality.md). Fitted at the end it
reads what the finished model computes, and because nothing runs between that module and the final norm, what the
gate does to every logit is known in closed form. So the fit is two small problems on the hidden
states of a sample of training examples, each run with its own user's adapter:

1. `read`: ridge regression from the module input to "label i is among the model's own k most likely
   labels here", at the position that predicts a labelled answer's first token, and to 0 at the
   positions that predict the rest of the answer (so the gate stays shut while a label is being
   spelled). It reads which labels the question offers. Regressing on the gold answer instead reads
   the same thing through label noise (the gold is one of the offered labels by the user's taste, so
   the two offered labels' gates come out unequal, and a gate ratio decides like a share ratio);
   `bench/lamp_gate_probe.py` compares the two.
2. `write`: for each label, the smallest residual-stream vector that raises that label's first answer
   token by one nat and no other label's (a pseudo-inverse of the labels' output rows through the final
   norm), times its task's gain.

k (1 to 3), the ridge strength and the gains are chosen together on a quarter of the sampled users the
regression did not see, by how often the first answer token is the gold one (the final norm and the LM
head rerun on the changed hidden states), ties broken by its cross-entropy. Not by the loss alone: the
user's shares name the label they choose about 3 times in 4, and the loss stops the gain where the
quarter it gets wrong would be confidently wrong, below the gain that answers best
(`bench/lamp_gate_probe.py`). Gain 0 is a candidate, so a gate that does not help is fitted shut. Only training users are read; val users still choose between runs.

Each task's labels get a gain of their own, chosen with the other tasks' labels shut: a user's shares of
five ratings and of 18 tags are not on one scale, and on the synthetic mix one gain for both traded tag
accuracy against rating error (docs/quality.md, "The label gate on the synthetic benchmark").
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from p2p.config import TrainConfig
from p2p.errors import P2PError
from p2p.model.adapted import AdaptedModel
from p2p.model.hypernet import Hypernetwork, load_hypernet, save_hypernet
from p2p.model.label_gate import final_norm, label_first_tokens, same_first_token
from p2p.task.prompt import PromptFormat
from p2p.task.registry import task_for
from p2p.train.batch import IGNORE, batches_of
from p2p.train.examples import as_control
from p2p.train.step import val_rows_sample

RIDGES = (0.01, 0.03, 0.1, 0.3)  # ridge strength, relative to the mean diagonal of X^T X
MAX_OFFERED = 3  # the gate is fitted to read the model's own k most likely labels, k = 1 .. this
GAINS = tuple(2.0 ** k for k in range(2, 11))  # nats per unit share: 4 .. 1024 (0 is always a candidate)
HOLDOUT = 0.25  # share of the sampled users the regression leaves out, to choose k, ridge and gain on


@dataclass
class GateFit:
    """The fitted gate (set on the hypernet by `fit_label_gate`) and what the fit measured."""

    read: torch.Tensor  # [n, in]: A rows of the gate module
    write: torch.Tensor  # [n, out]: B column per unit share (scale included)
    ridge: float
    gains: dict[str, float]  # task -> nats per unit share of its labels
    report: dict


@dataclass
class GateStates:
    """What the fit needs from one forward pass per example, gathered over a sample."""

    x: torch.Tensor  # [P, in] gate module input at each position that predicts a target token
    h: torch.Tensor  # [P, hidden] final norm input there
    token: torch.Tensor  # [P] the target token it predicts
    example: torch.Tensor  # [P] example index
    first: torch.Tensor  # [P] bool: predicts the first answer token
    gold: torch.Tensor  # [E] gate label index of each example's answer, -1 for none
    shares: torch.Tensor  # [E, n] each example's user's share of each label
    held_out: torch.Tensor  # [E] bool: the example's user is in the holdout quarter


def held_out_users(user_ids: list[str]) -> set[str]:
    """The users the fit chooses on rather than regresses on: a quarter of them (at least one, never all),
    the first by a fixed hash, so the split is the same on every run and never empty."""
    users = sorted(set(user_ids), key=lambda u: hashlib.sha256(u.encode()).hexdigest())
    if len(users) < 2:
        raise P2PError(f"label_gate: the sampled training examples come from {len(users)} user(s); the fit needs "
                       "at least 2 (one to regress on, one to choose on)")
    return set(users[: min(len(users) - 1, max(1, round(HOLDOUT * len(users))))])


@contextlib.contextmanager
def _gate_shut(hypernet: Hypernetwork) -> Iterator[None]:
    """The hypernet as training left it (gate columns zero), whatever gate it holds now."""
    saved = hypernet.gate_read.clone(), hypernet.gate_write.clone()
    hypernet.set_gate(torch.zeros_like(saved[0]), torch.zeros_like(saved[1]))
    try:
        yield
    finally:
        hypernet.set_gate(*saved)


@torch.no_grad()
def gather_states(adapted: AdaptedModel, hypernet: Hypernetwork, rows: list[dict], max_len: int, batch_size: int,
                  progress: Callable[[int], None]) -> GateStates:
    """One forward pass per example with its own user's adapter and the gate shut, keeping what the fit reads."""
    c = hypernet.config
    model = adapted.model
    path = c.module_paths[c.gate_module].format(layer=c.layers[-1])
    label_index = {label: i for i, label in enumerate(c.gate_labels)}
    seen: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(path).register_forward_hook(lambda _m, args, _o: seen.__setitem__("x", args[0])),
             final_norm(model).register_forward_hook(lambda _m, args, _o: seen.__setitem__("h", args[0]))]
    xs, hs, tokens, examples, firsts = [], [], [], [], []
    fmt, start = PromptFormat(adapted.tokenizer), 0
    try:
        with _gate_shut(hypernet):
            for batch in batches_of(rows, batch_size, fmt, max_len):
                batch = batch.to(adapted.device)
                with adapted.applied(hypernet(batch.embeddings), row_index=batch.row_index):
                    model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
                targets = batch.labels[:, 1:]
                keep = targets != IGNORE  # [N, T-1]: positions that predict a target token
                xs.append(seen["x"][:, :-1][keep].float().cpu())
                hs.append(seen["h"][:, :-1][keep].float().cpu())
                tokens.append(targets[keep].cpu())
                row = torch.arange(len(batch)).unsqueeze(1).expand_as(keep)[keep.cpu()]
                examples.append(row + start)
                firsts.append((keep.cumsum(1) == 1)[keep].cpu())
                start += len(batch)
                progress(len(batch))
    finally:
        for h in hooks:
            h.remove()
    embeddings = torch.from_numpy(np.asarray([np.asarray(r["embedding"], np.float32) for r in rows]))
    held = held_out_users([r["user_id"] for r in rows])
    return GateStates(
        x=torch.cat(xs), h=torch.cat(hs), token=torch.cat(tokens), example=torch.cat(examples), first=torch.cat(firsts),
        gold=torch.tensor([label_index.get(r["target"].strip(), -1) for r in rows]),
        shares=hypernet.gate_shares(embeddings.to(hypernet.gate_read.device)).float().cpu(),
        held_out=torch.tensor([r["user_id"] in held for r in rows]),
    )


def ridge_read(x: torch.Tensor, y: torch.Tensor, strength: float) -> torch.Tensor:
    """[in, n] minimizing |x w - y|^2 + strength * mean(diag(x^T x)) |w|^2 (no intercept: a LoRA has none)."""
    x, y = x.double(), y.double()
    gram = x.T @ x
    gram += strength * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram, x.T @ y).float()


def _directions(adapted: AdaptedModel, labels: list[str], rms: float) -> torch.Tensor:
    """[n, hidden]: per label, the least-norm final-residual change that raises its first answer token's
    logit by one nat and leaves every other label's first token unchanged (labels that begin with the
    same token share its direction)."""
    model = adapted.model
    first = label_first_tokens(adapted.tokenizer, labels)
    distinct = sorted(set(first))
    rows = model.get_output_embeddings().weight[distinct].float().cpu() * final_norm(model).weight.float().cpu()
    inverse = torch.linalg.pinv(rows.double()).float() * rms  # [hidden, distinct tokens]
    return torch.stack([inverse[:, distinct.index(t)] for t in first])


@torch.no_grad()
def _score(adapted: AdaptedModel, s: GateStates, mask: torch.Tensor, delta: torch.Tensor | None) -> tuple[float, float]:
    """(mean over examples of each example's mean target-token CE, first-token accuracy) at the positions
    in `mask`, with `delta` added to the final residual there."""
    model = adapted.model
    h = s.h[mask] + (delta if delta is not None else 0)
    device = adapted.device
    norm, head = final_norm(model), model.get_output_embeddings()
    tokens = s.token[mask]
    ce, hits = [], []
    for i in range(0, len(h), 512):
        logits = head(norm(h[i : i + 512].to(device))).float()
        ce.append(F.cross_entropy(logits, tokens[i : i + 512].to(device), reduction="none").cpu())
        hits.append(logits.argmax(-1).cpu() == tokens[i : i + 512])
    ce_t, hit_t = torch.cat(ce), torch.cat(hits)
    example = s.example[mask]
    sums = torch.zeros(len(s.gold)).index_add(0, example, ce_t)
    counts = torch.zeros(len(s.gold)).index_add(0, example, torch.ones_like(ce_t))
    per_example = sums[counts > 0] / counts[counts > 0]
    first = s.first[mask]
    return float(per_example.mean()), float(hit_t[first].float().mean())


def offered_targets(s: GateStates, label_logits: torch.Tensor, k: int) -> torch.Tensor:
    """[P, n]: 1 for the model's own k most likely labels at the position that predicts a labelled
    answer's first token, 0 everywhere else (the rest of the answer, examples of tasks without labels)."""
    y = torch.zeros(len(s.token), label_logits.shape[1])
    first = torch.where(s.first)[0]
    labelled = s.gold[s.example[first]] >= 0
    rows = first[labelled]
    y[rows.unsqueeze(1), label_logits[labelled].topk(k, 1).indices] = 1.0
    return y


def label_groups(labels: list[str], tasks: list[str]) -> dict[str, list[int]]:
    """task -> indices of its labels among the gate's `labels`, for the tasks the fit's examples ask
    (a label two tasks share goes with the first by name; labels of no such task stay shut)."""
    groups: dict[str, list[int]] = {}
    taken: set[int] = set()
    for name in sorted(set(tasks)):
        index = [labels.index(label) for label in task_for(name).labels or () if label in labels]
        if index := [i for i in index if i not in taken]:
            groups[name] = index
            taken.update(index)
    return groups


def label_gains(gains: dict[str, float], groups: dict[str, list[int]], n: int) -> torch.Tensor:
    """[n]: each label's gain, its task's (0 for a label of no task)."""
    per_label = torch.zeros(n)
    for task, index in groups.items():
        per_label[index] = gains[task]
    return per_label


def fit_label_gate(adapted: AdaptedModel, hypernet: Hypernetwork, rows: list[dict], max_len: int,
                   batch_size: int = 8, progress: Callable[[int], None] = lambda n: None) -> GateFit:
    """The gate for `hypernet` from training `rows` (example_id, user_id, input, target, task, embedding);
    sets it on the hypernet and returns it with a report of the holdout with and without it."""
    c = hypernet.config
    s = gather_states(adapted, hypernet, rows, max_len, batch_size, progress)
    held = s.held_out[s.example]
    fit = ~held
    model = adapted.model
    with torch.no_grad():
        label_logits = model.get_output_embeddings()(final_norm(model)(s.h[s.first].to(adapted.device)))
    label_logits = label_logits[:, label_first_tokens(adapted.tokenizer, c.gate_labels)].float().cpu()
    rms = float(s.h[s.first & fit].pow(2).mean(-1).sqrt().mean())
    directions = _directions(adapted, c.gate_labels, rms)  # [n, hidden]
    groups = label_groups(c.gate_labels, [r["task"] for r in rows])
    n = len(c.gate_labels)
    choose = s.first & held  # choosing by the first answer token: one LM head pass over these positions

    def score(coeff: torch.Tensor, gains: dict[str, float], of: dict[str, list[int]]) -> tuple[float, float]:
        """(first-token accuracy, -CE) at `choose` with these tasks' gains: larger is better."""
        ce, acc = _score(adapted, s, choose, (coeff * label_gains(gains, of, n).unsqueeze(0)) @ directions)
        return acc, -ce

    base_ce, base_acc = _score(adapted, s, choose, None)
    best = ((base_acc, -base_ce), dict.fromkeys(groups, 0.0), RIDGES[0], 1)
    reads = {}
    for k in range(1, min(MAX_OFFERED, n) + 1):
        y = offered_targets(s, label_logits, k)
        for ridge in RIDGES:
            reads[k, ridge] = w = ridge_read(s.x[fit], y[fit], ridge)  # [in, n]
            coeff = (s.x[choose] @ w) * s.shares[s.example[choose]]  # [P, n]: gate x share per label
            gains = {}
            for task, index in groups.items():  # the first best gain wins a tie, so 0 before any other
                gains[task] = max((0.0, *GAINS), key=lambda g, t=task, i=index: score(coeff, {t: g}, {t: i}))
            best = max(best, (score(coeff, gains, groups), gains, ridge, k), key=lambda b: b[0])
    _, gains, ridge, k = best
    gain = label_gains(gains, groups, n)
    read = reads[k, ridge].T.contiguous()
    write = directions * (gain / adapted.scale).unsqueeze(1)  # the LoRA multiplies B A x by the scale
    hypernet.set_gate(read.to(hypernet.gate_read), write.to(hypernet.gate_write))
    without = _score(adapted, s, held, None)
    with_gate = _score(adapted, s, held, ((s.x[held] @ read.T) * s.shares[s.example[held]] * gain) @ directions)
    report = {"examples": len(rows), "positions": len(s.token), "holdout_examples": int(s.held_out.sum()),
              "offered": k, "ridge": ridge, "gains": gains,
              "same_first_token": same_first_token(c.gate_labels, label_first_tokens(adapted.tokenizer, c.gate_labels)),
              "holdout_loss": {"without": without[0], "with": with_gate[0]},
              "holdout_first_token_accuracy": {"without": without[1], "with": with_gate[1]}}
    return GateFit(read, write, ridge, gains, report)


# --- the gate of a run's result ---------------------------------------------------------------------


def fit_gate(config: TrainConfig, adapted: AdaptedModel, hypernet: Hypernetwork, train_rows: list[dict],
             log: Callable[[str], None] = print, progress: Callable[[int], None] = lambda n: None) -> dict:
    """Fit `hypernet`'s label gate on a fixed sample of training examples, as its run saw them: a
    control's rows carry the control's one embedding (its gate writes the training users' mean shares,
    the same for everyone) and, for `retrieval`, the profile text in the prompt. The report goes in the config."""
    rows = as_control(val_rows_sample(train_rows, config.label_gate_examples), config.control,
                      hypernet.shared_embedding().numpy())
    fit = fit_label_gate(adapted, hypernet, rows, config.max_seq_len, config.batch_size, progress)
    hypernet.config.extra["label_gate"] = r = fit.report
    gains = ", ".join(f"{task} {g:g}" for task, g in r["gains"].items())
    log(f"label gate: k {r['offered']}, gain {gains}, ridge {r['ridge']:g}; first answer token on held-out "
        f"training users {r['holdout_first_token_accuracy']['without']:.3f} -> "
        f"{r['holdout_first_token_accuracy']['with']:.3f} ({r['examples']} examples)")
    return r


def fit_gate_checkpoint(config: TrainConfig, model: nn.Module, tokenizer, folder: str, train_rows: list[dict],
                        log: Callable[[str], None] = print, progress: Callable[[int], None] = lambda n: None) -> dict:
    """The checkpoint in `folder` with its label gate fitted (a new hypernet_id). The new folder is
    written beside it and swapped in, so a fit that dies leaves the trained checkpoint loadable."""
    hypernet, _ = load_hypernet(folder)
    report = fit_gate(config, AdaptedModel(model, tokenizer, hypernet.config), hypernet, train_rows, log, progress)
    fresh, stale = folder.rstrip("/") + ".gated", folder.rstrip("/") + ".ungated"
    shutil.rmtree(fresh, ignore_errors=True)
    save_hypernet(hypernet, fresh)
    os.replace(folder, stale)
    os.replace(fresh, folder)
    shutil.rmtree(stale)
    return report
