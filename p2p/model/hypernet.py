"""The hypernetwork: a user's profile embedding -> a full set of LoRA adapters in one pass.

For every target (layer l, module m) the trunk reads
    concat(LN(Linear(z_user)), LN(E_depth[l]), LN(E_module[m]))
and one head per module type emits that target's A [r, in] and B [out, r]. All users times all
targets go through the trunk as one batch.

Two choices decide whether the user pathway learns at all:
- `z_user` is the embedding standardized with the training users' per-dimension mean and std
  (buffers saved with the checkpoint). Profile embeddings of one encoder are close to each other
  (cosine ~0.9); without centering, LN(Linear(e)) is dominated by what all users share.
- Each head is `bias + output_scale * (W h)`. The bias starts at PEFT's LoRA init (A
  Kaiming-uniform, B zero) and W at small random values (`head_init_std`), so adapters start at
  dW ~ 0 while the gradient into the trunk and the user projection is non-zero from step 0 (with
  W = 0 it is exactly zero and the bias alone learns one adapter for everyone). Adam moves each
  weight by ~lr per step, so `W h` would move by ~lr x fan-in; the fixed `output_scale`
  (1/sqrt(head_in) by default) keeps the generated values' steps near the bias's, so one learning
  rate suits the whole network.
Checkpoints written before these options load with their old behaviour (no standardization,
zero-initialised heads, scale 1): the defaults of the dataclass are that behaviour, and
`make_config` turns the new one on.

The first trunk layer acts on a concatenation, so it is computed as the sum of three smaller
products (user part per user, target part per target) and broadcast: same function, far fewer
FLOPs than materialising [users x targets, 3 x latent].
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load, save
from torch import nn

from p2p.errors import P2PError
from p2p.model.files import CHECKPOINT_CONFIG as CONFIG_FILE
from p2p.model.files import CHECKPOINT_FILES, read_local_files
from p2p.model.files import CHECKPOINT_WEIGHTS as WEIGHTS_FILE
from p2p.model.label_binding import AnswerPosition, bound_modules
from p2p.model.label_gate import check_gate, final_norm
from p2p.model.lora import AdapterBatch, UserAdapter, find_targets, split_users

PRESETS = {
    # CPU default: a few million parameters, ~ms per user.
    "small": dict(latent=128, trunk_width=512, trunk_depth=2, head_in=256),
    # The paper's sizes (arXiv:2510.16282): latent 1024, trunk 4096, head input 2048.
    "paper": dict(latent=1024, trunk_width=4096, trunk_depth=2, head_in=2048),
}


@dataclass
class HypernetConfig:
    """Everything needed to rebuild the hypernetwork and to apply what it generates."""

    base_model: str
    encoder: str
    embed_dim: int
    num_layers: int
    layers: list[int]  # layers that carry adapters (all, or the top K)
    target_modules: list[str]  # e.g. ["q_proj", "v_proj"]
    shapes: dict[str, list[int]]  # module name -> [in_features, out_features]
    module_paths: dict[str, str]  # module name -> path template, e.g. "model.layers.{layer}.self_attn.q_proj"
    rank: int = 8
    alpha: float = 16.0
    use_rslora: bool = False  # training scale alpha/sqrt(r) if true, else alpha/r
    fan_in_fan_out: bool = False  # GPT-2 style Conv1D targets
    latent: int = 128
    trunk_width: int = 512
    trunk_depth: int = 2
    head_in: int = 256
    dropout: float = 0.0
    standardize: bool = False  # standardize embeddings with the training users' mean and std (buffers)
    head_init_std: float = 0.0  # std of the heads' initial weights (0: zero heads, no gradient to the trunk)
    head_output_scale: float = 1.0  # heads emit bias + scale * (W h)
    # Label binding (p2p/model/label_binding.py): the last `label_features` embedding dims are label
    # statistics, written into the B of the targets whose output is the residual stream (width `hidden`).
    label_binding: bool = False
    label_features: int = 0
    hidden: int = 0
    # True: rank column 0 of each bound module carries the binding alone (the heads' outputs there are
    # dropped), so the factor its write is multiplied by, A[0] . x = read . x, cannot change sign per user.
    label_binding_exclusive: bool = False
    # Label gate (p2p/model/label_gate.py): rank columns 0..n-1 of `gate_module` in the top adapted layer
    # carry label i's share of the user's answers (the embedding dim `gate_dims[i]`), read only where the
    # question offers label i. Fitted after training (p2p/train/gate_fit.py); zeros until then.
    gate_labels: list[str] = field(default_factory=list)
    gate_dims: list[int] = field(default_factory=list)
    gate_module: str = ""
    seed: int = 0
    profile: dict = field(default_factory=dict)  # ProfileConfig fields: training and serving build profiles alike
    extra: dict = field(default_factory=dict)  # free-form notes (training data, preset name)

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.rank) if self.use_rslora else self.alpha / self.rank

    def to_json(self) -> str:
        data = asdict(self)
        if not self.label_binding:  # a hypernet without the binding keeps the content hash it had before it existed
            for name in ("label_binding", "label_features", "hidden"):
                data.pop(name)
        if not self.label_binding_exclusive:  # nor does a binding that shares its column with the heads
            data.pop("label_binding_exclusive")
        if not self.gate_labels:  # nor does one without the label gate
            for name in ("gate_labels", "gate_dims", "gate_module"):
                data.pop(name)
        return json.dumps(data, sort_keys=True, indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> HypernetConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"hypernet_id"})
        if unknown:
            raise P2PError(f"hypernet config: unknown field(s) {unknown}")
        return cls(**{k: v for k, v in data.items() if k in known})


def target_shapes(model: nn.Module, target_modules: list[str]) -> tuple[int, dict[str, list[int]], bool, dict]:
    """(layer count, {module: [in, out]}, fan_in_fan_out, {module: path template}) of an HF causal LM."""
    found = find_targets(model, target_modules)
    if not found:
        raise P2PError(f"no modules named {target_modules} in {type(model).__name__}")
    shapes: dict[str, list[int]] = {}
    templates: dict[str, str] = {}
    fan_in_fan_out = False
    for t in found:
        templates.setdefault(t.module, t.path.replace(f".{t.layer}.", ".{layer}.", 1))
        shape = [t.in_features, t.out_features]
        if shapes.setdefault(t.module, shape) != shape:
            raise P2PError(f"module {t.module} has different shapes across layers; not supported")
        fan_in_fan_out |= t.conv1d
    missing = [m for m in target_modules if m not in shapes]
    if missing:
        raise P2PError(f"target module(s) {missing} not found; the model has e.g. {sorted(shapes)}")
    num_layers = max(t.layer for t in found) + 1
    return num_layers, shapes, fan_in_fan_out, templates


def adapter_paths(config: HypernetConfig) -> dict[tuple[int, str], str]:
    """(layer, module) -> the module's full path in the base model, for PEFT key names."""
    return {
        (layer, m): config.module_paths[m].format(layer=layer) for layer in config.layers for m in config.target_modules
    }


