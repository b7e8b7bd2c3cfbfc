"""The one place that decides which implementation runs, and why.

From `EnvFacts` (env.py) and the user's requests this picks the attention backend per case (dense causal,
packed documents, decode with a KV cache, non-causal), RMSNorm, SwiGLU, the optimizer and the inference
engine. Every pick is a `Choice` with a human label and a one-line reason. `auto` falls back and says why;
an explicit request this machine cannot meet raises `BackendUnavailableError` with the reason and the fix.
`ghostvis doctor`, the startup log and the model all ask this module; nothing else decides.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from ghostvis_core.attention_preferences import CASES_SUPPORTED, PREFERENCES
from ghostvis_core.env import EnvFacts, probe_env
from ghostvis_core.errors import BackendUnavailableError, ConfigError
from ghostvis_core.log import get_logger

ATTENTION_CASES = ("dense", "packed", "decode", "noncausal")
ATTENTION_BACKENDS = ("flash_attn", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "flex", "sdpa_math")
# What the user types (--attn / GPTConfig.attn_backend) -> backend name.
ATTN_REQUESTS = {
    "auto": None,
    "flash": "flash_attn",
    "flash_attn": "flash_attn",
    "cudnn": "sdpa_cudnn",
    "sdpa_cudnn": "sdpa_cudnn",
    "sdpa_flash": "sdpa_flash",
    "efficient": "sdpa_efficient",
    "sdpa_efficient": "sdpa_efficient",
    "flex": "flex",
    "math": "sdpa_math",
    "sdpa_math": "sdpa_math",
}
NORM_REQUESTS = ("auto", "triton", "apex", "torch")
OPTIMIZER_REQUESTS = ("auto", "muon", "adamw", "apex_adam")
INFERENCE_REQUESTS = ("auto", "vllm", "native")

_FA2_FIX = "`ghostvis install flash-attn`"
_HALF_DTYPES = ("float16", "bfloat16", "fp16", "bf16", "half")


@dataclass(frozen=True)
class Choice:
    """One decision: the backend name code dispatches on, a human label, and why."""

    backend: str
    """Machine name the code dispatches on, e.g. "sdpa_cudnn", "triton", "muon"."""
    label: str
    """Human label, e.g. "SDPA/cuDNN", "FlashAttention-2 2.8.3 varlen"."""
    reason: str
    """One line: why this one (and, on a fallback, why not the preferred one)."""


@dataclass
class BackendPlan:
    """Every implementation choice for one process."""

    device_type: str
    """"cuda" or "cpu"."""
    attention: dict[str, Choice]
    """One Choice per ATTENTION_CASES entry."""
    rms_norm: Choice
    swiglu: Choice
    optimizer: Choice
    inference: Choice

    def to_dict(self) -> dict:
        """JSON-ready plan."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class _Context:
    env: EnvFacts
    device_type: str
    use_flash_attn: bool
    head_dim: int
    dtype: str

    @property
    def cc(self) -> tuple[int, int] | None:
        return self.env.capability if self.device_type == "cuda" else None

    @property
    def sm(self) -> str:
        return f"sm{self.cc[0]}{self.cc[1]}" if self.cc else "CPU"

    @property
    def half(self) -> bool:
        return self.dtype.replace("torch.", "") in _HALF_DTYPES


def arch_family(capability: tuple[int, int] | None) -> str:
    """Preference-table row for a compute capability (None = CPU)."""
    if capability is None:
        return "cpu"
    if capability >= (10, 0):
        return "blackwell"
    if capability >= (9, 0):
        return "hopper"
    if capability >= (8, 0):
        return "ampere"
    return "turing"


# ---------------------------------------------------------------------------------------------------------
# Attention


def _attention_label(backend: str, case: str, env: EnvFacts) -> str:
    if backend == "flash_attn":
        version = env.package("flash_attn").version
        base = f"FlashAttention-2 {version}" if version else "FlashAttention-2"
        return base + {"packed": " varlen", "decode": " kvcache"}.get(case, "")
    if backend == "flex":
        return "FlexAttention (document mask)" if case == "packed" else "FlexAttention"
    label = {
        "sdpa_cudnn": "SDPA/cuDNN",
        "sdpa_flash": "SDPA/flash",
        "sdpa_efficient": "SDPA/efficient",
        "sdpa_math": "SDPA/math",
    }[backend]
    return label + " + block-diagonal mask" if case == "packed" else label


