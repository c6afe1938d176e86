"""Per-row sampling: every row of a decode batch keeps its own settings and its own random generator.

A serving batch mixes requests from many users. If rows shared one generator (or one seed, or
one temperature), a request's tokens would depend on which other requests happened to share
its batch: a seeded request would not be reproducible under load. Here each row owns a
`torch.Generator` seeded from its request, so its samples are a function of its own logits
and seed only.

Order of operations for one row (OpenAI's documented semantics): presence / frequency
penalties on the tokens this row generated so far, then greedy (temperature 0) or softmax at
the row's temperature restricted to its top-p nucleus. Reported logprobs are those of the
model's raw distribution (before penalties and temperature), as vLLM reports them.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field

import torch

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts
MAX_LOGPROBS = 20
GREEDY_BELOW = 1e-5  # temperatures this small are greedy: logits / 1e-300 overflows to inf


@dataclass(frozen=True)
class SamplingParams:
    """What one generated sequence asks for. Validated here so no engine row can hold a bad value."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh random seed
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: no logprobs; k: the sampled token's and the top k alternatives'

    def __post_init__(self):
        problems = []
        if self.max_tokens < 1:
            problems.append(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0.0):
            problems.append(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (math.isfinite(value) and -2.0 <= value <= 2.0):
                problems.append(f"{name} must be in [-2, 2], got {value}")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            problems.append(f"seed must be in [{SEED_MIN}, {SEED_MAX}]")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            problems.append(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if any(not s for s in self.stop):
            problems.append("stop strings must be non-empty")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass
class TokenChoice:
    """One sampled token, with its logprob and the top alternatives when the row asked for them."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


@dataclass
class RowSampler:
    """One row's sampling state: its settings, its generator, the counts its penalties need."""

    params: SamplingParams
    generator: torch.Generator = field(init=False)
    counts: dict[int, int] = field(default_factory=dict)

    def __post_init__(self):
        seed = self.params.seed if self.params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator().manual_seed(seed)

    def observe(self, token: int) -> None:
        self.counts[token] = self.counts.get(token, 0) + 1


@torch.no_grad()
def choose(logits: torch.Tensor, samplers: list[RowSampler]) -> list[TokenChoice]:
    """The next token of every row of `logits` [rows, vocab], each by its own sampler."""
    raw = logits.float()
    adjusted = raw
    if any(s.params.penalized and s.counts for s in samplers):
        adjusted = raw.clone()
        for i, s in enumerate(samplers):
            if s.params.penalized and s.counts:
                ids = torch.tensor(list(s.counts), device=raw.device)
                counts = torch.tensor(list(s.counts.values()), dtype=raw.dtype, device=raw.device)
                adjusted[i, ids] -= counts * s.params.frequency_penalty + s.params.presence_penalty
    greedy = adjusted.argmax(-1).tolist()
    choices = []
    for i, s in enumerate(samplers):
        token = greedy[i] if s.params.temperature < GREEDY_BELOW else _sample(adjusted[i], s)
        choices.append(_with_logprobs(raw[i], token, s.params.logprobs))
    return choices


def _sample(logits: torch.Tensor, sampler: RowSampler) -> int:
    probs = torch.softmax(logits.cpu() / sampler.params.temperature, dim=-1)
    if sampler.params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= sampler.params.top_p
        outside[0] = False  # the likeliest token always stays: a top_p below float32's range (5e-324) is greedy
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs.masked_fill(outside, 0.0))
    return int(torch.multinomial(probs, 1, generator=sampler.generator))


def _with_logprobs(raw: torch.Tensor, token: int, k: int | None) -> TokenChoice:
    if k is None:
        return TokenChoice(token)
    logprobs = torch.log_softmax(raw, dim=-1)
    top = []
    if k > 0:
        values, ids = logprobs.topk(k)
        top = list(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenChoice(token, float(logprobs[token]), top)