def make_config(model: nn.Module, base_model: str, encoder: str, embed_dim: int, preset: str = "small",
                rank: int = 8, alpha: float | None = None, target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
                top_k_layers: int | None = None, seed: int = 0, **overrides) -> HypernetConfig:
    """A new hypernet's config: the preset's sizes, standardized inputs, small random heads."""
    if preset not in PRESETS:
        raise P2PError(f"unknown preset {preset!r}; valid: {', '.join(PRESETS)}")
    num_layers, shapes, fan, templates = target_shapes(model, list(target_modules))
    layers = list(range(num_layers))
    if top_k_layers:
        if not 0 < top_k_layers <= num_layers:
            raise P2PError(f"top_k_layers must be in 1..{num_layers}, got {top_k_layers}")
        layers = layers[num_layers - top_k_layers :]
    sizes = {**PRESETS[preset], **overrides}
    if sizes.get("label_binding"):
        sizes["hidden"] = model.get_output_embeddings().weight.shape[1]
        bound_modules(shapes, sizes["hidden"])  # fails now, naming the targets, if none is bound
        if not 0 < sizes.get("label_features", 0) <= embed_dim:
            raise P2PError("label_binding needs label statistics in the profile (profile_features > 0)")
    if sizes.get("gate_labels"):
        check_gate(sizes["gate_labels"], sizes["gate_dims"], sizes["gate_module"], shapes,
                   model.get_output_embeddings().weight.shape[1], rank, embed_dim)
        final_norm(model)  # a decoder the gate's fit can compute in closed form
    sizes.setdefault("standardize", True)
    sizes.setdefault("head_init_std", 1e-5)
    sizes.setdefault("head_output_scale", sizes["head_in"] ** -0.5)
    return HypernetConfig(
        base_model=base_model, encoder=encoder, embed_dim=embed_dim, num_layers=num_layers, layers=layers,
        target_modules=list(target_modules), shapes=shapes, module_paths=templates, rank=rank,
        alpha=float(alpha if alpha is not None else 2 * rank), fan_in_fan_out=fan, seed=seed,
        extra={"preset": preset}, **sizes,
    )