def attention_unavailable(backend: str, ctx: _Context) -> str | None:
    """Why `backend` cannot run on this machine and config (hardware, dtype, install), None if it can."""
    env = ctx.env
    if backend == "sdpa_math":
        return None
    if ctx.device_type != "cuda":
        return f"{_attention_label(backend, 'dense', env)} needs a CUDA GPU"
    cc = ctx.cc
    if backend == "flash_attn":
        if cc < (8, 0):
            return f"FlashAttention-2 needs an Ampere (sm80) or newer GPU; this is {ctx.sm}"
        if cc >= (10, 0):
            return (
                f"FlashAttention-2 is not built for Blackwell ({ctx.sm}) in our wheels; SDPA/cuDNN covers it"
            )
        if not ctx.half:
            return f"FlashAttention-2 runs only in fp16/bf16, not {ctx.dtype}"
        if ctx.head_dim > 256 or ctx.head_dim % 8:
            return f"FlashAttention-2 needs head_dim <= 256 and a multiple of 8, not {ctx.head_dim}"
        if not ctx.use_flash_attn:
            return "use_flash_attn=False in the config"
        pkg = env.package("flash_attn")
        if not pkg.installed:
            return f"flash-attn is not installed: {_FA2_FIX}"
        if not pkg.usable:
            return f"flash-attn does not import: {pkg.diagnosis or pkg.error}"
        return None
    if backend == "sdpa_cudnn":
        if not env.torch_features.get("cudnn_sdpa", False):
            return f"this torch ({env.torch_version}) has no cuDNN SDPA backend"
        if cc < (8, 0):
            return f"cuDNN SDPA needs sm80 or newer; this is {ctx.sm}"
        if not ctx.half:
            return f"cuDNN SDPA runs only in fp16/bf16, not {ctx.dtype}"
        if ctx.head_dim > 128 or ctx.head_dim % 8:
            return f"cuDNN SDPA needs head_dim <= 128 and a multiple of 8, not {ctx.head_dim}"
        return None
    if backend == "sdpa_flash":
        if cc < (8, 0):
            return f"SDPA's flash kernel needs sm80 or newer; this is {ctx.sm}"
        if not ctx.half:
            return f"SDPA's flash kernel runs only in fp16/bf16, not {ctx.dtype}"
        if ctx.head_dim > 256 or ctx.head_dim % 8:
            return f"SDPA's flash kernel needs head_dim <= 256 and a multiple of 8, not {ctx.head_dim}"
        return None
    if backend == "sdpa_efficient":
        return None if cc >= (5, 0) else f"SDPA's efficient kernel needs sm50 or newer; this is {ctx.sm}"
    if backend == "flex":
        if not env.torch_features.get("flex_attention", False):
            return f"this torch ({env.torch_version}) has no FlexAttention"
        if cc < (7, 0):
            return f"FlexAttention compiles Triton kernels, which need sm70 or newer; this is {ctx.sm}"
        triton = env.package("triton")
        if not triton.usable:
            why = triton.diagnosis or triton.error or "triton is not installed"
            return f"FlexAttention needs Triton: {why} (`ghostvis install triton`)"
        return None
    raise AssertionError(f"unknown attention backend {backend}")


def why_attention_unavailable(
    env: EnvFacts,
    backend: str,
    device_type: str | None = None,
    *,
    head_dim: int = 128,
    dtype: str = "bfloat16",
) -> str | None:
    """Why an attention backend cannot run on this machine (default config), None if it can."""
    device = device_type or ("cuda" if env.has_gpu else "cpu")
    return attention_unavailable(backend, _Context(env, device, True, head_dim, dtype))


