"""The batched decode engine: per-row KV cache, continuous batching, CUDA-graph decode, streaming.

A call of `Engine.generate_many` keeps `batch_size` rows busy through the scheduler (scheduler.py, which
`ghostvis serve` runs too): each row holds one request; when a request finishes, the next prompt is prefilled
into that row's cache slots (the other rows keep their state) and decode continues for all rows together. One
decode step (embed one token per row, every layer against the cache, sample) has the same shapes at every
step, so on CUDA it is captured once per (batch size, cache length, sampling mode) in a `torch.cuda.CUDAGraph`
and replayed: at batch 1 the step is launch-bound in eager mode (about 200 kernels per token for 20 layers),
and a replay issues them with no Python in between. Sampling parameters live in per-row device tensors
(sampling.RowSampling), so requests with different temperatures, top-k/top-p and seeds share one step.

The host reads the sampled tokens every `sync_every` steps (one copy for the whole chunk, never a sync per
step); a chunk is cut short so no row runs past its token budget, so only rows that stop early (EOS, a stop
string) run a few wasted steps.

When the plan is compiled (backends.inference_run_facts: the default on CUDA), the step is torch.compile'd
before capture: inductor fuses each layer's norms, RoPE, residuals and sampling into a few kernels, and at
batch 1 the kernel count (not the weights' bytes) is what bounds a replayed eager step.

Prefill is batched: the requests admitted together (all rows free at the start, or several finishing in one
chunk) are right-padded to one length and prefilled in one forward per group of at most `prefill_tokens`
padded tokens, written straight into their rows (KVCache.rows). A padded row's slots past its prompt hold
garbage that no query ever attends (every row attends only to its own length) and decode overwrites.
Embedding prompts (VLM) are prefilled one by one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

from ghostvis_core.errors import ConfigError
from ghostvis_core.kv_cache import KVCache, check_kv_cache_dtype
from ghostvis_core.log import get_logger
from ghostvis_core.sampling import RowSampling, SamplingParams, sample_rows
from ghostvis_core.scheduler import Completion, LazyPrompt, Prompt, Request, Scheduler

__all__ = ["Completion", "Engine", "LazyPrompt", "Prompt"]


PDL_MAX_BATCH = 1
"""Largest batch whose step is generated with programmatic dependent launch (each kernel's launch overlaps the
tail of the one before; Hopper and later). Graphed d20 step on an H200, off -> on, two calls each: batch 1
0.837 / 0.811 -> 0.784 / 0.774 ms, batch 64 1.503 / 1.519 -> 1.572 / 1.549 ms (docs/BENCHMARKS.md)."""


def decode_inductor_options(batch_size: int) -> dict:
    """How inductor generates the compiled decode step of a batch of `batch_size` rows (the one place).

    coordinate_descent_tuning, gpt-fast's setting: the d20 batch-1 step went from 0.905 to 0.843 ms on an H200
    (same call) for about 14 s more compile per graph, once (inductor caches the tuned configs on disk).
    triton.enable_pdl: PDL_MAX_BATCH. Each batch shape compiles its own graph, so each gets its own setting."""
    return {"coordinate_descent_tuning": True, "triton.enable_pdl": batch_size <= PDL_MAX_BATCH}


class _DecodeGraph:
    """One decode step captured in a CUDA graph (warmed up on a side stream first, as CUDA graphs require)."""

    def __init__(self, step: Callable[[], None]):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # triton autotune, cuBLAS workspaces and lazy inits happen before capture
                step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            step()

    def replay(self) -> None:
        self.graph.replay()


class _Batch:
    """Static device state of one (batch size, cache length): the cache, each row's next token and sampling."""

    def __init__(self, model, batch_size: int, cache_len: int, kv_cache_dtype: str = "auto"):
        self.cache: KVCache = model.new_kv_cache(batch_size, cache_len, kv_cache_dtype=kv_cache_dtype)
        device = self.cache.device
        self.tokens = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.sampling = RowSampling.empty(batch_size, device)
        self.graphs: dict[str, _DecodeGraph] = {}