class ResidualBlock(nn.Module):
    def __init__(self, width: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(self.fc2(F.gelu(self.fc1(self.norm(x)))))


class Hypernetwork(nn.Module):
    def __init__(self, config: HypernetConfig):
        super().__init__()
        self.config = c = config
        self.user_proj = nn.Linear(c.embed_dim, c.latent)
        self.user_norm = nn.LayerNorm(c.latent)
        self.depth_embed = nn.Embedding(c.num_layers, c.latent)
        self.depth_norm = nn.LayerNorm(c.latent)
        self.module_embed = nn.Embedding(len(c.target_modules), c.latent)
        self.module_norm = nn.LayerNorm(c.latent)
        # The first trunk layer on concat(user, depth, module), split by input block.
        self.in_user = nn.Linear(c.latent, c.trunk_width)
        self.in_target = nn.Linear(2 * c.latent, c.trunk_width, bias=False)
        self.blocks = nn.ModuleList(ResidualBlock(c.trunk_width, c.dropout) for _ in range(c.trunk_depth))
        self.out_norm = nn.LayerNorm(c.trunk_width)
        self.out = nn.Linear(c.trunk_width, c.head_in)
        self.heads = nn.ModuleDict(
            {m: nn.Linear(c.head_in, c.rank * (i + o)) for m, (i, o) in c.shapes.items()}
        )
        self.register_buffer("layer_ids", torch.tensor(c.layers, dtype=torch.long), persistent=False)
        if c.standardize:
            self.register_buffer("input_mean", torch.zeros(c.embed_dim))
            self.register_buffer("input_std", torch.ones(c.embed_dim))
        self.bound = bound_modules(c.shapes, c.hidden) if c.label_binding else []
        if self.bound:
            self.register_buffer("binding", torch.zeros(c.label_features, c.hidden))
            self.register_buffer("binding_norm", torch.ones(()))
            # Rank column 0 of each bound module, per layer: B[:, 0] += gain * u, A[0] += read (set by
            # `set_label_binding`; zeros until then, which is the adapter without the binding).
            self.binding_gain = nn.ParameterDict({m: nn.Parameter(torch.zeros(len(c.layers))) for m in self.bound})
            self.binding_read = nn.ParameterDict(
                {m: nn.Parameter(torch.zeros(len(c.layers), c.shapes[m][0])) for m in self.bound})
        if c.gate_labels:
            n, (fan_in, fan_out) = len(c.gate_labels), c.shapes[c.gate_module]
            self.register_buffer("gate_read", torch.zeros(n, fan_in))  # A[:n] of the gated module
            self.register_buffer("gate_write", torch.zeros(n, fan_out))  # B[:, i] = share_i * gate_write[i]
            self.register_buffer("gate_index", torch.tensor(c.gate_dims, dtype=torch.long), persistent=False)
        self.reset_heads()

    @torch.no_grad()
    def reset_heads(self) -> None:
        """Bias = PEFT's LoRA init (A Kaiming-uniform, B zero); weights ~ N(0, head_init_std^2)."""
        gen = torch.Generator().manual_seed(self.config.seed)
        for name, head in self.heads.items():
            fan_in, fan_out = self.config.shapes[name]
            a = torch.empty(self.config.rank, fan_in)
            # nn.init.kaiming_uniform_(a, a=sqrt(5)) as peft does, with our own generator.
            bound = math.sqrt(6.0 / ((1 + 5.0) * fan_in))
            a.uniform_(-bound, bound, generator=gen)
            head.weight.zero_()
            if self.config.head_init_std > 0:
                head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * self.config.head_init_std)
            head.bias.copy_(torch.cat([a.flatten(), torch.zeros(fan_out * self.config.rank)]))

    @torch.no_grad()
    def set_input_stats(self, mean, std) -> None:
        """Standardize inputs with the training users' per-dimension embedding mean and std."""
        if not self.config.standardize:
            return
        self.input_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.input_std.copy_(torch.as_tensor(std, dtype=torch.float32).clamp(min=1e-4))

    @torch.no_grad()
    def set_label_binding(self, matrix: torch.Tensor, answer: AnswerPosition, nats: float = 1.0) -> None:
        """The binding matrix [label_features, hidden] (`label_binding.binding_matrix`) and its starting
        point from the base model at the answer position (`label_binding.answer_position`), the gain where
        the logit gaps it writes between labels spread by `nats` over users; call after
        `set_input_stats`. The written vector u is scaled to unit RMS per dimension over users (from the
        training users' per-feature std: correlations ignored)."""
        c = self.config
        self.binding.copy_(torch.as_tensor(matrix, dtype=torch.float32))
        std = self.input_std[-c.label_features :] if c.standardize else torch.ones(c.label_features)
        spread = (std.pow(2) * self.binding.pow(2).sum(1)).sum()
        self.binding_norm.fill_(float((c.hidden / spread.clamp(min=1e-12)).sqrt()))
        for m in self.bound:
            for j, layer in enumerate(c.layers):
                mu = answer.inputs[(layer, m)]
                self.binding_read[m][j] = mu / mu.pow(2).sum().clamp(min=1e-12)  # read . mu = 1
        # The logit change of each label for users drawn with the training users' per-feature spread,
        # per unit of gain summed over the bound (layer, module)s: the write reaches the final norm along
        # the residual stream, which divides it by the stream's RMS and multiplies it by the norm weight.
        shares = torch.randn(256, c.label_features, generator=torch.Generator().manual_seed(c.seed)) * std
        u = (shares @ self.binding) * self.binding_norm  # [users, hidden]
        labels = self.binding[self.binding.abs().sum(1) > 0]  # [labels, hidden]
        logits = (labels * answer.norm_weight) @ u.T / answer.rms  # [labels, users]
        per_unit = c.scale * len(self.bound) * len(c.layers) * float((logits - logits.mean(0)).std())
        for m in self.bound:
            self.binding_gain[m].fill_(nats / max(per_unit, 1e-12))  # ~`nats` between labels, over users

    def bound_vector(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[U, hidden]: each user's centred label shares along their labels' output directions."""
        shares = embeddings[:, -self.config.label_features :]
        if self.config.standardize:
            shares = shares - self.input_mean[-self.config.label_features :]
        return (shares.to(self.binding.dtype) @ self.binding) * self.binding_norm  # bf16 under DeepSpeed

    def gate_shares(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[U, n]: each gate label's share of the user's answers, as the profile holds it (0..1).

        Not centred: a centred share is negative for a label the user rarely gives, and a gate that
        lowers an offered label can push both offered labels below one the question does not offer.
        """
        return embeddings[:, self.gate_index]

    def set_gate(self, read: torch.Tensor, write: torch.Tensor) -> None:
        """The fitted gate (p2p/train/gate_fit.py): A rows [n, in] and B columns per unit share [n, out]."""
        with torch.no_grad():
            self.gate_read.copy_(read)
            self.gate_write.copy_(write)

    def _gated(self, a: torch.Tensor, b: torch.Tensor, shares: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The gate module's (A, B) with rank columns 0..n-1 of its top layer replaced by the gate."""
        n_users, n = a.shape[0], len(self.config.gate_labels)
        read = self.gate_read.to(a.dtype)[None].expand(n_users, -1, -1)  # [U, n, in]
        write = shares.to(b.dtype)[:, None, :] * self.gate_write.to(b.dtype).T[None]  # [U, out, n]
        top_a = torch.cat([read, a[:, -1, n:]], dim=1)
        top_b = torch.cat([write, b[:, -1, :, n:]], dim=-1)
        return torch.cat([a[:, :-1], top_a[:, None]], dim=1), torch.cat([b[:, :-1], top_b[:, None]], dim=1)

    def shared_embedding(self) -> torch.Tensor:
        """The embedding of 'no user': the training mean (all zeros once standardized)."""
        if self.config.standardize:
            return self.input_mean.detach().clone()
        return torch.zeros(self.config.embed_dim)

    @torch.no_grad()
    def user_adapters(self, embeddings: np.ndarray | torch.Tensor) -> list[UserAdapter]:
        """One adapter (module path -> (A, B)) per embedding row, from one batched pass."""
        emb = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
        return split_users(self(emb), self.config.layers, adapter_paths(self.config))

    def forward(self, embeddings: torch.Tensor) -> AdapterBatch:
        """[U, embed_dim] -> {module: (A [U, L, r, in], B [U, L, out, r])} for the configured layers."""
        c = self.config
        if embeddings.ndim != 2 or embeddings.shape[1] != c.embed_dim:
            raise ValueError(f"embeddings must be [users, {c.embed_dim}], got {tuple(embeddings.shape)}")
        n_users, n_layers, n_mod = embeddings.shape[0], len(c.layers), len(c.target_modules)
        weight = self.user_proj.weight
        embeddings = embeddings.to(device=weight.device, dtype=torch.float32)
        bound = self.bound_vector(embeddings) if self.bound else None
        shares = self.gate_shares(embeddings) if c.gate_labels else None  # before standardizing
        if c.standardize:
            embeddings = (embeddings - self.input_mean) / self.input_std
        # Mixed precision (DeepSpeed bf16/fp16 casts the module): inputs follow the weights' dtype.
        user = self.user_norm(self.user_proj(embeddings.to(weight.dtype)))  # [U, latent]
        depth = self.depth_norm(self.depth_embed(self.layer_ids))  # [L, latent]
        module = self.module_norm(self.module_embed.weight)  # [M, latent]
        target = torch.cat(
            [depth[None, :, :].expand(n_mod, -1, -1), module[:, None, :].expand(-1, n_layers, -1)], dim=-1
        )  # [M, L, 2 latent]
        h = self.in_user(user)[:, None, None, :] + self.in_target(target)[None]  # [U, M, L, width]
        h = h.reshape(n_users * n_mod * n_layers, c.trunk_width)
        for block in self.blocks:
            h = block(h)
        h = self.out(self.out_norm(h)).reshape(n_users, n_mod, n_layers, c.head_in)
        out = {}
        for j, name in enumerate(c.target_modules):
            fan_in, fan_out = c.shapes[name]
            head = self.heads[name]
            flat = head.bias + F.linear(h[:, j], head.weight) * c.head_output_scale  # [U, L, r (in + out)]
            a = flat[..., : c.rank * fan_in].reshape(n_users, n_layers, c.rank, fan_in)
            b = flat[..., c.rank * fan_in :].reshape(n_users, n_layers, fan_out, c.rank)
            if bound is not None and name in self.binding_gain:
                read = self.binding_read[name].to(a.dtype)  # [L, in]
                write = self.binding_gain[name].to(b.dtype)[None, :, None] * bound.to(b.dtype)[:, None, :]  # [U, L, out]
                if c.label_binding_exclusive:  # column 0 is the binding's alone
                    a = torch.cat([read[None, :, None, :].expand(n_users, -1, -1, -1), a[:, :, 1:]], dim=2)
                    b = torch.cat([write[..., None], b[..., 1:]], dim=-1)
                else:
                    a = torch.cat([a[:, :, :1] + read[None, :, None, :], a[:, :, 1:]], dim=2)
                    b = torch.cat([b[..., :1] + write[..., None], b[..., 1:]], dim=-1)
            if shares is not None and name == c.gate_module:
                a, b = self._gated(a, b, shares)
            out[name] = (a, b)
        return out


# --- checkpoint: DIR/config.json + DIR/model.safetensors, identified by a content hash -----------



def _content_hash(config: HypernetConfig, weights: bytes) -> str:
    h = hashlib.sha256(config.to_json().encode())
    h.update(weights)
    return h.hexdigest()[:16]


def save_hypernet(model: Hypernetwork, folder: str) -> str:
    """Write the checkpoint and return its `hypernet_id` (sha256 of config + weights)."""
    os.makedirs(folder, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = save(state, metadata={"format": "pt"})
    hypernet_id = _content_hash(model.config, weights)
    with open(os.path.join(folder, WEIGHTS_FILE), "wb") as f:
        f.write(weights)
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        f.write(json.dumps({**asdict(model.config), "hypernet_id": hypernet_id}, sort_keys=True, indent=2))
    return hypernet_id


def checkpoint_files(folder: str) -> dict[str, bytes]:
    """A checkpoint folder's files, as the store keeps them."""
    return read_local_files(folder, CHECKPOINT_FILES, "a hypernet checkpoint")


def load_hypernet_files(files: dict[str, bytes], source: str, device: str = "cpu") -> tuple[Hypernetwork, str]:
    """A checkpoint from its files (JSON + safetensors only, no pickle), its content hash verified."""
    data = json.loads(files[CONFIG_FILE])
    config = HypernetConfig.from_dict(data)
    hypernet_id = _content_hash(config, files[WEIGHTS_FILE])
    if data.get("hypernet_id") not in (None, hypernet_id):
        raise P2PError(f"{source}: content hash {hypernet_id} != recorded {data['hypernet_id']}; files corrupted?")
    model = Hypernetwork(config)
    model.load_state_dict({k: v.to(device) for k, v in load(files[WEIGHTS_FILE]).items()})
    return model.eval(), hypernet_id


def load_hypernet(folder: str, device: str = "cpu") -> tuple[Hypernetwork, str]:
    """Read a checkpoint folder; verify its content hash."""
    return load_hypernet_files(checkpoint_files(folder), folder, device)