def _choose_attention(case: str, ctx: _Context, requested: str | None) -> Choice:
    table = PREFERENCES[arch_family(ctx.cc)][case]
    skipped: list[str] = []
    if requested is not None and case in CASES_SUPPORTED[requested]:
        why = attention_unavailable(requested, ctx)
        if why is not None:
            raise BackendUnavailableError(
                f"attention backend '{requested}' was requested but cannot run here: {why}. "
                f"Fix: {_attention_fix(requested)}, or use attn_backend=auto"
            )
        return Choice(requested, _attention_label(requested, case, ctx.env), "requested")
    if requested is not None:
        skipped.append(f"{_attention_label(requested, 'dense', ctx.env)} has no {case} mode")
    # Packed documents on CUDA with a backend missing from the arch row still get a correct fallback.
    for backend, why_good in table:
        why_not = attention_unavailable(backend, ctx)
        if why_not is None:
            reason = why_good if not skipped else f"{why_good}; {skipped[0]}"
            return Choice(backend, _attention_label(backend, case, ctx.env), reason)
        skipped.append(why_not)
    # The last resort always runs: SDPA's math kernel (packed through an explicit mask).
    return Choice("sdpa_math", _attention_label("sdpa_math", case, ctx.env), f"fallback; {skipped[0]}")


def _attention_fix(backend: str) -> str:
    return {
        "flash_attn": f"{_FA2_FIX} on an Ampere-or-newer GPU, with dtype bf16/fp16 and use_flash_attn=True",
        "flex": "`ghostvis install triton` on a CUDA GPU (sm70+) with torch >= 2.5",
    }.get(backend, "run on a GPU that supports it")


def _note_flash_skip(choice: Choice, case: str, ctx: _Context) -> Choice:
    """On GPUs whose table has no FA2 row (pre-Ampere, Blackwell), say why FA2 is not serving the case."""
    names = [b for b, _ in PREFERENCES[arch_family(ctx.cc)][case]]
    if ctx.device_type != "cuda" or "flash_attn" in names or case not in ("dense", "packed"):
        return choice  # where FA2 is in the table, _choose_attention already names why it was skipped
    why = attention_unavailable("flash_attn", ctx)
    if why is None or why in choice.reason:
        return choice
    return dataclasses.replace(choice, reason=f"{choice.reason}; {why}")


# ---------------------------------------------------------------------------------------------------------
# RMSNorm, SwiGLU


def _triton_unavailable(ctx: _Context) -> str | None:
    if ctx.device_type != "cuda":
        return "Triton kernels need a CUDA GPU"
    if ctx.cc < (7, 0):
        return f"Triton needs a CUDA GPU of sm70 or newer; this is {ctx.sm}"
    triton = ctx.env.package("triton")
    if not triton.installed:
        return "triton is not installed: `ghostvis install triton`"
    if not triton.usable:
        return f"triton does not import: {triton.diagnosis or triton.error}"
    return None


def _triton_interpret_ok(ctx: _Context) -> bool:
    """Explicit triton on CPU is allowed under TRITON_INTERPRET=1 (tests run kernels in the interpreter)."""
    return (
        ctx.device_type == "cpu"
        and os.environ.get("TRITON_INTERPRET") == "1"
        and ctx.env.package("triton").usable
    )


COMPILED_NORM_REASON = (
    "under torch.compile, inductor fuses RMSNorm/SwiGLU with neighbouring ops: measured 231.5 vs 242.2 ms "
    "per d20 step on H100 (ghostvis bench train --norm-backend torch vs auto)"
)