class Engine:
    """Generates for many prompts at once with one model (see the module docstring).

    stop_token_ids end a request (not part of its reply) unless sampling.ignore_eos. banned_token_ids are never
    generated (a VLM's `<image>` placeholder, which only data places). cuda_graphs: None = on when the model is
    on CUDA (eager on CPU); True on CPU is an error. kv_cache_dtype: auto (the model's dtype) or fp8 (e4m3 with
    per-token scales, kv_cache.py: half the cache bytes per step; refused where no decode kernel reads it).
    """

    def __init__(self, model, tokenizer=None, *, stop_token_ids: Sequence[int] = (), cuda_graphs: bool | None = None,
                 prefill_tokens: int = 8192, banned_token_ids: Sequence[int] = (),
                 inductor_options: dict | None = None, kv_cache_dtype: str = "auto"):  # fmt: skip
        self.model = model
        self.kv_cache_dtype = kv_cache_dtype
        self.inductor_overrides = dict(inductor_options or {})
        """Inductor settings over decode_inductor_options (a benchmark comparing variants sets them)."""
        self.prefill_tokens = prefill_tokens
        self.tokenizer = tokenizer
        self.stop_token_ids = frozenset(stop_token_ids)
        self.device = model.lm_head.weight.device
        on_cuda = self.device.type == "cuda"
        if cuda_graphs and not on_cuda:
            raise ConfigError(f"CUDA-graph decode needs the model on CUDA; it is on {self.device.type}")
        self.cuda_graphs = on_cuda if cuda_graphs is None else cuda_graphs
        self._batches: dict[tuple[int, int], _Batch] = {}
        self.last_timing: dict | None = None
        """Scheduler.timing() of the last generate_many."""
        plan = getattr(model, "plan", None)
        if plan is not None:  # refuse an fp8 cache here, before any prompt is read
            check_kv_cache_dtype(kv_cache_dtype, self.device, plan.attention["decode"].backend)
        self._banned = torch.tensor(sorted(set(banned_token_ids)), dtype=torch.long, device=self.device)
        # The plan decides (backends.inference_run_facts); dynamic=False: one specialisation per batch shape,
        # which is what a captured graph needs anyway; fullgraph: a graph break would split the step per layer
        # (flash-attn's kvcache call is a custom op for that reason, attention._flash_attn_kvcache).
        compiled = plan is not None and plan.compiled
        self._step_impl = self._compiled_step() if compiled else self._decode_step

    def _compiled_step(self) -> Callable[[_Batch, str], None]:
        """The decode step compiled under decode_inductor_options. Every call of the step goes through the
        patch, graphed or not, so each compile of it uses the same kernels, and the custom-op kernels inside it
        (attention._triton_decode_attention) read the same PDL setting."""
        import torch._inductor.config as inductor_config

        step = torch.compile(self._decode_step, dynamic=False, fullgraph=True)
        overrides = self.inductor_overrides

        def tuned(batch: _Batch, mode: str) -> None:
            with inductor_config.patch({**decode_inductor_options(batch.tokens.shape[0]), **overrides}):
                step(batch, mode)

        return tuned

    @property
    def context_len(self) -> int:
        return self.model.config.sequence_len

    # -- one step -------------------------------------------------------------------------------------------

    def sample(self, logits_BV: torch.Tensor, rows: RowSampling, positions_B: torch.Tensor, mode: str):
        """Next token per row (sampling.sample_rows) with the banned tokens masked out."""
        if self._banned.numel():
            logits_BV = logits_BV.index_fill(-1, self._banned, float("-inf"))
        return sample_rows(logits_BV, rows, positions_B, mode)

    def _decode_step(self, batch: _Batch, mode: str) -> None:
        """Feed each row's token, sample its next one into batch.tokens (in place: graph-safe)."""
        cache = batch.cache
        logits = self.model.forward_with_cache(batch.tokens[:, None], cache)[:, -1]
        # cache_seqlens now counts the fed token: it is the position the drawn token will take.
        batch.tokens.copy_(self.sample(logits, batch.sampling, cache.cache_seqlens, mode))
        cache.cache_seqlens.clamp_(max=cache.max_len - 1)  # idle rows step in place (kv_cache.py)

    def step_fn(self, batch: _Batch, mode: str) -> Callable[[], None]:
        """One decode step of `batch` in sampling mode `mode` (a CUDA-graph replay on CUDA)."""
        if not self.cuda_graphs:
            return lambda: self._step_impl(batch, mode)
        if mode not in batch.graphs:
            # Warm-up and capture run real steps: put each row's length and next token back afterwards (the
            # K/V they wrote sit past each row's length, where the row's next step writes before reading).
            saved = batch.tokens.clone(), batch.cache.cache_seqlens.clone()
            batch.graphs[mode] = _DecodeGraph(lambda: self._step_impl(batch, mode))
            batch.tokens.copy_(saved[0])
            batch.cache.cache_seqlens.copy_(saved[1])
        return batch.graphs[mode].replay

    def batch(self, batch_size: int, cache_len: int) -> _Batch:
        """The static state of (batch_size, cache_len), made on first use and kept with its graphs."""
        key = (batch_size, cache_len)
        if key not in self._batches:
            self._batches[key] = _Batch(self.model, batch_size, cache_len, self.kv_cache_dtype)
        return self._batches[key]

    def prefill(self, cache: KVCache, prompt: Prompt) -> torch.Tensor:
        """Fill an empty one-row cache (view) with a prompt; returns the last position's logits (1, V).

        prompt: token ids, or embeddings (1, T, C) (a VLM prompt: image features spliced into the text).
        The row is emptied here, so the view is fresh (KVCache.fresh).
        """
        cache.cache_seqlens.zero_()
        cache = replace(cache, fresh=True)
        if isinstance(prompt, torch.Tensor):
            logits = self.model.forward_with_cache(None, cache, inputs_embeds=prompt, last_only=True)
        else:
            ids = torch.tensor([list(prompt)], dtype=torch.long, device=self.device)
            logits = self.model.forward_with_cache(ids, cache, last_only=True)
        return logits[:, -1]

    def prefill_rows(self, batch: _Batch, rows_idx: list[int], prompts: list[Sequence[int]]) -> torch.Tensor:
        """Prefill token prompts into rows rows_idx of batch at once (right-padded to the longest); sets those
        rows' lengths; returns each prompt's last-position logits (n, V)."""
        lens = [len(p) for p in prompts]
        T = max(lens)
        ids = torch.zeros(len(prompts), T, dtype=torch.long)
        for j, p in enumerate(prompts):
            ids[j, : lens[j]] = torch.as_tensor(list(p), dtype=torch.long)
        idx = torch.tensor(rows_idx, dtype=torch.int32, device=self.device)
        lens_t = torch.tensor(lens, dtype=torch.int32, device=self.device)
        view = batch.cache.rows(idx)
        logits = self.model.forward_with_cache(ids.to(self.device), view, last_index=lens_t - 1)[:, -1]
        batch.cache.cache_seqlens[idx.long()] = lens_t
        return logits

    def prefill_admitted(self, batch: _Batch, admitted: list[tuple[int, Prompt]]) -> torch.Tensor:
        """Prefill every (row, prompt) admitted together; returns their first-token logits (n, V) in order."""
        out: list[torch.Tensor | None] = [None] * len(admitted)
        token_jobs = sorted(
            (j for j, (_, p) in enumerate(admitted) if not isinstance(p, torch.Tensor)),
            key=lambda j: len(admitted[j][1]),
        )
        group: list[int] = []
        for j in token_jobs + [None]:  # groups of similar lengths, at most prefill_tokens padded tokens each
            if group and (j is None or (len(group) + 1) * len(admitted[j][1]) > self.prefill_tokens):
                logits = self.prefill_rows(batch, [admitted[g][0] for g in group], [admitted[g][1] for g in group])
                for g, row_logits in zip(group, logits, strict=True):
                    out[g] = row_logits
                group = []
            if j is not None:
                group.append(j)
        for j, (b, p) in enumerate(admitted):
            if isinstance(p, torch.Tensor):
                out[j] = self.prefill(batch.cache.row(b), p)[0]
        return torch.stack(out)

    # -- the scheduler --------------------------------------------------------------------------------------

    def check_prompt_len(self, n: int, i: int = 0) -> None:
        """ConfigError unless a prompt of n tokens leaves room for one new token in the context."""
        if n == 0:
            raise ConfigError(f"prompt {i} is empty: every prompt needs at least one token")
        if n >= self.context_len:
            raise ConfigError(
                f"prompt {i} is {n} tokens; the model's context is {self.context_len} (room for at least one "
                "new token is needed): shorten it"
            )

    def _budgets(self, lengths: list[int], max_tokens: int, warn_capped: bool = True) -> list[int]:
        """Tokens each request may generate: max_tokens, capped by the context (with one warning unless
        warn_capped is False: a default the user never typed fills what fits without a word)."""
        limit = self.context_len
        for i, n in enumerate(lengths):
            self.check_prompt_len(n, i)
        budgets = [min(max_tokens, limit - n) for n in lengths]
        capped = [i for i, b in enumerate(budgets) if b < max_tokens]
        if capped and warn_capped:
            i = capped[0]
            get_logger().warning(
                f"--max-tokens {max_tokens} does not fit the {limit}-token context for {len(capped)} prompt(s): "
                f"capped (prompt {i}: {lengths[i]} tokens, so at most {budgets[i]} new)"
            )
        return budgets

    def generate_many(
        self,
        prompts: Sequence[Prompt | LazyPrompt],
        sampling: SamplingParams,
        max_tokens: int,
        batch_size: int = 32,
        *,
        on_text: Callable[[int, str], None] | None = None,
        on_finish: Callable[[Completion], None] | None = None,
        sync_every: int = 16,
        cache_len: int | None = None,
        seeds: Sequence[int] | None = None,
        warn_capped: bool = True,
    ) -> list[Completion]:
        """Completions of every prompt, in prompt order (continuous batching over `batch_size` rows). A
        LazyPrompt is made when its request gets a row.

        on_text(index, new_text) streams each reply as it grows (needs a tokenizer); on_finish(completion) is
        called as each request ends (in finishing order). cache_len: slots per row (default: just enough for
        the longest prompt plus its budget; a chat passes the context so one graph serves every turn).
        seeds: one sampling seed per prompt (default sampling.seed + index; a resumed batch passes the seeds
        its prompts had in the whole file). warn_capped: warn when max_tokens does not fit the context (False
        for a default the user did not choose).
        """
        if max_tokens < 1:
            raise ConfigError(f"--max-tokens must be >= 1 (got {max_tokens})")
        if batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1 (got {batch_size})")
        if not prompts:
            return []
        lengths = [p.length if isinstance(p, LazyPrompt) else p.shape[1] if isinstance(p, torch.Tensor) else len(p)
                   for p in prompts]  # fmt: skip
        budgets = self._budgets(lengths, max_tokens, warn_capped)
        need = max(n + b for n, b in zip(lengths, budgets, strict=True))
        cache_len = min(max(cache_len or 0, need), self.context_len)
        B = min(batch_size, len(prompts))
        if seeds is None:
            seeds = [sampling.seed + i for i in range(len(prompts))]
        elif len(seeds) != len(prompts):
            raise ConfigError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        done: list[Completion | None] = [None] * len(prompts)

        def finished(c: Completion) -> None:
            done[c.index] = c
            if on_finish:
                on_finish(c)

        scheduler = Scheduler(self, B, cache_len, sync_every)
        for i, prompt in enumerate(prompts):
            text = None if on_text is None else (lambda delta, i=i: on_text(i, delta))
            made = prompt.make if isinstance(prompt, LazyPrompt) else prompt  # the scheduler calls a factory
            scheduler.submit(Request(made, lengths[i], budgets[i], replace(sampling, seed=seeds[i]), index=i,
                                     on_text=text, on_finish=finished))  # fmt: skip
        scheduler.run_until_idle()
        self.last_timing = scheduler.timing()
        return done
