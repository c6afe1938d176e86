"""The methods P2P is compared with, all with one shape: `predict(users, examples) -> answers`.

- `base`: the frozen base model, input only.
- `prompt`: the same profile text P2P embeds, in the prompt (as a system message).
- `oppu`: One-PEFT-Per-User: a LoRA trained with peft on the user's own history items, on the
  same modules, layers, rank and scale as the hypernetwork's adapters.
- `p2p`: the hypernetwork's adapter per user: profile -> embedding -> adapter in one pass.

All answer greedily through the same batched decoder, so their differences are the method's.
Each method also records what personalizing costs: seconds per user, bytes stored per user.
"""

from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from p2p.adapted_model import AdaptedModel
from p2p.encoder import ProfileEncoder
from p2p.generate import adapter_files, generate_user_adapters
from p2p.hypernet import Hypernetwork
from p2p.lora import UserAdapter
from p2p.metrics import task_kind
from p2p.models import chat_prompt
from p2p.profile import ProfileConfig, build_profile

MAX_TOKENS = {"classification": 8, "rating": 4, "generation": 24}


@dataclass
class Cost:
    """What a method spends to personalize and to answer; `users` is how many users it stands on."""

    personalize_seconds_per_user: float = 0.0
    bytes_per_user: int = 0
    seconds_per_answer: float = 0.0
    users: int = 0
    answers: int = 0