def _choose_norm(ctx: _Context, request: str, use_fused: bool, compiled: bool) -> tuple[Choice, Choice]:
    triton_why = _triton_unavailable(ctx)
    torch_norm = Choice("torch", "PyTorch F.rms_norm", "")
    torch_swiglu = Choice("torch", "PyTorch silu(gate) * up", "")
    triton_norm = Choice("triton", "Triton fused RMSNorm", "")
    triton_swiglu = Choice("triton", "Triton fused SwiGLU", "")
    if request == "triton":
        if triton_why is None:
            return (
                dataclasses.replace(triton_norm, reason="requested"),
                dataclasses.replace(triton_swiglu, reason="requested"),
            )
        if _triton_interpret_ok(ctx):
            reason = "requested; TRITON_INTERPRET=1 runs the kernels in Triton's CPU interpreter (tests only)"
            return dataclasses.replace(triton_norm, reason=reason), dataclasses.replace(
                triton_swiglu, reason=reason
            )
        raise BackendUnavailableError(
            f"norm_backend='triton' was requested but cannot run here: {triton_why}. "
            "Fix: run on a CUDA GPU (sm70+) with triton installed, set TRITON_INTERPRET=1 for CPU tests, "
            "or use norm_backend=auto"
        )
    if request == "apex":
        apex = ctx.env.package("apex")
        if ctx.device_type != "cuda":
            why = "apex's fused kernels need a CUDA GPU"
        elif not apex.installed:
            why = "apex is not installed"
        elif not apex.extensions.get("fused_layer_norm_cuda", False):
            why = f"apex has no fused_layer_norm_cuda extension ({apex.diagnosis or apex.error or 'Python-only build'})"
        else:
            why = None
        if why is not None:
            raise BackendUnavailableError(
                f"norm_backend='apex' was requested but cannot run here: {why}. "
                "Fix: `ghostvis install apex` on a CUDA machine, or use norm_backend=auto"
            )
        # REFERENCE.md (H200, torch 2.11): apex FusedRMSNorm 2.25 / 1.26 TB/s vs F.rms_norm 3.31 / 1.68.
        norm = Choice(
            "apex",
            f"apex FusedRMSNorm {apex.version or ''}".strip(),
            "requested (measured slower than F.rms_norm on H200 + torch 2.11)",
        )
        swiglu = (
            dataclasses.replace(triton_swiglu, reason="fastest available SwiGLU")
            if triton_why is None
            else dataclasses.replace(torch_swiglu, reason=f"apex has no SwiGLU; {triton_why}")
        )
        return norm, swiglu
    if request == "torch":
        return (
            dataclasses.replace(torch_norm, reason="requested"),
            dataclasses.replace(torch_swiglu, reason="requested"),
        )
    # auto: PyTorch under torch.compile, else Triton, else PyTorch. apex is never picked on auto: measured
    # F.rms_norm beats FusedRMSNorm (REFERENCE.md, H200: 3.31 vs 2.25 TB/s fwd, 1.68 vs 1.26 fwd+bwd), so it
    # is not a faster fallback.
    if not use_fused:
        reason = "use_fused_kernels=False in the config"
        return dataclasses.replace(torch_norm, reason=reason), dataclasses.replace(
            torch_swiglu, reason=reason
        )
    if triton_why is not None:
        return dataclasses.replace(torch_norm, reason=triton_why), dataclasses.replace(
            torch_swiglu, reason=triton_why
        )
    if compiled:
        # A Triton kernel is opaque to inductor: it cuts the graph into pieces that cannot fuse with the
        # residual add, RoPE casts or the GEMM inputs around them.
        return dataclasses.replace(torch_norm, reason=COMPILED_NORM_REASON), dataclasses.replace(
            torch_swiglu, reason=COMPILED_NORM_REASON
        )
    # Eager, Triton wins at every width measured, d20's narrow 1280 included (RMSNorm fwd+bwd of 32768 fp32
    # rows, H100, torch 2.11: 0.612 vs 0.657 ms at 1280, 0.740 vs 1.105 at 2048, 1.441 vs 2.289 at 4096).
    reason = "fused forward and backward in one kernel each"
    return dataclasses.replace(triton_norm, reason=reason), dataclasses.replace(triton_swiglu, reason=reason)


# ---------------------------------------------------------------------------------------------------------
# Optimizer, inference


