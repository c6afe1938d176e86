"""The methods P2P is compared with, all with one shape: `predict(users, examples) -> answers`.

Untrained baselines (what a product without personalization would ship):
- `base`: the frozen base model, input only.
- `prompt`: the same profile text P2P embeds, in the prompt (as a system message).

Controls (what isolates the personalization effect; P2P must beat the best of them):
- `rule`: the best rule that sees only the input: the data set's own reference rule where it
  ships one (the synthetic benchmark's), else the majority training answer of the task.
- `shared`: one adapter for everyone, from a hypernet trained with the same config and budget
  on a constant embedding (`p2p train --with-shared`): it learns the task, not the user.
- `shuffled`: P2P's own hypernet, each held-out user given another held-out user's profile.

The expensive alternative P2P replaces:
- `oppu`: One-PEFT-Per-User as published: start from the `shared` adapter, then train each user's
  LoRA on that user's history items of the evaluated tasks, each turned into the task's own
  prompt format, until the training loss stops falling (or a cap).

And `p2p`: the hypernetwork's adapter per user: profile -> embedding -> adapter in one pass.

All model-based methods answer greedily through the same batched decoder, with the same prompt
format and token budget per task, so their differences are the method's. Each records what
personalizing costs: seconds per user, bytes stored per user.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from p2p.generation.decoding import decode
from p2p.generation.label_choice import LabelChooser
from p2p.model.adapted import AdaptedModel
from p2p.model.lora import UserAdapter, split_users, stack_users
from p2p.model.peft_format import peft_files
from p2p.personalize import Personalizer
from p2p.profile.config import ProfileConfig
from p2p.profile.text import build_profile
from p2p.progress import ProgressBar
from p2p.task.prompt import PromptFormat, profile_context
from p2p.task.registry import CLASSIFICATION, RATING, Task
from p2p.train.batching import collated, epochs
from p2p.train.loop import LossPlateau, TorchStepper, TrainLoop
from p2p.train.step import AdapterLoss


@dataclass
class Cost:
    """What a method spends to personalize and to answer; `users` is how many users it stands on."""

    personalize_seconds_per_user: float = 0.0
    bytes_per_user: int = 0
    seconds_per_answer: float = 0.0
    prompt_tokens_per_answer: float = 0.0
    users: int = 0
    answers: int = 0


DECODINGS = ("free", "labels")


class Answerer:
    """Answers of the frozen base model, each row with its own adapter (or none).

    `decoding="free"`: greedy decoding, in batches of similar lengths. `decoding="labels"`: for a
    task with a label list (classification, rating), the label whose full token sequence is most
    likely (`LabelChooser`); a task without one (generation) is decoded freely.
    """

    def __init__(self, adapted: AdaptedModel, tasks: dict[str, Task], batch_size: int = 16,
                 decoding: str = "free", labels: dict[str, list[str]] | None = None):
        if decoding not in DECODINGS:
            raise ValueError(f"decoding must be one of {DECODINGS}, got {decoding!r}")
        self.adapted, self.tok, self.tasks, self.batch_size = adapted, adapted.tokenizer, tasks, batch_size
        self.decoding = decoding
        self.context = int(getattr(adapted.model.config, "max_position_embeddings", 2048))
        self.choosers = {} if decoding == "free" else {
            name: LabelChooser(adapted, list(t.labels or (labels or {}).get(name) or []))
            for name, t in tasks.items() if t.kind in (CLASSIFICATION, RATING) and (t.labels or (labels or {}).get(name))}
        self.prompt_tokens = 0

    def answer(self, examples: list[dict], adapters: list[UserAdapter | None] | None = None,
               system: list[str | None] | None = None, desc: str = "answers") -> list[str]:
        budgets = [self.tasks[e["task"]].max_tokens for e in examples]
        # The prompt rule of training and serving: a prompt too long loses the middle of its text.
        ids = [PromptFormat(self.tok, system[i] if system else None).ids(e["input"], self.context - budgets[i])
               for i, e in enumerate(examples)]
        self.prompt_tokens = sum(len(i) for i in ids)
        out: list[str] = [""] * len(ids)
        free = [i for i, e in enumerate(examples) if e["task"] not in self.choosers]
        order = sorted(free, key=lambda i: len(ids[i]))  # similar lengths share a batch
        # a method answers for up to twenty minutes on CPUs (the profile in the prompt): show it
        with ProgressBar(len(examples), desc, "answer") as bar:
            for i, e in enumerate(examples):
                if e["task"] in self.choosers:
                    out[i] = self.choosers[e["task"]].choose(ids[i], adapters[i] if adapters else None)
                    bar.update()
            for s in range(0, len(order), self.batch_size):
                rows = order[s : s + self.batch_size]
                decoded = decode(self.adapted, [ids[i] for i in rows], [budgets[i] for i in rows],
                                 [adapters[i] for i in rows] if adapters else None)
                for i, toks in zip(rows, decoded.tokens, strict=True):
                    out[i] = self.tok.decode(toks, skip_special_tokens=True).strip()
                bar.update(len(rows))
        return out


@dataclass
class Method:
    name: str
    answerer: Answerer | None
    cost: Cost = field(default_factory=Cost)

    def predict(self, users: dict[str, dict], examples: list[dict]) -> list[str | None]:
        raise NotImplementedError

    def _timed_answers(self, examples, adapters=None, system=None) -> list[str]:
        t = time.perf_counter()
        out = self.answerer.answer(examples, adapters, system, desc=f"{self.name}: answering")
        self.cost.seconds_per_answer = (time.perf_counter() - t) / max(len(examples), 1)
        self.cost.prompt_tokens_per_answer = self.answerer.prompt_tokens / max(len(examples), 1)
        self.cost.answers = len(examples)
        return out


class Base(Method):
    def predict(self, users, examples):
        return self._timed_answers(examples)


class ProfileInPrompt(Method):
    """The user's profile text in the prompt (a system message): with the untrained base model
    (`prompt`), or with the retrieval control's one adapter, trained on such prompts (`retrieval`)."""

    def __init__(self, name: str, answerer: Answerer, profile: ProfileConfig, adapter: UserAdapter | None = None):
        super().__init__(name, answerer)
        self.profile, self.adapter = profile, adapter

    def predict(self, users, examples):
        t = time.perf_counter()
        texts = {u: build_profile(users[u]["history"], self.profile) for u in {e["user_id"] for e in examples}}
        self.cost.personalize_seconds_per_user = (time.perf_counter() - t) / max(len(texts), 1)
        self.cost.users = len(texts)
        self.cost.bytes_per_user = int(np.mean([len(t.encode()) for t in texts.values()])) if texts else 0
        system = [profile_context(texts[e["user_id"]]) for e in examples]
        return self._timed_answers(examples, [self.adapter] * len(examples) if self.adapter else None, system)


