"""One progress bar per long step, readable on a terminal and in a job's log.

tqdm's own answer off a terminal (`disable=None`) is silence, so `ray job logs` of an evaluation or a
generation showed nothing for the tens of minutes its longest step takes. Off a terminal this bar
prints a plain line instead, at most every `line_every_s` seconds and once at the end, which reads
well in a log file; on a terminal it is tqdm.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class ProgressBar:
    def __init__(self, total: int | None, desc: str, unit: str, line_every_s: float = 30.0, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.total, self.desc, self.unit, self.line_every_s = total, desc, unit, line_every_s
        self.n = 0
        self.start = self.last_line = time.monotonic()
        self.bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, disable=not self.tty)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)
        self.n += n
        now = time.monotonic()
        if not self.tty and now - self.last_line >= self.line_every_s:
            self.last_line = now
            self._line(now)

    def close(self, state: str = "done") -> None:
        self.bar.close()
        if not self.tty and self.n:
            self._line(time.monotonic(), state)

    def _line(self, now: float, state: str = "running") -> None:
        of = f"/{self.total}" if self.total is not None else ""
        rate = self.n / max(now - self.start, 1e-9)
        print(f"{self.desc}: {self.n}{of} {self.unit}s, {now - self.start:.0f} s, {rate:.2f} {self.unit}/s ({state})",
              file=self.stream, flush=True)

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("stopped" if exc_type is not None else "done")  # an error's line follows: not "done"
