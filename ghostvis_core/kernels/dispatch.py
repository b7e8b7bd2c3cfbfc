"""Public RMSNorm / SwiGLU entry points and their backends: "triton", "apex", "torch", "auto".

The decision of record (which backend a model uses, and why) is made by `ghostvis_core.backends`; the model
passes that choice here explicitly. "auto" exists for direct callers and stays trivial: Triton for CUDA tensors
when Triton imports, PyTorch otherwise. An explicit request that cannot run raises `BackendUnavailableError`.

Backends and their rounding (bf16/fp16 inputs; fp32 inputs agree to fp32 rounding):
  triton  Llama/HF semantics: y = w * round(x * rstd), fp32 inside (see rms_norm_triton.py).
  torch   `F.rms_norm` when x and w share a dtype (rounds once: round(x * rstd * w), so it can differ from
          triton/HF by one ulp of the output dtype); the explicit HF formula when they differ, because
          `F.rms_norm` then returns x.dtype where HF promotes to the wider dtype.
  apex    `apex.normalization.fused_layer_norm.fused_rms_norm_affine` (CUDA only).
SwiGLU: triton (fused, silu recomputed in backward) or torch (`F.silu(gate) * up`); apex has no SwiGLU.
"""

import functools
import os

import torch
import torch.nn.functional as F

from ghostvis_core.errors import BackendUnavailableError, ConfigError

RMS_NORM_BACKENDS = ("auto", "triton", "apex", "torch")
SWIGLU_BACKENDS = ("auto", "triton", "torch")


@functools.cache
def triton_import_error() -> str | None:
    """None when Triton imports in this process, else the import error as text."""
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return f"{type(err).__name__}: {err}"
    return None


def triton_interpret() -> bool:
    """True when TRITON_INTERPRET=1: Triton kernels then run on CPU tensors (slowly; for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def _resolve(backend: str, t: torch.Tensor, allowed: tuple[str, ...], what: str) -> str:
    """Map "auto" to a concrete backend and check that an explicit one can run on this tensor."""
    if backend not in allowed:
        raise ConfigError(f"{what} backend {backend!r} is not one of {', '.join(allowed)}")
    if backend == "auto":
        return "triton" if t.is_cuda and triton_import_error() is None else "torch"
    if backend == "triton":
        if triton_import_error() is not None:
            raise BackendUnavailableError(
                f"{what} backend 'triton' requested but Triton does not import ({triton_import_error()}); "
                "install it (`ghostvis install triton`) or pick backend 'torch'."
            )
        if not t.is_cuda and not triton_interpret():
            raise BackendUnavailableError(
                f"{what} backend 'triton' needs CUDA tensors (got a {t.device.type} tensor); "
                "use backend 'torch' on this device."
            )
    if backend == "apex" and not t.is_cuda:
        raise BackendUnavailableError(
            f"{what} backend 'apex' needs CUDA tensors (got {t.device.type}); use backend 'torch'."
        )
    return backend


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-5) -> torch.Tensor:
    """PyTorch RMSNorm: `F.rms_norm` for matching dtypes, the HF formula for mixed x/w dtypes."""
    if weight is None or weight.dtype == x.dtype:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    x_f32 = x.float()
    n = x_f32 * torch.rsqrt(x_f32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * n.to(x.dtype)


def rms_norm_apex(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-5) -> torch.Tensor:
    """apex's fused CUDA RMSNorm; raises BackendUnavailableError when apex or its extension is missing."""
    try:
        from apex.normalization.fused_layer_norm import fused_rms_norm, fused_rms_norm_affine
    except ImportError as err:
        raise BackendUnavailableError(
            f"RMSNorm backend 'apex' requested but apex does not import ({err}); "
            "build it with `ghostvis install apex` or pick backend 'triton' or 'torch'."
        ) from err
    shape = (x.shape[-1],)
    if weight is None:
        return fused_rms_norm(x, shape, eps)
    return fused_rms_norm_affine(x, weight, shape, eps)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-5, backend: str = "auto"
) -> torch.Tensor:
    """RMSNorm over the last dim of x (any leading shape), scaled by `weight` when given."""
    chosen = _resolve(backend, x, RMS_NORM_BACKENDS, "RMSNorm")
    if chosen == "triton":
        from ghostvis_core.kernels.rms_norm_triton import rms_norm_triton

        return rms_norm_triton(x, weight, eps)
    if chosen == "apex":
        return rms_norm_apex(x, weight, eps)
    return rms_norm_torch(x, weight, eps)


def swiglu_torch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Eager SwiGLU: silu(gate) * up."""
    return F.silu(gate) * up


def swiglu(gate: torch.Tensor, up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """silu(gate) * up; gate and up share a shape (they may be the two halves of one projection)."""
    if backend == "apex":
        raise BackendUnavailableError("apex has no SwiGLU kernel; use backend 'triton' or 'torch'.")
    chosen = _resolve(backend, gate, SWIGLU_BACKENDS, "SwiGLU")
    if chosen == "triton":
        from ghostvis_core.kernels.swiglu_triton import swiglu_triton

        return swiglu_triton(gate, up)
    return swiglu_torch(gate, up)
