"""`ghostvis bench kernels`: GhostVis Triton RMSNorm and SwiGLU against PyTorch (and Liger when installed).

Each implementation is timed in the same process on the same card, as the median of CUDA-event timings, and
reported in GB/s and as a percentage of a device-to-device copy measured in the same run. Bytes counted
(the fewest a fused kernel must move):

    RMSNorm fwd      reads x, writes y                    2 * M * H * elem
    RMSNorm bwd      reads x, dy, writes dx               3 * M * H * elem     (weight and rstd negligible)
    SwiGLU fwd       reads gate, up, writes out           3 * M * N * elem
    SwiGLU bwd       reads gate, up, dout, writes d(gate), d(up)   5 * M * N * elem

"fwd+bwd" times `autograd.grad(f(inputs), inputs, dy)` (forward included) against fwd + bwd bytes.
Attention rows come from `ghostvis_core.bench.attention_bench.run_attention_bench()`.
"""

import importlib.util
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ghostvis_core.bench.timing import copy_bandwidth, cuda_median_ms, gb_per_s, require_cuda
from ghostvis_core.errors import ConfigError

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass(kw_only=True)
class KernelBenchConfig:
    """Shapes and options of one `bench kernels` run."""

    rms_rows: int = 16384
    """RMSNorm rows M (tokens)."""
    rms_hidden: int = 4096
    """RMSNorm hidden size H."""
    swiglu_rows: int = 16384
    """SwiGLU rows M (tokens)."""
    swiglu_hidden: int = 8192
    """SwiGLU width N of gate, up and the output."""
    dtype: str = "bfloat16"
    """Activation dtype: bfloat16 or float16 (bf16 / fp16 accepted)."""
    eps: float = 1e-5
    """RMSNorm epsilon."""
    iters: int = 30
    """Timed calls per measurement (the median is reported)."""
    compile: bool = True
    """Also time `torch.compile` of the eager formulas (costs compile time on the first call)."""
    attention: bool = True
    """Also run the attention benchmark rows (TFLOP/s per attention backend)."""

    def __post_init__(self) -> None:
        for name in ("rms_rows", "rms_hidden", "swiglu_rows", "swiglu_hidden", "iters"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.eps <= 0:
            raise ConfigError(f"--eps must be positive, got {self.eps}")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype named by `dtype`."""
        return DTYPES[self.dtype]


@dataclass
class KernelRow:
    """One implementation's result for one kernel."""

    kernel: str
    impl: str
    status: str  # "ok" | "absent" | "error"
    reason: str | None = None
    fwd_ms: float | None = None
    fwdbwd_ms: float | None = None
    fwd_gb_s: float | None = None
    fwdbwd_gb_s: float | None = None
    fwd_pct_copy: float | None = None
    fwdbwd_pct_copy: float | None = None
    rel_err: float | None = None
    """||out - ref|| / ||ref|| against a float64 reference of the Llama / eager formula."""


def rms_norm_eager(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """The Llama/HF formula: fp32 normalisation, cast back, times weight."""
    x_f32 = x.float()
    return w * (x_f32 * torch.rsqrt(x_f32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def swiglu_eager(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b in eager PyTorch."""
    return F.silu(a) * b


def _liger_rms_norm() -> tuple[Callable | None, str | None]:
    if importlib.util.find_spec("liger_kernel") is None:
        return None, "liger_kernel is not installed (pip install liger-kernel)"
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    # in_place=False: the benchmark reuses dy, which Liger would otherwise overwrite with dx.
    return lambda x, w, eps: LigerRMSNormFunction.apply(x, w, eps, 0.0, "llama", False), None


def _liger_swiglu() -> tuple[Callable | None, str | None]:
    if importlib.util.find_spec("liger_kernel") is None:
        return None, "liger_kernel is not installed (pip install liger-kernel)"
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    # Liger writes the gradients into its inputs' storage: give it private copies each call site.
    return lambda a, b: LigerSiLUMulFunction.apply(a, b), None


def _measure(
    kernel: str,
    impl: str,
    fn: Callable[..., torch.Tensor],
    inputs: tuple[torch.Tensor, ...],
    dy: torch.Tensor,
    ref: torch.Tensor,
    fwd_bytes: int,
    bwd_bytes: int,
    copy_gb_s: float,
    iters: int,
) -> KernelRow:
    """Time forward and forward+backward of `fn(*inputs)`; a failure becomes an "error" row, not a crash."""
    grads_of = tuple(t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad)
    try:
        out = fn(*inputs).detach()
        rel_err = float((out.double() - ref).norm() / ref.norm())
        del out
        fwd_ms = cuda_median_ms(lambda: fn(*inputs), iters=iters)
        fwdbwd_ms = cuda_median_ms(lambda: torch.autograd.grad(fn(*inputs), grads_of, dy), iters=iters)
    except (RuntimeError, ValueError, TypeError, AssertionError) as err:  # reported in the table, not hidden
        return KernelRow(kernel, impl, "error", reason=f"{type(err).__name__}: {str(err)[:200]}")
    fwd = gb_per_s(fwd_bytes, fwd_ms)
    fwdbwd = gb_per_s(fwd_bytes + bwd_bytes, fwdbwd_ms)
    return KernelRow(
        kernel, impl, "ok", fwd_ms=fwd_ms, fwdbwd_ms=fwdbwd_ms, fwd_gb_s=fwd, fwdbwd_gb_s=fwdbwd,
        fwd_pct_copy=100 * fwd / copy_gb_s, fwdbwd_pct_copy=100 * fwdbwd / copy_gb_s, rel_err=rel_err,
    )  # fmt: skip


def bench_rms_norm(cfg: KernelBenchConfig, copy_gb_s: float) -> list[KernelRow]:
    """RMSNorm rows: GhostVis Triton, eager Llama formula, F.rms_norm, torch.compile(eager), Liger."""
    from ghostvis_core.kernels.rms_norm_triton import rms_norm_triton

    M, H, dt, eps = cfg.rms_rows, cfg.rms_hidden, cfg.torch_dtype, cfg.eps
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, H, device="cuda", dtype=dt, generator=gen).requires_grad_()
    w = (1 + 0.1 * torch.randn(H, device="cuda", generator=gen)).to(dt).requires_grad_()
    dy = torch.randn(M, H, device="cuda", dtype=dt, generator=gen)
    ref = rms_norm_eager(x.detach().double(), w.detach().double(), eps)
    elem = x.element_size()
    fwd_bytes, bwd_bytes = 2 * M * H * elem, 3 * M * H * elem
    impls: dict[str, Callable | None] = {
        "ghostvis triton": lambda x, w: rms_norm_triton(x, w, eps),
        "eager": lambda x, w: rms_norm_eager(x, w, eps),
        "F.rms_norm": lambda x, w: F.rms_norm(x, (H,), w, eps),
    }
    if cfg.compile:
        compiled = torch.compile(rms_norm_eager, dynamic=False)
        impls["torch.compile"] = lambda x, w: compiled(x, w, eps)
    liger, liger_reason = _liger_rms_norm()
    rows = []
    for name, fn in impls.items():
        rows.append(
            _measure("rms_norm", name, fn, (x, w), dy, ref, fwd_bytes, bwd_bytes, copy_gb_s, cfg.iters)
        )
    if liger is None:
        rows.append(KernelRow("rms_norm", "liger", "absent", reason=liger_reason))
    else:
        rows.append(
            _measure("rms_norm", "liger", lambda x, w: liger(x, w, eps), (x, w), dy, ref, fwd_bytes, bwd_bytes,
                     copy_gb_s, cfg.iters)
        )  # fmt: skip
    del ref
    return rows


def bench_swiglu(cfg: KernelBenchConfig, copy_gb_s: float) -> list[KernelRow]:
    """SwiGLU rows: GhostVis Triton, eager, torch.compile(eager), Liger."""
    from ghostvis_core.kernels.swiglu_triton import swiglu_triton

    M, N, dt = cfg.swiglu_rows, cfg.swiglu_hidden, cfg.torch_dtype
    gen = torch.Generator(device="cuda").manual_seed(1)
    a = torch.randn(M, N, device="cuda", dtype=dt, generator=gen).requires_grad_()
    b = torch.randn(M, N, device="cuda", dtype=dt, generator=gen).requires_grad_()
    dy = torch.randn(M, N, device="cuda", dtype=dt, generator=gen)
    ref = swiglu_eager(a.detach().double(), b.detach().double())
    elem = a.element_size()
    fwd_bytes, bwd_bytes = 3 * M * N * elem, 5 * M * N * elem
    impls: dict[str, Callable] = {"ghostvis triton": swiglu_triton, "eager": swiglu_eager}
    if cfg.compile:
        impls["torch.compile"] = torch.compile(swiglu_eager, dynamic=False)
    rows = [
        _measure("swiglu", name, fn, (a, b), dy, ref, fwd_bytes, bwd_bytes, copy_gb_s, cfg.iters)
        for name, fn in impls.items()
    ]
    liger, liger_reason = _liger_swiglu()
    if liger is None:
        rows.append(KernelRow("swiglu", "liger", "absent", reason=liger_reason))
    else:
        a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        rows.append(
            _measure("swiglu", "liger", liger, (a2, b2), dy, ref, fwd_bytes, bwd_bytes, copy_gb_s, cfg.iters)
        )
    del ref
    return rows


def run_kernel_bench(cfg: KernelBenchConfig | None = None) -> dict:
    """Run the whole kernel benchmark on the current CUDA device; returns a JSON-ready dict."""
    cfg = cfg or KernelBenchConfig()
    device = require_cuda("`ghostvis bench kernels`")
    import triton

    copy = copy_bandwidth()
    rms_rows = bench_rms_norm(cfg, copy.gb_s)
    torch.cuda.empty_cache()
    swiglu_rows = bench_swiglu(cfg, copy.gb_s)
    torch.cuda.empty_cache()
    attention_rows: list[dict] = []
    if cfg.attention:
        from ghostvis_core.bench.attention_bench import run_attention_bench

        attention_rows = run_attention_bench()
    return {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "config": asdict(cfg),
        "copy": {"bytes": copy.num_bytes, "ms": copy.ms, "gb_s": copy.gb_s},
        "rms_norm": [asdict(r) for r in rms_rows],
        "swiglu": [asdict(r) for r in swiglu_rows],
        "attention": attention_rows,
    }
