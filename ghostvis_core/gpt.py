"""GPT: a Llama-compatible decoder (pre-norm RMSNorm, SwiGLU, RoPE rotate-half, GQA, no biases).

Parameter names mirror Hugging Face's LlamaForCausalLM exactly (`model.embed_tokens`,
`model.layers.N.self_attn.{q,k,v,o}_proj`, `model.layers.N.mlp.{gate,up,down}_proj`,
`model.layers.N.{input_layernorm,post_attention_layernorm}`, `model.norm`, `lm_head`), so export to HF is
the identity on keys (minus `lm_head.weight` when tied).

Shape legend: B batch, T tokens, C = n_embd, H query heads, K kv heads, D head dim, V vocab, N = B*T, L layers.

Backends come from the `BackendPlan` passed in (backends.py, the one place that decides, builds it once per
run): attention per case through `attention.py`, RMSNorm and SwiGLU through `ghostvis_core.kernels` with the
plan's concrete backend.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from ghostvis_core.attention import (
    AttentionContext,
    attention,
    attention_with_kvcache,
    build_attention_context,
)
from ghostvis_core.backends import BackendPlan
from ghostvis_core.config import GPTConfig
from ghostvis_core.decode_layers import fused_decode_logits, runs_fused
from ghostvis_core.errors import ConfigError
from ghostvis_core.fp8 import lm_head_in_fp8
from ghostvis_core.kernels.dispatch import rms_norm_fn, swiglu_fn
from ghostvis_core.kv_cache import KVCache, check_kv_cache_dtype, fp8_cache_backends
from ghostvis_core.linear_cross_entropy import linear_cross_entropy
from ghostvis_core.sampling import filter_logits

__all__ = ["GPT", "GPTConfig", "KVCache", "linear_cross_entropy"]


# ---------------------------------------------------------------------------------------------------------
# RoPE (rotate-half / neox convention, as HF Llama and vLLM's is_neox_style=True)


def rope_inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """inv_freq[i] = 1 / theta^(2i / D), i < D/2 (HF's default rope init, computed the same way)."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta**exponent)


def rope_cos_sin(position_ids_BT: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B, T, 1, D/2) in fp32: angle = position * inv_freq."""
    freqs = position_ids_BT.float()[..., None] * inv_freq.float()
    return freqs.cos()[:, :, None, :], freqs.sin()[:, :, None, :]


def apply_rope(x_BTHD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x*cos + rotate_half(x)*sin with rotate_half(x) = cat(-x2, x1) over the two halves of D."""
    cos, sin = cos.to(x_BTHD.dtype), sin.to(x_BTHD.dtype)  # HF casts cos/sin to the activation dtype
    x1, x2 = x_BTHD.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


# ---------------------------------------------------------------------------------------------------------
# Modules


class RMSNorm(nn.Module):
    """y = weight * x / sqrt(mean(x^2) + eps), through the plan's kernel backend."""

    def __init__(self, dim: int, eps: float, backend: str = "torch", device_type: str = "cpu"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        # Resolved once here, so forward (compiled or not) calls the kernel without dispatch checks.
        self.backend = backend
        self._fn = rms_norm_fn(backend, device_type)

    def forward(self, x):
        return self._fn(x, self.weight, self.eps)


class Attention(nn.Module):
    """GQA self-attention with RoPE; HF LlamaAttention's parameter names."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        C, H, K, D = config.n_embd, config.n_head, config.n_kv_head, config.head_dim
        self.n_head, self.n_kv_head, self.head_dim = H, K, D
        self.q_proj = nn.Linear(C, H * D, bias=False)
        self.k_proj = nn.Linear(C, K * D, bias=False)
        self.v_proj = nn.Linear(C, K * D, bias=False)
        self.o_proj = nn.Linear(H * D, C, bias=False)
        self.qkv_weight: torch.Tensor | None = None  # fuse_projections_(): inference only

    @torch.no_grad()
    def fuse_projections_(self) -> None:
        """One (H*D + 2*K*D, C) q|k|v weight, with q/k/v_proj.weight turned into views of it: a decode step
        runs one GEMM instead of three (at batch 1 each is a small latency-bound GEMV), the state dict keeps its
        HF names and no memory is added."""
        fused = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        _share_rows_(fused, (self.q_proj, self.k_proj, self.v_proj))
        self.qkv_weight = fused

    def forward(
        self, x_BTC, cos, sin, ctx: AttentionContext | None, cache: KVCache | None = None, layer: int = 0
    ):
        B, T, _ = x_BTC.shape
        H, K, D = self.n_head, self.n_kv_head, self.head_dim
        if self.qkv_weight is None:
            # Training: separate q/k/v GEMMs (concatenating the weights each step measured 8% slower at d20).
            q, k, v = self.q_proj(x_BTC), self.k_proj(x_BTC), self.v_proj(x_BTC)
        else:
            q, k, v = F.linear(x_BTC, self.qkv_weight).split([H * D, K * D, K * D], dim=-1)
        q = apply_rope(q.view(B, T, H, D), cos, sin)
        k = apply_rope(k.view(B, T, K, D), cos, sin)
        v = v.view(B, T, K, D)
        if cache is None:
            y = attention(q, k, v, ctx)
        else:
            k_cache, v_cache = cache.layer(layer)
            k_scale, v_scale = cache.layer_scales(layer)
            dt = cache.dtype  # no-op casts unless the activations' dtype is not the plan's (no autocast)
            y = attention_with_kvcache(
                q.to(dt), k.to(dt), v.to(dt), k_cache, v_cache, cache.cache_seqlens, cache.backend(T),
                cache.batch_idx, k_scale, v_scale, ctx,
            ).to(x_BTC.dtype)
        return self.o_proj(y.reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); HF LlamaMLP's parameter names."""

    def __init__(self, config: GPTConfig, backend: str = "torch", device_type: str = "cpu"):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=False)
        self.backend = backend  # resolved once, as in RMSNorm
        self._fn = swiglu_fn(backend, device_type)
        self.gate_up_weight: torch.Tensor | None = None  # fuse_projections_(): inference only

    @torch.no_grad()
    def fuse_projections_(self) -> None:
        """One (2 * hidden, C) gate|up weight, gate/up_proj.weight views of it (as Attention's)."""
        fused = torch.cat([self.gate_proj.weight, self.up_proj.weight])
        _share_rows_(fused, (self.gate_proj, self.up_proj))
        self.gate_up_weight = fused

    def forward(self, x):
        if self.gate_up_weight is None:
            return self.down_proj(self._fn(self.gate_proj(x), self.up_proj(x)))
        gate, up = F.linear(x, self.gate_up_weight).chunk(2, dim=-1)
        return self.down_proj(self._fn(gate, up))


def _share_rows_(fused: torch.Tensor, linears: tuple[nn.Linear, ...]) -> None:
    """Point each linear's weight at its block of rows of `fused` (the rows are stacked in `linears` order)."""
    start = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight.data = fused[start : start + rows]
        start += rows


class Block(nn.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(self, config: GPTConfig, plan: BackendPlan):
        super().__init__()
        norm, dev = plan.rms_norm.backend, plan.device_type
        self.input_layernorm = RMSNorm(config.n_embd, config.norm_eps, norm, dev)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.norm_eps, norm, dev)
        self.mlp = MLP(config, plan.swiglu.backend, dev)

    def forward(self, x, cos, sin, ctx, cache=None, layer=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Embedding, layers and final norm (HF's LlamaModel)."""

    def __init__(self, config: GPTConfig, plan: BackendPlan):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList(Block(config, plan) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps, plan.rms_norm.backend, plan.device_type)


def checkpointed_layers(mode: str, n_layer: int) -> frozenset[int]:
    """Blocks whose activations are recomputed in backward (the plan's activation_checkpointing).

    full: every block. selective: every other block (0, 2, 4, ...): memory and recompute both halve, and whole
    blocks stay the unit that torch.compile and FSDP2 work on. (Recomputing only the MLP would not be cheaper:
    at d20 its three GEMMs are 2/3 of a block's linear FLOPs for about 2/3 of its saved activations.)
    """
    if mode == "full":
        return frozenset(range(n_layer))
    if mode == "selective":
        return frozenset(range(0, n_layer, 2))
    return frozenset()


_EAGER: dict = {}


def _eager(fn):
    """fn under torch.compiler.disable (a graph break), built on first use: importing dynamo costs seconds."""
    if fn not in _EAGER:
        _EAGER[fn] = torch.compiler.disable(fn)
    return _EAGER[fn]


# ---------------------------------------------------------------------------------------------------------
# GPT


class GPT(nn.Module):
    """Llama-compatible decoder LM with packed-document attention, chunked loss and a KV-cache decode."""

    def __init__(self, config: GPTConfig, plan: BackendPlan):
        super().__init__()
        self.config = config
        self.plan = plan  # the run's plan (backends.plan_run): every kernel this model calls was chosen by it
        self.model = Decoder(config, plan)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(config.head_dim, config.rope_theta), persistent=False)
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        # On CUDA (where torch.compile is used) the per-batch attention setup (host sync, BlockMask) and the
        # chunked loss (its own compiled chunk kernel, a Python loop) run outside compiled graphs.
        cuda = plan.device_type == "cuda"
        self._build_ctx = _eager(build_attention_context) if cuda else build_attention_context
        self._loss_fn = _eager(linear_cross_entropy) if cuda else linear_cross_entropy
        self._recomputed_layers = checkpointed_layers(plan.activation_checkpointing.backend, config.n_layer)
        self.init_weights()

    def _check_device(self, device: torch.device) -> None:
        if device.type != self.plan.device_type:
            raise ConfigError(
                f"the model's backend plan is for {self.plan.device_type} but the inputs are on {device.type}: "
                "build the plan for the device the model runs on (backends.plan_run)"
            )

    def compile_blocks(self, **compile_kwargs) -> GPT:
        """torch.compile each decoder block and the final norm in place; returns self.

        The plan must have been made for compiled execution (plan.compiled): it already chose RMSNorm/SwiGLU
        for inductor. Regional compilation: the 20 identical blocks of d20 share one graph (about 7 s to
        compile, H100 host). One graph over all layers, which lets each block's last residual add fuse into
        the next block's norm, measured no faster (224.0 vs 223.5 ms per d20 step, H100) and took 37 s.
        Embedding, attention setup and the chunked loss stay eager.
        """
        assert self.plan.compiled, "compile_blocks() needs a plan made with compiled=True"
        for block in self.model.layers:
            block.compile(**compile_kwargs)
        self.model.norm.compile(**compile_kwargs)
        return self

    def fuse_projections_(self) -> GPT:
        """For inference: every layer's q|k|v and gate|up weights fused into one GEMM each (the state dict,
        parameters and memory stay as they are; see Attention.fuse_projections_). Call it after the last dtype
        or device move (a later .to() would copy the views apart). Returns self."""
        for block in self.model.layers:
            block.self_attn.fuse_projections_()
            block.mlp.fuse_projections_()
        return self

    # -- init, counting ------------------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self) -> None:
        """nanochat-style init; residual output projections start at zero so each block starts as identity.

        q/k/v/gate/up: uniform with std 1/sqrt(fan_in) (bound sqrt(3/fan_in)); o_proj, down_proj: 0;
        embedding: N(0, 1) untied (RMSNorm follows it), N(0, 1/C) tied (it is also the head);
        lm_head untied: N(0, 0.001) so the first logits are near-uniform; norm weights: 1.
        """
        C = self.config.n_embd
        for block in self.model.layers:
            for lin in (
                block.self_attn.q_proj,
                block.self_attn.k_proj,
                block.self_attn.v_proj,
                block.mlp.gate_proj,
                block.mlp.up_proj,
            ):
                bound = math.sqrt(3.0 / lin.in_features)
                lin.weight.uniform_(-bound, bound)
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
        if self.config.tie_embeddings:
            # With zero-init blocks the final hidden state is norm(e_x) = e_x * sqrt(C) / |e_x|, so a tied head
            # gives the input token the logit sqrt(C) * |e_x| = C * std: std = 1/C keeps it near 1 and the
            # first loss near ln(V) instead of "predict the current token" (std 1/sqrt(C) gave 15.8 at V=631).
            self.model.embed_tokens.weight.normal_(0.0, 1.0 / C)
        else:
            self.model.embed_tokens.weight.normal_(0.0, 1.0)
            self.lm_head.weight.normal_(0.0, 0.001)
        self.inv_freq.copy_(rope_inv_freq(self.config.head_dim, self.config.rope_theta))
        self._rope_cache.clear()

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Parameter count (a tied matrix counted once); exclude_embedding drops the input embedding table."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.model.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token at sequence length T (flops.py): when everything trains, nanochat's
        6 * N_matmul + 12 * L * H * D * T, with lm_head counted (also when tied) and the embedding lookup not;
        frozen layers cost what their backward still computes."""
        from ghostvis_core.flops import gpt_flops_per_token

        return gpt_flops_per_token(self, seq_len or self.config.sequence_len)

    # -- forward -------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor | None,
        targets: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        loss_reduction: str = "mean",
        *,
        inputs_embeds: torch.Tensor | None = None,
        doc_bounds: tuple[torch.Tensor, int] | None = None,
    ) -> torch.Tensor:
        """Loss (fp32 scalar) when targets are given, else logits (B, T, V) fp32.

        position_ids (B, T) restart at 0 at every document start (packed rows): attention stays inside each
        document and RoPE uses these positions. None means one causal sequence per row (positions 0..T-1).
        inputs_embeds (B, T, C) replaces the token embedding (the VLM splices image features in).
        doc_bounds: the packed rows' (cu_seqlens, max_seqlen) from the data loader (attention.build_attention_context).
        """
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if self.config.low_precision_residual and torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        B, T, _ = x.shape
        self._check_device(x.device)
        ctx = self._build_ctx(self.plan, position_ids, B, T, x.device, doc_bounds)
        if position_ids is None:
            cos, sin = self._dense_rope(T, x.device)
        else:
            cos, sin = rope_cos_sin(position_ids, self.inv_freq)
        recompute = self._recomputed_layers if torch.is_grad_enabled() else frozenset()
        for i, block in enumerate(self.model.layers):
            if i in recompute:
                # non-reentrant: works under torch.compile'd blocks and FSDP2's per-block hooks, and lets
                # gradients flow to inputs that do not require grad
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, ctx, use_reentrant=False)
            else:
                x = block(x, cos, sin, ctx)
        h = self.model.norm(x)
        if targets is None:
            return self.lm_head(h).float()
        head_fp8 = lm_head_in_fp8(self.plan.fp8, self.config.n_embd, self.config.vocab_size)
        return self._loss_fn(
            h.reshape(B * T, -1), self.lm_head.weight, targets.reshape(B * T), loss_reduction, head_fp8
        )

    def _dense_rope(self, T: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (1, T, 1, D/2) for positions 0..T-1, computed once per (T, device, dtype) and reused."""
        pos = torch.arange(T, device=device)[None]
        if torch.is_inference_mode_enabled():  # inference tensors could not be saved for a later backward
            return rope_cos_sin(pos, self.inv_freq)
        key = (T, str(device), self.inv_freq.dtype)
        if key not in self._rope_cache:
            self._rope_cache[key] = rope_cos_sin(pos, self.inv_freq)
        return self._rope_cache[key]

    # -- decode --------------------------------------------------------------------------------------------

    def new_kv_cache(
        self, batch_size: int, max_len: int, device: torch.device | str | None = None, kv_cache_dtype: str = "auto"
    ) -> KVCache:
        """An empty KV cache for `batch_size` rows of up to `max_len` tokens each, in the parameters' dtype
        (kv_cache_dtype auto) or in fp8 e4m3 with per-token scales (fp8; kv_cache.py)."""
        device = torch.device(device) if device is not None else self.lm_head.weight.device
        self._check_device(device)
        c = self.config
        decode, prefill = self.plan.attention["decode"].backend, self.plan.attention["prefill"].backend
        check_kv_cache_dtype(kv_cache_dtype, device, decode)
        if kv_cache_dtype == "fp8":
            decode, prefill = fp8_cache_backends(decode, prefill, device)
        # The plan's compute dtype: the parameters' in inference, the autocast dtype in a training process
        # (whose fp32 parameters make bf16 keys under autocast); both kernels were chosen for it.
        dtype = getattr(torch, self.plan.dtype)
        return KVCache(c.n_layer, c.n_kv_head, c.head_dim, batch_size, max_len, device, decode, prefill, dtype,
                       kv_cache_dtype)

    def forward_with_cache(
        self,
        input_ids_BT: torch.Tensor | None,
        cache: KVCache,
        *,
        inputs_embeds: torch.Tensor | None = None,
        last_only: bool = False,
        last_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V) fp32 of T new tokens per row, attending to the cache; appends their K/V and advances
        each row's length by T.

        Row b's tokens take RoPE positions cache_seqlens[b] + 0..T-1. inputs_embeds (B, T, C) replaces the
        token embedding (a VLM prefill with image features spliced in). No host sync and no shape that depends
        on the lengths, so a one-token step is CUDA-graph capturable; the caller keeps lengths within max_len
        (the engine's scheduler does). last_only: logits (B, 1, V) of the last token only (a prefill needs no
        more, and a 2k-token prompt's full fp32 logits would be 0.5 GB at V = 65536). last_index (B,): logits
        (B, 1, V) at position last_index[b] of row b instead (prompts right-padded to one length).
        """
        x = self.model.embed_tokens(input_ids_BT) if inputs_embeds is None else inputs_embeds
        B, T, _ = x.shape
        self._check_device(x.device)
        if runs_fused(self, cache, T):  # a small-batch decode step: the fused kernels (decode_layers.py)
            return fused_decode_logits(self, x, cache)
        pos = cache.cache_seqlens[:, None].to(torch.long) + torch.arange(T, device=x.device)
        cos, sin = rope_cos_sin(pos, self.inv_freq)
        # Fresh rows of an fp8 cache attend over their own new K/V through the plan's dense case (KVCache.fresh):
        # flash-attn cannot read fp8, and the SDPA path would attend over a dequantized copy of every slot.
        fresh = cache.fresh and cache.storage == "fp8"
        ctx = self._build_ctx(self.plan, None, B, T, x.device) if fresh else None
        for i, block in enumerate(self.model.layers):
            x = block(x, cos, sin, ctx, cache, i)
        cache.cache_seqlens += T
        if last_index is not None:
            x = x[torch.arange(B, device=x.device), last_index.to(torch.long)][:, None]
        elif last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x)).float()

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        embed=None,
        banned_token: int | None = None,
    ) -> torch.Tensor:
        """Append max_new_tokens to idx (B, T): greedy at temperature 0, else sampled (optionally top-k).

        embed: ids (B, T') -> input embeddings (B, T', C) of a whole sequence (the VLM's image splice). With
        the cache it gives the prefill's embeddings and the generated tokens go through embed_tokens; without
        it every step recomputes the whole sequence through it, so both paths see the same inputs.
        banned_token: an id never generated (the VLM's `<image>` placeholder, which only data places).
        """
        if idx.dim() != 2:
            raise ConfigError(f"generate expects idx of shape (B, T), got {tuple(idx.shape)}")
        out = idx
        cache = (
            self.new_kv_cache(idx.shape[0], idx.shape[1] + max_new_tokens, idx.device) if use_cache else None
        )

        def full(ids):
            return self(ids) if embed is None else self(None, inputs_embeds=embed(ids))

        if use_cache:
            embeds = None if embed is None else embed(idx)
            logits = self.forward_with_cache(None if embeds is not None else idx, cache, inputs_embeds=embeds)
        else:
            logits = full(idx)
        for step in range(max_new_tokens):
            last = logits[:, -1]
            if banned_token is not None:
                last = last.index_fill(-1, torch.tensor([banned_token], device=last.device), float("-inf"))
            nxt = _sample(last, temperature, top_k, generator)
            out = torch.cat([out, nxt], dim=1)
            if step == max_new_tokens - 1:
                break
            logits = self.forward_with_cache(nxt, cache) if use_cache else full(out)
        return out

    # -- checkpoints ---------------------------------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, step_dir, plan: BackendPlan, state=None) -> GPT:
        """The GPT saved in checkpoint folder `step_dir`, built with `plan` on the plan's device.

        The config comes from its state.json (TrainState; pass `state` when the caller already read it, e.g.
        to make the plan for that config); weights load with every key and shape checked, so a mismatch is one
        CheckpointError naming the folder and the key.
        """
        from ghostvis_core.checkpoint import build_from_checkpoint

        return build_from_checkpoint(cls, GPTConfig, "gpt", step_dir, plan, state)


def _sample(logits_BV: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    """Next token (B, 1): argmax at temperature 0, else softmax(logits / temperature) over the top k (the
    engine's filter, sampling.filter_logits), drawn with torch's generator (this is the simple reference
    decode; the engine draws from per-row seeded noise instead)."""
    if temperature <= 0:
        return logits_BV.argmax(dim=-1, keepdim=True)
    logits = logits_BV / temperature
    if top_k is not None:
        logits = filter_logits(logits, top_k, 1.0)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