class Answerer:
    """Greedy answers of the frozen base model, in batches, each row with its own adapter (or none)."""

    def __init__(self, adapted: AdaptedModel, batch_size: int = 16):
        self.adapted, self.tok, self.batch_size = adapted, adapted.tokenizer, batch_size

    def answer(self, prompts: list[str], max_tokens: list[int], adapters: list[UserAdapter | None] | None = None,
               ) -> list[str]:
        ids = [self.tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a batch
        out: list[str] = [""] * len(ids)
        for s in range(0, len(order), self.batch_size):
            rows = order[s : s + self.batch_size]
            decoded = self.adapted.decode([ids[i] for i in rows], [max_tokens[i] for i in rows],
                                          [adapters[i] for i in rows] if adapters else None)
            for i, toks in zip(rows, decoded.tokens, strict=True):
                out[i] = self.tok.decode(toks, skip_special_tokens=True).strip()
        return out


def _budget(examples: list[dict]) -> list[int]:
    return [MAX_TOKENS[task_kind(e["task"])] for e in examples]


@dataclass
class Method:
    name: str
    answerer: Answerer
    cost: Cost = field(default_factory=Cost)

    def predict(self, users: dict[str, dict], examples: list[dict]) -> list[str]:
        raise NotImplementedError

    def _timed_answers(self, prompts, examples, adapters=None) -> list[str]:
        t = time.perf_counter()
        out = self.answerer.answer(prompts, _budget(examples), adapters)
        self.cost.seconds_per_answer = (time.perf_counter() - t) / max(len(examples), 1)
        self.cost.answers = len(examples)
        return out


class Base(Method):
    def predict(self, users, examples):
        tok = self.answerer.tok
        return self._timed_answers([chat_prompt(tok, e["input"]) for e in examples], examples)


class ProfileInPrompt(Method):
    def __init__(self, name, answerer, profile: ProfileConfig):
        super().__init__(name, answerer)
        self.profile = profile

    def predict(self, users, examples):
        t = time.perf_counter()
        texts = {u: build_profile(users[u]["history"], self.profile) for u in {e["user_id"] for e in examples}}
        self.cost.personalize_seconds_per_user = (time.perf_counter() - t) / max(len(texts), 1)
        self.cost.users = len(texts)
        self.cost.bytes_per_user = int(np.mean([len(t.encode()) for t in texts.values()])) if texts else 0
        tok = self.answerer.tok
        prompts = [chat_prompt(tok, e["input"], system=f"What you know about this user:\n{texts[e['user_id']]}")
                   for e in examples]
        return self._timed_answers(prompts, examples)


class P2P(Method):
    def __init__(self, name, answerer, hypernet: Hypernetwork, hypernet_id: str, encoder: ProfileEncoder):
        super().__init__(name, answerer)
        self.hypernet, self.hypernet_id, self.encoder = hypernet, hypernet_id, encoder

    def personalize(self, histories: list[list[dict]]) -> list[UserAdapter]:
        profile = ProfileConfig(**self.hypernet.config.profile)
        emb = self.encoder.encode([build_profile(h, profile) for h in histories])
        return generate_user_adapters(self.hypernet, emb)

    def predict(self, users, examples):
        ids = sorted({e["user_id"] for e in examples})
        t = time.perf_counter()
        adapters = dict(zip(ids, self.personalize([users[u]["history"] for u in ids]), strict=True))
        batch_seconds = (time.perf_counter() - t) / max(len(ids), 1)
        # One user alone (no batching to amortize): what a brand-new user waits for.
        single = []
        for u in ids[: min(5, len(ids))]:
            t = time.perf_counter()
            self.personalize([users[u]["history"]])
            single.append(time.perf_counter() - t)
        self.cost.personalize_seconds_per_user = float(np.median(single)) if single else batch_seconds
        self.cost.users = len(ids)
        if ids:
            self.cost.bytes_per_user = sum(len(b) for b in adapter_files(self.hypernet, self.hypernet_id,
                                                                         adapters[ids[0]]).values())
        tok = self.answerer.tok
        return self._timed_answers([chat_prompt(tok, e["input"]) for e in examples], examples,
                                   [adapters[e["user_id"]] for e in examples])


_TASK_IN_ID = re.compile(r"-(tag|rate|headline)-")


@dataclass
class OPPUConfig:
    epochs: int = 2
    lr: float = 5e-4
    batch_size: int = 8
    max_items: int = 96  # the user's most recent history items it trains on
    max_seq_len: int = 192
    seed: int = 0


class OPPU(Method):
    """One LoRA per user, trained with peft on that user's history (item text -> the user's label)."""

    def __init__(self, name, answerer, base_model: nn.Module, hypernet: Hypernetwork, instructions: dict[str, str],
                 config: OPPUConfig | None = None):
        super().__init__(name, answerer)
        self.base_model, self.hconfig = base_model, hypernet.config
        self.instructions, self.config = instructions, config or OPPUConfig()
        self.hypernet, self.train_seconds = hypernet, {}

    def training_pairs(self, history: list[dict], default_task: str) -> list[tuple[str, str]]:
        """(prompt, target) per history item; the item's task comes from its id when it names one."""
        pairs = []
        for h in sorted(history, key=lambda h: h["ts"])[-self.config.max_items :]:
            if h.get("label") in (None, ""):
                continue
            m = _TASK_IN_ID.search(h["item_id"])
            task = m.group(1) if m else default_task
            template = self.instructions.get(task, "{text}")
            pairs.append((template.format(text=h["text"]), h["label"]))
        return pairs

    def train_user(self, history: list[dict], default_task: str) -> UserAdapter:
        from peft import LoraConfig, get_peft_model

        from p2p.training import IGNORE, encode_example

        c, oc = self.hconfig, self.config
        torch.manual_seed(oc.seed)
        model = get_peft_model(copy.deepcopy(self.base_model), LoraConfig(
            r=c.rank, lora_alpha=c.scale * c.rank, target_modules=list(c.target_modules),
            layers_to_transform=sorted(c.layers) if len(c.layers) < c.num_layers else None, lora_dropout=0.0))
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=oc.lr)
        tok = self.answerer.tok
        pairs = self.training_pairs(history, default_task)
        rng = np.random.default_rng(oc.seed)
        model.train()
        for _ in range(oc.epochs):
            order = rng.permutation(len(pairs))
            for s in range(0, len(order), oc.batch_size):
                enc = [encode_example(tok, *pairs[i], oc.max_seq_len) for i in order[s : s + oc.batch_size]]
                width = max(len(x) for x, _ in enc)
                ids = torch.full((len(enc), width), tok.pad_token_id or 0)
                labels = torch.full((len(enc), width), IGNORE)
                mask = torch.zeros((len(enc), width), dtype=torch.long)
                for i, (x, lab) in enumerate(enc):
                    ids[i, : len(x)], labels[i, : len(x)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(lab), 1
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                loss.backward()
                opt.step()
                opt.zero_grad()
        adapter: UserAdapter = {}
        for name, module in model.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                path = name.removeprefix("base_model.model.")
                adapter[path] = (module.lora_A["default"].weight.detach().clone(),
                                 module.lora_B["default"].weight.detach().clone())
        return adapter

    def predict(self, users, examples):
        ids = sorted({e["user_id"] for e in examples})
        adapters, seconds = {}, []
        task_of = {e["user_id"]: e["task"] for e in examples}
        for u in ids:
            t = time.perf_counter()
            adapters[u] = self.train_user(users[u]["history"], task_of[u])
            seconds.append(time.perf_counter() - t)
            self.train_seconds[u] = seconds[-1]
        self.cost.personalize_seconds_per_user = float(np.mean(seconds)) if seconds else 0.0
        self.cost.users = len(ids)
        if ids:
            self.cost.bytes_per_user = sum(len(b) for b in adapter_files(self.hypernet, "oppu", adapters[ids[0]]).values())
        tok = self.answerer.tok
        return self._timed_answers([chat_prompt(tok, e["input"]) for e in examples], examples,
                                   [adapters[e["user_id"]] for e in examples])
