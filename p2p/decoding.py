"""Batched decoding where every row has its own adapter, prompt length, token budget and temperature.

`model.generate` takes one temperature and one stopping rule per call; a serving batch mixes
users and requests, so this is a plain KV-cache loop: left-padded prefill, then one token per
step for the rows still running. Rows without an adapter get a zero adapter, which adds exactly
0.0: their tokens are the base model's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from p2p.lora import UserAdapter

if TYPE_CHECKING:
    from p2p.adapted_model import AdaptedModel


@dataclass
class Decoded:
    tokens: list[list[int]]  # generated ids per row (without the prompt, without EOS)
    finish_reasons: list[str]  # "stop" (EOS) or "length" (max_tokens)
    forward_passes: int


@torch.no_grad()
def decode(adapted: AdaptedModel, prompts: list[list[int]], max_tokens: list[int], temperatures: list[float],
           adapters: list[UserAdapter | None] | None = None, seed: int = 0) -> Decoded:
    """Generate for each row of a mixed batch; `adapters[i]` None means the base model for row i."""
    model = adapted.model
    n = len(prompts)
    width = max(len(p) for p in prompts)
    device = adapted.device
    ids = torch.full((n, width), adapted.pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((n, width), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, device=device)
        mask[i, width - len(p):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    generator = torch.Generator().manual_seed(seed)
    eos_id = adapted.eos_id

    out: list[list[int]] = [[] for _ in range(n)]
    done = [m <= 0 for m in max_tokens]
    reasons = ["length"] * n
    passes = 0
    with adapted.applied(adapted.stack(adapters)):
        logits, cache = _forward(model, ids, mask, positions, None)
        passes += 1
        while not all(done):
            step = _sample(logits[:, -1], temperatures, generator)
            for i in range(n):
                if done[i]:
                    continue
                token = int(step[i])
                if eos_id is not None and token == eos_id:
                    done[i], reasons[i] = True, "stop"
                    continue
                out[i].append(token)
                if len(out[i]) >= max_tokens[i]:
                    done[i] = True
            if all(done):
                break
            mask = torch.cat([mask, torch.ones((n, 1), dtype=torch.long, device=device)], dim=1)
            positions = positions[:, -1:] + 1
            logits, cache = _forward(model, step.view(n, 1), mask, positions, cache)
            passes += 1
    return Decoded(out, reasons, passes)


def _forward(model, ids, mask, positions, cache):
    # Only the last position's logits are needed: projecting every prompt position onto the
    # vocabulary would cost ~20% of a SmolLM2 prefill for nothing.
    result = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
                   logits_to_keep=1)
    return result.logits, result.past_key_values


def _sample(logits: torch.Tensor, temperatures: list[float], generator: torch.Generator) -> torch.Tensor:
    """Greedy for rows with temperature 0, softmax sampling at their temperature for the others."""
    greedy = logits.argmax(-1)
    if all(t <= 0 for t in temperatures):
        return greedy
    temps = torch.tensor([max(t, 1e-6) for t in temperatures], dtype=logits.dtype, device=logits.device).unsqueeze(1)
    sampled = torch.multinomial(torch.softmax(logits.float().cpu() / temps.cpu(), dim=-1), 1, generator=generator).squeeze(1).to(logits.device)
    return torch.where(torch.tensor([t <= 0 for t in temperatures], device=logits.device), greedy, sampled)
