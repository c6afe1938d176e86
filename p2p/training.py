"""The training step of the hypernetwork, independent of how it is distributed.

End-to-end SFT through the frozen LLM: each example's tokens pass through the base model with
*its own user's* generated adapter; cross-entropy on target tokens only (optional label
smoothing) plus an optional L2 penalty on the generated A and B. `train_local` is the plain
single-process loop; `pipelines/train.py` runs the same step under Ray Train + DeepSpeed.

With adapters on the top K layers only, the hidden states entering the first adapted layer do
not depend on the adapter: `PrefixCache` computes them once per example, with the bottom layers
alone (no adapters, no LM head), and every later epoch runs only the top K layers (same loss).

Checkpoints are chosen on `val` users by the task-balanced val loss: each task's mean
per-example loss, averaged over tasks, so a task with long answers (headlines) does not drown
one with one-token answers (tags).
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from p2p.adapted_model import AdaptedModel
from p2p.config import TrainConfig
from p2p.errors import P2PError
from p2p.hypernet import HypernetConfig, Hypernetwork, make_config, save_hypernet
from p2p.prompting import PromptFormat

IGNORE = -100


# --- tokenization -------------------------------------------------------------------------------


def encode_example(fmt: PromptFormat, prompt: str, target: str, max_len: int) -> tuple[list[int], list[int]]:
    """Token ids of chat(prompt) + target + eos, and labels that score only the target.

    A target longer than half the budget is cut at its end; a prompt that does not fit the rest
    loses the middle of its user text (`PromptFormat`), never its chat header or instruction.
    """
    tok = fmt.tokenizer
    t = tok(target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    p = fmt.ids(prompt)
    if len(p) + len(t) > max_len:
        t = t[: max(1, max_len // 2)] if len(t) > max_len // 2 else t
        p = fmt.ids(prompt, budget=max_len - len(t))
    return p + t, [IGNORE] * len(p) + t


@dataclass
class Batch:
    example_ids: list[str]
    input_ids: torch.Tensor  # [N, T], right-padded
    attention_mask: torch.Tensor  # [N, T]
    labels: torch.Tensor  # [N, T], IGNORE outside targets
    embeddings: torch.Tensor  # [U, D]: one per distinct user in the batch
    row_index: torch.Tensor  # [N] -> row of `embeddings`
    tasks: list[str] = field(default_factory=list)

    @property
    def target_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.example_ids, self.input_ids.to(device), self.attention_mask.to(device),
                     self.labels.to(device), self.embeddings.to(device), self.row_index.to(device), self.tasks)


def collate(rows: list[dict], fmt: PromptFormat, max_len: int, memo: dict | None = None) -> Batch:
    """rows: dicts with example_id, user_id, input, target, embedding (and task).

    `memo` (example id -> token ids) saves re-tokenizing an example every epoch.
    """
    encoded = []
    for r in rows:
        ids = memo.get(r["example_id"]) if memo is not None else None
        if ids is None:
            ids = encode_example(fmt, r["input"], r["target"], max_len)
            if memo is not None:
                memo[r["example_id"]] = ids
        encoded.append(ids)
    width = max(len(ids) for ids, _ in encoded)
    pad = fmt.tokenizer.pad_token_id
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
        tasks=[r.get("task", "") for r in rows],
    )


# --- the frozen prefix ----------------------------------------------------------------------------

LLAMA_LIKE = ("llama", "qwen2", "qwen3", "mistral")


def _shallow(module: nn.Module) -> nn.Module:
    view = copy.copy(module)
    view._modules = dict(module._modules)
    return view


def layers_view(model: nn.Module, start: int, stop: int, final_norm: bool) -> nn.Module | None:
    """The decoder (`model.model`) running only layers [start, stop), with or without its final norm.

    Works for Llama-style models (Llama, Qwen, Mistral: model.model.layers, no embedding
    scaling); returns None for others, which then train without the prefix cache.
    """
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or model.config.model_type not in LLAMA_LIKE:
        return None
    view = _shallow(inner)
    view.layers = nn.ModuleList(list(layers)[start:stop])
    if not final_norm:
        view.norm = nn.Identity()
    config = copy.copy(model.config)
    config.num_hidden_layers = stop - start
    view.config = config
    return view


class PrefixCache:
    """Hidden states entering the first adapted layer, computed once per example.

    Correct for any mix of cached and new rows: new rows run the bottom layers alone (outside any
    adapter context: they carry none). States live on the model's device up to `max_bytes`; past
    that, rows are recomputed every time instead of stored.
    """

    def __init__(self, model: nn.Module, first_adapted_layer: int, max_bytes: int):
        self.bottom = layers_view(model, 0, first_adapted_layer, final_norm=False)
        self.top = layers_view(model, first_adapted_layer, model.config.num_hidden_layers, final_norm=True)
        self.max_bytes, self.bytes = max_bytes, 0
        self.states: dict[str, torch.Tensor] = {}
        self.hits = self.misses = 0

    @property
    def usable(self) -> bool:
        return self.bottom is not None and self.top is not None

    @torch.no_grad()
    def hidden(self, batch: Batch) -> torch.Tensor:
        """[N, T, H] hidden states of the batch's rows entering the first adapted layer (zeros at padding)."""
        lengths = batch.attention_mask.sum(1).tolist()
        missing = [i for i, e in enumerate(batch.example_ids) if e not in self.states]
        fresh: dict[int, torch.Tensor] = {}
        if missing:
            idx = torch.tensor(missing, device=batch.input_ids.device)
            width = max(lengths[i] for i in missing)
            hs = self.bottom(input_ids=batch.input_ids[idx, :width], attention_mask=batch.attention_mask[idx, :width],
                             use_cache=False).last_hidden_state
            for j, i in enumerate(missing):
                state = hs[j, : lengths[i]].clone()
                fresh[i] = state
                size = state.numel() * state.element_size()
                if self.bytes + size <= self.max_bytes:
                    self.states[batch.example_ids[i]] = state
                    self.bytes += size
        self.misses += len(missing)
        self.hits += len(batch.example_ids) - len(missing)
        first = fresh[missing[0]] if missing else self.states[batch.example_ids[0]]
        out = torch.zeros((len(lengths), batch.input_ids.shape[1], first.shape[-1]), dtype=first.dtype,
                          device=first.device)
        for i, e in enumerate(batch.example_ids):
            state = fresh.get(i)
            if state is None:
                state = self.states[e]
            out[i, : state.shape[0]] = state
        return out


