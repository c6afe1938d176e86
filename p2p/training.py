"""The training step of the hypernetwork, independent of how it is distributed.

End-to-end SFT through the frozen LLM: each example's tokens pass through the base model with
*its own user's* generated adapter; cross-entropy on target tokens only (optional label
smoothing) plus an optional L2 penalty on the generated A and B. `train_local` is the plain
single-process loop; `pipelines/train.py` runs the same step under Ray Train + DeepSpeed.

With adapters on the top K layers only, the hidden states entering the first adapted layer do
not depend on the adapter: `PrefixCache` computes them once per example and the step runs
only the top K layers on them (same loss, DESIGN section 8 measured 3.5x faster steps).
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from p2p.config import TrainConfig
from p2p.hypernet import HypernetConfig, Hypernetwork, make_config, save_hypernet
from p2p.lora import adapters_applied, wrap_model
from p2p.models import chat_prompt

IGNORE = -100


# --- tokenization -------------------------------------------------------------------------------


def encode_example(tokenizer, prompt: str, target: str, max_len: int) -> tuple[list[int], list[int]]:
    """Token ids of chat(prompt) + target + eos, and labels that score only the target."""
    p = tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    t = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    t = t[: max(1, max_len // 2)] if len(t) > max_len // 2 and len(p) + len(t) > max_len else t
    p = p[max(0, len(p) + len(t) - max_len) :]  # cut the prompt from the left when too long
    return p + t, [IGNORE] * len(p) + t


@dataclass
class Batch:
    example_ids: list[str]
    input_ids: torch.Tensor  # [N, T], right-padded
    attention_mask: torch.Tensor  # [N, T]
    labels: torch.Tensor  # [N, T], IGNORE outside targets
    embeddings: torch.Tensor  # [U, D]: one per distinct user in the batch
    row_index: torch.Tensor  # [N] -> row of `embeddings`

    @property
    def target_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())


def collate(rows: list[dict], tokenizer, max_len: int) -> Batch:
    """rows: dicts with example_id, user_id, input, target, embedding."""
    encoded = [encode_example(tokenizer, r["input"], r["target"], max_len) for r in rows]
    width = max(len(ids) for ids, _ in encoded)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(encoded):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    users: dict[str, int] = {}
    for r in rows:
        users.setdefault(r["user_id"], len(users))
    emb = np.zeros((len(users), len(rows[0]["embedding"])), dtype=np.float32)
    for r in rows:
        emb[users[r["user_id"]]] = np.asarray(r["embedding"], dtype=np.float32)
    return Batch(
        example_ids=[r["example_id"] for r in rows], input_ids=input_ids, attention_mask=mask, labels=labels,
        embeddings=torch.from_numpy(emb), row_index=torch.tensor([users[r["user_id"]] for r in rows]),
    )


# --- the frozen prefix ----------------------------------------------------------------------------


def _shallow(module: nn.Module) -> nn.Module:
    view = copy.copy(module)
    view._modules = dict(module._modules)
    return view


def top_layers_view(model: nn.Module, k: int) -> nn.Module | None:
    """The same model running only its top k decoder layers on given `inputs_embeds`.

    Works for Llama-style models (Llama, Qwen, Mistral: model.model.layers, no embedding
    scaling); returns None for others, which then train without the prefix cache.
    """
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or model.config.model_type not in ("llama", "qwen2", "qwen3", "mistral"):
        return None
    view, view_inner = _shallow(model), _shallow(inner)
    view_inner.layers = nn.ModuleList(list(layers)[len(layers) - k :])
    config = copy.copy(model.config)
    config.num_hidden_layers = k
    view.config = view_inner.config = config
    view.model = view_inner
    return view


class PrefixCache:
    """Hidden states entering the first adapted layer, computed once per example."""

    def __init__(self, model: nn.Module, first_adapted_layer: int, top: nn.Module):
        self.model, self.first, self.top = model, first_adapted_layer, top
        self.states: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def hidden(self, batch: Batch) -> torch.Tensor:
        missing = [i for i, e in enumerate(batch.example_ids) if e not in self.states]
        if missing:
            idx = torch.tensor(missing)
            out = self.model(input_ids=batch.input_ids[idx], attention_mask=batch.attention_mask[idx],
                             output_hidden_states=True, use_cache=False)
            hs = out.hidden_states[self.first]
            for j, i in enumerate(missing):
                n = int(batch.attention_mask[i].sum())
                self.states[batch.example_ids[i]] = hs[j, :n].clone()
        width = batch.input_ids.shape[1]
        first = self.states[batch.example_ids[0]]
        out = torch.zeros((len(batch.example_ids), width, first.shape[-1]), dtype=first.dtype)
        for i, e in enumerate(batch.example_ids):
            s = self.states[e]
            out[i, : s.shape[0]] = s
        return out


# --- loss -----------------------------------------------------------------------------------------


def target_loss(lm_head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0):
    """Next-token cross-entropy on target tokens only.

    The LM head runs only at positions that predict a target token: with a 49k vocabulary,
    projecting every prompt position would cost more than the adapted layers themselves.
    Tokens are averaged within each example, then examples are averaged: a 12-token headline
    and a one-token tag weigh the same, so short-answer tasks are not drowned out.
    """
    keep = labels[:, 1:] != IGNORE
    logits = lm_head(hidden[:, :-1][keep]).float()
    per_token = F.cross_entropy(logits, labels[:, 1:][keep], label_smoothing=label_smoothing, reduction="none")
    row = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(keep)[keep]
    counts = keep.sum(1).clamp(min=1).to(per_token.dtype)
    per_example = torch.zeros(labels.shape[0], dtype=per_token.dtype, device=per_token.device).index_add(0, row, per_token)
    has_target = keep.any(1)
    return (per_example[has_target] / counts[has_target]).mean()


class AdapterLM:
    """The frozen base model with LoRA wrappers, plus what a training step needs around it."""

    def __init__(self, model: nn.Module, hconfig: HypernetConfig, cache_prefix: bool = True):
        self.model, self.hconfig = model, hconfig
        wrap_model(model, hconfig.target_modules, hconfig.layers)
        self.cache = None
        first = min(hconfig.layers)
        if cache_prefix and first > 0:
            top = top_layers_view(model, hconfig.num_layers - first)
            if top is not None:
                self.cache = PrefixCache(model, first, top)

    def loss(self, generate: Callable[[torch.Tensor], dict], batch: Batch, config: TrainConfig) -> tuple:
        """(loss, cross-entropy) for a batch; `generate` is the (possibly wrapped) hypernetwork."""
        generated = generate(batch.embeddings)
        c = self.hconfig
        with adapters_applied(self.model, generated, c.layers, c.scale, row_index=batch.row_index):
            if self.cache is not None:
                hidden = self.cache.top.base_model(
                    inputs_embeds=self.cache.hidden(batch), attention_mask=batch.attention_mask, use_cache=False
                ).last_hidden_state
            else:
                hidden = self.model.base_model(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
                ).last_hidden_state
        ce = target_loss(self.model.get_output_embeddings(), hidden, batch.labels, config.label_smoothing)
        loss = ce
        if config.l2_adapter > 0:
            l2 = sum(a.pow(2).mean() + b.pow(2).mean() for a, b in generated.values()) / len(generated)
            loss = loss + config.l2_adapter * l2
        return loss, ce


def hypernet_config_for(config: TrainConfig, model: nn.Module, embed_dim: int) -> HypernetConfig:
    return make_config(
        model, config.base, config.encoder, embed_dim, preset=config.preset, rank=config.rank, alpha=config.alpha,
        target_modules=tuple(config.targets), top_k_layers=config.top_k_layers, seed=config.seed,
        use_rslora=config.use_rslora,
        profile={"top_k": config.profile_top_k, "max_chars": config.profile_max_chars},
    )


def lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to `min_lr_ratio` of the peak."""

    def f(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = min(1.0, (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


@torch.no_grad()
def val_loss(lm: AdapterLM, generate, batches: Iterable[Batch], config: TrainConfig) -> float:
    total, tokens = 0.0, 0
    for b in batches:
        _, ce = lm.loss(generate, b, config)
        total += float(ce) * b.target_tokens
        tokens += b.target_tokens
    return total / max(tokens, 1)


def batches_of(rows: list[dict], size: int, tokenizer, max_len: int) -> list[Batch]:
    return [collate(rows[i : i + size], tokenizer, max_len) for i in range(0, len(rows), size)]


def epochs(rows: list[dict], size: int, seed: int) -> Iterator[list[dict]]:
    """Shuffled batches of rows, epoch after epoch, reproducible by seed."""
    rng = np.random.default_rng(seed)
    epoch = 0
    while True:
        order = rng.permutation(len(rows))
        for i in range(0, len(order) - size + 1, size):
            yield [rows[j] for j in order[i : i + size]]
        epoch += 1


class Checkpoints:
    """RUN_DIR/latest and RUN_DIR/best (by val loss): hypernet checkpoint folders."""

    def __init__(self, run_dir: str):
        self.run_dir, self.best = run_dir, float("inf")

    def save(self, hypernet: Hypernetwork, step: int, val: float | None) -> str:
        hypernet.config.extra.update({"step": step, "val_loss": val})
        hid = save_hypernet(hypernet, os.path.join(self.run_dir, "latest"))
        if val is not None and val < self.best:
            self.best = val
            save_hypernet(hypernet, os.path.join(self.run_dir, "best"))
        return hid


def train_local(config: TrainConfig, model: nn.Module, tokenizer, train_rows: list[dict], val_rows: list[dict],
                embed_dim: int, run_dir: str | None = None, log: Callable[[str], None] = print) -> dict:
    """The plain single-process loop: what the distributed job does, minus distribution."""
    torch.manual_seed(config.seed)
    hconfig = hypernet_config_for(config, model, embed_dim)
    hypernet = Hypernetwork(hconfig)
    lm = AdapterLM(model, hconfig, config.cache_prefix)
    opt = torch.optim.AdamW(hypernet.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(config))
    val_batches = batches_of(val_rows[: config.val_examples], config.batch_size, tokenizer, config.max_seq_len)
    ckpt = Checkpoints(run_dir) if run_dir else None
    history, t0 = [], time.perf_counter()
    for step, rows in zip(range(1, config.max_steps + 1), epochs(train_rows, config.batch_size, config.seed),
                          strict=False):
        hypernet.train()
        loss, ce = lm.loss(hypernet, collate(rows, tokenizer, config.max_seq_len), config)
        opt.zero_grad()
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(hypernet.parameters(), config.grad_clip))
        opt.step()
        sched.step()
        record = {"step": step, "loss": loss.item(), "ce": ce.item(), "grad_norm": grad_norm}
        if step % config.eval_every == 0 or step == config.max_steps:
            hypernet.eval()
            record["val_loss"] = val_loss(lm, hypernet, val_batches, config) if val_batches else None
            if ckpt:
                ckpt.save(hypernet, step, record["val_loss"])
        if step % config.log_every == 0 or "val_loss" in record:
            rate = step * config.batch_size / (time.perf_counter() - t0)
            log(f"step {step}/{config.max_steps} loss {record['loss']:.4f}"
                + (f" val {record['val_loss']:.4f}" if record.get("val_loss") is not None else "")
                + f" {rate:.1f} ex/s")
        history.append(record)
    return {"hypernet": hypernet, "history": history}
