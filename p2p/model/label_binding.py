"""Label binding: a user's label statistics written into the residual stream along the base model's
own direction for each label.

Why: when the answer is an interaction (which of the labels this question offers does this user
prefer?), a hypernet that reads label shares must learn two maps from the questions alone: which
input numbers are a label's share, and which output direction raises that label. From one or ten
questions per user it learns neither (docs/quality.md, LaMP-2-shaped: P2P equals `shuffled`). The
base model already knows the second map: the row of its output embedding for a label's first token
is the direction that raises that label's logit; the first map is fixed by the feature hashing.
The binding joins them in a buffer, `matrix[bin] = output embedding of the label hashed to bin`,
so the hypernet learns only how strongly to write `u = centred shares @ matrix` (a gain per layer
and rank of each bound module), not a [features x hidden] map per label.

The adapter stays a plain LoRA: rank column 0 of each bound module carries it, B[:, 0] += gain[l] * u
and A[0] += read[l]. Both start where the written vector does something from step 0, because a gain
that starts at 0 did not learn here: its gradient changed sign from batch to batch (the user's choice
agrees with their shares ~3 times in 4), and 300 steps of Adam left it a random walk around 0. So
- `read[l]` starts at mu / |mu|^2, with mu the module's mean input at the position that predicts the
  first answer token over a few training prompts: read . x = 1 there (std ~0.02 on LaMP-2 prompts);
- `gain[l]` starts where the logit gaps the write makes between labels spread by `label_binding_nats`
  (3) over users, measured through the final norm and output embedding: the soft form of "the label
  this user gives more often", which training then strengthens, weakens or turns off.
Bound modules are the targets whose output is the residual stream (o_proj, down_proj).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from p2p.errors import P2PError
from p2p.profile.features import label_bin
from p2p.task.registry import task_for


def labels_of_tasks(task_names: Iterable[str]) -> list[str]:
    """The fixed label lists of the registry's tasks among `task_names` (others have none to bind)."""
    labels: list[str] = []
    for name in task_names:
        for label in task_for(name).labels or ():
            if label not in labels:
                labels.append(label)
    return labels


@torch.no_grad()
def binding_matrix(output_embeddings: torch.Tensor, tokenizer, labels: list[str], features: int) -> torch.Tensor:
    """[features, hidden]: for each bin a label's statistic lands in, that label's first answer token's
    output-embedding row (the mean where labels share a bin); zero rows elsewhere."""
    hidden = output_embeddings.shape[1]
    rows = torch.zeros(features, hidden)
    counts = torch.zeros(features)
    for label in labels:
        b = label_bin(label, features)
        ids = tokenizer(label, add_special_tokens=False)["input_ids"]  # as LabelChooser and training see an answer
        if b is None or not ids:
            continue
        rows[b] += output_embeddings[ids[0]].float().cpu()
        counts[b] += 1
    if not counts.any():
        raise P2PError(f"label_binding: none of the training tasks' labels ({len(labels)}) gives a label statistic; "
                       "it needs a classification or rating task with a fixed label list")
    return rows / counts.clamp(min=1)[:, None]


# Module names (Llama, Mistral, Qwen, GPT-2, OPT, Falcon) whose output is added to the residual stream. A
# query projection can have the same width (SmolLM2's q_proj) but writes nowhere the logits read.
RESIDUAL_OUTPUTS = frozenset({"o_proj", "down_proj", "out_proj", "c_proj", "fc2", "dense_4h_to_h"})


def bound_modules(shapes: dict[str, list[int]], hidden: int) -> list[str]:
    """The target modules whose output is the residual stream."""
    bound = [m for m, (_, out) in shapes.items() if m in RESIDUAL_OUTPUTS and out == hidden]
    if not bound:
        raise P2PError(f"label_binding needs a target whose output is the residual stream (o_proj or down_proj); "
                       f"the targets are {sorted(shapes)}")
    return bound


@dataclass
class AnswerPosition:
    """What the base model computes at the position that predicts the first answer token."""

    inputs: dict[tuple[int, str], torch.Tensor]  # (layer, module) -> mean input [in]
    rms: float  # RMS of the final residual stream (the final norm's input)
    norm_weight: torch.Tensor  # the final norm's weight [hidden]


@torch.no_grad()
def answer_position(model: nn.Module, prompt_ids: list[list[int]], paths: dict[tuple[int, str], str]) -> AnswerPosition:
    """Mean inputs of the modules at `paths` at each prompt's last position, by forward hooks."""
    final_norm = model.get_decoder().norm
    sums: dict[tuple[int, str], torch.Tensor] = {}
    rms: list[float] = []

    def keep(key):
        def hook(_module, args, _out):
            x = args[0][0, -1].float().cpu()
            if key is None:
                rms.append(float(x.pow(2).mean().sqrt()))
            else:
                sums[key] = sums.get(key, 0) + x
        return hook

    hooks = [model.get_submodule(path).register_forward_hook(keep(key)) for key, path in paths.items()]
    hooks.append(final_norm.register_forward_hook(keep(None)))
    try:
        device = next(model.parameters()).device
        for ids in prompt_ids:
            model(input_ids=torch.tensor([ids], device=device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    n = len(prompt_ids)
    return AnswerPosition({k: v / n for k, v in sums.items()}, sum(rms) / n, final_norm.weight.detach().float().cpu())