# --- loss -----------------------------------------------------------------------------------------


def per_example_ce(lm_head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                   label_smoothing: float = 0.0) -> torch.Tensor:
    """[N] mean next-token cross-entropy over each example's target tokens (NaN for none).

    The LM head runs only at positions that predict a target token: with a 49k vocabulary,
    projecting every prompt position would cost more than the adapted layers themselves.
    """
    keep = labels[:, 1:] != IGNORE
    logits = lm_head(hidden[:, :-1][keep]).float()
    per_token = F.cross_entropy(logits, labels[:, 1:][keep], label_smoothing=label_smoothing, reduction="none")
    row = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(keep)[keep]
    counts = keep.sum(1).to(per_token.dtype)
    sums = torch.zeros(labels.shape[0], dtype=per_token.dtype, device=per_token.device).index_add(0, row, per_token)
    return sums / counts  # 0/0 = NaN for an example without targets


def target_loss(lm_head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0):
    """Mean over examples of each example's mean token loss: a 12-token headline and a one-token
    tag weigh the same, so short-answer tasks are not drowned out."""
    per_example = per_example_ce(lm_head, hidden, labels, label_smoothing)
    return per_example[~per_example.isnan()].mean()


class AdapterLM:
    """The frozen base model as training sees it: per-row adapters, the frozen prefix cached."""

    def __init__(self, adapted: AdaptedModel, cache_prefix: bool = True, cache_max_bytes: int = 2 << 30):
        self.adapted, self.model, self.hconfig = adapted, adapted.model, adapted.config
        self.cache = None
        first = min(self.hconfig.layers)
        if cache_prefix and first > 0:
            cache = PrefixCache(self.model, first, cache_max_bytes)
            self.cache = cache if cache.usable else None

    def hidden(self, generated: dict, batch: Batch) -> torch.Tensor:
        if self.cache is not None:
            states = self.cache.hidden(batch)  # outside the adapter context: the prefix has none
            with self.adapted.applied(generated, row_index=batch.row_index):
                return self.cache.top(inputs_embeds=states, attention_mask=batch.attention_mask,
                                      use_cache=False).last_hidden_state
        with self.adapted.applied(generated, row_index=batch.row_index):
            return self.model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                         use_cache=False).last_hidden_state

    def per_example(self, generate: Callable[[torch.Tensor], dict], batch: Batch, label_smoothing: float = 0.0):
        """(generated adapters, [N] per-example cross-entropy); `generate` is the (wrapped) hypernetwork."""
        generated = generate(batch.embeddings)
        hidden = self.hidden(generated, batch)
        return generated, per_example_ce(self.model.get_output_embeddings(), hidden, batch.labels, label_smoothing)

    def loss(self, generate: Callable[[torch.Tensor], dict], batch: Batch, config: TrainConfig) -> tuple:
        """(loss, cross-entropy) for a batch."""
        generated, per_example = self.per_example(generate, batch, config.label_smoothing)
        ce = per_example[~per_example.isnan()].mean()
        loss = ce
        if config.l2_adapter > 0:
            l2 = sum(a.pow(2).mean() + b.pow(2).mean() for a, b in generated.values()) / len(generated)
            loss = loss + config.l2_adapter * l2
        return loss, ce


