"""Label gate: the user's share of each label written into the answer's logits only where the question
offers that label.

Why: on LaMP-2-shaped data the answer is an interaction. The question (a movie) offers two of 15 tags;
the user picks the one they prefer. The label binding (p2p/model/label_binding.py) writes the user's
label shares along each label's output direction through one rank column, so it raises every label the
user likes, offered or not. Written weakly it loses to the shared adapter's content preference between
the two offered tags (about 2 nats, noise for this task); written strongly it answers the user's
favourite tag whatever the movie (docs/quality.md). A choice *among the labels the question offers* is
a product of two factors, one from the question and one from the user, and a LoRA computes exactly such
a product: `B A x` with A reading the question from the module input x and B carrying the user. So the
gate gives each label i a rank column of its own in one module of the top adapted layer:

    A[i] = read_i          (read_i . x ~ "the question offers label i", at the answer position only)
    B[:, i] = share_i * write_i   (write_i raises label i's first answer token by one nat per unit)

Label i's logit rises by about share_i * (read_i . x), and nothing else does. `read` and `write` are
fitted after training (p2p/train/gate_fit.py), the user's share is the profile's label statistic, and
the adapter stays an ordinary rank-r LoRA for peft, vLLM and the store.
"""

from __future__ import annotations

from collections.abc import Iterable

from p2p.errors import P2PError
from p2p.model.label_binding import labels_of_tasks
from p2p.profile.features import label_bin

# MLP output projections (Llama/Mistral/Qwen, OPT, Falcon): the last write to the residual stream in a
# layer, so in the top layer the gate's write reaches the final norm unchanged, as the fit assumes.
GATE_MODULES = frozenset({"down_proj", "fc2", "dense_4h_to_h"})


def gate_labels(tasks: Iterable[str], features: int, embed_dim: int) -> tuple[list[str], list[int]]:
    """(labels, embedding dims of their shares) for the fixed label lists of `tasks`: the label
    statistics are the last `features` dims of the embedding."""
    labels, dims, by_bin = [], [], {}
    for label in labels_of_tasks(tasks):
        b = label_bin(label, features)
        if b is None:
            continue
        if b in by_bin:
            raise P2PError(f"label_gate: labels {by_bin[b]!r} and {label!r} share one label-statistics bin; "
                           f"raise profile_features (now {features})")
        by_bin[b] = label
        labels.append(label)
        dims.append(embed_dim - features + b)
    if not labels:
        raise P2PError("label_gate: none of the training tasks has a fixed label list with label statistics; "
                       "it needs a classification or rating task and profile_features > 0")
    return labels, dims


def check_gate(labels: list[str], dims: list[int], module: str, shapes: dict[str, list[int]], hidden: int,
               rank: int, embed_dim: int) -> None:
    """A gate the hypernet can carry: its module writes the residual stream and has a column per label."""
    if module not in shapes:
        raise P2PError(f"label_gate_module {module!r} is not a target; the targets are {sorted(shapes)}")
    if module not in GATE_MODULES or shapes[module][1] != hidden:
        raise P2PError(f"label_gate_module {module!r} is not the MLP's output projection ({', '.join(sorted(GATE_MODULES))}): "
                       "the gate's write must reach the final norm unchanged")
    if len(labels) > rank:
        raise P2PError(f"label_gate needs a rank column per label: {len(labels)} labels, rank {rank}; "
                       f"set rank to at least {len(labels)}")
    if len(dims) != len(labels) or not all(0 <= d < embed_dim for d in dims):
        raise P2PError(f"label_gate: label dims {dims} do not fit an embedding of {embed_dim}")