class Rule(Method):
    """The best input-only rule: a reference answer, or the majority training answer for its key.

    `reference` maps example ids to (rule_key, rule answer) as a data set ships them; `train`
    are the training examples the majorities are fitted on. No answer (None) where a task has no
    rule (free generation without a reference).
    """

    def __init__(self, name: str, tasks: dict[str, Task], train: list[dict], reference: dict[str, tuple]):
        super().__init__(name, None)
        self.tasks, self.reference = tasks, reference
        by_key: dict[tuple, Counter] = {}
        for e in train:
            key = (reference.get(e["example_id"]) or (None, None))[0]
            by_key.setdefault((e["task"], key), Counter())[e["target"]] += 1
            by_key.setdefault((e["task"], None), Counter())[e["target"]] += 1
        self.majority = {k: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for k, c in by_key.items()}

    def predict(self, users, examples):
        out = []
        for e in examples:
            key, answer = self.reference.get(e["example_id"], (None, None))
            if answer is None and self.tasks[e["task"]].kind in (CLASSIFICATION, RATING):
                answer = self.majority.get((e["task"], key), self.majority.get((e["task"], None)))
            out.append(answer)
        return out


class P2P(Method):
    """The hypernetwork's adapter per user, from their own profile (or from another user's: `shuffled`)."""

    def __init__(self, name: str, answerer: Answerer, personalizer: Personalizer, shuffle_seed: int | None = None):
        super().__init__(name, answerer)
        self.personalizer, self.shuffle_seed = personalizer, shuffle_seed
        self.profile_of: dict[str, str] = {}  # user -> the user whose profile they were given

    def _donors(self, users: dict[str, dict], examples: list[dict]) -> dict[str, str]:
        """Who lends each user a profile: themselves, or (shuffled) another user of the same split."""
        ids = sorted({e["user_id"] for e in examples})
        if self.shuffle_seed is None:
            return {u: u for u in ids}
        split_of = {e["user_id"]: e["split"] for e in examples}
        rng = random.Random(self.shuffle_seed)
        donors = {}
        for split in sorted(set(split_of.values())):
            group = [u for u in ids if split_of[u] == split]
            if len(group) < 2:
                continue  # nobody to swap with: no answer for this split
            shifted = group[:]
            rng.shuffle(shifted)
            donors.update(zip(shifted, shifted[1:] + shifted[:1], strict=True))  # a cycle: nobody keeps their own
        return donors

    def predict(self, users, examples):
        donors = self._donors(users, examples)
        self.profile_of = donors
        ids = sorted(donors)
        t = time.perf_counter()
        adapters = dict(zip(ids, self.personalizer.adapters([users[donors[u]]["history"] for u in ids]), strict=True))
        batch_seconds = (time.perf_counter() - t) / max(len(ids), 1)
        single = []  # one user alone (no batching to amortize): what a brand-new user waits for
        for u in ids[: min(5, len(ids))]:
            t = time.perf_counter()
            self.personalizer.adapters([users[u]["history"]])
            single.append(time.perf_counter() - t)
        self.cost.personalize_seconds_per_user = float(np.median(single)) if single else batch_seconds
        self.cost.users = len(ids)
        if ids:
            self.cost.bytes_per_user = sum(len(b) for b in self.personalizer.files(adapters[ids[0]]).values())
        kept = [e for e in examples if e["user_id"] in adapters]
        answers = dict(zip((e["example_id"] for e in kept),
                           self._timed_answers(kept, [adapters[e["user_id"]] for e in kept]), strict=True))
        return [answers.get(e["example_id"]) for e in examples]


