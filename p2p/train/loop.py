"""The one training loop, and the plain single-process run built on it.

Three things train adapters here: the hypernetwork in one process (`train_local`, benches,
tests), the hypernetwork in each Ray Train worker under DeepSpeed (pipelines/train.py), and
OPPU's one LoRA per user (p2p/evaluation/baselines.py). They differ in how a step is taken
(`Stepper`: plain PyTorch or a DeepSpeed engine), in what produces the adapters (the hypernet,
its engine, or a user's own tensors), and in what happens around a step (checkpoints, reports
to Ray, an early stop). `TrainLoop` is the part they share: take a batch, compute the loss
through the frozen model, step, measure, evaluate on schedule, hand the record on.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

import numpy as np
import torch
from torch import nn

from p2p.config import TrainConfig
from p2p.errors import P2PError
from p2p.model.adapted import AdaptedModel
from p2p.model.hypernet import HypernetConfig, Hypernetwork, adapter_paths, make_config, save_hypernet
from p2p.model.label_binding import answer_position, binding_matrix, labels_of_tasks
from p2p.model.label_gate import gate_labels
from p2p.task.prompt import PromptFormat
from p2p.train.batch import Batch, batches_of
from p2p.train.batching import check_task_weights, collated, training_batches
from p2p.train.examples import as_control, embedding_stats, user_embeddings
from p2p.train.gate_fit import fit_gate, fit_gate_checkpoint
from p2p.train.step import AdapterLoss, AdapterSource, val_metrics, val_rows_sample, val_sums


class Stepper(Protocol):
    """How one optimizer step is taken, and what makes a batch's adapters."""

    source: AdapterSource

    def step(self, loss: torch.Tensor) -> float | None:
        """Backward, clip, step, schedule; the gradient norm when known."""

    def train(self, mode: bool) -> None: ...

    @property
    def lr(self) -> float: ...


class TorchStepper:
    """Plain PyTorch: zero the gradients, backward, clip (optional), step, schedule (optional)."""

    def __init__(self, source: AdapterSource, params: Iterable[torch.Tensor], optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, grad_clip: float | None = None):
        self.source, self.params, self.optimizer = source, list(params), optimizer
        self.scheduler, self.grad_clip = scheduler, grad_clip

    def step(self, loss: torch.Tensor) -> float | None:
        self.optimizer.zero_grad()
        loss.backward()
        norm = None
        if self.grad_clip is not None:
            norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip))
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return norm

    def train(self, mode: bool) -> None:
        if isinstance(self.source, nn.Module):
            self.source.train(mode)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


# on_step(record, evaluated): checkpoints, progress lines, reports; its time is not counted as training.
StepHook = Callable[[dict, bool], None]


class TrainLoop:
    """Step through batches until `max_steps` (or `stop`); evaluate every `eval_every` steps and at the end.

    Each step's record holds step, loss, ce, grad_norm, lr, examples (seen in this run),
    train_seconds (evaluation and hooks excluded) and examples_per_s, plus what `evaluate`
    returned on evaluation steps.
    """

    def __init__(self, loss: AdapterLoss, stepper: Stepper, max_steps: int, eval_every: int | None = None,
                 evaluate: Callable[[], dict] | None = None, on_step: StepHook | None = None,
                 stop: StepHook | None = None):
        self.loss, self.stepper, self.max_steps = loss, stepper, max_steps
        self.eval_every, self.evaluate, self.on_step, self.stop = eval_every, evaluate, on_step, stop

    def run(self, batches: Iterator[Batch], start_step: int = 0) -> list[dict]:
        history: list[dict] = []
        t0, outside, seen = time.perf_counter(), 0.0, 0
        for step in range(start_step + 1, self.max_steps + 1):
            batch = next(batches, None)
            if batch is None:
                break
            self.stepper.train(True)
            loss, ce = self.loss(self.stepper.source, batch)
            grad_norm = self.stepper.step(loss)
            seen += len(batch)
            seconds = time.perf_counter() - t0 - outside
            record = {"step": step, "loss": loss.item(), "ce": ce.item(), "grad_norm": grad_norm,
                      "lr": self.stepper.lr, "examples": seen, "train_seconds": seconds,
                      "examples_per_s": seen / seconds}
            t = time.perf_counter()
            evaluated = self.evaluate is not None and (step % self.eval_every == 0 or step == self.max_steps)
            if evaluated:
                self.stepper.train(False)
                record.update(self.evaluate())
            if self.on_step is not None:
                self.on_step(record, evaluated)
            outside += time.perf_counter() - t
            history.append(record)
            if self.stop is not None and self.stop(record, evaluated):
                break
        return history


