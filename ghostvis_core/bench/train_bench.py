"""Training-step benchmark: our stack against the plain PyTorch model a user would write, same card.

Ours: what the trainer runs: `GPT` with the backends the plan picks, bf16 autocast, `build_optimizer` with the
trainer's default optimizer (Muon + AdamW; --optimizer adamw for AdamW only), blocks compiled; optionally packed
rows (--packed N documents per row, the packed-attention backend), fp8 block linears (--fp8) and activation
checkpointing (--recompute), each through the same plan and functions the trainer uses.
Reference: the same Llama architecture written plainly below (nn.RMSNorm, SDPA is_causal with PyTorch's
default kernel choice, silu(gate) * up, full-logit fp32 cross-entropy), `torch.compile(model)`, fused AdamW.

MFU = tok/s * flops_per_token / peak, flops_per_token = 6 * N_non_embedding + 12 * L * d * T (nanochat),
against the card's dense bf16 peak (hardware_limits.PEAK_BF16_FLOPS, the table the trainer's MFU uses).
Component times (attention kernel, the attention layer, MLP, RMSNorm, loss) are fwd+bwd of one call of the
shipped modules in isolation at the model's shapes, eager, timed by timing.cuda_median_ms, scaled by the
number of calls per step; the optimizer time is measured inside the real training steps. Eager components
do not add up to a compiled step: inductor fuses the elementwise work (RoPE, residual adds, norms, SwiGLU).
The plan is built once (backends.training_run_facts, as the trainer does) and shared by every measurement.
"""

from __future__ import annotations

import gc
import statistics
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ghostvis_core.backends import BackendPlan
from ghostvis_core.bench.timing import CudaSpan, cuda_median_ms
from ghostvis_core.config import GPTConfig, OptimizerConfig
from ghostvis_core.errors import ConfigError, GhostVisError
from ghostvis_core.hardware_limits import peak_bf16_flops
from ghostvis_core.model_configs import get_preset

# ---------------------------------------------------------------------------------------------------------
# The plain PyTorch reference


class RefAttention(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.h, self.kv, self.d = c.n_head, c.n_kv_head, c.head_dim
        self.q_proj = nn.Linear(c.n_embd, self.h * self.d, bias=False)
        self.k_proj = nn.Linear(c.n_embd, self.kv * self.d, bias=False)
        self.v_proj = nn.Linear(c.n_embd, self.kv * self.d, bias=False)
        self.o_proj = nn.Linear(self.h * self.d, c.n_embd, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.h, self.d).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.kv, self.d).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv, self.d).transpose(1, 2)
        q, k = _ref_rope(q, cos, sin), _ref_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv != self.h)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


def _ref_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class RefMLP(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.n_embd, c.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(c.n_embd, c.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(c.mlp_hidden, c.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RefBlock(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.norm1 = nn.RMSNorm(c.n_embd, eps=c.norm_eps)
        self.attn = RefAttention(c)
        self.norm2 = nn.RMSNorm(c.n_embd, eps=c.norm_eps)
        self.mlp = RefMLP(c)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class RefLlama(nn.Module):
    """The plain PyTorch Llama of the same shape as GPT(config)."""

    def __init__(self, c: GPTConfig):
        super().__init__()
        self.embed = nn.Embedding(c.vocab_size, c.n_embd)
        self.blocks = nn.ModuleList(RefBlock(c) for _ in range(c.n_layer))
        self.norm = nn.RMSNorm(c.n_embd, eps=c.norm_eps)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2).float() / c.head_dim))
        t = torch.arange(c.sequence_len).float()
        emb = torch.cat([torch.outer(t, inv_freq)] * 2, dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, idx, targets):
        T = idx.shape[1]
        x = self.embed(idx)
        cos, sin = self.cos[:T], self.sin[:T]
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.lm_head(self.norm(x))
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1), ignore_index=-100)