def _choose_optimizer(ctx: _Context, request: str) -> Choice:
    adamw = "torch fused AdamW" if ctx.device_type == "cuda" else "torch AdamW"
    has_muon = ctx.env.torch_features.get("muon", False)
    if request == "apex_adam":
        apex = ctx.env.package("apex")
        if ctx.device_type != "cuda" or not apex.importable or not apex.extensions.get("amp_C", False):
            why = (
                "apex FusedAdam needs a CUDA GPU"
                if ctx.device_type != "cuda"
                else f"apex FusedAdam is not importable ({apex.diagnosis or apex.error or 'apex not installed'})"
            )
            raise BackendUnavailableError(
                f"optimizer backend 'apex_adam' was requested but cannot run here: {why}. "
                "Fix: `ghostvis install apex` on a CUDA machine, or use backend=auto"
            )
        # REFERENCE.md (H200): 32 x 4096^2 fp32 step, apex FusedAdam 4.47 ms vs torch fused AdamW 4.36 ms.
        return Choice(
            "apex_adam",
            f"apex FusedAdam {apex.version or ''}".strip(),
            "requested (measured no faster than torch fused AdamW)",
        )
    if request == "muon" or (request == "auto" and has_muon):
        if not has_muon:
            raise BackendUnavailableError(
                f"optimizer backend 'muon' was requested but this torch ({ctx.env.torch_version}) has no "
                "torch.optim.Muon. Fix: upgrade torch (>= 2.9), or use backend=adamw"
            )
        return Choice(
            "muon",
            f"{adamw} + Muon",
            "Muon for 2-D hidden matrices, AdamW for embeddings, head and scalars"
            + ("" if request == "auto" else "; requested"),
        )
    if request == "adamw":
        return Choice("adamw", adamw, "requested")
    return Choice("adamw", adamw, f"this torch ({ctx.env.torch_version}) has no torch.optim.Muon")


def vllm_unavailable(env: EnvFacts, device_type: str) -> str | None:
    """Why vLLM cannot serve here, None if it can."""
    if env.os_name != "Linux":
        return f"vLLM runs only on Linux, not {env.os_name}"
    pkg = env.package("vllm")
    if device_type == "cuda" and env.capability is not None and env.capability < (7, 5):
        cc = env.capability
        return f"vLLM needs compute capability 7.5 or newer; this GPU is sm{cc[0]}{cc[1]}"
    if not pkg.installed:
        return "vllm is not installed: `ghostvis install vllm`"
    if not pkg.usable:
        return f"vllm does not import: {pkg.diagnosis or pkg.error}"
    return None


def _choose_inference(ctx: _Context, request: str) -> Choice:
    why = vllm_unavailable(ctx.env, ctx.device_type)
    if request == "native":
        return Choice("native", "GhostVis engine", "requested")
    if why is None:
        version = ctx.env.package("vllm").version
        label = f"vLLM {version}" if version else "vLLM"
        where = "CPU build" if ctx.device_type == "cpu" else "CUDA"
        return Choice(
            "vllm",
            label,
            f"paged KV cache and continuous batching ({where})"
            + ("; requested" if request == "vllm" else ""),
        )
    if request == "vllm":
        raise BackendUnavailableError(f"inference backend 'vllm' was requested but cannot run here: {why}")
    return Choice("native", "GhostVis engine", f"preallocated KV cache; {why}")


# ---------------------------------------------------------------------------------------------------------
# Public API