class Validation:
    """The task-balanced val loss of a fixed set of val batches; `all_reduce` sums it over workers."""

    def __init__(self, loss: AdapterLoss, source: AdapterSource, batches: list[Batch],
                 all_reduce: Callable[[dict[str, float]], dict[str, float]] | None = None):
        self.loss, self.source, self.batches, self.all_reduce = loss, source, batches, all_reduce

    def __call__(self) -> dict[str, float]:
        sums = val_sums(self.loss, self.source, self.batches)
        return val_metrics(self.all_reduce(sums) if self.all_reduce else sums)


class LossPlateau:
    """Stop once an epoch's mean loss falls by less than `min_improvement` of the previous epoch's."""

    def __init__(self, steps_per_epoch: int, min_improvement: float):
        self.steps_per_epoch, self.min_improvement = steps_per_epoch, min_improvement
        self.epochs, self.previous, self._losses = 0, float("inf"), []

    def __call__(self, record: dict, evaluated: bool) -> bool:
        self._losses.append(record["loss"])
        if len(self._losses) < self.steps_per_epoch:
            return False
        self.epochs += 1
        mean, self._losses = float(np.mean(self._losses)), []
        if mean > self.previous * (1 - self.min_improvement):
            return True
        self.previous = mean
        return False


# --- the hypernetwork's run ---------------------------------------------------------------------


def hypernet_config_for(config: TrainConfig, model: nn.Module, embed_dim: int,
                        tasks: Iterable[str] = ()) -> HypernetConfig:
    """The hypernet config a run of `config` trains for `model`; the label gate's labels are those of the
    training `tasks` (a gated config needs them)."""
    gate = {}
    if config.label_gate:
        labels, dims = gate_labels(tasks, config.profile_features, embed_dim)
        gate = {"gate_labels": labels, "gate_dims": dims, "gate_module": config.label_gate_module}
    hconfig = make_config(
        model, config.base, config.encoder, embed_dim, preset=config.preset, rank=config.rank, alpha=config.alpha,
        target_modules=tuple(config.targets), top_k_layers=config.top_k_layers, seed=config.seed,
        use_rslora=config.use_rslora, profile=config.profile_config(), standardize=config.standardize_inputs,
        head_init_std=config.head_init_std, label_binding=config.label_binding,
        label_binding_exclusive=config.label_binding and config.label_binding_exclusive,
        label_features=config.profile_features if config.label_binding else 0,
        **({"head_output_scale": config.head_output_scale} if config.head_output_scale is not None else {}), **gate,
    )
    hconfig.extra.update({"max_seq_len": config.max_seq_len, "control": config.control})
    return hconfig


# Training prompts whose answer position starts the label binding (p2p/model/label_binding.py).
BINDING_PROMPTS = 32


def new_hypernet(config: TrainConfig, model: nn.Module, embed_dim: int, stats: tuple[np.ndarray, np.ndarray],
                 tokenizer=None, tasks: Iterable[str] = (), prompts: list[str] = ()) -> Hypernetwork:
    """A fresh hypernet for `model`, its inputs standardized with the training users' (mean, std);
    with `label_binding`, bound to the labels of the training `tasks` as `tokenizer` spells them,
    starting from the answer position of training `prompts`."""
    torch.manual_seed(config.seed)
    tasks = list(tasks)
    hypernet = Hypernetwork(hypernet_config_for(config, model, embed_dim, tasks))
    hypernet.set_input_stats(*stats)
    if config.label_binding:
        if not prompts:
            raise P2PError("label_binding: no training prompts to start the binding from")
        matrix = binding_matrix(model.get_output_embeddings().weight, tokenizer, labels_of_tasks(tasks),
                                config.profile_features)
        fmt = PromptFormat(tokenizer)
        ids = [fmt.ids(p, config.max_seq_len) for p in prompts[:BINDING_PROMPTS]]
        paths = {k: v for k, v in adapter_paths(hypernet.config).items() if k[1] in hypernet.bound}
        hypernet.set_label_binding(matrix, answer_position(model, ids, paths), config.label_binding_nats)
        if not config.label_binding_trained:
            hypernet.binding_gain.requires_grad_(False)
        if not config.label_binding_trained or config.label_binding_exclusive:
            hypernet.binding_read.requires_grad_(False)
    return hypernet


def binding_prompts(rows: list[dict]) -> list[str]:
    """The training prompts the label binding starts from: a fixed pseudo-random sample (by example id)."""
    return [r["input"] for r in val_rows_sample(rows, BINDING_PROMPTS)]


