"""How a test compares floats that two code paths computed: one rule, stated once.

Two float32 computations of the same function through different kernels (a batched LoRA and
peft's per-user module, a cached prefix and the full forward, a reloaded adapter) agree only
up to rounding, and how much depends on the CPU, its vector unit and the thread count: which
kernels run and how they block their sums. So no test compares such floats with `==`: it
allows a relative error of `REL_PER_STEP` of the largest expected magnitude per step of depth
(a layer of the model, a block of the hypernet, an optimizer step of a training run).

Why 1e-4 (about 840 float32 epsilons) a step: the tiny random Llama's residual stream reaches
~200 before its final norm, and one ulp there, through sharp attention, moves the normalised
logits by up to ~8e-5 relative (measured: 3.0e-4 on logits of 3.5 after 4 layers, on an AMD
EPYC with 2 threads; 0 with 1 thread). Why that is still tight: the bugs these tests exist for
move logits by 2 or more (a wrong scale, a dropped layer's adapter, one row given another
user's adapter), a thousand times the tolerance. `test_lora.py::
test_the_tolerance_rejects_the_bugs_it_guards_against` breaks each on purpose and checks that
this rule fails it.

Positions that are padding carry no defined value (nothing reads them), so comparisons of
logits take a mask of the real tokens.

`make test` runs every test marked `numerics` again under other kernel configurations
(`OMP_NUM_THREADS=1`, `ATEN_CPU_CAPABILITY=default`), so a tolerance that holds on one CPU only
fails on every machine.
"""

from __future__ import annotations

import torch

REL_PER_STEP = 1e-4
TINY_DEPTH = 4  # layers of the tiny random Llama
HYPERNET_DEPTH = 6  # user projection, first trunk layer, two residual blocks, output layer, head


def tolerance(expected: torch.Tensor, depth: int) -> float:
    """Absolute tolerance for values of `expected`'s magnitude after `depth` steps of float32 work."""
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    return REL_PER_STEP * depth * scale


def assert_same_function(actual: torch.Tensor, expected: torch.Tensor, depth: int,
                         mask: torch.Tensor | None = None, what: str = "") -> None:
    """`actual` and `expected` are one function computed by two code paths (up to float32 rounding).

    `mask` (bool, broadcast over the last dim) keeps the positions that carry values: real tokens.
    """
    actual, expected = actual.detach().float(), expected.detach().float()
    if mask is not None:
        actual, expected = actual[mask.bool()], expected[mask.bool()]
    tol = tolerance(expected, depth)
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=tol,
                               msg=lambda m: f"{what}: differs by more than float32 rounding allows "
                                             f"(atol {tol:.2e} at depth {depth}); {m}")


def assert_same_losses(actual: list[float], expected: list[float], steps: int | None = None, what: str = "") -> None:
    """Two training runs that must be the same run: equal losses up to rounding accumulated over steps."""
    assert len(actual) == len(expected), f"{what}: {len(actual)} losses vs {len(expected)}"
    steps = steps or len(expected)
    assert_same_function(torch.tensor(actual, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                         depth=steps, what=what or "losses")