class Shared(Method):
    """One adapter for everyone: the `shared` control's hypernet at its 'no user' embedding."""

    def __init__(self, name: str, answerer: Answerer, shared: Personalizer):
        super().__init__(name, answerer)
        self.adapter = shared.shared_adapter()

    def predict(self, users, examples):
        return self._timed_answers(examples, [self.adapter] * len(examples))


@dataclass
class OPPUConfig:
    max_epochs: int = 6  # cap; training stops earlier once the epoch loss stops falling
    min_improvement: float = 0.01  # an epoch must lower the mean loss by this share to go on
    lr: float = 1e-3
    batch_size: int = 8
    max_items: int = 256  # cap on a user's task-matched history items (most recent kept)
    max_seq_len: int = 256
    seed: int = 0


class OPPU(Method):
    """One LoRA per user, trained on the user's own task-matched history, from the shared adapter.

    The LoRA has exactly the shape P2P generates (same modules, layers, rank and scale) and trains
    with the same loss, prompt format and frozen-prefix cache as the hypernet, through the same
    batched-LoRA layers that are tested equal to peft's: the comparison is the training recipe,
    not the implementation.
    """

    def __init__(self, name: str, answerer: Answerer, tasks: dict[str, Task], start: UserAdapter | None,
                 config: OPPUConfig | None = None):
        super().__init__(name, answerer)
        self.tasks, self.start, self.config = tasks, start, config or OPPUConfig()
        self.train_seconds: dict[str, float] = {}
        self.epochs_run: dict[str, int] = {}
        self.items_used: dict[str, int] = {}

    def training_pairs(self, history: list[dict], tasks: list[str]) -> list[tuple[str, str]]:
        """The user's history items of these tasks, in each task's prompt format (most recent kept)."""
        pairs = []
        for name in tasks:
            pairs += self.tasks[name].history_examples(history)[-self.config.max_items :]
        return pairs

    def train_user(self, user_id: str, history: list[dict], tasks: list[str]) -> UserAdapter:
        c, adapted = self.config, self.answerer.adapted
        start = self.start or _peft_init(adapted)
        params = {m: (a.clone().requires_grad_(True), b.clone().requires_grad_(True))
                  for m, (a, b) in stack_users([start], adapted.layers, adapted.paths).items()}
        rows = [{"example_id": f"{user_id}#{i}", "user_id": user_id, "input": x, "target": y, "embedding": [0.0]}
                for i, (x, y) in enumerate(self.training_pairs(history, tasks))]
        self.items_used[user_id] = len(rows)
        if not rows:
            self.epochs_run[user_id] = 0
            return start
        # The hypernet's loop and loss (plain cross-entropy, its own prefix cache, freed with it);
        # what it trains is the user's own A and B.
        optimizer = torch.optim.AdamW([t for ab in params.values() for t in ab], lr=c.lr)
        plateau = LossPlateau(math.ceil(len(rows) / c.batch_size), c.min_improvement)
        loop = TrainLoop(AdapterLoss(adapted), TorchStepper(lambda _: params, [], optimizer),
                         max_steps=c.max_epochs * plateau.steps_per_epoch, stop=plateau)
        loop.run(collated(epochs(rows, c.batch_size, c.seed, drop_last=False), PromptFormat(self.answerer.tok),
                          c.max_seq_len))
        self.epochs_run[user_id] = plateau.epochs
        generated = {m: (a.detach(), b.detach()) for m, (a, b) in params.items()}
        return split_users(generated, adapted.layers, adapted.paths)[0]

    def predict(self, users, examples):
        ids = sorted({e["user_id"] for e in examples})
        tasks_of: dict[str, list[str]] = {}
        for e in examples:
            tasks_of.setdefault(e["user_id"], [])
            if e["task"] not in tasks_of[e["user_id"]]:
                tasks_of[e["user_id"]].append(e["task"])
        adapters, seconds = {}, []
        # a minute a user on CPUs: the longest step of `p2p eval`, with its own bar
        with ProgressBar(len(ids), f"{self.name}: one LoRA per user", "user") as bar:
            for u in ids:
                t = time.perf_counter()
                adapters[u] = self.train_user(u, users[u]["history"], tasks_of[u])
                seconds.append(time.perf_counter() - t)
                self.train_seconds[u] = seconds[-1]
                bar.update()
        self.cost.personalize_seconds_per_user = float(np.mean(seconds)) if seconds else 0.0
        self.cost.users = len(ids)
        if ids:
            files = peft_files(adapters[ids[0]], self.answerer.adapted.config)
            self.cost.bytes_per_user = sum(len(b) for b in files.values())
        return self._timed_answers(examples, [adapters[e["user_id"]] for e in examples])


