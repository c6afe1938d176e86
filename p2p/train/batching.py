"""The order examples come in: shuffled epochs, or one task per batch with per-task weights.

A mixed batch pads every row to its longest prompt (LaMP-3 or the synthetic tag prompt pad a
short rating prompt to twice its length), so a run may ask for one task per batch; and a task
that learns slowly may be given more steps than its share of the data.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from p2p.config import TrainConfig
from p2p.errors import P2PError
from p2p.task.prompt import PromptFormat
from p2p.train.batch import Batch, collate


def epochs(rows: list[dict], size: int, seed: int, drop_last: bool = True) -> Iterator[list[dict]]:
    """Shuffled batches of rows, epoch after epoch, reproducible by seed.

    `drop_last=False` keeps each epoch's last, smaller batch: OPPU trains on a user's few items.
    """
    if drop_last and len(rows) < size:
        raise ValueError(f"{len(rows)} training examples cannot fill one batch of {size}")
    if not rows:
        return
    rng = np.random.default_rng(seed)
    last = len(rows) - size + 1 if drop_last else len(rows)
    while True:
        order = rng.permutation(len(rows))
        for i in range(0, last, size):
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


def collated(batches: Iterator[list[dict]], fmt: PromptFormat, max_len: int,
             device: torch.device | str | None = None) -> Iterator[Batch]:
    """Rows -> tokenized `Batch`es (on `device`), each example tokenized once for the whole run."""
    memo: dict[str, tuple] = {}
    for rows in batches:
        batch = collate(rows, fmt, max_len, memo)
        yield batch if device is None else batch.to(device)