def lr_lambda(config: TrainConfig, start_step: int = 0) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to `min_lr_ratio` of the peak (from `start_step` on a resume)."""

    def f(step: int) -> float:
        step += start_step
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = min(1.0, (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def optimizer_for(config: TrainConfig, hypernet: Hypernetwork, start_step: int = 0):
    """(AdamW, its warmup + cosine schedule): the same for the local run and every Ray worker."""
    gains = {id(p) for p in hypernet.binding_gain.parameters()} if hypernet.bound else set()
    trained = [p for p in hypernet.parameters() if p.requires_grad]  # a fixed label binding stays out
    groups = [{"params": [p for p in trained if id(p) not in gains]}]
    if any(id(p) in gains for p in trained):
        groups.append({"params": [p for p in trained if id(p) in gains], "lr": config.lr * config.label_binding_lr_scale})
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, start_step))


def save_checkpoint(hypernet: Hypernetwork, folder: str, step: int, metrics: dict) -> str:
    """The checkpoint folder, its config stamped with the step and val metrics; returns its hypernet_id."""
    hypernet.config.extra.update({"step": step, **{k: v for k, v in metrics.items() if k.startswith("val_")}})
    return save_hypernet(hypernet, folder)


class Checkpoints:
    """RUN_DIR/latest and RUN_DIR/best (by the task-balanced val loss): hypernet checkpoint folders."""

    def __init__(self, run_dir: str):
        self.run_dir, self.best = run_dir, float("inf")

    def save(self, hypernet: Hypernetwork, step: int, metrics: dict) -> str:
        hid = save_checkpoint(hypernet, os.path.join(self.run_dir, "latest"), step, metrics)
        val = metrics.get("val_loss")
        if val is not None and val < self.best:
            self.best = val
            save_hypernet(hypernet, os.path.join(self.run_dir, "best"))
        return hid


def progress_line(record: dict, max_steps: int) -> str:
    val = f" val {record['val_loss']:.4f}" if record.get("val_loss") is not None else ""
    return f"step {record['step']}/{max_steps} loss {record['loss']:.4f}{val} {record['examples_per_s']:.1f} ex/s"


def train_local(config: TrainConfig, model: nn.Module, tokenizer, train_rows: list[dict], val_rows: list[dict],
                embed_dim: int, run_dir: str | None = None, log: Callable[[str], None] = print) -> dict:
    """The plain single-process run: what the distributed job does, minus distribution."""
    check_task_weights(config, (r["task"] for r in train_rows))
    hypernet = new_hypernet(config, model, embed_dim, embedding_stats(user_embeddings(train_rows)), tokenizer,
                            sorted({r["task"] for r in train_rows}), binding_prompts(train_rows))
    mean = hypernet.shared_embedding().numpy()
    train_rows, val_rows = as_control(train_rows, config.control, mean), as_control(val_rows, config.control, mean)
    loss = AdapterLoss(AdaptedModel(model, tokenizer, hypernet.config), config.cache_prefix, config.cache_max_bytes,
                       config.label_smoothing, config.l2_adapter, config.contrast_weight, config.contrast_margin)
    fmt = PromptFormat(tokenizer)
    optimizer, scheduler = optimizer_for(config, hypernet)
    val_batches = batches_of(val_rows_sample(val_rows, config.val_examples), config.batch_size, fmt,
                             config.max_seq_len)
    checkpoints = Checkpoints(run_dir) if run_dir else None

    def on_step(record: dict, evaluated: bool) -> None:
        if evaluated and checkpoints:
            checkpoints.save(hypernet, record["step"], record)
        if evaluated or record["step"] % config.log_every == 0:
            log(progress_line(record, config.max_steps))

    loop = TrainLoop(loss, TorchStepper(hypernet, hypernet.parameters(), optimizer, scheduler, config.grad_clip),
                     config.max_steps, config.eval_every, Validation(loss, hypernet, val_batches), on_step)
    history = loop.run(collated(training_batches(config, train_rows, config.seed), fmt, config.max_seq_len))
    if config.label_gate:  # the handed-on model's gate: RUN/best's with a run dir, else the one in memory
        if checkpoints:
            fit_gate_checkpoint(config, model, tokenizer, os.path.join(run_dir, "best"), train_rows, log)
        else:
            fit_gate(config, loss.adapted, hypernet, train_rows, log)
    return {"hypernet": hypernet, "history": history, "adapter_loss": loss}
