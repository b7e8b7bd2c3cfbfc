"""The continuous-batching scheduler: a request queue, rows of one static batch, and the decode loop.

Requests wait in a FIFO queue. Whenever a row of the batch is free, the next request is prefilled into it
(its own cache slots; the other rows keep their state) and its sampling parameters are written into the row's
device tensors; then every busy row decodes together, `sync_every` steps at a time, and the host reads the
chunk's tokens in one copy (never a sync per step). A chunk is cut short so no row runs past its token budget,
so only rows that stop early (an end token, a stop string) run a few wasted steps. A row is freed as soon as
its request ends, is cancelled (a client that went away) or fails, and the next waiting request takes it.

Two ways to drive it: `run_until_idle()` in the caller's thread until every submitted request is done (what
`Engine.generate_many` does), or `start()` a loop thread that serves requests submitted from other threads
(`ghostvis serve`), with `on_text` / `on_finish` / `on_error` called from that thread.

Timing per request (Completion.ttft_s / latency_s) starts when the request enters a row; queued_s is the wait
before that.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ghostvis_core.log import get_logger
from ghostvis_core.sampling import SamplingParams, batch_mode, sampling_mode
from ghostvis_core.text_stream import TextStream

Prompt = Sequence[int] | torch.Tensor
"""Token ids, or prompt embeddings (1, T, C) in the model's dtype (a VLM prompt with image features in it)."""


@dataclass(frozen=True)
class LazyPrompt:
    """A prompt made when its request gets a row, in the scheduler's thread: make() returns ids or embeddings
    of `length` tokens (known up front: a VLM prompt's expanded ids, before its image goes through the tower).
    A batch of image prompts then never holds every image's features at once."""

    make: Callable[[], Prompt]
    length: int


@dataclass
class Completion:
    """One finished request."""

    index: int
    """The request's index (for generate_many, the position of its prompt in the list)."""
    prompt_tokens: int
    token_ids: list[int]
    text: str | None
    """Decoded reply (None when the engine has no tokenizer, e.g. a benchmark on random weights)."""
    finish_reason: str
    """"stop" (end token or stop string), "length" (max_tokens or the context) or "cancelled"."""
    ttft_s: float
    latency_s: float
    queued_s: float = 0.0
    """Time between submit and entering a row."""


@dataclass(eq=False)
class Request:
    """One prompt to complete. prompt: ids, embeddings (1, T, C), or a function making the embeddings (run in
    the scheduler's thread, so e.g. a vision tower runs on the device beside the decode loop, never in
    parallel with it). max_tokens: its budget, already capped to what the context leaves."""

    prompt: Prompt | Callable[[], torch.Tensor]
    prompt_len: int
    max_tokens: int
    sampling: SamplingParams
    index: int = 0
    on_text: Callable[[str], None] | None = None
    """New reply text as it becomes safe to show (needs a tokenizer)."""
    on_tokens: Callable[[list[int]], None] | None = None
    """New reply tokens as the host reads them."""
    on_finish: Callable[[Completion], None] | None = None
    on_error: Callable[[BaseException], None] | None = None
    """Called when the request fails (prefill or decode raised); without it the error propagates."""
    t_submit: float = 0.0
    cancelled: bool = False

    def cancel(self) -> None:
        """Stop this request at the next chunk boundary (or before it starts); safe from any thread."""
        self.cancelled = True


@dataclass
class _Row:
    request: Request
    t_admit: float
    stream: TextStream | None
    mode: str
    tokens: list[int] = field(default_factory=list)
    t_first: float | None = None
    finish_reason: str | None = None


