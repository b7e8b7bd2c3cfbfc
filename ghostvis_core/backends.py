"""The one place that decides which implementation runs, and why.

`plan_run(env, facts)` turns `EnvFacts` (env.py: the machine) and `RunFacts` (the run: device, compute dtype,
compiled or not, world size, and the user's requests) into one `BackendPlan`: the attention backend per case
(dense causal, packed documents, decode with a KV cache, non-causal), RMSNorm, SwiGLU, the optimizer and the
inference engine, the small-batch decode layers (decode_layers.py), and for training fp8 and activation
checkpointing (their rules: training_choices.py; which engine `ghostvis infer/bench --backend` runs, native or
vLLM, is engine_choice.py's). Every pick is a `Choice` with a human label and a one-line reason. `auto` falls
back and says why; an explicit request this machine cannot meet raises `BackendUnavailableError` with the reason and the fix.
A process builds its plan once (`training_run_facts` / `inference_run_facts` give the facts) and passes it to
the model, the optimizer, the engine and the benchmarks; `ghostvis doctor` calls the same functions.
Hardware limits come from hardware_limits.py; request names from backend_names.py; the startup banner that
reports a plan from plan_banner.py.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from ghostvis_core.attention_preferences import CASES_SUPPORTED, PREFERENCES
from ghostvis_core.backend_names import (
    ACTIVATION_CHECKPOINTING,
    ATTENTION_CASES,
    ATTN_REQUEST_TO_BACKEND,
    ATTN_REQUESTS,
    DECODE_LAYERS_REQUESTS,
    DTYPES,
    FP8_REQUESTS,
    INFERENCE_REQUESTS,
    NORM_REQUESTS,
    OPTIMIZER_REQUESTS,
)
from ghostvis_core.env import EnvFacts
from ghostvis_core.errors import BackendUnavailableError, ConfigError
from ghostvis_core.hardware_limits import (
    Unavailable,
    gpu_unavailable,
    package_unavailable,
)
from ghostvis_core.hardware_limits import arch_unavailable as _arch_unavailable

__all__ = [
    "ATTENTION_CASES",
    "BackendPlan",
    "Choice",
    "RunFacts",
    "attention_unavailable",
    "inference_run_facts",
    "plan_backends",
    "plan_run",
    "training_run_facts",
]

_FA2_FIX = "`ghostvis install flash-attn`"


@dataclass(frozen=True)
class Choice:
    """One decision: the backend name code dispatches on, a human label, and why."""

    backend: str
    """Machine name the code dispatches on, e.g. "sdpa_cudnn", "triton", "muon"."""
    label: str
    """Human label, e.g. "SDPA/cuDNN", "FlashAttention-2 2.8.3 varlen"."""
    reason: str
    """One line: why this one (and, on a fallback, why not the preferred one)."""


@dataclass(frozen=True)
class RunFacts:
    """Everything about one run that a backend choice depends on (the machine itself is `EnvFacts`)."""

    device_type: str
    """"cuda" or "cpu"."""
    dtype: str
    """Compute dtype (backend_names.Dtype): the autocast dtype in training, the parameter dtype in inference."""
    compiled: bool = False
    """The decoder blocks run under torch.compile (auto then keeps RMSNorm/SwiGLU in PyTorch for inductor)."""
    world_size: int = 1
    """Processes in the run (DDP/FSDP ranks)."""
    attn: str = "auto"
    """Attention request (backend_names.AttnRequest)."""
    norm: str = "auto"
    """RMSNorm request (backend_names.NormRequest)."""
    optimizer: str = "auto"
    """Optimizer request (backend_names.OptimizerRequest)."""
    inference: str = "auto"
    """Inference engine request (backend_names.InferenceRequest)."""
    use_flash_attn: bool = True
    """GPTConfig.use_flash_attn: False keeps FlashAttention-2 out of every case."""
    use_fused_kernels: bool = True
    """GPTConfig.use_fused_kernels: False keeps auto RMSNorm/SwiGLU in PyTorch."""
    head_dim: int = 128
    """Attention head dim (kernels have head-dim limits)."""
    fp8: str = "none"
    """fp8 training request (backend_names.Fp8Request): none, tensorwise or rowwise."""
    activation_checkpointing: str = "none"
    """Block recomputation request (backend_names.ActivationCheckpointing): none, full or selective."""
    fsdp: bool = False
    """Parameters are sharded with FSDP2 (fp8 then all-gathers the weights in float8 where the recipe allows)."""
    purpose: str = "train"
    """"train" or "inference": what the banner reports (an inference run has no optimizer to name)."""
    decode_layers: str = "auto"
    """Small-batch decode layers request (backend_names.DecodeLayersRequest)."""

    def __post_init__(self):
        if self.attn not in ATTN_REQUESTS:
            raise ConfigError(f"attn_backend={self.attn!r} is not one of {sorted(ATTN_REQUESTS)}")
        if self.norm not in NORM_REQUESTS:
            raise ConfigError(f"norm_backend={self.norm!r} is not one of {list(NORM_REQUESTS)}")
        if self.optimizer not in OPTIMIZER_REQUESTS:
            raise ConfigError(f"optimizer backend={self.optimizer!r} is not one of {list(OPTIMIZER_REQUESTS)}")
        if self.inference not in INFERENCE_REQUESTS:
            raise ConfigError(f"inference backend={self.inference!r} is not one of {list(INFERENCE_REQUESTS)}")
        if self.decode_layers not in DECODE_LAYERS_REQUESTS:
            raise ConfigError(f"decode_layers={self.decode_layers!r} is not one of {list(DECODE_LAYERS_REQUESTS)}")
        if self.device_type not in ("cuda", "cpu"):
            raise ConfigError(f"device_type={self.device_type!r} is not one of ['cuda', 'cpu']")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} is not one of {list(DTYPES)}")
        if self.world_size < 1:
            raise ConfigError(f"world_size must be >= 1, got {self.world_size}")
        if self.fp8 not in FP8_REQUESTS:
            raise ConfigError(f"fp8={self.fp8!r} is not one of {list(FP8_REQUESTS)}")
        if self.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
            raise ConfigError(f"activation_checkpointing={self.activation_checkpointing!r} is not one of "
                              f"{list(ACTIVATION_CHECKPOINTING)}")

    @classmethod
    def for_training(
        cls, model_config, optimizer_backend: str, device_type: str, dtype: str, compiled: bool, world_size: int,
        *, fp8: str = "none", activation_checkpointing: str = "none", fsdp: bool = False,
    ) -> RunFacts:
        """Facts of a training run (model_config None: a default GPTConfig's requests)."""
        return cls(
            device_type, dtype, bool(compiled), int(world_size), optimizer=optimizer_backend,
            fp8=fp8, activation_checkpointing=activation_checkpointing, fsdp=bool(fsdp),
            **_model_requests(model_config),
        )

    @classmethod
    def for_inference(cls, model_config, device_type: str, dtype: str, compiled: bool = False) -> RunFacts:
        """Facts of an inference run, one process; compiled: the decode step runs under torch.compile."""
        return cls(device_type, dtype, bool(compiled), **_model_requests(model_config), purpose="inference")


def _model_requests(config) -> dict:
    if config is None:
        return {}
    return {
        "attn": config.attn_backend,
        "norm": config.norm_backend,
        "use_flash_attn": bool(config.use_flash_attn),
        "use_fused_kernels": bool(config.use_fused_kernels),
        "head_dim": int(config.head_dim),
    }


def default_device_type(env: EnvFacts) -> str:
    """cuda when a CUDA GPU is visible, else cpu."""
    return "cuda" if env.has_gpu else "cpu"


def resolve_dtype(dtype: str, device_type: str) -> str:
    """"auto" = bfloat16 on CUDA, float32 on CPU; any other Dtype name is returned as is."""
    if dtype == "auto":
        return "bfloat16" if device_type == "cuda" else "float32"
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return dtype


def training_run_facts(
    env: EnvFacts,
    model_config=None,
    *,
    device_type: str | None = None,
    compile: bool | None = None,
    dtype: str = "auto",
    optimizer: str = "auto",
    world_size: int = 1,
    fp8: str = "none",
    activation_checkpointing: str = "none",
    fsdp: bool = False,
) -> RunFacts:
    """The one translation of a training run's settings into facts (the trainer and `ghostvis doctor` use it).

    dtype auto = bfloat16 autocast on CUDA, float32 on CPU; compile None = on for CUDA, off on CPU.
    """
    device = device_type or default_device_type(env)
    compiled = compile if compile is not None else device == "cuda"
    return RunFacts.for_training(model_config, optimizer, device, resolve_dtype(dtype, device), compiled, world_size,
                                 fp8=fp8, activation_checkpointing=activation_checkpointing, fsdp=fsdp)


def inference_run_facts(env: EnvFacts, model_config=None, *, device_type: str | None = None,
                        dtype: str = "auto", compile: bool | None = None) -> RunFacts:
    """Facts of an inference run: parameters in `dtype` (auto = bfloat16 on CUDA, float32 on CPU); compile
    None = the decode step is compiled on CUDA (fused kernels inside its CUDA graph: at batch 1 a step is a
    few hundred tiny kernels whose count, not the weights' bytes, bounds eager speed), eager on CPU."""
    device = device_type or default_device_type(env)
    compiled = compile if compile is not None else device == "cuda"
    return RunFacts.for_inference(model_config, device, resolve_dtype(dtype, device), compiled)


@dataclass(frozen=True)
class BackendPlan:
    """Every implementation choice for one process, and the facts it was made for."""

    facts: RunFacts
    attention: dict[str, Choice]
    """One Choice per ATTENTION_CASES entry."""
    rms_norm: Choice
    swiglu: Choice
    optimizer: Choice
    inference: Choice
    fp8: Choice = None  # type: ignore[assignment]  # plan_run always sets it; None only in hand-built plans
    """Whether the block linears train in float8: backend none | tensorwise | rowwise."""
    activation_checkpointing: Choice = None  # type: ignore[assignment]
    """Which blocks recompute their activations in backward: backend none | full | selective."""
    decode_layers: Choice = None  # type: ignore[assignment]
    """How a small-batch decode step runs its layers: triton (fused kernels) | torch (decode_layers.py)."""

    def __post_init__(self):
        if self.decode_layers is None:
            object.__setattr__(self, "decode_layers", Choice("torch", "PyTorch layers", "not planned"))
        if self.fp8 is None:
            object.__setattr__(self, "fp8", Choice("none", "off", "not requested"))
        if self.activation_checkpointing is None:
            object.__setattr__(self, "activation_checkpointing", Choice("none", "off", "not requested"))

    @property
    def device_type(self) -> str:
        """"cuda" or "cpu"."""
        return self.facts.device_type

    @property
    def dtype(self) -> str:
        """The compute dtype the plan was made for."""
        return self.facts.dtype

    @property
    def compiled(self) -> bool:
        """True when the plan is for blocks under torch.compile."""
        return self.facts.compiled

    def to_dict(self) -> dict:
        """JSON-ready plan."""
        d = dataclasses.asdict(self)
        facts = d.pop("facts")
        return {"device_type": self.device_type, "dtype": self.dtype, "compiled": self.compiled,
                "world_size": facts["world_size"], **d}


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
        return base + {"packed": " varlen", "decode": " kvcache", "prefill": " kvcache"}.get(case, "")
    if backend == "flex":
        return "FlexAttention (document mask)" if case == "packed" else "FlexAttention"
    if backend == "triton":
        return "Triton split-KV decode"
    label = {
        "sdpa_cudnn": "SDPA/cuDNN",
        "sdpa_flash": "SDPA/flash",
        "sdpa_efficient": "SDPA/efficient",
        "sdpa_math": "SDPA/math",
    }[backend]
    return label + " + block-diagonal mask" if case == "packed" else label


def attention_unavailable(backend: str, ctx: _Context) -> Unavailable | None:
    """Why `backend` cannot run on this machine and config (hardware, dtype, install), None if it can."""
    env = ctx.env
    if backend == "sdpa_math":
        return None
    if ctx.device_type != "cuda":
        label = _attention_label(backend, "dense", env)
        return Unavailable("device", f"{label} needs a CUDA GPU", "run on a CUDA GPU")
    why = gpu_unavailable(
        backend, ctx.cc, dtype=ctx.dtype, head_dim=ctx.head_dim,
        torch_features=env.torch_features, torch_version=env.torch_version,
    )
    if why is not None:
        return why
    if backend == "flash_attn":
        if not ctx.use_flash_attn:
            return Unavailable("config", "use_flash_attn=False in the config", "set use_flash_attn=True")
        return package_unavailable(env, "flash_attn", "flash-attn")
    if backend in ("flex", "triton"):
        triton = env.package("triton")
        if not triton.usable:
            why = triton.diagnosis or triton.error or "triton is not installed"
            fix = "`ghostvis install triton`"
            name = "FlexAttention" if backend == "flex" else "The Triton decode kernel"
            return Unavailable("package", f"{name} needs Triton: {why} ({fix})", fix)
    if backend == "triton" and ctx.head_dim & (ctx.head_dim - 1):
        return Unavailable("head_dim", f"the Triton decode kernel needs a power-of-two head_dim, got {ctx.head_dim}",
                           "change n_embd / n_head")  # fmt: skip
    return None


def attention_context(env: EnvFacts, facts: RunFacts) -> _Context:
    """The attention-relevant facts of a run on this machine (for `attention_unavailable`)."""
    return _Context(env, facts.device_type, facts.use_flash_attn, int(facts.head_dim), facts.dtype)


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
        skipped.append(why_not.message)
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
    if why is None or why.message in choice.reason:
        return choice
    return dataclasses.replace(choice, reason=f"{choice.reason}; {why.message}")


# ---------------------------------------------------------------------------------------------------------
# RMSNorm, SwiGLU


def _triton_unavailable(ctx: _Context) -> str | None:
    if ctx.device_type != "cuda":
        return "Triton kernels need a CUDA GPU"
    why = _arch_unavailable("triton", ctx.cc) or package_unavailable(ctx.env, "triton", "triton")
    return None if why is None else why.message


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


def _choose_inference(ctx: _Context, request: str) -> Choice:
    # The plan's engine for this process's model code: the native one (`choose_inference` picks between it and
    # vLLM for `ghostvis infer --backend`, with facts about the vLLM environment the plan does not hold).
    return Choice("native", "GhostVis engine", "preallocated KV cache" + ("; requested" if request == "native" else ""))


# ---------------------------------------------------------------------------------------------------------
# Public API


def plan_run(env: EnvFacts, facts: RunFacts) -> BackendPlan:
    """Choose every backend for this machine and run; explicit requests that can't run raise. Pure."""
    if facts.device_type == "cuda" and not env.has_gpu:
        raise BackendUnavailableError(
            "device cuda was requested but no CUDA GPU is visible "
            f"(torch {env.torch_version}, CUDA build {env.torch_cuda or 'none'}). "
            "Fix: install a CUDA build of torch on a GPU machine, or use the CPU"
        )
    from ghostvis_core.decode_layers import choose_decode_layers
    from ghostvis_core.training_choices import choose_activation_checkpointing, choose_fp8

    ctx = attention_context(env, facts)
    requested = ATTN_REQUEST_TO_BACKEND[facts.attn]
    attention = {}
    for case in ATTENTION_CASES:
        choice = _choose_attention(case, ctx, requested)
        attention[case] = choice if requested else _note_flash_skip(choice, case, ctx)
    rms_norm, swiglu = _choose_norm(ctx, facts.norm, facts.use_fused_kernels, facts.compiled)
    return BackendPlan(
        facts=facts,
        attention=attention,
        rms_norm=rms_norm,
        swiglu=swiglu,
        optimizer=_choose_optimizer(ctx, facts.optimizer),
        inference=_choose_inference(ctx, facts.inference),
        fp8=choose_fp8(env, facts),
        activation_checkpointing=choose_activation_checkpointing(facts),
        decode_layers=choose_decode_layers(env, facts),
    )


def plan_backends(env: EnvFacts, *, device_type: str | None = None, dtype: str = "bfloat16", **requests) -> BackendPlan:
    """plan_run with the facts given as keywords (RunFacts fields; device default: this machine's GPU, else
    CPU). For tests and tools that look at one choice; a run builds its facts with training_run_facts."""
    return plan_run(env, RunFacts(device_type or default_device_type(env), dtype, **requests))