def plan_backends(
    env: EnvFacts,
    *,
    device_type: str | None = None,
    attn: str = "auto",
    norm: str = "auto",
    optimizer: str = "auto",
    inference: str = "auto",
    use_flash_attn: bool = True,
    use_fused_kernels: bool = True,
    head_dim: int = 128,
    dtype: str = "bfloat16",
    compiled: bool = False,
) -> BackendPlan:
    """Choose every backend for this machine and these requests; explicit requests that can't run raise.

    compiled: the model runs under torch.compile (auto then keeps RMSNorm/SwiGLU in PyTorch for inductor to
    fuse with the ops around them).
    """
    if attn not in ATTN_REQUESTS:
        raise ConfigError(f"attn_backend={attn!r} is not one of {sorted(ATTN_REQUESTS)}")
    if norm not in NORM_REQUESTS:
        raise ConfigError(f"norm_backend={norm!r} is not one of {list(NORM_REQUESTS)}")
    if optimizer not in OPTIMIZER_REQUESTS:
        raise ConfigError(f"optimizer backend={optimizer!r} is not one of {list(OPTIMIZER_REQUESTS)}")
    if inference not in INFERENCE_REQUESTS:
        raise ConfigError(f"inference backend={inference!r} is not one of {list(INFERENCE_REQUESTS)}")
    if device_type is None:
        device_type = "cuda" if env.has_gpu else "cpu"
    if device_type not in ("cuda", "cpu"):
        raise ConfigError(f"device_type={device_type!r} is not one of ['cuda', 'cpu']")
    if device_type == "cuda" and not env.has_gpu:
        raise BackendUnavailableError(
            "device cuda was requested but no CUDA GPU is visible "
            f"(torch {env.torch_version}, CUDA build {env.torch_cuda or 'none'}). "
            "Fix: install a CUDA build of torch on a GPU machine, or use the CPU"
        )
    ctx = _Context(env, device_type, use_flash_attn, int(head_dim), str(dtype))
    requested = ATTN_REQUESTS[attn]
    attention = {}
    for case in ATTENTION_CASES:
        choice = _choose_attention(case, ctx, requested)
        attention[case] = choice if requested else _note_flash_skip(choice, case, ctx)
    rms_norm, swiglu = _choose_norm(ctx, norm, use_fused_kernels, compiled)
    return BackendPlan(
        device_type=device_type,
        attention=attention,
        rms_norm=rms_norm,
        swiglu=swiglu,
        optimizer=_choose_optimizer(ctx, optimizer),
        inference=_choose_inference(ctx, inference),
    )


_PLAN_CACHE: dict[tuple, BackendPlan] = {}


def plan_for_model(config, device_type: str, compiled: bool = False) -> BackendPlan:
    """The plan for a GPTConfig on `device_type` (eager, or under torch.compile), cached per (requests, device,
    compiled) for the process."""
    kwargs = {
        "compiled": bool(compiled),
        "attn": getattr(config, "attn_backend", "auto"),
        "norm": getattr(config, "norm_backend", "auto"),
        "use_flash_attn": bool(getattr(config, "use_flash_attn", True)),
        "use_fused_kernels": bool(getattr(config, "use_fused_kernels", True)),
        "head_dim": int(getattr(config, "head_dim", 128)),
        "dtype": str(getattr(config, "dtype", "bfloat16")),
    }
    key = (device_type, os.environ.get("TRITON_INTERPRET"), *sorted(kwargs.items()))
    if key not in _PLAN_CACHE:
        _PLAN_CACHE[key] = plan_backends(probe_env(), device_type=device_type, **kwargs)
    return _PLAN_CACHE[key]


def format_banner(plan: BackendPlan) -> str:
    """The startup log: which backend serves each case and why (facts only, no speedup claims)."""
    attn = "; ".join(
        f"{case} {c.label}" + (f" ({c.reason})" if c.reason else "") for case, c in plan.attention.items()
    )
    lines = ["=== GhostVis backends ===", f"Attention: {attn}"]
    if plan.rms_norm.backend == plan.swiglu.backend and plan.rms_norm.reason == plan.swiglu.reason:
        what = (
            "Triton fused kernels"
            if plan.rms_norm.backend == "triton"
            else (
                "PyTorch (F.rms_norm, silu(gate) * up)"
                if plan.rms_norm.backend == "torch"
                else plan.rms_norm.label
            )
        )
        lines.append(f"RMSNorm, SwiGLU: {what} ({plan.rms_norm.reason})")
    else:
        lines.append(
            f"RMSNorm: {plan.rms_norm.label} ({plan.rms_norm.reason}); "
            f"SwiGLU: {plan.swiglu.label} ({plan.swiglu.reason})"
        )
    lines.append(f"Optimizer: {plan.optimizer.label} ({plan.optimizer.reason})")
    lines.append(f"Inference: {plan.inference.label} ({plan.inference.reason})")
    return "\n".join(lines)


_LOGGED: set[str] = set()


def log_backends_once(plan: BackendPlan) -> None:
    """Log the banner through the ghostvis logger, once per process (the first plan wins)."""
    if _LOGGED:
        return
    banner = format_banner(plan)
    _LOGGED.add(banner)
    logger = get_logger()
    for line in banner.splitlines():
        logger.info(line)
