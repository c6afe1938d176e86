"""`make demo`: the main job end to end on the embedded defaults.

Today: print `p2p info` and answer one prompt with the embedded base model (SmolLM2-135M).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from p2p.cli import main  # noqa: E402


def step(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def run() -> int:
    step("p2p info")
    if main(["info"]) != 0:
        return 1
    step("base model answers one prompt (SmolLM2-135M, greedy)")
    prompt = "What is the capital of France?"
    print(f"prompt: {prompt}")
    return main(["complete", "--prompt", prompt, "--max-tokens", "24"])


if __name__ == "__main__":
    sys.exit(run())