def _peft_init(adapted: AdaptedModel) -> UserAdapter:
    """PEFT's own LoRA init for these modules (A Kaiming-uniform, B zero), when no shared adapter exists."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for (_layer, module), path in sorted(adapted.paths.items()):
        fan_in, fan_out = adapted.config.shapes[module]
        bound = math.sqrt(6.0 / (6 * fan_in))
        a = torch.empty(adapted.config.rank, fan_in).uniform_(-bound, bound, generator=gen)
        out[path] = (a, torch.zeros(fan_out, adapted.config.rank))
    return out


@dataclass
class Sources:
    """What the methods are built from: one answerer (base model + decoder), P2P's hypernet, the shared
    control's (if trained), the task registry, the training examples and reference answers."""

    answerer: Answerer
    personalizer: Personalizer
    shared: Personalizer | None
    retrieval: Personalizer | None  # the retrieval control: one adapter trained with the profile in the prompt
    tasks: dict[str, Task]
    train: list[dict]
    reference: dict[str, tuple]  # example id -> (rule key, rule answer)
    oppu: OPPUConfig
    seed: int


def build_methods(names: tuple[str, ...], src: Sources) -> tuple[dict[str, Method], list[str]]:
    """The named methods, in order, and notes on what could not be built as asked."""
    out: dict[str, Method] = {}
    notes: list[str] = []
    for name in names:
        if name == "base":
            out[name] = Base(name, src.answerer)
        elif name == "prompt":
            out[name] = ProfileInPrompt(name, src.answerer, ProfileConfig(**src.personalizer.hypernet.config.profile))
        elif name == "rule":
            out[name] = Rule(name, src.tasks, src.train, src.reference)
        elif name == "shared":
            if src.shared is None:
                notes.append("shared: no shared control in the run (train it with `p2p train --with-shared`)")
                continue
            out[name] = Shared(name, src.answerer, src.shared)
        elif name == "retrieval":
            if src.retrieval is None:
                notes.append("retrieval: no retrieval control in the run (train it with `p2p train --with-retrieval`)")
                continue
            out[name] = ProfileInPrompt(name, src.answerer, ProfileConfig(**src.retrieval.hypernet.config.profile),
                                        src.retrieval.shared_adapter())
        elif name == "shuffled":
            out[name] = P2P(name, src.answerer, src.personalizer, shuffle_seed=src.seed)
        elif name == "p2p":
            out[name] = P2P(name, src.answerer, src.personalizer)
        elif name == "oppu":
            if src.shared is None:
                notes.append("oppu: no shared control, so each user's LoRA starts from PEFT's init")
            start = src.shared.shared_adapter() if src.shared else None
            out[name] = OPPU(name, src.answerer, src.tasks, start, src.oppu)
        else:
            raise ValueError(f"unknown method {name!r}")
    return out, notes
