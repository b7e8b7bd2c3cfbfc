"""Public RMSNorm / SwiGLU entry points and their concrete backends: "triton", "apex", "torch".

The decision (which backend a model uses, and why) is made by `ghostvis_core.backends`; the model and direct
callers (tests, kernels_bench) pass a concrete name here ("auto" is resolved by the plan, never in a kernel).
A backend that cannot run on the tensors' device raises `BackendUnavailableError`.

Backends and their rounding (bf16/fp16 inputs; fp32 inputs agree to fp32 rounding):
  triton  Llama/HF semantics: y = w * round(x * rstd), fp32 inside (see rms_norm_triton.py).
  torch   `F.rms_norm` when x and w share a dtype (rounds once: round(x * rstd * w), so it can differ from
          triton/HF by one ulp of the output dtype); the explicit HF formula when they differ, because
          `F.rms_norm` then returns x.dtype where HF promotes to the wider dtype.
  apex    `apex.normalization.fused_layer_norm.fused_rms_norm_affine` (CUDA only).
SwiGLU: triton (fused, silu recomputed in backward) or torch (`F.silu(gate) * up`); apex has no SwiGLU.
"""

import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ghostvis_core.backend_names import NORM_BACKENDS, SWIGLU_BACKENDS
from ghostvis_core.errors import BackendUnavailableError, ConfigError

RMS_NORM_BACKENDS = NORM_BACKENDS


# Memo of the Triton import check: a plain global rather than functools.cache, because dynamo warns about (and
# cannot inline) lru_cache-wrapped calls when a direct `rms_norm(...)` call sits inside a compiled region.
_TRITON_ERROR: list[str | None] = []


def triton_import_error() -> str | None:
    """None when Triton imports in this process, else the import error as text."""
    if not _TRITON_ERROR:
        try:
            import triton  # noqa: F401
        except ImportError as err:
            _TRITON_ERROR.append(f"{type(err).__name__}: {err}")
        else:
            _TRITON_ERROR.append(None)
    return _TRITON_ERROR[0]


def triton_interpret() -> bool:
    """True when TRITON_INTERPRET=1: Triton kernels then run on CPU tensors (slowly; for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def _check(backend: str, device_type: str, allowed: tuple[str, ...], what: str) -> str:
    """Check that the concrete `backend` can run on `device_type` tensors; returns it."""
    if backend not in allowed:
        raise ConfigError(f"{what} backend {backend!r} is not one of {', '.join(allowed)}")
    cuda = device_type == "cuda"
    if backend == "triton":
        if triton_import_error() is not None:
            raise BackendUnavailableError(
                f"{what} backend 'triton' requested but Triton does not import ({triton_import_error()}); "
                "install it (`ghostvis install triton`) or pick backend 'torch'."
            )
        if not cuda and not triton_interpret():
            raise BackendUnavailableError(
                f"{what} backend 'triton' needs CUDA tensors (got a {device_type} tensor); "
                "use backend 'torch' on this device."
            )
    if backend == "apex" and not cuda:
        raise BackendUnavailableError(
            f"{what} backend 'apex' needs CUDA tensors (got {device_type}); use backend 'torch'."
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


def rms_norm_fn(backend: str, device_type: str) -> Callable:
    """The RMSNorm function `(x, weight, eps) -> y` of `backend` for `device_type` tensors, checked once.

    Modules resolve their function here at construction, so a compiled forward calls it without re-checking.
    """
    chosen = _check(backend, device_type, RMS_NORM_BACKENDS, "RMSNorm")
    if chosen == "triton":
        from ghostvis_core.kernels.rms_norm_triton import rms_norm_triton

        return rms_norm_triton
    return rms_norm_apex if chosen == "apex" else rms_norm_torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-5, *, backend: str) -> torch.Tensor:
    """RMSNorm over the last dim of x (any leading shape), scaled by `weight` when given."""
    return rms_norm_fn(backend, x.device.type)(x, weight, eps)


def swiglu_torch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Eager SwiGLU: silu(gate) * up."""
    return F.silu(gate) * up


def swiglu_fn(backend: str, device_type: str) -> Callable:
    """The SwiGLU function `(gate, up) -> silu(gate) * up` of `backend` for `device_type` tensors."""
    if backend == "apex":
        raise BackendUnavailableError("apex has no SwiGLU kernel; use backend 'triton' or 'torch'.")
    if _check(backend, device_type, SWIGLU_BACKENDS, "SwiGLU") == "triton":
        from ghostvis_core.kernels.swiglu_triton import swiglu_triton

        return swiglu_triton
    return swiglu_torch


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str) -> torch.Tensor:
    """silu(gate) * up; gate and up share a shape (they may be the two halves of one projection)."""
    return swiglu_fn(backend, gate.device.type)(gate, up)
