"""The replica's generation engine: one decode loop on its own thread, fed by a queue of requests.

Continuous (iteration-level) batching, as vLLM, LoRAX and S-LoRA do it: at every step the
loop admits waiting sequences (prefilled together, then merged into the running batch) and
finished sequences leave, so a request that arrives while others decode joins them at the
next step instead of waiting for the longest of them to finish. Each sequence keeps its own
adapter, token budget, stop strings and sampler, and hands its text to its caller as it is
made (`stream`), through the caller's event loop.

`batching="static"` keeps the old policy for comparison (bench/serve.py): gather requests
for `batch_wait_s`, run them until the last one finishes, only then admit more.

The loop runs on a plain thread, never on an event loop: a forward pass holds the GIL-free
torch kernels for tens of milliseconds, and an HTTP server must keep answering meanwhile.

Health: the queue is bounded (`EngineBusy` beyond `max_waiting`: the server answers 429), a loop
that died (any error outside one step's or one join's own handling) fails every sequence and
refuses new ones (`EngineDead`), and `check()` also fails when one step has run longer than
`stuck_s`, so the replica's health check can have it replaced.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from p2p.generation.decoding import DecodeBatch
from p2p.generation.label_choice import LabelChooser
from p2p.generation.sampling import RowSampler, SamplingParams, TokenChoice
from p2p.generation.text_stream import TextStream
from p2p.model.adapted import AdaptedModel
from p2p.model.lora import UserAdapter

log = logging.getLogger(__name__)
BATCHING = ("continuous", "static")


class EngineClosed(RuntimeError):
    """The engine was shut down; no new sequences are taken."""


class EngineDead(EngineClosed):
    """The decode loop died or is stuck: this engine answers nothing more (the replica is to be replaced)."""


class EngineBusy(RuntimeError):
    """`max_waiting` sequences already wait: come back later."""


@dataclass
class Delta:
    """What one sequence produced in one step: a token (or none) and the text now safe to send."""

    text: str = ""
    token: int | None = None
    choice: TokenChoice | None = None  # the token's logprobs, when the sequence asked for them
    finish_reason: str | None = None  # "stop" (EOS or a stop string), "length", "error"
    batch_rows: int = 0  # rows in the step that made this token
    error: str | None = None


@dataclass
class Job:
    """One sequence to generate."""

    prompt: list[int]
    adapter: UserAdapter | None
    params: SamplingParams
    labels: tuple[str, ...] | None = None  # constrained: the answer is the likeliest of these, scored whole


@dataclass(eq=False)
class Sequence:
    """A job inside the engine: a `DecodeBatch` row that reports each token through `emit`."""

    prompt: list[int]
    adapter: UserAdapter | None
    sampler: RowSampler
    text: TextStream
    emit: Callable[[Delta], None]
    eos_id: int | None
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    cancelled: bool = False
    max_rows: int = 0  # the largest step this sequence was part of
    labels: tuple[str, ...] | None = None  # constrained: answered whole by `Engine._choose`, never decoded

    def accept(self, choice: TokenChoice, batch_rows: int) -> bool:
        self.max_rows = max(self.max_rows, batch_rows)
        if self.eos_id is not None and choice.token == self.eos_id:
            return self._finish(Delta(self.text.finish(), finish_reason="stop", batch_rows=batch_rows))
        self.tokens.append(choice.token)
        self.sampler.observe(choice.token)
        piece = self.text.push(choice.token)
        reason = None
        if self.text.stopped:
            reason = "stop"
        elif len(self.tokens) >= self.sampler.params.max_tokens:
            reason, piece = "length", piece + self.text.finish()
        delta = Delta(piece, choice.token, choice if choice.logprob is not None else None, reason, batch_rows)
        if reason is not None:
            return self._finish(delta)
        self._send(delta)
        return self.cancelled

    def fail(self, message: str) -> None:
        self._finish(Delta(finish_reason="error", error=message))

    def _finish(self, delta: Delta) -> bool:
        self.finish_reason = delta.finish_reason
        self._send(delta)
        return True

    def _send(self, delta: Delta) -> None:
        try:
            self.emit(delta)
        except Exception:  # noqa: BLE001 - the caller went away (its event loop closed): stop decoding for it
            self.cancelled = True


class Engine:
    """Decodes every submitted sequence on one background thread; see the module docstring."""

    def __init__(self, adapted: AdaptedModel, max_batch_size: int = 16, batching: str = "continuous",
                 batch_wait_s: float = 0.0, on_step: Callable[[int], None] | None = None,
                 max_waiting: int = 256, stuck_s: float = 300.0):
        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {BATCHING}, got {batching!r}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.adapted, self.tokenizer = adapted, adapted.tokenizer
        self.max_batch_size, self.batching, self.batch_wait_s = max_batch_size, batching, batch_wait_s
        self.max_waiting, self.stuck_s = max_waiting, stuck_s
        self.dead: str | None = None  # why the loop died
        self._working_since: float | None = None  # set while a join or step runs
        self._joining: list[Sequence] = []  # admitted, not yet in the batch
        self.on_step = on_step  # called on the engine thread after each step with its row count
        self.vocab_size = adapted.model.get_input_embeddings().num_embeddings
        self.stats = {"submitted": 0, "steps": 0, "prefills": 0, "tokens": 0, "finished": 0, "cancelled": 0,
                      "failed": 0, "rows_per_step": collections.Counter()}
        self._batch = DecodeBatch(adapted)
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="p2p-engine", daemon=True)
        self._thread.start()

    # --- the caller's side -------------------------------------------------------------------

    def submit(self, job: Job, emit: Callable[[Delta], None]) -> Sequence:
        """Queue one sequence; `emit` is called on the engine thread with each `Delta`. Thread-safe."""
        if not job.prompt:
            raise ValueError("the prompt is empty")
        bad = next((t for t in job.prompt if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        if job.labels is not None and not job.labels:
            raise ValueError("a constrained job needs at least one label")
        seq = Sequence(job.prompt, job.adapter, RowSampler(job.params),
                       TextStream(self.tokenizer, job.params.stop, context=job.prompt), emit, self.adapted.eos_id,
                       labels=job.labels)
        with self._cond:
            if self.dead is not None:
                raise EngineDead(f"the engine's decode loop died: {self.dead}")
            if self._closed:
                raise EngineClosed("the engine is shut down")
            if len(self._waiting) >= self.max_waiting:
                raise EngineBusy(f"{len(self._waiting)} sequences are waiting (the limit is {self.max_waiting})")
            self._waiting.append(seq)
            self.stats["submitted"] += 1
            self._cond.notify_all()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop a sequence at the next step (no-op once it has finished)."""
        if seq.finish_reason is None:
            seq.cancelled = True
            with self._cond:
                self._cond.notify_all()

    async def stream(self, jobs: list[Job]) -> AsyncIterator[tuple[int, Delta]]:
        """Run `jobs` and yield (job index, delta) as tokens come; closing it early cancels the rest.

        Use it under `contextlib.aclosing` so a client that goes away stops its rows at the next step.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, Delta]] = asyncio.Queue()

        def emitter(i: int) -> Callable[[Delta], None]:
            return lambda delta: loop.call_soon_threadsafe(queue.put_nowait, (i, delta))

        seqs: list[Sequence] = []
        try:
            for i, job in enumerate(jobs):
                seqs.append(self.submit(job, emitter(i)))
            running = len(seqs)
            while running:
                i, delta = await queue.get()
                running -= delta.finish_reason is not None
                yield i, delta
        finally:
            for seq in seqs:
                self.cancel(seq)

    def close(self) -> None:
        """Stop the loop; sequences still waiting or running end with an error."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    def check(self) -> None:
        """Raise `EngineDead` if the loop died, its thread is gone, or one step has run past `stuck_s`."""
        if self.dead is not None:
            raise EngineDead(f"the engine's decode loop died: {self.dead}")
        if not self._thread.is_alive() and not self._closed:
            raise EngineDead("the engine's thread is not running")
        started = self._working_since
        if started is not None and time.monotonic() - started > self.stuck_s:
            raise EngineDead(f"one decode step has run for {time.monotonic() - started:.0f} s (stuck_s={self.stuck_s})")

    def snapshot(self) -> dict:
        """The counters, JSON-ready (step sizes as {rows: steps})."""
        with self._cond:
            out = {k: v for k, v in self.stats.items() if k != "rows_per_step"}
            out["rows_per_step"] = {str(k): v for k, v in sorted(self.stats["rows_per_step"].items())}
            out["running"], out["waiting"] = len(self._batch), len(self._waiting)
        return out

    # --- the engine thread -------------------------------------------------------------------

    def _run(self) -> None:
        reason = "the server is shutting down"
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - a dead loop must fail its callers, not leave them waiting
            log.exception("p2p engine: the decode loop died")
            with self._cond:
                self.dead = reason = f"{type(exc).__name__}: {exc}"
        finally:
            self._working_since = None
            with self._cond:
                left = [*self._joining, *self._batch.rows, *self._waiting]
                self._waiting.clear()
            for seq in {id(s): s for s in left}.values():
                seq.fail(reason)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._waiting and not len(self._batch):
                    self._cond.wait()
                if self._closed:
                    return
                self._joining = newcomers = self._admit()
            self._working_since = time.monotonic()
            self._drop_cancelled()
            if any(s.labels for s in newcomers):
                self._choose([s for s in newcomers if s.labels])
                newcomers = [s for s in newcomers if not s.labels]
            if newcomers:
                self._join(newcomers)
            self._joining = []
            if len(self._batch):
                self._step()
            self._working_since = None

    def _admit(self) -> list[Sequence]:
        """Waiting sequences that join now (called with the lock held)."""
        if self.batching == "static":
            if len(self._batch):
                return []  # a static batch runs until its last row finishes
            deadline = time.monotonic() + self.batch_wait_s
            while not self._closed and len(self._waiting) < self.max_batch_size:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
        out = []
        while self._waiting and len(out) < self.max_batch_size - len(self._batch):
            seq = self._waiting.popleft()
            if seq.cancelled:
                self.stats["cancelled"] += 1
            else:
                out.append(seq)
        return out

    def _choose(self, seqs: list[Sequence]) -> None:
        """Answer the constrained sequences at once (one prompt pass and one row per label each), on this
        thread: a forward sets the adapters on the shared model's modules."""
        for seq in seqs:
            if seq.cancelled:
                continue
            try:
                label = LabelChooser(self.adapted, seq.labels).choose(seq.prompt, seq.adapter)
            except Exception as exc:  # noqa: BLE001 - fail this request, keep the loop
                log.exception("p2p engine: scoring %d labels failed", len(seq.labels))
                self._fail([seq], f"label scoring failed: {type(exc).__name__}: {exc}")
                continue
            seq.finish_reason = "stop"
            seq._send(Delta(text=label, finish_reason="stop", batch_rows=1))
            with self._cond:
                self.stats["finished"] += 1

    def _drop_cancelled(self) -> None:
        gone = [r for r in self._batch.rows if r.cancelled]
        if gone:
            self._batch.remove(gone)
            with self._cond:
                self.stats["cancelled"] += len(gone)

    def _join(self, newcomers: list[Sequence]) -> None:
        try:
            self._batch.add(newcomers)
        except Exception as exc:  # noqa: BLE001 - fail these requests, keep the running ones and the loop
            log.exception("p2p engine: prefill of %d sequences failed", len(newcomers))
            self._fail(newcomers, f"prefill failed: {type(exc).__name__}: {exc}")
            return
        with self._cond:
            self.stats["prefills"] += 1

    def _step(self) -> None:
        rows = len(self._batch)
        try:
            finished = self._batch.step()
        except Exception as exc:  # noqa: BLE001 - fail the batch, keep the loop
            log.exception("p2p engine: decode step over %d rows failed", rows)
            failed = [r for r in self._batch.rows if r.finish_reason is None]
            self._batch = DecodeBatch(self.adapted)
            self._fail(failed, f"decode failed: {type(exc).__name__}: {exc}")
            return
        with self._cond:
            self.stats["steps"] += 1
            self.stats["tokens"] += rows
            self.stats["rows_per_step"][rows] += 1
            self.stats["finished"] += sum(1 for r in finished if not r.cancelled)
            self.stats["cancelled"] += sum(1 for r in finished if r.cancelled and r.finish_reason is None)
        if self.on_step is not None:
            self.on_step(rows)

    def _fail(self, seqs: list[Sequence], message: str) -> None:
        for seq in seqs:
            seq.fail(message)
        with self._cond:
            self.stats["failed"] += len(seqs)