def hypernet_config_for(config: TrainConfig, model: nn.Module, embed_dim: int) -> HypernetConfig:
    hconfig = make_config(
        model, config.base, config.encoder, embed_dim, preset=config.preset, rank=config.rank, alpha=config.alpha,
        target_modules=tuple(config.targets), top_k_layers=config.top_k_layers, seed=config.seed,
        use_rslora=config.use_rslora, profile=config.profile_config(), standardize=config.standardize_inputs,
        head_init_std=config.head_init_std,
        **({"head_output_scale": config.head_output_scale} if config.head_output_scale is not None else {}),
    )
    hconfig.extra.update({"max_seq_len": config.max_seq_len, "control": config.control})
    return hconfig


def lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to `min_lr_ratio` of the peak."""

    def f(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = min(1.0, (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


# --- validation -------------------------------------------------------------------------------------


def val_rows_sample(rows: list[dict], n: int) -> list[dict]:
    """`n` val examples spread over users and tasks: a fixed pseudo-random order (by example id),
    not the first n rows (which are a handful of users' every example)."""
    import hashlib

    order = sorted(rows, key=lambda r: hashlib.sha256(r["example_id"].encode()).hexdigest())
    return order[:n]


@torch.no_grad()
def val_sums(lm: AdapterLM, generate, batches: Iterable[Batch], label_smoothing: float = 0.0) -> dict[str, float]:
    """Per task: the sum of per-example losses and the count (all-reduce these across workers)."""
    sums: dict[str, float] = {}
    for b in batches:
        _, per_example = lm.per_example(generate, b, label_smoothing)
        for task, value in zip(b.tasks, per_example.tolist(), strict=True):
            if not math.isnan(value):
                sums[f"{task}/sum"] = sums.get(f"{task}/sum", 0.0) + value
                sums[f"{task}/n"] = sums.get(f"{task}/n", 0.0) + 1
    return sums


def val_metrics(sums: dict[str, float]) -> dict[str, float]:
    """{"val_loss": mean over tasks of each task's mean per-example loss, "val_loss/<task>": ...}."""
    per_task = {k[: -len("/sum")]: v / sums[k[: -len("/sum")] + "/n"] for k, v in sums.items() if k.endswith("/sum")}
    if not per_task:
        return {}
    return {"val_loss": sum(per_task.values()) / len(per_task), **{f"val_loss/{t}": v for t, v in sorted(per_task.items())}}


def batches_of(rows: list[dict], size: int, fmt: PromptFormat, max_len: int) -> list[Batch]:
    return [collate(rows[i : i + size], fmt, max_len) for i in range(0, len(rows), size)]


def epochs(rows: list[dict], size: int, seed: int) -> Iterator[list[dict]]:
    """Shuffled batches of rows, epoch after epoch, reproducible by seed."""
    if len(rows) < size:
        raise ValueError(f"{len(rows)} training examples cannot fill one batch of {size}")
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(rows))
        for i in range(0, len(order) - size + 1, size):
            yield [rows[j] for j in order[i : i + size]]


