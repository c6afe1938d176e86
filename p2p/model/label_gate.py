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
    B[:, i] = share_i * write_i   (write_i raises label i's first answer token by `gain` nats per unit)

Label i's logit rises by about gain * share_i * (read_i . x), and no other label's does. `read` and `write` are
fitted after training (p2p/train/gate_fit.py), the user's share is the profile's label statistic, and
the adapter stays an ordinary rank-r LoRA for peft, vLLM and the store.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from p2p.errors import P2PError
from p2p.model.label_binding import labels_of_tasks
from p2p.profile.features import label_bin, statistic_bin

# The MLP output projection of Llama-style decoders (Llama, Mistral, Qwen, SmolLM): the last write to the
# residual stream in a layer, so in the top layer the gate's write reaches the final RMSNorm unchanged,
# which the fit's closed form assumes (p2p/train/gate_fit.py).
GATE_MODULES = frozenset({"down_proj"})
# Statistics of a fixed vocabulary that may share a bin with a label (a score, a written answer's form).
OTHER_STATISTICS = ([("score", f"score:{k}") for k in range(1, 6)]
                    + [("text", f"case:{c}") for c in ("lowercase", "title case", "sentence case")]
                    + [("text", f"end:{e}") for e in ("!", "?", ".", "-")])


def gate_labels(tasks: Iterable[str], features: int, embed_dim: int) -> tuple[list[str], list[int]]:
    """(labels, embedding dims of their shares) for the fixed label lists of `tasks`: the label
    statistics are the last `features` dims of the embedding. A share the gate writes must be that
    label's alone, so a bin another label or statistic also lands in is an error."""
    labels = [label for label in labels_of_tasks(tasks) if label_bin(label, features) is not None]
    if not labels:
        raise P2PError("label_gate: none of the training tasks has a fixed label list with label statistics; "
                       "it needs a classification or rating task and profile_features > 0")
    owner = {statistic_bin(kind, token, features): token for kind, token in OTHER_STATISTICS}
    dims = []
    for label in labels:
        b = label_bin(label, features)
        if b in owner and owner[b] != f"score:{label}":
            raise P2PError(f"label_gate: label {label!r} shares a label-statistics bin with {owner[b]!r}; "
                           f"set profile_features to another size (now {features})")
        owner[b] = label
        dims.append(embed_dim - features + b)
    return labels, dims


def check_gate(labels: list[str], dims: list[int], module: str, shapes: dict[str, list[int]], hidden: int,
               rank: int, embed_dim: int) -> None:
    """A gate the hypernet can carry: its module is the MLP's output projection and has a column per label."""
    if module not in shapes:
        raise P2PError(f"label_gate_module {module!r} is not a target; the targets are {sorted(shapes)}")
    if module not in GATE_MODULES or shapes[module][1] != hidden:
        raise P2PError(f"label_gate_module {module!r} is not the MLP's output projection ({', '.join(sorted(GATE_MODULES))}): "
                       "the gate's write must reach the final norm unchanged")
    check_gate_rank(len(labels), rank)
    if len(dims) != len(labels) or not all(0 <= d < embed_dim for d in dims):
        raise P2PError(f"label_gate: label dims {dims} do not fit an embedding of {embed_dim}")


def check_gate_rank(n_labels: int, rank: int) -> None:
    """The gate takes a rank column per label: checked by the hypernet and, before training starts, by the driver."""
    if n_labels > rank:
        raise P2PError(f"label_gate needs a rank column per label: {n_labels} labels, rank {rank}; "
                       f"set rank to at least {n_labels}")


def final_norm(model: nn.Module) -> nn.Module:
    """The decoder's final norm, where the gate's write arrives. The fit computes what the write does to
    the logits as `weight * h / rms(h)`: an RMSNorm with nothing between the top layer's MLP and it."""
    norm = getattr(model.get_decoder(), "norm", None)
    top = model.get_decoder().layers[-1]
    if norm is None or "RMSNorm" not in type(norm).__name__ or getattr(norm, "bias", None) is not None \
            or hasattr(top, "post_feedforward_layernorm") or "Gemma" in type(norm).__name__:
        raise P2PError(f"label_gate: {type(model).__name__} is not a Llama-style decoder (a final RMSNorm right "
                       "after the top layer's MLP); the gate's fit supports those only")
    return norm


def label_first_tokens(tokenizer, labels: list[str]) -> list[int]:
    """Each label's first answer token, as training tokenizes an answer."""
    return [tokenizer(label, add_special_tokens=False)["input_ids"][0] for label in labels]


def same_first_token(labels: list[str], tokens: list[int]) -> list[list[str]]:
    """Groups of labels that begin with the same token: the gate raises them only together (their
    first token), so among them the answer is the shared adapter's choice."""
    groups: dict[int, list[str]] = {}
    for label, token in zip(labels, tokens, strict=True):
        groups.setdefault(token, []).append(label)
    return [g for g in groups.values() if len(g) > 1]
