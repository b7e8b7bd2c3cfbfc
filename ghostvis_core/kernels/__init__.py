"""Fused kernels: RMSNorm and SwiGLU with Triton, apex and PyTorch backends.

    from ghostvis_core.kernels import rms_norm, swiglu
    y = rms_norm(x, weight, eps=1e-5, backend="triton")   # backend: "triton" | "apex" | "torch"
    h = swiglu(gate, up, backend="triton")                 # backend: "triton" | "torch"

Triton itself is imported only when a Triton backend runs, so importing this package costs nothing extra.
"""

from ghostvis_core.kernels.dispatch import (
    RMS_NORM_BACKENDS,
    SWIGLU_BACKENDS,
    rms_norm,
    rms_norm_torch,
    swiglu,
    swiglu_torch,
    triton_import_error,
)

__all__ = [
    "RMS_NORM_BACKENDS",
    "SWIGLU_BACKENDS",
    "rms_norm",
    "rms_norm_torch",
    "swiglu",
    "swiglu_torch",
    "triton_import_error",
]
