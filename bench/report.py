"""Benchmarks print a Markdown table and write the same figures as JSON (bench/results/)."""

from __future__ import annotations

import json
import os
import platform
import time

import torch


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
    }


def timed(fn, repeat: int = 3, warmup: int = 1) -> float:
    """Best-of-`repeat` seconds for one call (after `warmup` calls)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def write(name: str, rows: list[dict], summary: dict, out_dir: str = "bench/results") -> None:
    os.makedirs(out_dir, exist_ok=True)
    payload = {"benchmark": name, "machine": machine(), "summary": summary, "rows": rows}
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(payload, f, indent=2)
    cols = list(rows[0]) if rows else []
    lines = [f"### {name}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    lines += ["", *(f"- {k}: {_fmt(v)}" for k, v in summary.items())]
    md = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(md)
    print(md)
    print(json.dumps(payload["summary"]))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)