def task_batches(rows: list[dict], size: int, seed: int, weights: dict[str, float] | None = None,
                 counts: dict[str, int] | None = None) -> Iterator[list[dict]]:
    """Batches of one task each, the task drawn with probability its examples x its weight.

    A mixed batch is padded to its longest example: LaMP-3/5 or the synthetic tag prompt pad a short
    rating prompt to twice its length. One task per batch spends the compute on tokens, and the
    weights give a hard task more steps than its share of the data (an unlisted task weighs 1).
    `counts` are the whole training set's examples per task: a Ray worker holds a shard whose mix
    need not be the data's, and draws by the data's. Each task's examples come round in a fresh
    shuffle once all were seen, so a task with fewer examples than a batch still fills one.
    """
    if not rows:
        raise ValueError("no training examples to fill a batch")
    by_task: dict[str, list[dict]] = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r)
    tasks, weights = sorted(by_task), weights or {}
    counts = counts or {t: len(by_task[t]) for t in tasks}
    share = np.array([counts[t] * weights.get(t, 1.0) for t in tasks])
    rng = np.random.default_rng(seed)

    def stream(task_rows: list[dict]) -> Iterator[dict]:
        while True:
            for j in rng.permutation(len(task_rows)):
                yield task_rows[j]

    streams = {t: stream(by_task[t]) for t in tasks}
    while True:
        task = tasks[rng.choice(len(tasks), p=share / share.sum())]
        yield [next(streams[task]) for _ in range(size)]


def check_task_weights(config: TrainConfig, tasks: Iterable[str]) -> None:
    """Before any training: every weighted task has training examples (a typo would weigh nothing)."""
    known = sorted(set(tasks))
    unknown = sorted(set(config.task_weights or {}) - set(known))
    if unknown:
        raise P2PError(f"config field 'task_weights': no training examples of task {unknown[0]!r} "
                       f"(tasks in the data: {', '.join(known)})")


def training_batches(config: TrainConfig, rows: list[dict], seed: int,
                     task_counts: dict[str, int] | None = None) -> Iterator[list[dict]]:
    """The batch order a run's config asks for: shuffled mixed batches, or one task per batch."""
    if config.batch_by_task:
        return task_batches(rows, config.batch_size, seed, config.task_weights, task_counts)
    return epochs(rows, config.batch_size, seed)


