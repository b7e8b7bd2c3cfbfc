"""The one table of hardware limits per backend: compute capability, dtypes, head dim, package, platform.

The planner (backends.py), `ghostvis install` (install_plan.py) and `ghostvis doctor` (doctor_checks.py) all
read it, so a T4 is refused FlashAttention-2 for the same reason everywhere. A failed check is structured
(`Unavailable`: kind, message, fix); callers branch on `kind`, never on the text.

Also here: peak dense bf16 tensor-core FLOP/s per GPU (MFU in the trainer and `ghostvis bench train`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ghostvis_core.backend_names import HALF_DTYPES

UnavailableKind = Literal["device", "arch", "dtype", "head_dim", "torch", "package", "platform", "config"]


@dataclass(frozen=True)
class Unavailable:
    """Why a backend cannot run here: what kind of limit, the one-line message, and what would fix it."""

    kind: UnavailableKind
    """device (no CUDA GPU), arch (compute capability), dtype, head_dim, torch (feature missing from this
    torch), package (not installed / does not import: installing fixes it), platform (OS), config."""
    message: str
    """One line, e.g. "FlashAttention-2 needs an Ampere (sm80) or newer GPU; this is sm75"."""
    fix: str = ""
    """What to do about it (may be empty when nothing can be done on this machine)."""

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Limit:
    """What one backend needs. Message templates take {sm} (e.g. "sm75"), {dtype}, {head_dim}, {torch}."""

    min_cc: tuple[int, int] | None = None
    too_old: str = ""
    too_old_fix: str = ""
    max_cc: tuple[int, int] | None = None
    """Exclusive upper bound (the first capability that is not served)."""
    too_new: str = ""
    too_new_fix: str = ""
    dtypes: tuple[str, ...] | None = None
    """Compute dtypes it runs in; None = any."""
    dtype_msg: str = ""
    max_head_dim: int | None = None
    head_dim_multiple: int = 1
    head_dim_msg: str = ""
    torch_feature: str | None = None
    """EnvFacts.torch_features key this torch must have."""
    torch_msg: str = ""
    package: str | None = None
    """Import name of the package it needs (checked by `package_unavailable`)."""
    linux_only: bool = False


_NOTHING_TO_INSTALL_OLD = "GhostVis uses SDPA's efficient kernel and FlexAttention here; nothing to install."

LIMITS: dict[str, Limit] = {
    "flash_attn": Limit(
        min_cc=(8, 0),
        too_old="FlashAttention-2 needs an Ampere (sm80) or newer GPU; this is {sm}",
        too_old_fix=_NOTHING_TO_INSTALL_OLD,
        max_cc=(10, 0),
        too_new="FlashAttention-2 is not built for Blackwell ({sm}) in our wheels",
        too_new_fix="SDPA/cuDNN serves attention there; nothing to install.",
        dtypes=HALF_DTYPES,
        dtype_msg="FlashAttention-2 runs only in fp16/bf16, not {dtype}",
        max_head_dim=256,
        head_dim_multiple=8,
        head_dim_msg="FlashAttention-2 needs head_dim <= 256 and a multiple of 8, not {head_dim}",
        package="flash_attn",
        linux_only=True,
    ),
    "sdpa_cudnn": Limit(
        torch_feature="cudnn_sdpa",
        torch_msg="this torch ({torch}) has no cuDNN SDPA backend",
        min_cc=(8, 0),
        too_old="cuDNN SDPA needs sm80 or newer; this is {sm}",
        dtypes=HALF_DTYPES,
        dtype_msg="cuDNN SDPA runs only in fp16/bf16, not {dtype}",
        max_head_dim=128,
        head_dim_multiple=8,
        head_dim_msg="cuDNN SDPA needs head_dim <= 128 and a multiple of 8, not {head_dim}",
    ),
    "sdpa_flash": Limit(
        min_cc=(8, 0),
        too_old="SDPA's flash kernel needs sm80 or newer; this is {sm}",
        dtypes=HALF_DTYPES,
        dtype_msg="SDPA's flash kernel runs only in fp16/bf16, not {dtype}",
        max_head_dim=256,
        head_dim_multiple=8,
        head_dim_msg="SDPA's flash kernel needs head_dim <= 256 and a multiple of 8, not {head_dim}",
    ),
    "sdpa_efficient": Limit(min_cc=(5, 0), too_old="SDPA's efficient kernel needs sm50 or newer; this is {sm}"),
    "sdpa_math": Limit(),
    "flex": Limit(
        torch_feature="flex_attention",
        torch_msg="this torch ({torch}) has no FlexAttention",
        min_cc=(7, 0),
        too_old="FlexAttention compiles Triton kernels, which need sm70 or newer; this is {sm}",
        package="triton",
    ),
    "triton": Limit(
        min_cc=(7, 0), too_old="Triton needs a CUDA GPU of sm70 or newer; this is {sm}", package="triton"
    ),
    "vllm": Limit(
        min_cc=(7, 5),
        too_old="vLLM needs compute capability 7.5 or newer; this GPU is {sm}",
        too_old_fix="`ghostvis infer` uses the native engine here.",
        package="vllm",
        linux_only=True,
    ),
    "liger": Limit(
        min_cc=(7, 0),
        too_old="Liger-Kernel's Triton kernels need sm70 or newer; this is {sm}",
        package="liger_kernel",
        linux_only=True,
    ),
}


# vLLM's CPU attention (vllm/v1/attention/backends/cpu_attn.py, get_supported_head_sizes in 0.32): any other
# head_dim loads, then fails at the first generate ("Unsupported CPU attention configuration").
VLLM_CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def sm_name(cc: tuple[int, int] | None) -> str:
    """"sm90" for (9, 0); "CPU" for None."""
    return f"sm{cc[0]}{cc[1]}" if cc else "CPU"


def arch_unavailable(backend: str, cc: tuple[int, int]) -> Unavailable | None:
    """Why `backend` cannot run on a GPU of compute capability `cc`, None if the architecture is served."""
    limit = LIMITS[backend]
    if limit.min_cc is not None and cc < limit.min_cc:
        return Unavailable("arch", limit.too_old.format(sm=sm_name(cc)), limit.too_old_fix)
    if limit.max_cc is not None and cc >= limit.max_cc:
        return Unavailable("arch", limit.too_new.format(sm=sm_name(cc)), limit.too_new_fix)
    return None


def gpu_unavailable(
    backend: str,
    cc: tuple[int, int],
    *,
    dtype: str,
    head_dim: int,
    torch_features: dict[str, bool],
    torch_version: str,
) -> Unavailable | None:
    """Torch feature, architecture, dtype and head-dim limits of `backend` on one CUDA GPU (no package check)."""
    limit = LIMITS[backend]
    if limit.torch_feature is not None and not torch_features.get(limit.torch_feature, False):
        return Unavailable("torch", limit.torch_msg.format(torch=torch_version), "upgrade torch")
    why = arch_unavailable(backend, cc)
    if why is not None:
        return why
    if limit.dtypes is not None and dtype not in limit.dtypes:
        return Unavailable("dtype", limit.dtype_msg.format(dtype=dtype), "run in bfloat16 or float16")
    if limit.max_head_dim is not None and (head_dim > limit.max_head_dim or head_dim % limit.head_dim_multiple):
        return Unavailable("head_dim", limit.head_dim_msg.format(head_dim=head_dim), "change n_embd / n_head")
    return None


def package_unavailable(env, module: str, dist: str) -> Unavailable | None:
    """Why package `module` (pip name `dist`) is not usable: not installed or does not import; None if usable."""
    pkg = env.package(module)
    fix = f"`ghostvis install {dist}`"
    if not pkg.installed:
        return Unavailable("package", f"{dist} is not installed: {fix}", fix)
    if not pkg.usable:
        return Unavailable("package", f"{dist} does not import: {pkg.diagnosis or pkg.error}", fix)
    return None


# Peak dense bf16 tensor-core FLOP/s (no sparsity) by GPU name substring, first match wins; MFU divides by it.
# Vendor datasheets: H100/H200 SXM 989 TF, H100 PCIe 756 TF, B200 2.25 PF, A100 312 TF.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
)


def peak_bf16_flops(gpu_name: str) -> float | None:
    """Datasheet peak dense bf16 FLOP/s for a GPU name (torch.cuda.get_device_name), None if unknown."""
    for key, flops in PEAK_BF16_FLOPS:
        if key in gpu_name:
            return flops
    return None


# Model preset of a fresh pretraining run on GPUs when --preset is not given, by the smallest visible card's
# memory in GiB (first row it reaches). Training holds ~16 bytes a parameter (fp32 weights and gradients,
# two optimizer moments): d20's 564M parameters take ~9 GiB before activations, so it fits an 80 GiB card with
# room for real batches, d12's 186M (~3 GiB) a 24 GiB one. Smaller cards get the 32M "small" decoder; the CPU
# keeps the "tiny" demo preset (the recipes' default).
GPU_DEFAULT_PRESETS: tuple[tuple[float, str], ...] = ((64.0, "d20"), (20.0, "d12"), (0.0, "small"))


def default_gpu_preset(memory_gib: float) -> str:
    """The GPU_DEFAULT_PRESETS preset for a card with `memory_gib` GiB."""
    for floor, preset in GPU_DEFAULT_PRESETS:
        if memory_gib >= floor:
            return preset
    return GPU_DEFAULT_PRESETS[-1][1]