# ---------------------------------------------------------------------------------------------------------
# Measurement


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def _run_steps(model, optimizer, x, y, steps: int, warmup: int, position_ids=None) -> dict:
    """Time `steps` training steps after `warmup` (compile happens there); optimizer ms from inner events.
    Packed rows get their document bounds from the host once, as the trainer's loaders hand them over."""
    extra, bounds = (), {}
    if position_ids is not None:
        from ghostvis_core.data.loader import document_bounds

        host = document_bounds(position_ids.cpu())
        extra, bounds = (position_ids,), {"doc_bounds": (host["cu_seqlens"].to(x.device), host["max_seqlen"])}

    def one_step(opt_span: CudaSpan | None = None):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, y, *extra, **bounds)
        loss.backward()
        if opt_span is not None:
            opt_span.start()
        optimizer.step()
        if opt_span is not None:
            opt_span.stop()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        loss = one_step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    # consecutive steps timed as one span: the host runs ahead of the GPU as in training
    total, opt_spans = CudaSpan(), [CudaSpan() for _ in range(steps)]
    total.start()
    for i in range(steps):
        loss = one_step(opt_spans[i])
    total.stop()
    torch.cuda.synchronize()
    step_ms = total.ms / steps
    tokens = x.numel()
    return {
        "step_ms": step_ms,
        "tok_per_s": tokens / (step_ms / 1e3),
        "optimizer_ms": statistics.median(span.ms for span in opt_spans),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "final_loss": float(loss.item()),
    }


def bench_plan(config: GPTConfig, compile: bool, optimizer: str, fp8: str = "none",
               activation_checkpointing: str = "none") -> BackendPlan:
    """The plan a bf16 training run of `config` gets on this GPU (the trainer's facts function)."""
    from ghostvis_core.backends import plan_run, training_run_facts
    from ghostvis_core.env import probe_env

    env = probe_env()
    facts = training_run_facts(env, config, device_type="cuda", compile=compile, dtype="bfloat16", optimizer=optimizer,
                               fp8=fp8, activation_checkpointing=activation_checkpointing)
    return plan_run(env, facts)