def input_stats(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std of the training users' embeddings (each user once)."""
    users = {r["user_id"]: np.asarray(r["embedding"], np.float32) for r in rows}
    emb = np.stack(list(users.values()))
    return emb.mean(0), emb.std(0)


def as_shared_control(rows: list[dict], mean: np.ndarray) -> list[dict]:
    """The `shared` control's data: every example carries the same embedding (no user signal)."""
    return [{**r, "embedding": mean} for r in rows]


class Checkpoints:
    """RUN_DIR/latest and RUN_DIR/best (by the task-balanced val loss): hypernet checkpoint folders."""

    def __init__(self, run_dir: str):
        self.run_dir, self.best = run_dir, float("inf")

    def save(self, hypernet: Hypernetwork, step: int, metrics: dict) -> str:
        hypernet.config.extra.update({"step": step, **{k: v for k, v in metrics.items() if k.startswith("val_")}})
        hid = save_hypernet(hypernet, os.path.join(self.run_dir, "latest"))
        val = metrics.get("val_loss")
        if val is not None and val < self.best:
            self.best = val
            save_hypernet(hypernet, os.path.join(self.run_dir, "best"))
        return hid


def prepare_hypernet(config: TrainConfig, model: nn.Module, embed_dim: int, train_rows: list[dict]) -> Hypernetwork:
    """A fresh hypernet for `model`, its inputs standardized with the training users' statistics."""
    torch.manual_seed(config.seed)
    hypernet = Hypernetwork(hypernet_config_for(config, model, embed_dim))
    hypernet.set_input_stats(*input_stats(train_rows))
    return hypernet


def train_local(config: TrainConfig, model: nn.Module, tokenizer, train_rows: list[dict], val_rows: list[dict],
                embed_dim: int, run_dir: str | None = None, log: Callable[[str], None] = print) -> dict:
    """The plain single-process loop: what the distributed job does, minus distribution."""
    check_task_weights(config, (r["task"] for r in train_rows))
    hypernet = prepare_hypernet(config, model, embed_dim, train_rows)
    if config.control == "shared":
        train_rows = as_shared_control(train_rows, hypernet.shared_embedding().numpy())
        val_rows = as_shared_control(val_rows, hypernet.shared_embedding().numpy())
    lm = AdapterLM(AdaptedModel(model, tokenizer, hypernet.config), config.cache_prefix, config.cache_max_bytes)
    fmt = PromptFormat(tokenizer)
    opt = torch.optim.AdamW(hypernet.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(config))
    val_batches = batches_of(val_rows_sample(val_rows, config.val_examples), config.batch_size, fmt,
                             config.max_seq_len)
    ckpt = Checkpoints(run_dir) if run_dir else None
    history, t0, eval_seconds = [], time.perf_counter(), 0.0
    memo: dict = {}
    for step, rows in zip(range(1, config.max_steps + 1), training_batches(config, train_rows, config.seed),
                          strict=False):
        hypernet.train()
        loss, ce = lm.loss(hypernet, collate(rows, fmt, config.max_seq_len, memo), config)
        opt.zero_grad()
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(hypernet.parameters(), config.grad_clip))
        opt.step()
        sched.step()
        record = {"step": step, "loss": loss.item(), "ce": ce.item(), "grad_norm": grad_norm,
                  "examples_per_s": step * config.batch_size / (time.perf_counter() - t0 - eval_seconds)}
        if step % config.eval_every == 0 or step == config.max_steps:
            t_eval = time.perf_counter()
            hypernet.eval()
            record.update(val_metrics(val_sums(lm, hypernet, val_batches, config.label_smoothing)))
            if ckpt:
                ckpt.save(hypernet, step, record)
            eval_seconds += time.perf_counter() - t_eval
        if step % config.log_every == 0 or "val_loss" in record:
            log(f"step {step}/{config.max_steps} loss {record['loss']:.4f}"
                + (f" val {record['val_loss']:.4f}" if record.get("val_loss") is not None else "")
                + f" {record['examples_per_s']:.1f} ex/s")
        history.append(record)
    return {"hypernet": hypernet, "history": history, "lm": lm}


def examples_with_embeddings(data: str, profiles, splits: tuple[str, ...], tasks: list[str] | None = None,
                             limit: int | None = None) -> list[dict]:
    """Examples of `splits` (and `tasks`), each carrying its user's embedding."""
    from p2p.data.schemas import examples_uri, read_table

    vectors = np.asarray(profiles.column("embedding").combine_chunks().flatten()).reshape(len(profiles), -1)
    emb = dict(zip(profiles.column("user_id").to_pylist(), vectors, strict=True))
    ex = read_table(examples_uri(data), "examples")
    rows = []
    for r in ex.to_pylist():
        if r["split"] not in splits or (tasks and r["task"] not in tasks):
            continue
        if r["user_id"] not in emb:
            raise P2PError(f"example {r['example_id']!r}: user {r['user_id']!r} has no profile")
        rows.append({**r, "embedding": emb[r["user_id"]]})
        if limit is not None and len(rows) >= limit:
            break
    return rows