class Scheduler:
    """Continuous batching of submitted requests over `batch_size` rows of `cache_len` slots (see the module
    docstring). engine: a batch_engine.Engine (prefill, sample, the decode step and its static state)."""

    def __init__(self, engine, batch_size: int, cache_len: int, sync_every: int = 16):
        self.engine = engine
        self.batch_size = batch_size
        self.cache_len = cache_len
        self.sync_every = max(1, sync_every)
        self._queue: deque[Request] = deque()
        self._rows: list[_Row | None] = [None] * batch_size
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._batch = None
        # Counters for /metrics (read without the lock: each is one int, and a slightly stale read is fine).
        self.num_finished = 0
        self.num_cancelled = 0
        self.num_failed = 0
        self.generated_tokens = 0
        self.decode_steps = 0
        self.row_steps = 0
        """Sum over decode steps of the rows busy in it: occupancy = row_steps / (decode_steps * batch_size)."""
        # Where the loop thread's time goes, per decode chunk (timing()): queueing the chunk's steps on the device,
        # waiting at its one host read, and the host work on its tokens; plus admissions (prefills, first tokens).
        self.chunks = 0
        self.launch_s = self.device_wait_s = self.host_s = self.admit_s = 0.0

    # -- submitting -----------------------------------------------------------------------------------------

    def submit(self, request: Request) -> Request:
        """Queue a request (any thread); returns it (call .cancel() on it to stop it)."""
        request.t_submit = request.t_submit or time.perf_counter()
        with self._wake:
            self._queue.append(request)
            self._wake.notify()
        return request

    def timing(self) -> dict:
        """Mean ms per decode chunk the loop thread spent queueing its steps (launch; when this is near the
        device's time per chunk, the device waits on the host: a slow launch, or a thread holding the GIL),
        waiting at its host read (device_wait: the device still working), and on its tokens (host); admission
        ms in all. On CUDA the steps run asynchronously, so launch + device_wait is the chunk's wall time."""
        n = max(self.chunks, 1)
        return {"chunks": self.chunks, "steps_per_chunk": self.decode_steps / n,
                "launch_ms_per_chunk": 1e3 * self.launch_s / n, "device_wait_ms_per_chunk": 1e3 * self.device_wait_s / n,
                "host_ms_per_chunk": 1e3 * self.host_s / n, "admit_ms_total": 1e3 * self.admit_s}  # fmt: skip

    @staticmethod
    def format_timing(t: dict) -> str:
        """One line of a timing() dict."""
        return (f"loop per decode chunk of {t['steps_per_chunk']:.1f} steps: queueing {t['launch_ms_per_chunk']:.2f} ms, "
                f"device wait {t['device_wait_ms_per_chunk']:.2f} ms, host {t['host_ms_per_chunk']:.2f} ms "
                f"({t['chunks']} chunks; admissions {t['admit_ms_total']:,.0f} ms in all)")

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def active_rows(self) -> int:
        return sum(r is not None for r in self._rows)

    # -- driving --------------------------------------------------------------------------------------------

    def run_until_idle(self) -> None:
        """Run in this thread until the queue is empty and every row is free."""
        with torch.no_grad():
            while self._queue or self.active_rows:
                self._iteration()

    def start(self) -> None:
        """Serve submitted requests from a loop thread until stop()."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._serve, name="ghostvis-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the loop thread (requests still running are cancelled)."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _serve(self) -> None:
        with torch.no_grad():
            while True:
                with self._wake:
                    while not self._stopping and not self._queue and not self.active_rows:
                        self._wake.wait()
                    if self._stopping:
                        break
                self._iteration()
            for b, r in enumerate(self._rows):
                if r is not None:
                    r.finish_reason = "cancelled"
                    self._finish(b)

    # -- one iteration: admit, decode one chunk, hand out tokens --------------------------------------------

    def _iteration(self) -> None:
        if self._batch is None:
            self._batch = self.engine.batch(self.batch_size, self.cache_len)
        for b, r in enumerate(self._rows):
            if r is not None and r.request.cancelled:
                r.finish_reason = "cancelled"
                self._finish(b)
        if any(q.cancelled for q in self._queue):
            with self._wake:
                gone = [q for q in self._queue if q.cancelled]
                self._queue = deque(q for q in self._queue if not q.cancelled)
            for q in gone:
                self._drop(q)
        free = [b for b, r in enumerate(self._rows) if r is None]
        t_admit = time.perf_counter()
        while free and self._queue:  # a request can end at its first token: admit again until full
            self._admit([(b, self._queue.popleft()) for b in free[: len(self._queue)]])
            free = [b for b, r in enumerate(self._rows) if r is None]
        self.admit_s += time.perf_counter() - t_admit
        busy = [(b, r) for b, r in enumerate(self._rows) if r is not None]
        if not busy:
            return
        n_steps = max(1, min(self.sync_every, min(r.request.max_tokens - len(r.tokens) for _, r in busy)))
        batch = self._batch
        try:
            step = self.engine.step_fn(batch, batch_mode(r.mode for _, r in busy))
            hist = torch.empty(self.batch_size, n_steps, dtype=torch.long, device=batch.tokens.device)
            t0 = time.perf_counter()
            for s in range(n_steps):
                step()
                hist[:, s].copy_(batch.tokens)
            t1 = time.perf_counter()
            host = hist.tolist()  # the one host sync of the chunk
            t2 = time.perf_counter()
        except Exception as exc:  # a failed step leaves every busy row's state unknown: fail them all
            for b, _ in busy:
                self._fail(b, exc)
            return
        self.decode_steps += n_steps
        self.row_steps += n_steps * len(busy)
        for b, _ in busy:
            if self._rows[b] is not None:
                self._accept(b, host[b])
        self.chunks += 1
        self.launch_s += t1 - t0
        self.device_wait_s += t2 - t1
        self.host_s += time.perf_counter() - t2

    def _drop(self, request: Request) -> None:
        """A request cancelled before it got a row."""
        self.num_cancelled += 1
        if request.on_finish:
            queued = time.perf_counter() - request.t_submit
            request.on_finish(Completion(request.index, request.prompt_len, [], "" if self._text() else None,
                                         "cancelled", 0.0, 0.0, queued))  # fmt: skip

    def _admit(self, admitted: list[tuple[int, Request]]) -> None:
        """Prefill requests into free rows, together (Engine.prefill_admitted), and take their first tokens."""
        engine, batch = self.engine, self._batch
        for _, req in admitted:
            if req.cancelled:
                self._drop(req)  # its row stays free for the next one
        admitted = [(b, req) for b, req in admitted if not req.cancelled]
        if not admitted:
            return
        now = time.perf_counter()
        for b, req in admitted:
            stream = TextStream(engine.tokenizer, req.sampling.stop) if self._text() else None
            self._rows[b] = _Row(req, now, stream, sampling_mode(req.sampling))
        try:
            vocab = engine.model.config.vocab_size
            for b, req in admitted:
                batch.sampling.set_row(b, req.sampling, vocab)
            # An embedding factory (a VLM prompt) runs here, in this thread, on the model's device.
            prompts = [(b, req.prompt() if callable(req.prompt) else req.prompt) for b, req in admitted]
            logits = engine.prefill_admitted(batch, prompts)
            idx = torch.tensor([b for b, _ in admitted], device=batch.tokens.device)
            first = engine.sample(logits, batch.sampling.rows(idx), batch.cache.cache_seqlens[idx],
                                  batch_mode(self._rows[b].mode for b, _ in admitted))  # fmt: skip
            batch.tokens[idx] = first
            tokens = first.tolist()  # one host read per admission
        except Exception as exc:  # a failed prefill leaves these rows' caches unknown: fail their requests
            for b, _ in admitted:
                self._fail(b, exc)
            return
        for (b, _), token in zip(admitted, tokens, strict=True):
            self._accept(b, [token])

    def _text(self) -> bool:
        return self.engine.tokenizer is not None

    def _accept(self, b: int, new: list[int]) -> None:
        """Host side of a row's new tokens: stop tokens, stop strings, budget, streaming."""
        r = self._rows[b]
        req = r.request
        if r.t_first is None:
            r.t_first = time.perf_counter()
        taken, deltas = [], []
        for tok in new:
            if tok in self.engine.stop_token_ids and not req.sampling.ignore_eos:
                r.finish_reason = "stop"
                break
            r.tokens.append(tok)
            taken.append(tok)
            if r.stream is not None:
                deltas.append(r.stream.push([tok]))
                if r.stream.stopped:
                    r.finish_reason = "stop"
                    break
            if len(r.tokens) >= req.max_tokens:
                r.finish_reason = "length"
                break
        # One on_text per chunk, not per token: a server hands each call to its event loop from this thread
        # (a wake-up each), and 256 streams x 16 tokens per chunk were thousands of them.
        text = "".join(deltas)
        if text and req.on_text:
            req.on_text(text)
        self.generated_tokens += len(taken)
        if taken and req.on_tokens:
            req.on_tokens(taken)
        if r.finish_reason is not None:
            self._finish(b)

    def _finish(self, b: int) -> None:
        r = self._rows[b]
        self._rows[b] = None
        req = r.request
        now = time.perf_counter()
        text = None
        if r.stream is not None:
            tail = r.stream.finish() if r.finish_reason != "cancelled" else ""
            if tail and req.on_text:
                req.on_text(tail)
            text = r.stream.text if r.finish_reason != "cancelled" else r.stream.emitted
        if r.finish_reason == "cancelled":
            self.num_cancelled += 1
        else:
            self.num_finished += 1
        t_first = r.t_first if r.t_first is not None else now
        c = Completion(req.index, req.prompt_len, r.tokens, text, r.finish_reason, t_first - r.t_admit,
                       now - r.t_admit, r.t_admit - req.t_submit)  # fmt: skip
        if req.on_finish:
            req.on_finish(c)

    def _fail(self, b: int, exc: BaseException) -> None:
        r = self._rows[b]
        self._rows[b] = None
        self.num_failed += 1
        if r.request.on_error is None:
            raise exc
        get_logger().error(f"request {r.request.index} failed: {type(exc).__name__}: {exc}", exc_info=exc)
        r.request.on_error(exc)