def packed_positions(batch_size: int, seq_len: int, docs_per_row: int, device) -> torch.Tensor | None:
    """position_ids (B, T) of rows holding `docs_per_row` equal documents (positions restart at each one);
    None for one document per row (dense causal)."""
    if docs_per_row <= 1:
        return None
    if seq_len % docs_per_row:
        raise ConfigError(f"--packed {docs_per_row} must divide --seq-len {seq_len}")
    pos = torch.arange(seq_len, device=device) % (seq_len // docs_per_row)
    return pos[None].expand(batch_size, seq_len).contiguous()


def measure_ours(config: GPTConfig, plan: BackendPlan, batch_size: int, steps: int, warmup: int,
                 packed: int = 0) -> dict:
    """One configuration of our stack: tok/s, step ms, optimizer ms, peak memory, backends in use."""
    from ghostvis_core.fp8 import convert_to_fp8
    from ghostvis_core.gpt import GPT
    from ghostvis_core.optim import build_optimizer

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = GPT(config, plan)
    fp8_linears = convert_to_fp8(model, plan.fp8)  # before compile, as the trainer does
    if plan.compiled:
        model.compile_blocks(dynamic=False)
    opt, description = build_optimizer(model, OptimizerConfig(backend=plan.facts.optimizer, lr=1e-4), plan)
    x = torch.randint(0, config.vocab_size, (batch_size, config.sequence_len), device="cuda")
    y = torch.roll(x, -1, dims=1)
    position_ids = packed_positions(batch_size, config.sequence_len, packed, x.device)
    graph_breaks_before = _graph_breaks()
    result = _run_steps(model, opt, x, y, steps, warmup, position_ids)
    result.update(
        {
            "attention": plan.attention["packed" if position_ids is not None else "dense"].label,
            "fp8": f"{plan.fp8.label} on {len(fp8_linears)} linears" if fp8_linears else "off",
            "activation_checkpointing": plan.activation_checkpointing.label,
            "rms_norm": plan.rms_norm.label,
            "swiglu": plan.swiglu.label,
            "optimizer": description,
            "graph_breaks": _graph_breaks() - graph_breaks_before,
            "flops_per_token": model.flops_per_token(config.sequence_len),
        }
    )
    del model, opt, x, y
    _free()
    return result


def measure_reference(config: GPTConfig, batch_size: int, steps: int, warmup: int, compile: bool) -> dict:
    """The plain PyTorch model: torch.compile(model), default SDPA, fused AdamW."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = RefLlama(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    step_model = torch.compile(model) if compile else model
    x = torch.randint(0, config.vocab_size, (batch_size, config.sequence_len), device="cuda")
    y = torch.roll(x, -1, dims=1)
    result = _run_steps(step_model, opt, x, y, steps, warmup)
    result["optimizer"] = "torch.optim.AdamW(fused=True)"
    del model, step_model, opt, x, y
    _free()
    return result


def _graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def _fwd_bwd(fn: Callable[[], torch.Tensor], inputs: list[torch.Tensor]) -> Callable[[], None]:
    def run():
        for t in inputs:
            t.grad = None
        out = fn()
        out.backward(torch.ones_like(out) if out.dim() else None)

    return run


def _attention_ms(config: GPTConfig, plan, B: int) -> tuple[float, float]:
    from ghostvis_core.attention import attention, build_attention_context

    T, H, K, D = config.sequence_len, config.n_head, config.n_kv_head, config.head_dim
    q = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, T, K, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, T, K, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ctx = build_attention_context(plan, None, B, T, q.device)

    def ref():
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=K != H).float().sum()

    ours_ms = cuda_median_ms(_fwd_bwd(lambda: attention(q, k, v, ctx).float().sum(), [q, k, v]))
    return ours_ms, cuda_median_ms(_fwd_bwd(ref, [q, k, v]))


def _attn_layer_ms(config: GPTConfig, plan: BackendPlan, B: int) -> tuple[float, float]:
    """One attention layer, the shipped `Attention` module (q/k/v/o GEMMs, RoPE, the plan's dense kernel)
    against RefAttention (the same with SDPA's default kernel choice)."""
    from ghostvis_core.attention import build_attention_context
    from ghostvis_core.gpt import Attention, rope_cos_sin, rope_inv_freq

    T, D = config.sequence_len, config.head_dim
    x = torch.randn(B, T, config.n_embd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with torch.device("cuda"):
        ours, ref = Attention(config), RefAttention(config)
    inv_freq = rope_inv_freq(D, config.rope_theta, device="cuda")
    cos, sin = rope_cos_sin(torch.arange(T, device="cuda")[None], inv_freq)
    emb = torch.cat([torch.outer(torch.arange(T, device="cuda").float(), inv_freq)] * 2, dim=-1)
    ref_cos, ref_sin = emb.cos(), emb.sin()
    ctx = build_attention_context(plan, None, B, T, x.device)

    def ours_fn():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return ours(x, cos, sin, ctx).float().sum()

    def ref_fn():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return ref(x, ref_cos, ref_sin).float().sum()

    return cuda_median_ms(_fwd_bwd(ours_fn, [x])), cuda_median_ms(_fwd_bwd(ref_fn, [x]))


def _mlp_ms(config: GPTConfig, plan, B: int) -> tuple[float, float]:
    from ghostvis_core.gpt import MLP

    x = torch.randn(
        B, config.sequence_len, config.n_embd, device="cuda", dtype=torch.bfloat16, requires_grad=True
    )
    with torch.device("cuda"):
        ours, ref = MLP(config, plan.swiglu.backend, "cuda"), RefMLP(config)

    def under_autocast(m):
        def f():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return m(x).float().sum()

        return f

    return cuda_median_ms(_fwd_bwd(under_autocast(ours), [x])), cuda_median_ms(_fwd_bwd(under_autocast(ref), [x]))


def _norm_ms(config: GPTConfig, plan: BackendPlan, B: int) -> tuple[float, float]:
    from ghostvis_core.gpt import RMSNorm

    C = config.n_embd
    # The residual stream is fp32 under autocast (fp32 embedding output + bf16 branch outputs).
    x = torch.randn(B, config.sequence_len, C, device="cuda", requires_grad=True)
    with torch.device("cuda"):
        ours = RMSNorm(C, config.norm_eps, plan.rms_norm.backend, "cuda")
        ref = nn.RMSNorm(C, eps=config.norm_eps)
    return cuda_median_ms(_fwd_bwd(lambda: ours(x).sum(), [x])), cuda_median_ms(_fwd_bwd(lambda: ref(x).sum(), [x]))


def _loss_ms(config: GPTConfig, B: int) -> tuple[float, float]:
    from ghostvis_core.linear_cross_entropy import linear_cross_entropy

    N, C, V = B * config.sequence_len, config.n_embd, config.vocab_size
    h = torch.randn(N, C, device="cuda", requires_grad=True)
    head = torch.randn(V, C, device="cuda", requires_grad=True)
    tgt = torch.randint(0, V, (N,), device="cuda")

    def ours():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return linear_cross_entropy(h, head, tgt)

    def ref():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return F.cross_entropy(F.linear(h, head).float(), tgt)

    return cuda_median_ms(_fwd_bwd(ours, [h, head]), warmup=3, iters=5), cuda_median_ms(
        _fwd_bwd(ref, [h, head]), warmup=3, iters=5
    )


def component_times(config: GPTConfig, batch_size: int, plan: BackendPlan) -> list[dict]:
    """ms per training step of each component, ours vs reference, measured in isolation (eager).

    `plan` is the one the timed steps ran with (RMSNorm/SwiGLU backends differ under torch.compile); the
    components themselves run eager, so they show kernel choices, not inductor's fusions.
    """
    L = config.n_layer
    specs = [
        (
            "attention",
            L,
            lambda: _attention_ms(config, plan, batch_size),
            plan.attention["dense"].label,
            "SDPA default",
        ),
        (
            "attn layer",
            L,
            lambda: _attn_layer_ms(config, plan, batch_size),
            f"Attention module ({plan.attention['dense'].label})",
            "RefAttention (SDPA default)",
        ),
        ("mlp", L, lambda: _mlp_ms(config, plan, batch_size), plan.swiglu.label, "silu(gate) * up"),
        (
            "rms_norm",
            2 * L + 1,
            lambda: _norm_ms(config, plan, batch_size),
            plan.rms_norm.label,
            "nn.RMSNorm",
        ),
        (
            "lm_head+loss",
            1,
            lambda: _loss_ms(config, batch_size),
            "chunked linear+CE",
            "full fp32 logits + F.cross_entropy",
        ),
    ]
    rows = []
    for name, calls, measure, ours_label, ref_label in specs:
        ours_ms, ref_ms = measure()
        rows.append(
            {
                "component": name,
                "calls": calls,
                "ours_ms": ours_ms * calls,
                "reference_ms": ref_ms * calls,
                "ours_backend": ours_label,
                "reference_backend": ref_label,
            }
        )
        _free()
    return rows


def run_train_bench(
    preset: str = "d20",
    seq_len: int = 2048,
    batch_size: int = 16,
    steps: int = 10,
    compile: bool = True,
    warmup: int = 3,
    optimizer: str = "auto",
    components: bool = True,
    norm_backend: str = "auto",
    packed: int = 0,
    fp8: str = "none",
    activation_checkpointing: str = "none",
) -> dict:
    """Train-step throughput, MFU and peak memory of our stack vs the plain PyTorch reference, same card."""
    # the flags first: a typo is reported as such on any machine, not hidden behind "needs a GPU"
    if steps < 1 or warmup < 0 or batch_size < 1:
        raise ConfigError(
            f"need --steps >= 1, warmup >= 0, --batch-size >= 1 (got {steps}, {warmup}, {batch_size})"
        )
    if optimizer not in ("auto", "adamw", "muon"):
        raise ConfigError(f"--optimizer {optimizer!r}: expected auto, adamw or muon")
    from ghostvis_core.backend_names import ACTIVATION_CHECKPOINTING, FP8_REQUESTS

    if fp8 not in FP8_REQUESTS:
        raise ConfigError(f"--fp8 {fp8!r}: expected one of {', '.join(FP8_REQUESTS)}")
    if activation_checkpointing not in ACTIVATION_CHECKPOINTING:
        raise ConfigError(f"--recompute {activation_checkpointing!r}: expected one of "
                          f"{', '.join(ACTIVATION_CHECKPOINTING)}")
    if packed < 0 or (packed > 1 and seq_len % packed):
        raise ConfigError(f"--packed {packed}: expected 0 or a number of documents that divides --seq-len {seq_len}")
    config = get_preset(preset, sequence_len=seq_len, norm_backend=norm_backend)
    if not torch.cuda.is_available():
        raise GhostVisError(
            "the training benchmark needs a CUDA GPU (it measures tok/s, MFU and GPU memory); "
            "run `ghostvis bench train` on a GPU machine"
        )
    device_name = torch.cuda.get_device_name()
    peak = peak_bf16_flops(device_name)
    plan = bench_plan(config, compile, optimizer, fp8, activation_checkpointing)
    ours = measure_ours(config, plan, batch_size, steps, warmup, packed)
    reference = measure_reference(config, batch_size, steps, warmup, compile)
    fpt = ours["flops_per_token"]
    for r in (ours, reference):
        r["mfu"] = r["tok_per_s"] * fpt / peak if peak else None
    result = {
        "device": device_name,
        "torch": torch.__version__,
        "preset": preset,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "steps": steps,
        "compile": compile,
        "optimizer": plan.optimizer.backend,
        "norm_backend": norm_backend,
        "packed": packed,
        "fp8": plan.fp8.backend,
        "activation_checkpointing": plan.activation_checkpointing.backend,
        "peak_flops": peak,
        "flops_per_token": fpt,
        "ours": ours,
        "reference": reference,
        "speedup": ours["tok_per_s"] / reference["tok_per_s"],
        "components": [],
    }
    if components:
        rows = component_times(config, batch_size, plan)
        rows.append(
            {
                "component": "optimizer",
                "calls": 1,
                "ours_ms": ours["optimizer_ms"],
                "reference_ms": reference["optimizer_ms"],
                "ours_backend": ours["optimizer"],
                "reference_backend": reference["optimizer"],
            }
        )
        result["components"] = rows
    return result


def format_train_bench(result: dict) -> str:
    """Plain-text table of a run_train_bench result."""
    o, r = result["ours"], result["reference"]

    def mfu(x):
        return "n/a" if x["mfu"] is None else f"{100 * x['mfu']:.1f}%"

    lines = [
        f"{result['preset']} B={result['batch_size']} T={result['seq_len']} on {result['device']} "
        f"(torch {result['torch']}, compile={result['compile']}, "
        f"optimizer={result['optimizer']}, norm={result['norm_backend']}, packed={result['packed']}, "
        f"fp8={result['fp8']}, activation checkpointing={result['activation_checkpointing']})",
        f"ours: {o['optimizer']}; attention {o['attention']}; fp8 {o['fp8']}",
        "reference: plain compiled PyTorch, one document per row, fused AdamW",
        f"{'':12}{'tok/s':>10}{'MFU':>8}{'step ms':>9}{'peak GiB':>10}",
        f"{'GhostVis':12}{o['tok_per_s']:>10.0f}{mfu(o):>8}{o['step_ms']:>9.1f}{o['peak_mem_gib']:>10.1f}",
        f"{'reference':12}{r['tok_per_s']:>10.0f}{mfu(r):>8}{r['step_ms']:>9.1f}{r['peak_mem_gib']:>10.1f}",
        f"speedup: {result['speedup']:.2f}x",
    ]
    if result["components"]:
        lines.append(f"{'component':14}{'ours ms':>9}{'ref ms':>9}  ours backend")
        for row in result["components"]:
            lines.append(
                f"{row['component']:14}{row['ours_ms']:>9.1f}{row['reference_ms']:>9.1f}  {row['ours_backend']}"
            )
    return "\n".join(lines)


__all__ = [
    "run_train_bench",
    "format_train_bench",
    "peak_bf16_flops",
    "RefLlama",
    "measure_ours",
    "measure_reference",
    "component_times",
    "bench_plan",
]
